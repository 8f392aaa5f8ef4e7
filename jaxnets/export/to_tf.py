"""TensorFlow SavedModel through ``jax.experimental.jax2tf``, and TFLite converted from that SavedModel.

The SavedModel holds the weights the function reads as ``tf.Variable``s (not GoogLeNet's aux heads) and the
function as ``XlaCallModule`` (serialized StableHLO, batch polymorphic), served as the ``serving_default``
signature: ``images`` in, one tensor per output name out.
Passing the weights as variables rather than closing over them keeps them out of the serialized module: for
AlexNet, saving takes 2 s instead of 14 and the TFLite conversion 11 s instead of 62.

TFLite: ``tf.lite.TFLiteConverter`` legalizes the StableHLO to TFLite's builtin operators (float32, the batch
dimension left dynamic: ``resize_tensor_input`` or the signature runner set it); optionally a second file with
dynamic-range int8 weights (``Optimize.DEFAULT`` without a representative dataset: weights stored as int8,
activations computed in float).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.extend import core

from jaxnets.export.extras import missing, require
from jaxnets.export.signature import BATCH, Signature

SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
TFLITE_INT8_FILE = "model.int8.tflite"
SIGNATURE = "serving_default"


def write_saved_model(fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature,
                      directory: Path) -> dict[str, Any]:
    """Write the SavedModel directory ``SAVED_MODEL_DIR`` into ``directory``."""
    tf = _tensorflow("saved_model")
    _save(tf, fn, params, signature, directory / SAVED_MODEL_DIR)
    return {"files": {"model": SAVED_MODEL_DIR}, "signature": SIGNATURE, "converter": f"jax2tf (jax {jax.__version__}),"
            f" tensorflow {tf.__version__}"}


def write_tflite(fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature, directory: Path, *,
                 int8: bool = False) -> dict[str, Any]:
    """Write ``TFLITE_FILE`` (float32) and, with ``int8``, ``TFLITE_INT8_FILE`` into ``directory``."""
    tf = _tensorflow("tflite")
    files = {"model": TFLITE_FILE}
    staging = Path(tempfile.mkdtemp(prefix=".saved_model.", dir=directory))
    try:
        _save(tf, fn, params, signature, staging)
        (directory / TFLITE_FILE).write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(staging)).convert())
        if int8:
            converter = tf.lite.TFLiteConverter.from_saved_model(str(staging))
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            (directory / TFLITE_INT8_FILE).write_bytes(converter.convert())
            files["int8"] = TFLITE_INT8_FILE
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": files, "signature": SIGNATURE, "converter": f"jax2tf (jax {jax.__version__}) + "
            f"tf.lite.TFLiteConverter (tensorflow {tf.__version__})"}


def _tensorflow(format: str) -> Any:
    """TensorFlow as jaxnets' input pipeline imports it (quiet, kept off the GPUs JAX uses), then jax2tf."""
    from jaxnets.data.lazy_tf import tf

    try:
        tf.__version__  # noqa: B018 (the first attribute imports TensorFlow)
    except ImportError as error:
        raise missing("tensorflow", format, error) from None
    require("jax.experimental.jax2tf", format)
    return tf


def _save(tf: Any, fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature, path: Path) -> None:
    from jax.experimental import jax2tf

    leaves, treedef = jax.tree.flatten(params)
    example = jax.ShapeDtypeStruct((1, *signature.input_shape), signature.input_dtype)
    used = _used_inputs(lambda weights, images: fn(jax.tree.unflatten(treedef, weights), images), leaves, example)
    kept = [leaf for leaf, read in zip(leaves, used, strict=False) if read]

    def forward(weights: list[Any], images: Any) -> Any:
        stored = iter(weights)  # the weights the graph reads; the others (never read) as zeros of their shape
        every = [next(stored) if read else np.zeros(np.shape(leaf), leaf.dtype)
                 for leaf, read in zip(leaves, used, strict=False)]
        return fn(jax.tree.unflatten(treedef, every), images)

    converted = jax2tf.convert(forward, polymorphic_shapes=[None, f"({BATCH}, ...)"], with_gradient=False)
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in kept]
    names = signature.output_names

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec((None, *signature.input_shape), signature.input_dtype, name=signature.input_name)])
    def serve(images):
        outputs = converted(module.weights, images)
        return dict(zip(names, [outputs] if signature.single_output else outputs, strict=True))

    tf.saved_model.save(module, str(path), signatures={SIGNATURE: serve.get_concrete_function()})


def _used_inputs(fn: Callable[..., Any], *args: Any) -> list[bool]:
    """For each leaf of ``args``, whether ``fn(*args)`` reads it: GoogLeNet's eval graph never reads its aux heads'
    weights, which the SavedModel's variables should not carry."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, core.Var)}
    read |= {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    return [v in read for v in jaxpr.invars]
