"""StableHLO: ``jax.export`` with a symbolic batch dimension, serialized, and on request the module as MLIR text.

``model.stablehlo`` is what ``jax.export.deserialize`` reads back in any JAX process (no jaxnets, no Flax): the
function for each of ``platforms`` (lowered here, whatever devices this machine has), weights embedded as
constants, once (the directory is about the weights' size). ``model.mlir`` (``mlir_text``, ``--mlir-text``) is the
StableHLO module of one platform (``platforms[0]``) as text, for other StableHLO consumers (IREE, XLA's own
tools); it holds the weights too, as hex (twice their size: ResNet-18's is 90 MB), which is why it is written only
when asked for (``exported.mlir_module()`` gives the same text from ``model.stablehlo``). It has the one custom
call jax adds to shape-polymorphic modules, ``shape_assertion`` (the batch is at least 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxnets.errors import UserError
from jaxnets.export.signature import BATCH, Signature

MODEL_FILE = "model.stablehlo"
TEXT_FILE = "model.mlir"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for, whatever devices this machine has
DEFAULT_PLATFORMS = PLATFORMS


def write(fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature, directory: Path, *,
          platforms: Sequence[str] = DEFAULT_PLATFORMS, mlir_text: bool = False) -> dict[str, Any]:
    """Write ``MODEL_FILE`` (and with ``mlir_text`` ``TEXT_FILE``) into ``directory``; what ``export.json``
    records of them."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise UserError(f"--platforms {','.join(platforms)}: choose one or more of {', '.join(PLATFORMS)}")
    batch, = jax.export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, *signature.input_shape), signature.input_dtype)
    forward = jax.jit(lambda images: fn(params, images))
    exported = jax.export.export(forward, platforms=tuple(platforms))(spec)
    (directory / MODEL_FILE).write_bytes(exported.serialize())
    files = {"model": MODEL_FILE}
    if mlir_text:
        single = exported if len(platforms) == 1 else jax.export.export(forward, platforms=(platforms[0],))(spec)
        (directory / TEXT_FILE).write_text(single.mlir_module(), encoding="utf-8")
        files["mlir_text"] = TEXT_FILE
    return {"files": files, "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version, "converter": f"jax {jax.__version__}"}
