"""ONNX through jax2onnx, which converts the jaxpr itself (no TensorFlow in between), with a dynamic batch.

Why jax2onnx: jax2tf only emits ``XlaCallModule`` (serialized StableHLO) since JAX 0.4.30, which tf2onnx cannot
read, so jax2tf + tf2onnx no longer converts anything; jax2onnx is maintained and maps each JAX primitive to ONNX
operators. The function is re-traced first (``graph.portable`` with pools: jax2onnx's own lowering of
``reduce_window_max`` is an ONNX MaxPool ONNX Runtime cannot run). Opset 18 by default and at least: the oldest
for which jax2onnx writes valid graphs of these models (it gives ReduceMean its axes as an input, opset 18's form;
at 17 ONNX Runtime refuses the graph); newer opsets are accepted and verified the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxnets.errors import UserError
from jaxnets.export.extras import require
from jaxnets.export.graph import portable
from jaxnets.export.signature import BATCH, Signature

MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 18
MIN_OPSET = 18
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
    model = jax2onnx.to_onnx(portable(lambda images: fn(params, images), pools=True), inputs=[spec],
                             model_name=model_name, opset=opset, input_names=[signature.input_name],
                             output_names=list(signature.output_names))
    files = {"model": MODEL_FILE}
    external = model.ByteSize() > _PROTOBUF_LIMIT
    if external:
        files["weights"] = MODEL_FILE + ".data"
    onnx.save_model(model, str(directory / MODEL_FILE), save_as_external_data=external,
                    location=files.get("weights"))
    return {"files": files, "opset": opset, "converter": f"jax2onnx {_version('jax2onnx')}"}


def _version(distribution: str) -> str:
    from importlib import metadata

    return metadata.version(distribution)
