"""The eval graph re-traced in the primitives every converter handles, with the same numbers.

``jax.export`` serializes any jaxpr, but the converters to other formats each lack something the models' eval
graph holds, so a function is re-traced through a small interpreter over its jaxpr before ``onnx``, ``saved_model``
and ``tflite`` conversion (``portable``):

- Strided slices. Under a symbolic batch dimension, jnp's strided indexing (``x[:, ::2, ::2]``, the stride of a
  1x1 convolution, ``layers.pointwise_conv``) traces to a ``gather`` whose slice sizes hold the batch; TFLite's
  converter cannot legalize that dynamic gather, and ONNX gets a GatherND. A gather that picks a regular grid of
  whole slices is a strided slice and is re-emitted as ``lax.slice`` (constant index arithmetic is folded first,
  so that the grid can be read).
- Max pooling (with ``pools=True``, for ONNX). jaxnets pools as a row pass then a column pass
  (``layers.max_pool``; or in one 2-d window, by the kernel choice), each a ``reduce_window_max`` over the 4-d
  NHWC array. jax2onnx lowers any ``reduce_window_max`` to an N-d MaxPool over the whole array, which ONNX Runtime
  refuses ("Unsupported pooling size"). The two passes are fused back into one k x k pool (the maximum over a
  rectangle is the maximum of the row maxima) and emitted as an explicit -inf padding (``jnp.pad``) and
  ``flax.linen.max_pool`` with 'VALID' windows, which jax2onnx converts to ONNX's 2-d MaxPool.

Calls (``jit``, ``custom_jvp_call``, ...) are inlined: only the eval forward pass is exported, so the custom
derivative rules (max pooling's JVP, BatchNorm's VJP) have nothing to do there. Every other primitive is bound as
it was traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

# Primitives that only call a sub-jaxpr (names across JAX versions: 'pjit' became 'jit').
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "remat", "checkpoint")
_CALLED_JAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def portable(fn: Callable[..., Any], *, pools: bool = False) -> Callable[..., Any]:
    """``fn`` re-traced at call time (with the caller's shapes, symbolic or not) with the rewrites above.

    The result is the same function: the same outputs to the last bit for the slices, and for the pools the same
    maximum over the same windows."""

    def traced(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        interpreter = _Interpreter(pools)
        outs = interpreter.run(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), [interpreter.value(x) for x in outs])

    return traced


def used_inputs(fn: Callable[..., Any], *args: Any) -> list[bool]:
    """For each leaf of ``args``, whether ``fn(*args)`` reads it: GoogLeNet's eval graph never reads its aux heads'
    weights, which an artifact storing the weights apart from the graph (a SavedModel's variables) should not
    carry."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, core.Var)}
    read |= {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    return [v in read for v in jaxpr.invars]


@dataclass(frozen=True)
class _PendingPool:
    """A max pool not yet emitted: ``source`` padded by ``pads`` (-inf), max over ``window`` every ``strides``."""

    source: Any
    window: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


class _Interpreter:
    def __init__(self, pools: bool):
        self.pools = pools
        self.emitted: dict[int, tuple[_PendingPool, Any]] = {}  # a pool read twice (ResNet's shortcut) is one pool

    def run(self, jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[core.Var, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))

        def read(var: Any) -> Any:
            return var.val if isinstance(var, core.Literal) else env[var]

        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            env.update((v, x) for v, x in zip(eqn.outvars, outs, strict=True) if not isinstance(v, core.DropVar))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: core.JaxprEqn, args: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        called = next((eqn.params[k] for k in _CALLED_JAXPR if k in eqn.params), None)
        if name in _CALLS and called is not None:
            if isinstance(called, core.ClosedJaxpr):
                return self.run(called.jaxpr, called.consts, args)
            return self.run(called, [], args)
        if name == "reduce_window_max" and self.pools and (pool := _spatial_pool(eqn)) is not None:
            x = args[0]
            if isinstance(x, _PendingPool) and not _pooled_axes(x) & _pooled_axes(pool):
                return [_fused(x, pool)]
            return [dataclasses.replace(pool, source=self.value(x))]
        args = [self.value(x) for x in args]
        if name == "gather":
            sliced = _gather_as_slice(eqn, *args)
            if sliced is not None:
                return [sliced]
        bind = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = bind if isinstance(bind, tuple) else ((), bind)  # JAX < 0.9: (subfuns, params)
        if _is_index_arithmetic(eqn, args):
            with jax.ensure_compile_time_eval():  # concrete in, concrete out, even inside the converter's trace
                outs = eqn.primitive.bind(*subfuns, *args, **params)
        else:
            outs = eqn.primitive.bind(*subfuns, *args, **params)
        return list(outs) if eqn.primitive.multiple_results else [outs]

    def value(self, x: Any) -> Any:
        """An array for ``x``, emitting a pending pool (once)."""
        if not isinstance(x, _PendingPool):
            return x
        if id(x) not in self.emitted:
            self.emitted[id(x)] = (x, self._emit(x))
        return self.emitted[id(x)][1]

    @staticmethod
    def _emit(x: _PendingPool) -> Any:
        from flax import linen  # the pooling jax2onnx converts to a 2-d MaxPool

        # jnp.pad, not lax.pad: jax2onnx converts jnp.pad's calls with a symbolic batch, and lax.pad's not
        padded = jnp.pad(x.source, x.pads, constant_values=-np.inf)
        # NHWC: the windows are on H and W
        return linen.max_pool(padded, window_shape=x.window[1:3], strides=x.strides[1:3], padding="VALID")


def _spatial_pool(eqn: core.JaxprEqn) -> _PendingPool | None:
    """A ``reduce_window_max`` over the spatial axes of NHWC as a pending pool of a placeholder source; None for
    any other (left as traced)."""
    p = eqn.params
    window, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    pads = tuple(tuple(pair) for pair in p["padding"])
    if len(window) != 4 or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        return None
    pool = _PendingPool(None, window, strides, pads)
    return pool if _pooled_axes(pool) <= {1, 2} else None


def _pooled_axes(pool: _PendingPool) -> set[int]:
    return {axis for axis in range(4) if (pool.window[axis], pool.strides[axis], pool.pads[axis]) != (1, 1, (0, 0))}


def _fused(inner: _PendingPool, outer: _PendingPool) -> _PendingPool:
    """One pool doing ``inner`` then ``outer``, which pool other axes: a max over rectangles."""
    take = [axis in _pooled_axes(outer) for axis in range(4)]
    window, strides, pads = (tuple(b if t else a for a, b, t in zip(first, second, take, strict=True))
                             for first, second in ((inner.window, outer.window), (inner.strides, outer.strides),
                                                   (inner.pads, outer.pads)))
    return _PendingPool(inner.source, window, strides, pads)


def _is_index_arithmetic(eqn: core.JaxprEqn, args: Sequence[Any]) -> bool:
    """Integer results computed from constants only (the indices of a gather): folded to constants."""
    return (not eqn.effects and not any(isinstance(x, jax.core.Tracer) for x in args)
            and all(np.issubdtype(v.aval.dtype, np.integer) for v in eqn.outvars))


def _gather_as_slice(eqn: core.JaxprEqn, operand: Any, indices: Any) -> Any | None:
    """``lax.slice`` equal to a ``gather`` of whole slices on a regular grid of constant indices, keeping the
    operand's axis order; None for any other gather."""
    if isinstance(indices, jax.core.Tracer):
        return None
    dims, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    axes = tuple(dims.start_index_map)
    index = np.asarray(indices)
    rank = len(operand.shape)
    if (dims.operand_batching_dims or dims.start_indices_batching_dims or tuple(dims.collapsed_slice_dims) != axes
            or list(axes) != sorted(axes) or index.shape[-1:] != (len(axes),) or index.ndim != len(axes) + 1):
        return None
    kept = [d for d in range(rank) if d not in axes]
    grid_positions = [i for i in range(rank) if i not in dims.offset_dims]
    source_of_output = dict(zip(dims.offset_dims, kept, strict=True)) | dict(zip(grid_positions, axes, strict=True))
    if [source_of_output[i] for i in range(rank)] != list(range(rank)):
        return None
    if any(sizes[d] != 1 for d in axes) or any(sizes[d] != operand.shape[d] for d in kept):
        return None
    starts, limits, steps = [0] * rank, list(operand.shape), [1] * rank
    for k, axis in enumerate(axes):
        column, count = index[..., k], index.shape[k]
        start = int(column.flat[0])
        step = int(np.take(column, 1, axis=k).flat[0]) - start if count > 1 else 1
        expected = (start + step * np.arange(count)).reshape([-1 if i == k else 1 for i in range(len(axes))])
        size = operand.shape[axis]
        if (step < 1 or start < 0 or not isinstance(size, int) or start + step * (count - 1) >= size
                or not np.array_equal(column, np.broadcast_to(expected, column.shape))):
            return None
        starts[axis], limits[axis], steps[axis] = start, start + step * (count - 1) + 1, step
    return lax.slice(operand, starts, limits, steps)
