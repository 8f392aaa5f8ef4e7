"""``jaxnets-benchmark --suite gpu``: the one-shot GPU check, one command and one markdown table.

    bash benchmarks/gpu.sh --output gpu.md           # on a GPU machine: under 8 minutes on one GPU
    jaxnets-benchmark --suite gpu --tiny             # the same code at toy sizes, on any CPU (the tests run it)

In one process (plus one child for the warm compilation cache), in this order, so that what matters most is
measured first if the time budget (``--budget-s``) runs out:

1. the headline: ResNet-50 bfloat16 training at batch 256, jaxnets' jitted train step (the one ``train.py``
   runs), its compile time with an empty persistent cache (cold), then the first step of a fresh process on
   that cache (warm); torchvision eager on the same batch (AMP bfloat16, channels_last, cudnn.benchmark);
2. the input pipeline of ``train.py`` (tf.data: JPEG decode, random-resized crop, flip, normalize) with all
   host cores, in images/s;
3. one model per family (AlexNet, VGG-16, GoogLeNet, ResNet-50), train and inference, in bfloat16 and float32,
   at batch 128, against torchvision eager;
4. the headline against ``torch.compile`` (when it works: its failure is a note, not an error);
5. the largest batch that fits: predicted from XLA's memory analysis of the headline step, then run (backing
   off when it does not fit). Last, since JAX's allocator keeps the memory it grew into.

MFU is the model's arithmetic (XLA's FLOP count of the step as written, before optimization: the same FLOPs
for torchvision's step) per second over the chip's published dense peak (``PEAK_TFLOPS``). float32 runs use
TF32 tensor cores, JAX's default precision on GPUs (and torch is given ``allow_tf32`` for the comparison), so
they are measured against the TF32 peak. On a chip not in the table, or a CPU, MFU is not given.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from jaxnets import errors, host, kernels
from jaxnets.benchmark import timing

PROG = "python -m jaxnets.benchmark --suite gpu"
FAMILY_MODELS = ("alexnet", "vgg16", "googlenet", "resnet50")
DTYPES = ("bfloat16", "float32")
# Dense (no sparsity) peaks from NVIDIA's datasheets, TFLOP/s: (bf16 tensor, tf32 tensor, fp32 non-tensor).
# Matched against the device kind in this order (the first pattern that matches).
PEAK_TFLOPS: tuple[tuple[str, str, tuple[float, float, float]], ...] = (
    (r"H100.*PCIe", "H100 PCIe", (756.5, 378.0, 51.2)),
    (r"GH200", "GH200", (989.4, 494.7, 66.9)),
    (r"H100", "H100 SXM", (989.4, 494.7, 66.9)),
    (r"H200", "H200 SXM", (989.4, 494.7, 66.9)),
    (r"A100", "A100", (312.0, 156.0, 19.5)),
    (r"L40S", "L40S", (362.05, 183.0, 91.6)),
    (r"\bL4\b", "L4", (121.0, 60.0, 30.3)),
    (r"\bA10\b", "A10", (125.0, 62.5, 31.2)),
)
GOAL = {"images_per_s": 4000, "ratio": 1.2}  # issue 19: ResNet-50 bf16 training on one H100/H200
# JAX on the GPU: allocate as needed (torch shares the device), and let the largest batch use most of it.
GPU_ENVIRONMENT = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}


def chip_peak(device_kind: str) -> tuple[str, tuple[float, float, float]] | None:
    """(chip name, peaks in TFLOP/s) for a JAX ``device_kind`` such as 'NVIDIA H100 80GB HBM3', or None."""
    for pattern, name, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_kind) and "NVL" not in device_kind:  # NVL parts run at other clocks
            return name, peaks
    return None


def peak_flops(peaks: tuple[float, float, float] | None, dtype: str) -> float | None:
    """FLOP/s the measurement in ``dtype`` is held against: bf16 tensor cores, or TF32 ones for float32."""
    if peaks is None:
        return None
    return 1e12 * (peaks[0] if dtype == "bfloat16" else peaks[1])


@dataclasses.dataclass
class Row:
    """One line of the table: a jaxnets measurement and torchvision's in the same run, or a note."""

    what: str
    dtype: str = "–"
    batch: int | None = None
    image_size: int | None = None
    images_per_s: float | None = None
    flops: float | None = None  # per step, XLA's count of the program as written
    compile_s: float | None = None
    torch_eager: float | None = None  # images/s
    torch_compiled: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def mfu(self, peaks: tuple[float, float, float] | None) -> float | None:
        peak = peak_flops(peaks, self.dtype)
        if not (peak and self.flops and self.images_per_s and self.batch):
            return None
        return self.flops * self.images_per_s / self.batch / peak

    @property
    def ratio(self) -> float | None:
        """jaxnets over the faster torchvision (eager or compiled): above 1, jaxnets is faster."""
        best = max((t for t in (self.torch_eager, self.torch_compiled) if t), default=None)
        return self.images_per_s / best if best and self.images_per_s else None


class Budget:
    """Seconds the run may take; what would start after them is skipped, and says so in the table."""

    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, row: Row, part: str = "", need: float = 0.0) -> bool:
        """Whether a measurement expected to take ``need`` seconds still fits; a note on ``row`` if not."""
        if self.seconds is None or self.elapsed() + need < self.seconds:
            return True
        row.notes.append(f"{part or 'skipped'}: over the time budget ({self.seconds:.0f} s)".lstrip())
        return False


# --- one measurement each -----------------------------------------------------------------------------------


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError"


def _free_device_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def time_jax(row: Row, name: str, mode: str, warmup: int, iters: int) -> Any:
    """jaxnets' step on ``row``'s batch: images/s, compile seconds and FLOPs into ``row``; the setup (for
    memory analysis), or None when the batch did not fit."""
    from jaxnets.benchmark import models
    from jaxnets.benchmark.timing import time_calls

    images, labels = models.synthetic_batch(row.batch, row.image_size)
    try:
        setup = models.setup_jax(name, mode, images, labels, models.DTYPES[row.dtype])
        times = time_calls(setup.call, warmup, iters)
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        row.notes.append("jaxnets: out of memory")
        _free_device_memory()
        return None
    row.images_per_s = row.batch / statistics.median(times)
    row.compile_s = setup.compile_s
    row.flops = setup.flops
    return setup


def time_torch(row: Row, name: str, mode: str, warmup: int, iters: int, compile: bool) -> float | None:
    """torchvision's images/s on the same batch (AMP in bfloat16, channels_last); None, with a note, when it
    does not fit or ``torch.compile`` fails. The compile, at the first call, is timed into the note."""
    from jaxnets.benchmark import models
    from jaxnets.benchmark.timing import num_threads, time_calls

    label = "torch.compile" if compile else "torch eager"
    if not _has_torch():
        row.notes.append(f"{label}: torch is not installed")
        return None
    images, labels = models.synthetic_batch(row.batch, row.image_size)
    try:
        step = models.setup_torch(name, mode, images, labels, row.dtype, num_threads(), channels_last=True,
                                  compile=compile)
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        times = time_calls(step, max(warmup - 1, 0), iters)
    except Exception as error:
        if not (compile or _is_out_of_memory(error)):
            raise
        row.notes.append(f"{label}: {'out of memory' if _is_out_of_memory(error) else 'failed'} "
                         f"({errors.one_line(error, 120)})")
        return None
    finally:
        step = None  # noqa: F841  the model and its buffers go before the next measurement
        _free_device_memory()
    if compile:
        row.notes.append(f"torch.compile: first call {first:.0f} s")
    return row.batch / statistics.median(times)


def largest_batch(step_bytes: int, state_bytes: int, batch: int, limit: int, multiple: int = 8) -> int | None:
    """The largest batch (a multiple of ``multiple``) whose step should fit in ``limit`` bytes, from XLA's
    memory analysis of one step at ``batch``: the state is fixed, the rest grows with the batch. A tenth of
    the limit is kept for what the analysis does not count (cuDNN workspaces, the runtime)."""
    per_image = (step_bytes - state_bytes) / batch
    if per_image <= 0:
        return None
    fit = int((0.9 * limit - state_bytes) / per_image) // multiple * multiple
    return fit if fit >= multiple else None


def tree_bytes(tree: Any) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


# --- the run ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    import jax

    from jaxnets.benchmark import models

    budget = Budget(args.budget_s)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    compile_torch = args.torch_compile == "on" or (args.torch_compile == "auto" and on_gpu)
    chip = chip_peak(device.device_kind) if on_gpu else None
    if "torch" in sys.modules or _has_torch():
        import torch

        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 as JAX computes it on GPUs (cuDNN's default too)
        torch.backends.cudnn.allow_tf32 = True
    context = {"date": time.strftime("%Y-%m-%d"), "device": models.device_description(),
               "device_kind": device.device_kind, "chip": chip[0] if chip else None,
               "peak_tflops": chip[1] if chip else None, "jax": jax.__version__, "torch": _torch_version(),
               "kernels": kernels.current().describe(), "environment": {k: os.environ.get(k) for k in GPU_ENVIRONMENT},
               "command": args.command, "budget_s": args.budget_s}
    rows: list[Row] = []
    size = lambda name: _image_size(name, args.image_size)

    # 1. The headline, with a fresh persistent cache: its compile is cold, a child's first step warm.
    headline = Row(f"{args.model} train (headline)", "bfloat16", args.batch_size, size(args.model))
    rows.append(headline)
    with tempfile.TemporaryDirectory(prefix="jaxnets-gpu-cache-") as cache:
        host.setup_compilation_cache(cache)
        setup = time_jax(headline, args.model, "train", args.warmup, args.iters)
        host.setup_compilation_cache("")  # the other compiles stay cold (and the cache deletable)
        state_bytes = tree_bytes(setup.state().arrays()) if setup else None
        step_bytes = models.step_memory(setup.compiled) if setup else None
        setup = None
        _free_device_memory()
        cache_row = Row(f"{args.model} train: compile, cold / warm persistent cache", "bfloat16", args.batch_size,
                        size(args.model))
        rows.append(cache_row)
        if headline.compile_s is not None and budget.allows(cache_row):
            warm = _warm_first_step(args.model, "train", headline, cache)
            cache_row.compile_s = headline.compile_s
            cache_row.notes.append(f"cold: compile {headline.compile_s:.1f} s; warm: compile "
                                   f"{warm['compile_s']:.1f} s, first step {warm['first_step_s']:.1f} s after "
                                   f"building the model, {warm['cache_hits']} executables from the cache, "
                                   f"process {warm['process_s']:.0f} s")
    if budget.allows(headline, "torch eager"):
        headline.torch_eager = time_torch(headline, args.model, "train", args.warmup, args.iters, compile=False)

    # 2. The input pipeline, on the host's cores.
    pipeline_row = Row("input pipeline: JPEG decode + crop + flip + normalize (train.py's tf.data)", "–",
                       args.pipeline_batch, args.pipeline_size)
    rows.append(pipeline_row)
    if budget.allows(pipeline_row):
        _input_pipeline(pipeline_row, args, headline.images_per_s)

    # 3. One model per family, train and inference, bfloat16 and float32.
    for dtype in args.dtypes:
        for name in args.models:
            for mode in ("train", "infer"):
                row = Row(f"{name} {mode}", dtype, args.family_batch_size, size(name))
                rows.append(row)
                if (name, mode, dtype, row.batch) == (args.model, "train", headline.dtype, headline.batch):
                    row.images_per_s, row.compile_s, row.flops, row.torch_eager = (  # measured already
                        headline.images_per_s, headline.compile_s, headline.flops, headline.torch_eager)
                    row.notes.append("as the headline")
                    continue
                if not budget.allows(row):
                    continue
                setup = time_jax(row, name, mode, args.warmup, args.iters)
                setup = None  # noqa: F841
                _free_device_memory()
                if budget.allows(row, "torch eager"):
                    row.torch_eager = time_torch(row, name, mode, args.warmup, args.iters, compile=False)

    # 4. torch.compile on the headline.
    if compile_torch and budget.allows(headline, "torch.compile", need=2 * (headline.compile_s or 0)):
        headline.torch_compiled = time_torch(headline, args.model, "train", args.warmup, args.iters, compile=True)
    elif not compile_torch:
        why = "--torch-compile off" if args.torch_compile == "off" else "on a CPU only with --torch-compile on"
        headline.notes.append(f"torch.compile: not run ({why})")

    # 5. The largest batch that fits, last: JAX's allocator keeps what it grows into.
    biggest = Row(f"{args.model} train, largest batch that fits", "bfloat16", None, size(args.model))
    rows.append(biggest)
    limit = (device.memory_stats() or {}).get("bytes_limit") if on_gpu else None
    if not limit or step_bytes is None:
        biggest.notes.append("not measured: no device memory limit" + ("" if on_gpu else " on a CPU"))
    else:
        _largest_batch(biggest, args, step_bytes, state_bytes, limit, budget, headline.compile_s or 0.0)
    context["elapsed_s"] = budget.elapsed()
    return rows, context


def _warm_first_step(name: str, mode: str, row: Row, cache: str) -> dict:
    """The first step of a fresh process on the persistent cache the headline's compile filled."""
    command = [sys.executable, "-m", "jaxnets.benchmark", "--first-step", "--model", name, "--mode", mode,
               "--batch-size", str(row.batch), "--image-size", str(row.image_size), "--dtype", row.dtype,
               "--cache-dir", cache, "--system-malloc", "--kernels", kernels.current().setting()]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"warm first-step run failed: {done.stderr.strip().splitlines()[-3:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def _input_pipeline(row: Row, args: argparse.Namespace, consumed: float | None) -> None:
    from jaxnets.benchmark import models

    try:
        import tensorflow  # noqa: F401  jaxnets.data's input pipeline is tf.data
    except ImportError:
        row.notes.append("not measured: TensorFlow is not installed")
        return
    pipe = models.input_pipeline_throughput(None, row.batch, row.image_size, epochs=args.pipeline_epochs,
                                            count=args.pipeline_images)
    row.images_per_s = pipe["images_per_s"]
    row.notes.append(f"{pipe['cores']} host cores, {pipe['images_per_s_per_core']:.0f} images/s per core "
                     f"({pipe['source']})")
    if consumed:
        bound = "data loading" if pipe["images_per_s"] < consumed else "compute"
        row.notes.append(f"the headline step consumes {consumed:.0f} images/s: {bound} bounds it on this host")


def _largest_batch(row: Row, args: argparse.Namespace, step_bytes: int, state_bytes: int, limit: int,
                   budget: Budget, compile_s: float) -> None:
    batch = largest_batch(step_bytes, state_bytes, args.batch_size, limit)
    row.notes.append(f"predicted {batch} from XLA's memory analysis at batch {args.batch_size} "
                     f"({step_bytes / 2**30:.1f} GiB of {limit / 2**30:.1f})")
    for _ in range(3):
        if batch is None or batch <= args.batch_size or not budget.allows(row, need=compile_s):
            return
        row.batch = batch
        setup = time_jax(row, args.model, "train", args.warmup, args.iters)
        if setup is not None:
            return
        setup = None  # noqa: F841
        row.images_per_s = None
        batch = int(batch * 0.85) // 8 * 8
        row.notes.append(f"backed off to {batch}")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_version() -> str | None:
    return sys.modules["torch"].__version__ if "torch" in sys.modules else None


def _image_size(name: str, image_size: int) -> int:
    """``image_size``, or the model's minimum where that is larger (AlexNet at tiny sizes)."""
    from jaxnets.registry import get_spec

    return max(image_size, *get_spec(name).weights.min_size)


# --- the report ---------------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: Sequence[Row], context: dict) -> str:
    """The one table, after a few lines saying where, when and against what."""
    peaks = context["peak_tflops"]
    peak_text = (f"{context['chip']}: {peaks[0]:g} bf16 / {peaks[1]:g} TF32 dense TFLOP/s (datasheet)" if peaks
                 else f"no published peak known for {context['device_kind']!r}: MFU not given")
    lines = [f"GPU check, {context['date']}, {context['device']} (jax {context['jax']}, torch {context['torch']}); "
             f"{peak_text}; {context['elapsed_s']:.0f} s.",
             f"Command: `{context['command']}`. jaxnets kernels: {context['kernels']}. torchvision: AMP with the "
             "dtype, channels_last, cudnn.benchmark, TF32 allowed.", "",
             "| measurement | dtype | batch | px | jaxnets img/s | MFU | torchvision eager img/s "
             "| torch.compile img/s | jaxnets / torchvision | jaxnets compile s | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = r.mfu(peaks)
        lines.append(f"| {r.what} | {r.dtype} | {_cell(r.batch, 'd')} | {_cell(r.image_size, 'd')} "
                     f"| {_cell(r.images_per_s, '.0f')} | {_cell(mfu, '.0%')} | {_cell(r.torch_eager, '.0f')} "
                     f"| {_cell(r.torch_compiled, '.0f')} | {_cell(r.ratio, '.2f')} | {_cell(r.compile_s, '.1f')} "
                     f"| {'; '.join(r.notes)} |")
    headline = rows[0]
    if context["chip"] and headline.images_per_s and headline.ratio:
        met = headline.images_per_s >= GOAL["images_per_s"] and headline.ratio >= GOAL["ratio"]
        lines += ["", f"Goal (one H100/H200): >= {GOAL['images_per_s']} images/s and >= {GOAL['ratio']}x "
                      f"torchvision: {headline.images_per_s:.0f} images/s, {headline.ratio:.2f}x: "
                      f"{'met' if met else 'not met'}."]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = errors.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes for a CPU (32 px, batch 2, one timed step, a few JPEGs): tests the script")
    parser.add_argument("--model", default="resnet50", help="the headline model (default: resnet50)")
    parser.add_argument("--batch-size", type=int, default=None, help="headline batch (default 256; --tiny 2)")
    parser.add_argument("--family-batch-size", type=int, default=None, help="default 128; --tiny 2")
    parser.add_argument("--models", default=",".join(FAMILY_MODELS), help="the per-family rows' models")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="the per-family rows' dtypes")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --tiny 32 (or the minimum)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; --tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps, median (default 10; --tiny 1)")
    parser.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                        help="time the headline with torch.compile too (auto: on a GPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip what would not end within this many seconds (default 400; --tiny: none)")
    timing.add_report_flags(parser)
    args = parser.parse_args(argv)
    tiny = args.tiny
    timing.fill_defaults(args, {"batch_size": (2, 256), "family_batch_size": (2, 128), "image_size": (32, 224),
                                "warmup": (1, 3), "iters": (1, 10), "budget_s": (None, 400.0)})
    args.pipeline_batch, args.pipeline_size = (4, 32) if tiny else (128, 224)
    args.pipeline_images, args.pipeline_epochs = (8, 1) if tiny else (2048, 2)
    from jaxnets.registry import list_models

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in [args.model, *args.models]:
        if name not in list_models():
            parser.error(f"--models/--model: unknown model {name!r}")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    timing.check_at_least(parser, args, {"batch_size": 1, "family_batch_size": 1, "image_size": 1, "iters": 1})
    return args


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """The GPU check; the exit status. Runs anywhere JAX runs (``--tiny`` on a CPU)."""
    return timing.run_suite(argv, prog, parse_args, _main)


def _main(args: argparse.Namespace) -> int:
    for key, value in GPU_ENVIRONMENT.items():  # before JAX starts its backend; children inherit them
        os.environ.setdefault(key, value)
    if _has_torch():
        import torchvision  # noqa: F401  before TensorFlow (the input pipeline): the other order segfaults
    if not args.system_malloc:
        host.retain_freed_memory()
    rows, context = run(args)
    timing.write_report(args, markdown(rows, context),
                        {"context": context, "rows": [dataclasses.asdict(r) for r in rows]})
    return 0
