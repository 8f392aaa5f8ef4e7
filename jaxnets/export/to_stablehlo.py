"""StableHLO: ``jax.export`` with a symbolic batch dimension, serialized, plus the module as MLIR text.

``model.stablehlo`` is what ``jax.export.deserialize`` reads back in any JAX process (no jaxnets, no Flax): the
function for each of ``platforms`` (lowered here, whatever devices this machine has), weights embedded as
constants. ``model.mlir`` is the StableHLO module of one platform (``platforms[0]``) as text, for other StableHLO
consumers (IREE, XLA's own tools); it holds the weights too (as hex, twice their size), and the one custom call
jax adds to shape-polymorphic modules, ``shape_assertion`` (the batch is at least 1).
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
          platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
    """Write ``MODEL_FILE`` and ``TEXT_FILE`` into ``directory``; what ``export.json`` records of them."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise UserError(f"--platforms {','.join(platforms)}: choose one or more of {', '.join(PLATFORMS)}")
    batch, = jax.export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, *signature.input_shape), signature.input_dtype)
    forward = jax.jit(lambda images: fn(params, images))
    exported = jax.export.export(forward, platforms=tuple(platforms))(spec)
    (directory / MODEL_FILE).write_bytes(exported.serialize())
    single = exported if len(platforms) == 1 else jax.export.export(forward, platforms=(platforms[0],))(spec)
    (directory / TEXT_FILE).write_text(single.mlir_module(), encoding="utf-8")
    return {"files": {"model": MODEL_FILE, "mlir_text": TEXT_FILE}, "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version, "converter": f"jax {jax.__version__}"}
