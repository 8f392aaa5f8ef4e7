"""The tuned formulations of ``jaxnets.kernels``: the same numbers as XLA's own, written for speed on XLA:CPU.

``jaxnets.layers`` decides at trace time which formulation a layer runs (``kernels.uses``) and calls these for the
tuned ones: ``pointwise_conv`` (``matmul_1x1``), ``small_map_conv`` (``small_map_matmul``), ``batch_norm_train``
(``batchnorm_vjp``) and ``separable_max_pool`` (``maxpool_jvp``). The BatchNorm formula both BatchNorm
formulations share (``batch_statistics``, ``normalize``, ``batch_norm_train_formula``) lives here too, next to the
hand-written gradient that must match it. The fifth variant, ``eigen_conv``, is a compile option
(``host.xla_cpu_options``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any

# --- convolutions -------------------------------------------------------------------


# Output maps at most this many pixels high and wide go through ``small_map_conv`` (``kernels`` variant
# ``small_map_matmul``): XLA:CPU's convolution of a 1x1 or 2x2 map is 7-40x slower than the same products as one
# matrix multiplication, from a 3x3 map on it is as fast or faster (docs/performance.md).
SMALL_MAP = 2


def small_map_conv(x: Array, kernel: Array, stride: tuple[int, int], pad: tuple[int, int]) -> Array:
    """A convolution with a tiny output map (ResNet's last stages on 16-64 px inputs) as one matrix product of
    its patches (im2col) and the kernel: the tuned variant ``small_map_matmul`` of ``jaxnets.kernels``.

    Kernel taps that read only padding for every output pixel are left out (their products are zeros): a 3x3
    convolution of a 1x1 map is its centre tap alone. The same sums as the convolution, in another order."""
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    out_h, out_w = ((h + 2 * pad[0] - kh) // stride[0] + 1, (w + 2 * pad[1] - kw) // stride[1] + 1)

    def reads_the_image(tap: int, axis: int, size: int, out: int) -> bool:
        return any(pad[axis] <= tap + stride[axis] * o < pad[axis] + size for o in range(out))

    padded = jnp.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    patches, taps = [], []
    for i in (i for i in range(kh) if reads_the_image(i, 0, h, out_h)):
        for j in (j for j in range(kw) if reads_the_image(j, 1, w, out_w)):
            end = (n, i + stride[0] * (out_h - 1) + 1, j + stride[1] * (out_w - 1) + 1, c)
            patches.append(lax.slice(padded, (0, i, j, 0), end, (1, stride[0], stride[1], 1)))
            taps.append(kernel[i, j])
    columns = jnp.concatenate(patches, axis=-1).reshape(n * out_h * out_w, len(taps) * c)
    y = lax.dot_general(columns, jnp.concatenate(taps, axis=0), (((1,), (0,)), ((), ())))
    return y.reshape(n, out_h, out_w, features)


def pointwise_conv(x: Array, kernel: Array, stride: tuple[int, int]) -> Array:
    """A 1x1 convolution as a (pixels, channels) x (channels, features) matrix product (the tuned variant
    ``matmul_1x1`` of ``jaxnets.kernels``; ``layers.Conv2d`` decides which runs).

    Same numbers as the convolution, but its gradients are plain matrix products too. Both
    shapes matter on XLA's CPU backend: a 1x1 convolution's kernel gradient, and a product
    contracting the (N, H, W) axes of 4-D operands, go through a transposed copy of the
    output gradient that XLA fuses with the BatchNorm backward into a slow strided loop
    (about a quarter of a ResNet-50 training step). Flattening the pixels first makes the
    kernel gradient one matrix product over the shared leading axis, with no copy.
    """
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1], :]
    n, h, w, c = x.shape
    y = lax.dot_general(x.reshape(n * h * w, c), kernel[0, 0], (((1,), (0,)), ((), ())))
    return y.reshape(n, h, w, kernel.shape[-1])


# --- BatchNorm ------------------------------------------------------------------------


def normalize(x: Array, scale: Array, bias: Array, mean: Array, var: Array, eps: float, dtype: Dtype) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + bias in ``dtype``: eval mode's BatchNorm (running statistics) and
    training mode's (the batch's)."""
    # Normalization and affine folded into one multiply-add: fewer passes over x.
    mul = scale * lax.rsqrt(var + eps)
    add = bias - mean * mul
    return x * mul.astype(dtype) + add.astype(dtype)


def batch_statistics(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased variance, in float32 at least (bfloat16 -> float32, float64 stays)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    # E[(x - mean)^2] is numerically safer than E[x^2] - mean^2 in float32.
    return mean, jnp.mean(jnp.square(xf - mean), axes)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float, dtype: Dtype) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm: the output, the batch mean and the biased batch variance.

    The hand-written gradient (the tuned variant ``batchnorm_vjp`` of ``jaxnets.kernels``) needs two
    per-channel sums and one pass over x, where the differentiated formula takes several: a third less
    time for BatchNorm + ReLU on XLA:CPU.
    As with any ``custom_vjp``, forward-mode differentiation (``jax.jvp``) of a training-mode
    BatchNorm is not available; eval mode has no such limit.
    """
    return batch_norm_train_formula(x, scale, bias, eps, dtype)


def batch_norm_train_formula(x: Array, scale: Array, bias: Array, eps: float,
                             dtype: Dtype) -> tuple[Array, Array, Array]:
    """``batch_norm_train``'s outputs as a formula, which autodiff differentiates: XLA's own formulation."""
    mean, var = batch_statistics(x)
    return normalize(x, scale, bias, mean, var, eps, dtype), mean, var


def _batch_norm_train_fwd(x, scale, bias, eps, dtype):
    outputs = batch_norm_train_formula(x, scale, bias, eps, dtype)
    mean, var = outputs[1:]
    return outputs, (x, scale, mean, lax.rsqrt(var + eps))


def _batch_norm_train_bwd(eps, dtype, residuals, cotangents):
    """y = (x - m) r s + b with r = (v + eps)^-1/2; m and v are outputs too (for the running averages),
    so their cotangents gm, gv count. Everything reduces to dx = gy * (s r) + x * c + d per channel."""
    x, scale, mean, rstd = residuals
    gy, g_mean, g_var = cotangents
    xf = x.astype(mean.dtype)
    gyf = gy.astype(mean.dtype)
    n = math.prod(x.shape[:-1])
    axes = tuple(range(x.ndim - 1))
    g_bias = jnp.sum(gyf, axes)
    g_scale = rstd * (jnp.sum(gyf * xf, axes) - mean * g_bias)  # sum(gy * x_hat)
    s_r = scale * rstd
    c = (2 * g_var - s_r * rstd * g_scale) / n
    d = (g_mean - 2 * g_var * mean - s_r * g_bias + s_r * rstd * mean * g_scale) / n
    dx = gyf * s_r + xf * c + d
    return dx.astype(x.dtype), g_scale.astype(scale.dtype), g_bias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


# --- max pooling ----------------------------------------------------------------------


def separable_max_pool(x: Array, kernel_size: int, stride: int, pads: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """NHWC max pooling (``pads``: -inf padding of H and W) as a row pass then a column pass, each with its own JVP:
    the tuned variant ``maxpool_jvp`` of ``jaxnets.kernels`` (``layers.max_pool`` says why it gives torch's
    maximum and gradient)."""
    rows = _max_pool_1d(x, 2, kernel_size, stride, pads[1])
    return _max_pool_1d(rows, 1, kernel_size, stride, pads[0])


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_1d(x: Array, axis: int, kernel: int, stride: int, pad: tuple[int, int]) -> Array:
    init = np.array(-np.inf, x.dtype)  # concrete: lax picks the differentiable reduce_window_max
    window, strides, pads = [1] * x.ndim, [1] * x.ndim, [(0, 0)] * x.ndim
    window[axis], strides[axis], pads[axis] = kernel, stride, pad
    return lax.reduce_window(x, init, lax.max, window, strides, pads)


@_max_pool_1d.defjvp
def _max_pool_1d_jvp(axis, kernel, stride, pad, primals, tangents):
    """Each window passes on the tangent of its first maximum, as torch's gradient does; transposed,
    this sends each window's gradient to that element.

    XLA's own rule for the same (select-and-gather, transposed to select-and-scatter) took 39 % of a
    GoogLeNet training step on XLA:CPU. Written as k strided compares and selects, the gradient
    becomes interior-padded adds that fuse into plain loops.
    """
    (x,), (dx,) = primals, tangents
    y = _max_pool_1d(x, axis, kernel, stride, pad)
    span = stride * (y.shape[axis] - 1) + 1

    def tap(a: Array, k: int) -> Array:  # the k-th element of every window
        return lax.slice_in_dim(a, k, k + span, stride, axis)

    pads = [(0, 0)] * x.ndim
    pads[axis] = pad
    xp = jnp.pad(x, pads, constant_values=-np.inf)
    # Padding never wins, even in a window of -inf: torch's windows stop at the edge.
    inside = np.pad(np.ones(x.shape[axis], bool), pad)
    inside_shape = [-1 if d == axis else 1 for d in range(x.ndim)]
    # The offset of each window's first maximum: scan backwards so that the earliest match wins.
    first = jnp.full(y.shape, kernel, jnp.int8)
    for k in reversed(range(kernel)):
        is_max = (tap(xp, k) == y) & inside[k:k + span:stride].reshape(inside_shape)
        first = jnp.where(is_max, jnp.int8(k), first)
    dxp = jnp.pad(dx, pads)
    zero = jnp.zeros((), dx.dtype)
    return y, sum(jnp.where(first == k, tap(dxp, k), zero) for k in range(kernel))
