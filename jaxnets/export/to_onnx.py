"""ONNX through jax2onnx, which converts the jaxpr itself (no TensorFlow in between), with a dynamic batch.

Why jax2onnx: jax2tf only emits ``XlaCallModule`` (serialized StableHLO) since JAX 0.4.30, which tf2onnx cannot
read, so jax2tf + tf2onnx no longer converts anything; jax2onnx is maintained and maps each JAX primitive to ONNX
operators. One needs help: jax2onnx lowers a ``reduce_window_max`` to an N-d MaxPool over the whole 4-d array,
which ONNX Runtime refuses ("Unsupported pooling size"), but converts ``flax.linen.max_pool`` with 'VALID' windows
to ONNX's 2-d MaxPool; so the function is re-traced with each max pool over NHWC's H and W (``layers.max_pool``,
XLA's formulation: the exporter traces no other) re-emitted as an explicit -inf padding and that pool
(``_with_onnx_pools``). Opset 18 by default and at least: the oldest for which jax2onnx writes valid graphs of these
models (it gives ReduceMean its axes as an input, opset 18's form; at 17 ONNX Runtime refuses the graph); newer
opsets are accepted and verified the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from jaxnets.errors import UserError
from jaxnets.export.extras import require
from jaxnets.export.signature import BATCH, Signature

MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 18
MIN_OPSET = 18
SERIALIZER_LOGGER = "onnx_ir.serde"  # its warnings about untyped shape constants: see _quiet
_PROTOBUF_LIMIT = 2**31 - 1  # above it, ONNX stores the weights in a file of their own (external data)


def write(fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature, directory: Path, *,
          opset: int = DEFAULT_OPSET, model_name: str = "jaxnets") -> dict[str, Any]:
    """Write ``MODEL_FILE`` (and ``model.onnx.data`` for weights beyond 2 GB) into ``directory``."""
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: the ONNX export needs opset {MIN_OPSET} or newer (jax2onnx writes "
                        "ReduceMean in its opset-18 form)")
    jax2onnx = require("jax2onnx", "onnx")
    onnx = require("onnx", "onnx")
    batch, = jax.export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, *signature.input_shape), signature.input_dtype)
    with _quiet(SERIALIZER_LOGGER):
        model = jax2onnx.to_onnx(_with_onnx_pools(lambda images: fn(params, images)), inputs=[spec],
                                 model_name=model_name, opset=opset, input_names=[signature.input_name],
                                 output_names=list(signature.output_names))
        files = {"model": MODEL_FILE}
        external = model.ByteSize() > _PROTOBUF_LIMIT
        if external:
            files["weights"] = MODEL_FILE + ".data"
        onnx.save_model(model, str(directory / MODEL_FILE), save_as_external_data=external,
                        location=files.get("weights"))
    return {"files": files, "opset": opset, "converter": f"jax2onnx {_version('jax2onnx')}"}


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger ``name`` at ERROR within the block, as it was after. onnx_ir's serializer warns "The value type
    for shape [1] is not known ... Skipping serialization" for each shape constant that jax2onnx (0.17) leaves
    without a type in the graph's ``value_info``: an optional annotation left out, the graph unchanged (and then
    verified against jaxnets) -- nothing for a user to do."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _version(distribution: str) -> str:
    from importlib import metadata

    return metadata.version(distribution)


# Primitives that only call a sub-jaxpr (names across JAX versions: 'pjit' became 'jit'): inlined, so that the pools
# inside are re-emitted too (only the forward pass is exported: custom derivative rules have nothing to do there).
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_CALLED_JAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _with_onnx_pools(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` re-traced at call time (with the converter's symbolic shapes) with every max pool over the spatial
    axes of NHWC as ``jnp.pad`` (-inf) and ``flax.linen.max_pool`` ('VALID'): the same maximum over the same
    windows, every other primitive bound as it was traced."""

    def traced(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _run(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return traced


def _run(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[core.Var, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var: Any) -> Any:
        return var.val if isinstance(var, core.Literal) else env[var]

    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        called = next((eqn.params[k] for k in _CALLED_JAXPR if k in eqn.params), None)
        if eqn.primitive.name in _CALLS and called is not None:
            closed = called if isinstance(called, core.ClosedJaxpr) else core.ClosedJaxpr(called, [])
            outs = _run(closed.jaxpr, closed.consts, values)
        elif eqn.primitive.name == "reduce_window_max" and _is_spatial_pool(eqn.params):
            outs = [_max_pool(values[0], eqn.params)]
        else:
            bind = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bind if isinstance(bind, tuple) else ((), bind)  # JAX < 0.9: (subfuns, params)
            result = eqn.primitive.bind(*subfuns, *values, **params)
            outs = list(result) if eqn.primitive.multiple_results else [result]
        env.update((v, x) for v, x in zip(eqn.outvars, outs, strict=True) if not isinstance(v, core.DropVar))
    return [read(v) for v in jaxpr.outvars]


def _is_spatial_pool(params: Mapping[str, Any]) -> bool:
    """A window over the H and W axes of a 4-d (NHWC) array only, without dilation."""
    spatial = all((params["window_dimensions"][a], params["window_strides"][a], tuple(params["padding"][a]))
                  == (1, 1, (0, 0)) for a in (0, 3))
    return (len(params["window_dimensions"]) == 4 and spatial
            and all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"])))


def _max_pool(x: Any, params: Mapping[str, Any]) -> Any:
    from flax import linen  # the pooling jax2onnx converts to a 2-d MaxPool

    # jnp.pad, not lax.pad: jax2onnx converts jnp.pad's calls with a symbolic batch, and lax.pad's not
    padded = jnp.pad(x, [tuple(pair) for pair in params["padding"]], constant_values=-np.inf)
    return linen.max_pool(padded, window_shape=tuple(params["window_dimensions"][1:3]),
                          strides=tuple(params["window_strides"][1:3]), padding="VALID")
