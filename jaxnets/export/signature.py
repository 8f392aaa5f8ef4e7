"""What an exported function takes and gives: one batch of images in, named arrays out, the batch axis first
and of any size (the artifacts' one symbolic dimension)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxnets.errors import UserError

BATCH = "batch"  # the name of the symbolic batch dimension in every artifact
INPUT_NAME = "images"


@dataclass(frozen=True)
class Signature:
    """``input_shape``/``output_shapes`` are per example (without the batch axis)."""

    input_shape: tuple[int, ...]
    input_dtype: str
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    single_output: bool  # the function returns an array, not a list/tuple of them
    input_name: str = INPUT_NAME

    def describe(self) -> dict[str, Any]:
        """The input and outputs as ``export.json`` records them (the batch axis named ``BATCH``)."""
        return {"input": {"name": self.input_name, "shape": [BATCH, *self.input_shape], "dtype": self.input_dtype},
                "outputs": [{"name": name, "shape": [BATCH, *shape], "dtype": dtype} for name, shape, dtype
                            in zip(self.output_names, self.output_shapes, self.output_dtypes, strict=True)]}


def signature_of(fn: Callable[[Any, jax.Array], Any], params: Any, input_shape: Sequence[int], input_dtype: Any,
                 output_names: Sequence[str] | None = None) -> Signature:
    """The signature of ``fn(params, images)`` on a batch of ``input_shape`` examples, checked: an output that is
    not an array or a list/tuple of arrays, or one without the batch axis first, is a ``UserError``."""
    dtype = np.dtype(input_dtype).name
    batch, = jax.export.symbolic_shape(BATCH)
    out = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((batch, *input_shape), dtype))
    single = isinstance(out, jax.ShapeDtypeStruct)
    leaves = [out] if single else list(out) if isinstance(out, (list, tuple)) else None
    if not leaves or not all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        raise UserError(f"an exported function must return an array or a list/tuple of arrays, "
                        f"not {type(out).__name__}")
    for index, leaf in enumerate(leaves):
        if not leaf.shape or not _is(leaf.shape[0], batch) or any(not isinstance(d, int) for d in leaf.shape[1:]):
            given = ", ".join(map(str, (BATCH, *input_shape)))
            raise UserError(f"output {index} has shape {tuple(leaf.shape)} for input shape ({given}): every "
                            "output must keep the batch axis first, and only there")
    names = tuple(output_names) if output_names else (
        ("output",) if single else tuple(f"output_{i}" for i in range(len(leaves))))
    if len(names) != len(leaves) or len(set(names)) != len(names):
        raise UserError(f"output names {list(names)} do not name the function's {len(leaves)} output(s) once each")
    return Signature(tuple(int(d) for d in input_shape), dtype, names, tuple(tuple(leaf.shape[1:]) for leaf in leaves),
                     tuple(np.dtype(leaf.dtype).name for leaf in leaves), single)


def _is(dim: Any, batch: Any) -> bool:
    """Whether an output dimension is the symbolic batch (``==`` on a symbolic dimension and an int is False)."""
    return not isinstance(dim, int) and dim == batch
