"""``jaxnets-benchmark --suite nnx``: a model as an NNX module (``jaxnets.nnx``) against the same Linen model,
forward and train step, timed side by side in one process.

    jaxnets-benchmark --suite nnx --models resnet18,resnet50 --batch-size 16     # 224 px
    jaxnets-benchmark --suite nnx --tiny                                          # seconds: the tests run it

Per model and mode, three programs of the same computation from the same variables, timed in turns
(``time_interleaved``: a machine whose load changes slows all three alike):

- **Linen**: jaxnets' own, ``jax.jit`` of ``model.apply(train=False)``, and of a train step (cross-entropy, GoogLeNet
  with its auxiliary loss, SGD with momentum 0.9, BatchNorm statistics updated; state donated), compiled with the
  options jaxnets' steps get on this machine (``jaxnets.host.xla_cpu_options``);
- **NNX**: the ``jaxnets.nnx.Model`` as the README's loop runs it: ``nnx.jit`` of ``model(x)`` in eval mode, and of
  ``nnx.value_and_grad`` + ``nnx.Optimizer(model, tx, wrt=nnx.Param).update`` (model and optimizer donated).
  ``nnx.jit`` takes no XLA compile options;
- **NNX, split**: the same NNX step through NNX's functional API (``nnx.split``, ``jax.jit`` with jaxnets' compile
  options, ``nnx.merge``): the NNX wrapper's own cost, with the compilation equal to Linen's.

The ratios are NNX's speed over Linen's, the median over rounds of each round's ratio (``kernel_choice.round_ratios``);
the goal is >= 0.98.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from jaxnets import errors, host
from jaxnets.benchmark import timing
from jaxnets.benchmark.kernel_choice import round_ratios

PROG = "python -m jaxnets.benchmark --suite nnx"
MODES = ("infer", "train")
VARIANTS = ("linen", "nnx", "nnx_split")
GOAL = 0.98  # NNX images/s over Linen's (issue 30)
LEARNING_RATE = 0.01


@dataclasses.dataclass
class Row:
    """One model and mode: each variant's seconds per call, round by round (the variants take turns in a round),
    and its first call (compile + one call)."""

    model: str
    mode: str
    batch: int
    image_size: int
    times: dict[str, list[float]]
    first_call_s: dict[str, float]

    def images_per_s(self, variant: str) -> float:
        return self.batch / statistics.median(self.times[variant])

    def ratio(self, variant: str) -> float:
        """The median over rounds of ``variant``'s speed over Linen's in the round (above 1: faster than Linen): a
        machine whose load changes slows the calls of a round alike."""
        return statistics.median(round_ratios(self.times, variant, "linen"))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **{f"{v}_images_per_s": self.images_per_s(v) for v in VARIANTS},
                "nnx_over_linen": self.ratio("nnx"), "nnx_split_over_linen": self.ratio("nnx_split")}


def _loss(out: Any, labels: Any) -> Any:
    """Cross-entropy, GoogLeNet's with its auxiliary heads as ``train.py`` weighs them."""
    from jaxnets.losses import cross_entropy
    from jaxnets.models import GoogLeNetOutputs
    from jaxnets.models.googlenet import AUX_WEIGHT

    if isinstance(out, GoogLeNetOutputs):
        return (cross_entropy(out.logits, labels).mean()
                + AUX_WEIGHT * sum(cross_entropy(aux, labels).mean() for aux in (out.aux_logits1, out.aux_logits2)))
    return cross_entropy(out, labels).mean()


def _first_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def setup(model: Any, mode: str, images: Any, labels: Any) -> dict[str, Callable[[], Any]]:
    """Per variant, a call that runs one step of ``mode`` and blocks, each from its own copy of ``model``'s state."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxnets import nnx as jaxnets_nnx

    def copy(model: Any) -> Any:  # with its own arrays: the train steps donate what they are given
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))

    linen, variables = jaxnets_nnx.to_linen(copy(model))
    model = copy(model)
    options = host.xla_cpu_options()
    tx = optax.sgd(LEARNING_RATE, momentum=0.9)
    if mode == "infer":
        model.eval()
        linen_forward = jax.jit(partial(linen.apply, train=False), compiler_options=options)
        nnx_forward = nnx.jit(lambda model, images: model(images))
        graphdef, state = nnx.split(model)
        split_forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images), compiler_options=options)
        return {"linen": lambda: jax.block_until_ready(linen_forward(variables, images)),
                "nnx": lambda: jax.block_until_ready(nnx_forward(model, images)),
                "nnx_split": lambda: jax.block_until_ready(split_forward(state, images))}

    def linen_step(state, images, labels, key):
        params, stats, opt_state = state

        def loss_fn(params):
            out, updates = linen.apply({"params": params, **stats}, images, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": key})
            return _loss(out, labels), updates

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    def nnx_step(model, optimizer, images, labels):
        loss, grads = nnx.value_and_grad(lambda model: _loss(model(images), labels))(model)
        optimizer.update(model, grads)
        return loss

    linen_jit = jax.jit(linen_step, donate_argnums=0, compiler_options=options)
    stats = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}
    linen_state = [(variables["params"], stats, tx.init(variables["params"]))]
    key = jax.random.key(1)  # one dropout key for every step: drawing keys is not what is timed

    def run_linen():
        linen_state[0], loss = linen_jit(linen_state[0], images, labels, key)
        return jax.block_until_ready(loss)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx_jit = nnx.jit(nnx_step, donate_argnames=("model", "optimizer"))
    split_model = copy(model)
    graphdef, split_state = nnx.split((split_model, nnx.Optimizer(split_model, tx, wrt=nnx.Param)))

    def split_step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        loss = nnx_step(model, optimizer, images, labels)
        return nnx.state((model, optimizer)), loss

    split_jit = jax.jit(split_step, donate_argnums=0, compiler_options=options)
    holder = [split_state]

    def run_split():
        holder[0], loss = split_jit(holder[0], images, labels)
        return jax.block_until_ready(loss)

    return {"linen": run_linen, "nnx": lambda: jax.block_until_ready(nnx_jit(model, optimizer, images, labels)),
            "nnx_split": run_split}


def benchmark(model: Any, mode: str, batch: int, image_size: int, warmup: int, iters: int) -> Row:
    """One model (a ``jaxnets.nnx.Model``) and mode: the three variants' first calls, then ``warmup`` and ``iters``
    timed rounds, each variant called once per round."""
    import jax.numpy as jnp

    from jaxnets.benchmark.models import synthetic_batch
    from jaxnets.benchmark.timing import time_interleaved

    images, labels = synthetic_batch(batch, image_size)
    calls = setup(model, mode, jnp.asarray(images), jnp.asarray(labels.astype("int32")))
    first = {variant: _first_call(call) for variant, call in calls.items()}
    times = time_interleaved(list(calls.values()), warmup, iters)
    return Row(model.model_name, mode, batch, image_size, dict(zip(calls, times, strict=True)), first)


def markdown(rows: Sequence[Row], context: dict) -> str:
    lines = [f"Measured {context['date']} on {context['device']} (jax {context['jax']}, flax {context['flax']}).",
             f"Command: `{context['command']}`", "",
             "| model | mode | batch | px | Linen img/s | NNX img/s | NNX / Linen | NNX split img/s | split / Linen "
             "| first call s (Linen / NNX / split) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = " / ".join(f"{r.first_call_s[v]:.1f}" for v in VARIANTS)
        lines.append(f"| {r.model} | {r.mode} | {r.batch} | {r.image_size} | {r.images_per_s('linen'):.1f} "
                     f"| {r.images_per_s('nnx'):.1f} | {r.ratio('nnx'):.3f} | {r.images_per_s('nnx_split'):.1f} "
                     f"| {r.ratio('nnx_split'):.3f} | {first} |")
    lines += ["", f"Goal: NNX >= {GOAL}x Linen. NNX: `nnx.jit`, which takes no XLA compile options; Linen and NNX "
                  f"split compile with jaxnets' ({context['compiler_options'] or 'none on this machine'}). "
                  f"XLA_FLAGS: {context['xla_flags'] or 'not set'}."]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = errors.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes (resnet18, 32 px, batch 2, one timed call): tests the script in seconds")
    parser.add_argument("--models", default=None, help="comma-separated models (default resnet18,resnet50; "
                                                       "--tiny resnet18)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16; --tiny 2")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --tiny 32")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first calls (default 2; "
                                                                 "--tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds, every variant once in each (default 10; "
                                                                "--tiny 1)")
    timing.add_report_flags(parser)
    args = parser.parse_args(argv)
    timing.fill_defaults(args, {"models": ("resnet18", "resnet18,resnet50"), "batch_size": (2, 16),
                                "image_size": (32, 224), "warmup": (1, 2), "iters": (1, 10)})
    from jaxnets.config import check_image_size
    from jaxnets.registry import list_models

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in args.models:
        if name not in list_models():
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(list_models())}")
        try:
            check_image_size(name, args.image_size)
        except errors.UserError as error:
            parser.error(str(error))
    if not args.models:
        parser.error("--models: no model given")
    if not args.modes or any(mode not in MODES for mode in args.modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    timing.check_at_least(parser, args, {"batch_size": 1, "image_size": 1, "iters": 1, "warmup": 0})
    return args


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """The NNX-against-Linen benchmark; the exit status."""
    return timing.run_suite(argv, prog, parse_args, _main)


def _main(args: argparse.Namespace) -> int:
    import flax
    import jax
    from flax import nnx

    from jaxnets import nnx as jaxnets_nnx
    from jaxnets.benchmark.models import device_description

    if not args.system_malloc:
        host.retain_freed_memory()
    rows = []
    for name in args.models:
        model = jaxnets_nnx.create_model(name, rngs=nnx.Rngs(0))  # initialized once: every variant starts from it
        for mode in args.modes:
            rows.append(benchmark(model, mode, args.batch_size, args.image_size, args.warmup, args.iters))
            print(f"{name} {mode}: NNX / Linen {rows[-1].ratio('nnx'):.3f}, split / Linen "
                  f"{rows[-1].ratio('nnx_split'):.3f}", flush=True)
    context = {"date": time.strftime("%Y-%m-%d"), "device": device_description(), "jax": jax.__version__,
               "flax": flax.__version__, "command": args.command, "compiler_options": host.xla_cpu_options(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(flush=True)
    timing.write_report(args, markdown(rows, context), {"context": context, "rows": [r.as_dict() for r in rows]})
    return 0
