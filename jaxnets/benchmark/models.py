"""``python -m jaxnets.benchmark``: jaxnets against torchvision's eager models, timed in one run.

Speed claims are only worth something side by side on the same machine, so every number here
comes with its torchvision counterpart measured by the same process (same batch, same values,
same threads, same dtype), and with how close the step comes to the hardware: FLOPs from XLA's
cost analysis against a large matmul timed in the same run.

    python -m jaxnets.benchmark --model resnet50 --batch-size 16 --mode both --compare-torch
    python -m jaxnets.benchmark --all --compare-torch --output benchmark.md
    python -m jaxnets.benchmark --model vgg16 --conv-layers    # where: each convolution alone
    python -m jaxnets.benchmark --model resnet50 --batch-size 64 --mode train --remat   # gradient checkpointing

What is timed is ``jaxnets.train_step``'s jitted, state-donating train step (SGD, momentum 0.9; with
``probe`` the backbone frozen as ``--freeze backbone`` does) or the jitted eval forward, after
warm-up (median of ``--iters`` calls, each ending in ``jax.block_until_ready``), against torch's
``train()`` step (forward, cross-entropy, backward, SGD with momentum) and ``eval()`` +
``inference_mode`` forward. The steps take turns, so a machine whose load changes during the run
slows both alike and the ratio holds. ``--remat`` times, in the same way, the train step of the model built
with and without gradient checkpointing (``create_model(name, remat=True)``, the step compiled as
``train.py --remat`` compiles it) and reports XLA's memory of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import errors, host, kernels, parallel, train_step, transfer
from jaxnets.benchmark import conv_timing
from jaxnets.benchmark.timing import num_threads, time_interleaved, torchvision_model
from jaxnets.config import check_image_size
from jaxnets.errors import UserError
from jaxnets.models.backbone import REMAT_POLICY, remat_compiler_options
from jaxnets.models.googlenet import AUX_WEIGHT
from jaxnets.registry import create_model, get_spec, list_models

# What error lines start with and the report's command line names when no entry point says otherwise
# (``jaxnets.cli.benchmark`` passes the command the user ran).
PROG = "python -m jaxnets.benchmark"

MODES = ("train", "infer", "probe")
MODE_CHOICES = {"train": ("train",), "infer": ("infer",), "probe": ("probe",),
                "both": ("train", "infer"), "all": MODES}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# XLA flags the benchmark sets before JAX starts its backend. None, on measurement: on XLA:CPU
# (jax 0.10) --xla_cpu_use_onednn, --xla_cpu_use_xnnpack, --xla_cpu_enable_fast_math and
# --xla_cpu_use_fusion_emitters=false left a ResNet-50 training step's CPU time within 5% (noise).
# What does help, convolutions off YNNPACK, is a per-step compile option: jaxnets.host.xla_cpu_options.
CPU_XLA_FLAGS: tuple[str, ...] = ()


# --- environment ------------------------------------------------------------------------


def configure_xla_flags(flags: Sequence[str] = CPU_XLA_FLAGS) -> None:
    """Append ``flags`` to ``XLA_FLAGS``; only effective before JAX initializes its backend."""
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in flags if f.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def device_description() -> str:
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind} ({device.platform})"
    import platform
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {num_threads()} cores"


def kernel_context() -> dict[str, str]:
    """What a report says about the CPU and which of jaxnets' kernel variants ran (``jaxnets.kernels``)."""
    context = {"kernels": kernels.current().describe()}
    if jax.default_backend() == "cpu":
        context["cpu_vector_extensions"] = kernels.vector_extensions()
    return context


def kernel_line(context: dict) -> str:
    line = f"jaxnets kernels: {context['kernels']}."
    if "cpu_vector_extensions" in context:
        line = f"CPU vector extensions: {context['cpu_vector_extensions']}. " + line
    return line


# --- yardsticks ------------------------------------------------------------------------------


def matmul_probe(dtype: Any = jnp.float32, size: int | None = None) -> tuple[Callable[[], Any], float]:
    """A large square matmul and its FLOPs: what this device does on dense math, the yardstick of
    the fraction of peak. Timed alongside the steps, it sees the same machine load they do."""
    size = size or (8192 if jax.default_backend() != "cpu" else 2048)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), dtype)
    b = jax.random.normal(kb, (size, size), dtype)
    # Written into the donated previous result: no fresh buffer (and its page faults) per call.
    matmul = jax.jit(lambda a, b, previous: jnp.matmul(a, b), donate_argnums=2)
    result = [jnp.zeros((size, size), dtype)]

    def call() -> jax.Array:
        result[0] = matmul(a, b, result[0]).block_until_ready()
        return result[0]
    return call, 2.0 * size**3


def peak_memory() -> tuple[int, str]:
    """Peak bytes in use: the device allocator's count where it keeps one (GPU), else the process max RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process max RSS"


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs per call from XLA's cost analysis of a compiled or a lowered program (a dict, or a list of one
    dict in older JAX); None where the backend does not count them."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# --- jaxnets steps: the training library's own ---------------------------------------------


def synthetic_batch(batch_size: int, image_size: int, num_classes: int = 1000, seed: int = 0):
    """The same images and labels for both frameworks (numpy NHWC float32, int64 labels)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    return images, rng.integers(0, num_classes, batch_size)


class JaxSetup(NamedTuple):
    """A ready-to-time step: ``call()`` runs one step, blocks, and returns its output (the loss when
    training); ``state()`` is the current variables or ``TrainState``; ``compiled`` is for cost analysis."""

    call: Callable[[], Any]
    state: Callable[[], Any]
    compiled: Any
    compile_s: float
    flops: float | None = None  # per call, XLA's count of the program as written (before optimization)


def setup_jax(name: str, mode: str, images: np.ndarray, labels: np.ndarray, dtype: Any,
              learning_rate: float = 0.01, *, remat: bool = False, remat_options: bool = True) -> JaxSetup:
    """The model, its variables and the jitted step for ``mode``, compiled (and the compile timed).

    Training is ``jaxnets.train_step``'s step (data-parallel over all devices, state donated) with SGD
    and momentum 0.9; ``probe`` freezes the backbone with ``jaxnets.transfer``, as ``--freeze backbone``.
    ``remat``: the model built with gradient checkpointing, its step compiled as ``train.py --remat`` does
    (with ``remat_compiler_options``; without them when not ``remat_options``).
    """
    model = create_model(name, dtype=dtype, **({"remat": True} if remat else {}))
    mesh = parallel.make_mesh()
    variables = train_step.init_variables(model, images.shape[1], 0, mesh)
    batch = parallel.to_global({"image": images, "label": labels.astype(np.int32)}, mesh)
    if mode == "infer":
        step = jax.jit(kernels.bind(partial(model.apply, train=False)), compiler_options=host.xla_cpu_options())
        start = time.perf_counter()
        lowered = step.lower(variables, batch["image"])
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        return JaxSetup(lambda: jax.block_until_ready(compiled(variables, batch["image"])), lambda: variables,
                        compiled, compile_s, compiled_flops(lowered))

    sgd = optax.sgd(learning_rate, momentum=0.9)
    if mode == "probe":
        mask = transfer.trainable_mask(name, variables["params"], "backbone")
        state = train_step.create_train_state(model, variables, transfer.build_optimizer(sgd, mask), mesh, seed=1,
                                            frozen_norm=transfer.frozen_modules(name, mask), trainable_mask=mask)
    else:
        state = train_step.create_train_state(model, variables, sgd, mesh, seed=1)
    step = train_step.make_train_step(mesh, aux_weight=AUX_WEIGHT, remat=remat and remat_options)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    holder = [state]  # the step donates the state it is given: keep only the newest

    def call() -> jax.Array:
        holder[0], metrics = compiled(holder[0], batch)
        return jax.block_until_ready(metrics["loss"])
    return JaxSetup(call, lambda: holder[0], compiled, compile_s, compiled_flops(lowered))


# --- torchvision steps -----------------------------------------------------------------------


def setup_torch(name: str, mode: str, images: np.ndarray, labels: np.ndarray, dtype: str,
                threads: int, *, channels_last: bool = False, compile: bool = False) -> Callable[[], None]:
    """torchvision's eager model on the same values: ``train()`` + SGD step, or ``eval()`` + inference_mode;
    with ``channels_last`` in NHWC memory layout, with ``compile`` through ``torch.compile`` (compiled at the
    first call)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision_model(name).to(device, memory_format=memory_format)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device, memory_format=memory_format)
    y = torch.from_numpy(labels).to(device)
    # Same semantics as jaxnets' dtype: float32 parameters, bfloat16 compute.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if mode == "infer":
        model.eval()
        forward = torch.compile(model) if compile else model

        def infer():
            with torch.inference_mode(), autocast:
                forward(x)
            sync()
        return infer

    model.train()
    if mode == "probe":
        _freeze_torch_backbone(model, get_spec(name).head)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile else model

    def loss_fn(outputs):
        if isinstance(outputs, tuple):  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
            main, aux2, aux1 = outputs
            return loss_fn(main) + AUX_WEIGHT * (loss_fn(aux1) + loss_fn(aux2))
        return torch.nn.functional.cross_entropy(outputs.float(), y)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(forward(x))
        loss.backward()
        optimizer.step()
        sync()
    return train


def _freeze_torch_backbone(model: Any, head: Sequence[str]) -> None:
    """torch's linear probe: no gradients outside the head, backbone BatchNorms in eval mode."""
    import torch

    prefixes = tuple(h.replace("/", ".") for h in head)

    def in_head(module_name: str) -> bool:
        return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)

    for param_name, param in model.named_parameters():
        param.requires_grad_(in_head(param_name.rsplit(".", 1)[0]))
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not in_head(module_name):
            module.eval()


# --- one model ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One model and mode: the jaxnets step, and torchvision's where compared (timed interleaved)."""

    model: str
    mode: str
    batch_size: int
    image_size: int
    dtype: str
    step_s: float
    compile_s: float
    flops: float | None = None
    step_memory_bytes: int | None = None
    torch_step_s: float | None = None
    peak_flops: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.step_s

    @property
    def torch_images_per_s(self) -> float | None:
        return self.batch_size / self.torch_step_s if self.torch_step_s else None

    @property
    def ratio(self) -> float | None:
        """jaxnets images/s over torchvision images/s: above 1 means jaxnets is faster."""
        return self.torch_step_s / self.step_s if self.torch_step_s else None

    @property
    def achieved_flops(self) -> float | None:
        return self.flops / self.step_s if self.flops else None

    @property
    def peak_fraction(self) -> float | None:
        achieved = self.achieved_flops
        return achieved / self.peak_flops if achieved and self.peak_flops else None

    @property
    def torch_peak_fraction(self) -> float | None:
        """torchvision's step against the same peak, counting the same FLOPs (the same model and batch):
        how much room the hardware leaves a faster library. A ratio of r needs r times this fraction."""
        if not (self.flops and self.torch_step_s and self.peak_flops):
            return None
        return self.flops / self.torch_step_s / self.peak_flops

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("images_per_s", "torch_images_per_s", "ratio", "achieved_flops", "peak_fraction",
                    "torch_peak_fraction"):
            data[key] = getattr(self, key)
        return data


def _memory_analysis(compiled: Any) -> Any:
    """XLA's memory analysis of a compiled program, None where the backend has none."""
    try:
        return compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None


def step_memory(compiled: Any) -> int | None:
    """Bytes XLA allocates for one step: arguments, outputs and temporaries (donated buffers counted once)."""
    stats = _memory_analysis(compiled)
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def temp_memory(compiled: Any) -> int | None:
    """Bytes of a step's temporaries alone: where the activations kept for the backward pass live."""
    stats = _memory_analysis(compiled)
    return None if stats is None else int(stats.temp_size_in_bytes)


def benchmark_model(name: str, mode: str, batch_size: int, image_size: int, dtype: str = "float32",
                    iters: int = 10, warmup: int = 2, compare_torch: bool = False,
                    peak_size: int | None = None) -> Result:
    """Time ``mode`` ('train', 'infer' or 'probe') for jaxnets, for torchvision when compared, and a
    ``peak_size`` square matmul (the peak), taking turns in one process."""
    if mode not in MODES:
        raise UserError(f"--mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    images, labels = synthetic_batch(batch_size, image_size)
    setup = setup_jax(name, mode, images, labels, DTYPES[dtype])
    matmul, matmul_flops = matmul_probe(DTYPES[dtype], peak_size)
    steps = [setup.call, matmul]
    if compare_torch:
        steps.append(setup_torch(name, mode, images, labels, dtype, num_threads()))
    step_times, matmul_times, *torch_times = time_interleaved(steps, warmup, iters)
    # Steps: the median. The peak: the fastest matmul, what the machine can do (one slowed by a
    # neighbour's burst would inflate the fraction of peak).
    return Result(name, mode, batch_size, image_size, dtype, statistics.median(step_times), setup.compile_s,
                  compiled_flops(setup.compiled), step_memory(setup.compiled),
                  statistics.median(torch_times[0]) if torch_times else None, matmul_flops / min(matmul_times))


# --- gradient checkpointing: the train step with and without remat -------------------------------


@dataclasses.dataclass
class RematResult:
    """One model's train step without (``plain_*``) and with gradient checkpointing (``remat_*``), timed
    interleaved; memory is XLA's analysis of each compiled step (``step_memory``, ``temp_memory``)."""

    model: str
    batch_size: int
    image_size: int
    dtype: str
    plain_step_s: float
    remat_step_s: float
    plain_step_bytes: int | None
    remat_step_bytes: int | None
    plain_temp_bytes: int | None
    remat_temp_bytes: int | None
    plain_compile_s: float
    remat_compile_s: float

    @property
    def time_ratio(self) -> float:
        return self.remat_step_s / self.plain_step_s

    @property
    def memory_ratio(self) -> float | None:
        return _ratio(self.remat_step_bytes, self.plain_step_bytes)

    @property
    def temp_ratio(self) -> float | None:
        return _ratio(self.remat_temp_bytes, self.plain_temp_bytes)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **{key: getattr(self, key)
                                               for key in ("time_ratio", "memory_ratio", "temp_ratio")}}


def _ratio(remat: int | None, plain: int | None) -> float | None:
    return remat / plain if remat and plain else None


def benchmark_remat(name: str, batch_size: int, image_size: int, dtype: str = "float32", iters: int = 10,
                    warmup: int = 2, remat_options: bool = True) -> RematResult:
    """``name``'s train step built without and with ``remat`` (both compiled first, then taking turns)."""
    images, labels = synthetic_batch(batch_size, image_size)
    plain, remat = (setup_jax(name, "train", images, labels, DTYPES[dtype], remat=on, remat_options=remat_options)
                    for on in (False, True))
    plain_times, remat_times = time_interleaved([plain.call, remat.call], warmup, iters)
    return RematResult(name, batch_size, image_size, dtype, statistics.median(plain_times),
                       statistics.median(remat_times), step_memory(plain.compiled), step_memory(remat.compiled),
                       temp_memory(plain.compiled), temp_memory(remat.compiled), plain.compile_s, remat.compile_s)


def remat_table(results: Sequence[RematResult]) -> str:
    """Per model, a row without and one with remat, then their ratios (remat / plain)."""
    header = "| model | train step | batch | size | dtype | XLA step MiB | temporaries MiB | step ms | compile s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        setting = f"| {r.model} | {{}} | {r.batch_size} | {r.image_size} | {r.dtype} "
        for label, step, temp, seconds, compile_s in (
                ("without remat", r.plain_step_bytes, r.plain_temp_bytes, r.plain_step_s, r.plain_compile_s),
                ("with remat", r.remat_step_bytes, r.remat_temp_bytes, r.remat_step_s, r.remat_compile_s)):
            lines.append(setting.format(label) + f"| {_fmt(step, '.0f', 2**20)} | {_fmt(temp, '.0f', 2**20)} "
                                                 f"| {seconds * 1e3:.0f} | {compile_s:.1f} |")
        lines.append(setting.format("ratio remat/plain") + f"| {_fmt(r.memory_ratio, '.2f')} "
                                                           f"| {_fmt(r.temp_ratio, '.2f')} | {r.time_ratio:.2f} | |")
    return "\n".join(lines)


def remat_report(results: Sequence[RematResult], context: dict) -> str:
    """The markdown report of ``--remat``: where, how the remat step was built and compiled, the table."""
    options = ", ".join(f"{key}={value}" for key, value in context["remat_compiler_options"].items()) or "no options"
    return "\n".join([f"Measured {context['date']} on {context['device']} (jax {jax.__version__}).",
                      f"Command: `{context['command']}`", "",
                      f"Gradient checkpointing: jax.checkpoint policy {context['remat_policy']}, the remat step "
                      f"compiled with {options}. Memory: XLA's memory analysis of each compiled step (arguments + "
                      "outputs + temporaries - donated buffers; temporaries hold the activations kept for the "
                      "backward pass). Step time: median, the two steps taking turns.", kernel_line(context), "",
                      remat_table(results)])


# --- compile cache: time to first step in a fresh process --------------------------------------


def first_step(name: str, mode: str, batch_size: int, image_size: int, dtype: str = "float32") -> dict:
    """Seconds from building the model to the start (``ready_s``: variables, state and compiled step
    ready) and to the end of its first step, and how many executables came from the persistent cache
    (``cache_hits``) or were compiled (``cache_misses``)."""
    counts = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}

    def count(event: str, **_: Any) -> None:
        if event in counts:
            counts[event] += 1
    jax.monitoring.register_event_listener(count)
    try:
        images, labels = synthetic_batch(batch_size, image_size)
        start = time.perf_counter()
        setup = setup_jax(name, mode, images, labels, DTYPES[dtype])
        ready = time.perf_counter() - start
        setup.call()
        elapsed = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_listener(count)
    return {"ready_s": ready, "first_step_s": elapsed, "compile_s": setup.compile_s,
            "cache_hits": counts["/jax/compilation_cache/cache_hits"],
            "cache_misses": counts["/jax/compilation_cache/cache_misses"]}


def compile_cache_times(name: str, mode: str, batch_size: int, image_size: int, dtype: str = "float32",
                        cache_dir: str | os.PathLike | None = None) -> dict:
    """Run the same first step in two fresh processes sharing a compilation cache: cold, then warm.

    Returns ``{'cold': {...}, 'warm': {...}}``, each with ``first_step_s``, ``compile_s`` and
    ``process_s`` (the whole process, Python and JAX start-up included). The children build their steps under
    this process's kernel choice (``--kernels``).
    """
    with tempfile.TemporaryDirectory(prefix="jaxnets-cache-") as fresh:
        cache = os.fspath(cache_dir or fresh)
        command = [sys.executable, "-m", "jaxnets.benchmark", "--first-step", "--model", name, "--mode", mode,
                   "--batch-size", str(batch_size), "--image-size", str(image_size), "--dtype", dtype,
                   "--cache-dir", cache, "--kernels", kernels.current().setting()]
        times = {}
        for run in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"first-step run failed: {done.stderr.strip().splitlines()[-1:]}")
            times[run] = {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}
    return times


# --- input pipeline ----------------------------------------------------------------------------


def write_image_folder(directory: str | os.PathLike, count: int = 256, size: int = 224, seed: int = 0,
                       classes: int = 2) -> Path:
    """An image folder as ``train.py --dataset`` reads it (``train/<class>/*.jpg``, ``val/<class>/*.jpg``):
    ``count`` smooth random JPEGs of ``size`` px in train/ (noise would decode unrealistically slowly)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(directory)
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def input_pipeline_throughput(data_dir: str | os.PathLike | None = None, batch_size: int = 32,
                              image_size: int = 224, epochs: int = 2, count: int = 256) -> dict:
    """Images/s that ``train.py``'s own input pipeline (``jaxnets.data``: decode, random-resized crop,
    flip, normalize, in parallel) delivers as numpy batches on this host, and per core, over ``epochs``
    epochs after a warm-up epoch. ``data_dir`` is an image folder as ``--dataset`` takes it; without one,
    ``count`` generated JPEGs."""
    from jaxnets.data import DataConfig, load_dataset

    with tempfile.TemporaryDirectory(prefix="jaxnets-jpegs-") as tmp:
        root = data_dir or write_image_folder(tmp, count=count, size=image_size)
        dataset = load_dataset(DataConfig(dataset=os.fspath(root), image_size=image_size, batch_size=batch_size))
        if dataset.steps_per_epoch < 1:
            raise UserError(f"--data-dir: {root} has {len(dataset.train)} training images, fewer than a batch "
                             f"of {batch_size}")
        for _ in dataset.train_batches(epoch=0):
            pass
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            for _ in dataset.train_batches(epoch):
                pass
        images_per_s = epochs * dataset.steps_per_epoch * batch_size / (time.perf_counter() - start)
        source = os.fspath(data_dir) if data_dir else f"{len(dataset.train)} generated {image_size}px JPEGs"
    cores = num_threads()
    return {"images_per_s": images_per_s, "images_per_s_per_core": images_per_s / cores, "cores": cores,
            "source": source}


# --- report ------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def markdown_table(results: Sequence[Result]) -> str:
    """One row per model and mode: jaxnets and torchvision images/s, their ratio, and the roofline."""
    header = ("| model | mode | batch | size | dtype | jaxnets img/s | torchvision img/s | jaxnets/torch "
              "| step ms | compile s | GFLOP/step | GFLOP/s | % of peak | torch % of peak | XLA MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r.model} | {r.mode} | {r.batch_size} | {r.image_size} | {r.dtype} | {r.images_per_s:.1f} "
            f"| {_fmt(r.torch_images_per_s, '.1f')} | {_fmt(r.ratio, '.2f')} | {r.step_s * 1e3:.0f} "
            f"| {r.compile_s:.1f} | {_fmt(r.flops, '.1f', 1e9)} | {_fmt(r.achieved_flops, '.0f', 1e9)} "
            f"| {_fmt(r.peak_fraction, '.0%', 1.0)} | {_fmt(r.torch_peak_fraction, '.0%', 1.0)} "
            f"| {_fmt(r.step_memory_bytes, '.0f', 2**20)} |")
    return "\n".join(lines)


def report(results: Sequence[Result], context: dict) -> str:
    """The markdown report: where and how it was measured, the table, then the run-level numbers."""
    lines = [f"Measured {context['date']} on {context['device']} (jax {jax.__version__}"
             + (f", torch {context['torch']}" if context.get("torch") else "") + ").",
             f"Command: `{context['command']}`", "",
             f"Peak {context['dtype']} matmul (fastest, timed between the steps): "
             f"{context['peak_flops'] / 1e9:.0f} GFLOP/s. "
             f"Peak memory: {context['memory_bytes'] / 2**20:.0f} MiB ({context['memory_source']}). "
             f"Host allocator, for both libraries: {context['allocator']}.", kernel_line(context), "",
             markdown_table(results)]
    if "compile_cache" in context:
        cold, warm = context["compile_cache"]["cold"], context["compile_cache"]["warm"]
        lines += ["", f"Persistent compilation cache ({context['model']} {context['cache_mode']}): the first step "
                  f"starts {cold['ready_s']:.1f} s after building the model cold (compile {cold['compile_s']:.1f} s), "
                  f"{warm['ready_s']:.1f} s warm (compile {warm['compile_s']:.1f} s, "
                  f"{warm['cache_hits']} of {cold['cache_misses']} executables from the cache); "
                  f"whole process {cold['process_s']:.1f} s / {warm['process_s']:.1f} s."]
    if "input_pipeline" in context:
        pipe = context["input_pipeline"]
        lines += ["", f"Input pipeline of train.py ({pipe['source']}, decode + random-resized crop + flip + "
                  "normalize): "
                  f"{pipe['images_per_s']:.0f} images/s, {pipe['images_per_s_per_core']:.0f} per core "
                  f"({pipe['cores']} cores)."]
        train = [r for r in results if r.mode == "train"]
        if train:
            slowest_needed = max(r.images_per_s for r in train)
            bound = "data loading" if pipe["images_per_s"] < slowest_needed else "compute"
            lines.append(f"Fastest training step consumes {slowest_needed:.0f} images/s: {bound} bounds training.")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """The flags, every one checked here, so that a mistake is argparse's one line (exit status 1) before
    minutes of timing, never after."""
    parser = errors.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="model name (see jaxnets.list_models())")
    parser.add_argument("--all", action="store_true", help="every registered model; writes --output")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mode", choices=tuple(MODE_CHOICES), default=None,
                        help="train: SGD step; infer: eval forward; probe: frozen-backbone (linear-probe) step; "
                             "both: train + infer (the default); all: train + infer + probe")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype")
    parser.add_argument("--compare-torch", action="store_true", help="time torchvision's eager model too")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="persistent compilation cache (default: the training library's, under ~/.cache/jaxnets)")
    parser.add_argument("--skip-cache-check", action="store_true",
                        help="do not time the first step in two fresh processes (cold / warm cache)")
    parser.add_argument("--skip-input-pipeline", action="store_true", help="do not time the JPEG input pipeline")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="image folder (class subfolders, as train.py --dataset takes) for the input-pipeline "
                             "timing (default: generated JPEGs)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the markdown report here (--all: default benchmark.md)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--system-malloc", action="store_true",
                        help="run on the system's malloc as it is (default: both libraries run on tcmalloc where the "
                             "system has it, jaxnets.host.use_tcmalloc, else on glibc's with jaxnets.host."
                             "retain_freed_memory, which spares XLA:CPU and torch the page faults of fresh buffers)")
    parser.add_argument("--conv-layers", action="store_true",
                        help="instead of whole steps, time each convolution of the model alone, forward and "
                             "backward, in jaxnets and torch (jaxnets.benchmark.conv_timing)")
    parser.add_argument("--remat", action="store_true",
                        help="instead, the train step with and without gradient checkpointing (create_model(..., "
                             "remat=True)), timed in turns: XLA step memory, temporaries and step time, and their "
                             "ratios remat/plain (implies --mode train; no torchvision, cache or input-pipeline "
                             "timing)")
    parser.add_argument("--keep-cpu-cse", action="store_true",
                        help="with --remat: compile the remat step without jaxnets.models.backbone."
                             "remat_compiler_options (XLA:CPU then merges the recomputation back and saves nothing)")
    parser.add_argument("--kernels", default=None, metavar="auto|xla|tuned|V1,V2",
                        help="which formulation of jaxnets' tuned layers and compile options runs (jaxnets.kernels: "
                             f"{', '.join(kernels.VARIANTS)}; default: ${kernels.ENV_VARIABLE}, else auto)")
    parser.add_argument("--first-step", action="store_true", help=argparse.SUPPRESS)  # child of the cache check
    args = parser.parse_args(argv)
    if args.kernels is not None:
        try:
            kernels.parse_setting(args.kernels, "--kernels")
        except UserError as error:
            parser.error(str(error))
    for flag in ("batch_size", "image_size", "iters"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    _check_remat_flags(parser, args)
    args.mode = args.mode or ("train" if args.remat else "both")
    if args.model not in list_models():
        parser.error(f"--model: unknown model {args.model!r}; choose from {', '.join(list_models())}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir: {args.data_dir} is not a directory")
    if args.all and args.output is None:
        args.output = Path("benchmark.md")
    for name in list_models() if args.all else [args.model]:
        _check_image_size(parser, name, args.image_size)
    for flag, path in (("--output", args.output), ("--json", args.json)):
        if path is not None and (problem := _unwritable(path)):
            parser.error(f"{flag}: {path} {problem}")
    return args


def _check_remat_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--remat`` measures jaxnets' train step only: flags that ask for anything else with it are errors."""
    if args.keep_cpu_cse and not args.remat:
        parser.error("--keep-cpu-cse applies to --remat only")
    if not args.remat:
        return
    if args.mode not in (None, "train"):
        parser.error(f"--remat compares train steps: --mode {args.mode} cannot go with it (use --mode train)")
    for flag in ("compare_torch", "conv_layers"):
        if getattr(args, flag):
            parser.error(f"--remat cannot go with --{flag.replace('_', '-')}")


def _check_image_size(parser: argparse.ArgumentParser, name: str, image_size: int) -> None:
    """The model's minimum input size, checked as train.py checks it: torchvision's layers fail below it
    too, so this holds for ``--conv-layers`` as well."""
    try:
        check_image_size(name, image_size)
    except UserError as error:
        parser.error(str(error))


def _unwritable(path: Path) -> str | None:
    """Why the report cannot be written to ``path`` (None when it can): checked before the timing, which
    it would otherwise throw away. The folder must exist; the benchmark creates none."""
    if path.is_dir():
        return "is a directory; give a file name"
    parent = path.parent
    if not parent.is_dir():
        return f"cannot be written: folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "cannot be written: permission denied"
    return None


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run the benchmark; the exit status. ``prog`` is the command as the user ran it: it starts error lines
    and the report's ``Command:`` line. A user error or an ``OSError`` met while timing is one line and
    status 1; anything else is a bug and keeps its traceback (``jaxnets.errors.run_cli``)."""
    args = parse_args(argv, prog)
    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
    return errors.run_cli(prog, lambda: _run(args, command, prog))


def _run(args: argparse.Namespace, command: str, prog: str) -> int:
    configure_xla_flags()  # before anything below starts JAX's backend
    if args.kernels is None:  # the process default: JAXNETS_KERNELS, else auto
        return _run_under_kernels(args, command, prog)
    with kernels.using(args.kernels, source="--kernels"):  # every step below is built under it
        return _run_under_kernels(args, command, prog)


def _run_under_kernels(args: argparse.Namespace, command: str, prog: str) -> int:
    # Both libraries run under the same allocator settings: the comparison stays fair either way.
    retained = not args.system_malloc and host.retain_freed_memory()
    host.setup_compilation_cache(os.fspath(args.cache_dir) if args.cache_dir else None)
    if args.first_step:
        mode = MODE_CHOICES[args.mode][0]
        print(json.dumps(first_step(args.model, mode, args.batch_size, args.image_size, args.dtype)))
        return 0

    models = list_models() if args.all else [args.model]
    if args.conv_layers:
        return _conv_layers(models, args, prog)
    if args.remat:
        return _remat(models, args, command, prog)
    if args.compare_torch:
        import torchvision  # noqa: F401  before TensorFlow (the input pipeline): the other order segfaults
    pipeline = None
    if not args.skip_input_pipeline:  # first: a folder it cannot read fails before minutes of model timing
        pipeline = input_pipeline_throughput(args.data_dir, args.batch_size)
    modes = MODE_CHOICES[args.mode]
    results = []
    for name in models:
        for mode in modes:
            result = benchmark_model(name, mode, args.batch_size, args.image_size, args.dtype, args.iters,
                                     args.warmup, args.compare_torch)
            print(markdown_table([result]).splitlines()[-1], flush=True)
            results.append(result)
    # One yardstick for the run, its fastest matmul: a probe slowed by the other library's memory traffic
    # must not make a step look faster than the hardware.
    peak_flops = max(r.peak_flops for r in results)
    results = [dataclasses.replace(r, peak_flops=peak_flops) for r in results]
    memory_bytes, memory_source = peak_memory()
    context = {"date": time.strftime("%Y-%m-%d"), "device": device_description(), "dtype": args.dtype,
               "command": command, "peak_flops": peak_flops,
               "memory_bytes": memory_bytes, "memory_source": memory_source,
               "model": args.model, "cache_mode": modes[0], "retain_freed_memory": retained,
               "allocator": host.allocator_description(retained), **kernel_context()}
    if args.compare_torch:
        import torch
        context["torch"] = torch.__version__
    if not args.skip_cache_check:
        context["compile_cache"] = compile_cache_times(args.model, modes[0], args.batch_size, args.image_size,
                                                       args.dtype)
    if pipeline is not None:
        context["input_pipeline"] = pipeline
    text = report(results, context)
    print("\n" + text)
    data = json.dumps({"context": context, "results": [r.as_dict() for r in results]}, indent=2)
    written = [_write(prog, "--output", args.output, text + "\n"), _write(prog, "--json", args.json, data)]
    return 0 if all(written) else 1


def _write(prog: str, flag: str, path: Path | None, text: str) -> bool:
    """Write ``text`` to ``path`` (if given); a failure (checked up front, so rare: a full disk) is one
    line on stderr, and the report already printed, and the other file, stay the run's result."""
    if path is None:
        return True
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        print(f"{prog}: error: {flag}: cannot write {path}: {error.strerror or error}", file=sys.stderr)
        return False
    return True


def _conv_layers(models: Sequence[str], args: argparse.Namespace, prog: str) -> int:
    tables = [kernel_line(kernel_context())]
    print(tables[0] + "\n", flush=True)
    for name in models:
        timings = conv_timing.time_conv_layers(name, args.batch_size, args.image_size, args.warmup, args.iters)
        tables.append(conv_timing.conv_table(name, timings))
        print(tables[-1] + "\n", flush=True)
    return 0 if _write(prog, "--output", args.output, "\n\n".join(tables) + "\n") else 1


def _remat(models: Sequence[str], args: argparse.Namespace, command: str, prog: str) -> int:
    results = []
    for name in models:
        results.append(benchmark_remat(name, args.batch_size, args.image_size, args.dtype, args.iters, args.warmup,
                                       remat_options=not args.keep_cpu_cse))
        print("\n".join(remat_table(results[-1:]).splitlines()[2:]), flush=True)
    context = {"date": time.strftime("%Y-%m-%d"), "device": device_description(), "dtype": args.dtype,
               "command": command, "remat_policy": getattr(REMAT_POLICY, "__name__", str(REMAT_POLICY)),
               "remat_compiler_options": remat_compiler_options(not args.keep_cpu_cse), **kernel_context()}
    text = remat_report(results, context)
    print("\n" + text)
    data = json.dumps({"context": context, "results": [r.as_dict() for r in results]}, indent=2)
    written = [_write(prog, "--output", args.output, text + "\n"), _write(prog, "--json", args.json, data)]
    return 0 if all(written) else 1
