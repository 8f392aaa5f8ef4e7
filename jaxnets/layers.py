"""Torch-semantics building blocks shared by every model family.

Flax's defaults differ from PyTorch's in small ways that change numbers: ``'SAME'``
padding is asymmetric at stride 2, max pooling has no ``ceil_mode``, there is no
adaptive average pooling, and default initializers differ. Every layer here does
exactly what its ``torch.nn`` namesake does, on NHWC tensors, so that torchvision
weights give torchvision's outputs. Where ``jaxnets.kernels`` chooses a formulation tuned
for XLA:CPU, a layer decides here which runs and calls it from ``jaxnets.tuned_kernels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial, wraps
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from jaxnets import kernels, tuned_kernels
from jaxnets.errors import UserError

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# --- initializers -------------------------------------------------------------------

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default Conv/Linear bias init, U(±1/sqrt(fan_in)); needs the layer's fan-in."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def truncated_normal(std: float, lower: float = -2.0, upper: float = 2.0) -> Initializer:
    """torch.nn.init.trunc_normal_(std=std, a=lower, b=upper): bounds are absolute, not in stds."""
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, lower / std, upper / std, shape, dtype)
    return init


# --- layers ---------------------------------------------------------------------------


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC input with symmetric explicit padding.

    Parameters: ``kernel`` (kh, kw, in/groups, out) and optionally ``bias`` (out,).
    ``bias_init=None`` means torch's default, which depends on the fan-in.
    """

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = _pair(self.kernel_size)
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise UserError(f"{self.name}: {in_features} input channels not divisible by groups={self.groups}")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features))
        pad = _pair(self.padding)
        stride = _pair(self.stride)
        out_size = [(x.shape[1 + a] + 2 * pad[a] - (kh, kw)[a]) // stride[a] + 1 for a in (0, 1)]
        if (kh, kw) == (1, 1) and self.groups == 1 and pad == (0, 0) and kernels.uses("matmul_1x1"):
            y = tuned_kernels.pointwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), stride)
        elif (self.groups == 1 and max(out_size) <= tuned_kernels.SMALL_MAP
              and kernels.uses("small_map_matmul")):
            y = tuned_kernels.small_map_conv(x.astype(self.dtype), kernel.astype(self.dtype), stride, pad)
        else:
            y = lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype),
                window_strides=stride,
                padding=[(pad[0], pad[0]), (pad[1], pad[1])],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            fan_in = kh * kw * in_features // self.groups
            bias_init = self.bias_init or torch_default_bias_init(fan_in)
            y = y + self.param("bias", bias_init, (self.features,)).astype(self.dtype)
        return y


class Linear(nn.Module):
    """``torch.nn.Linear``: ``kernel`` is (in, out), the transpose of torch's ``weight``."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
        bias = self.param("bias", self.bias_init or torch_default_bias_init(in_features), (self.features,))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def batch_norm(train: bool, frozen: Sequence[str] = (), eps: float = 1e-5, torch_momentum: float = 0.1,
               dtype: Dtype = jnp.float32, scale_init: Initializer = nn.initializers.ones) -> Callable[..., nn.Module]:
    """``torch.nn.BatchNorm2d(eps=eps, momentum=torch_momentum)`` as a module factory.

    Flax's ``momentum`` is the weight of the old running average; torch's is the weight of
    the new batch statistic, hence ``1 - torch_momentum``.
    """
    return partial(TorchBatchNorm, train=train, frozen=frozen_paths(frozen), epsilon=eps,
                   momentum=1.0 - torch_momentum, dtype=dtype, scale_init=scale_init)


class TorchBatchNorm(nn.Module):
    """BatchNorm with torch's statistics: normalize by the biased batch variance, but update
    ``var`` with the unbiased one (n / (n - 1)), as ``torch.nn.BatchNorm2d`` does.

    ``frozen`` lists module paths (see ``is_frozen``) whose BatchNorms stay in eval mode.
    Variables match Flax's ``nn.BatchNorm``: params ``scale``/``bias``, batch_stats ``mean``/``var``.
    Statistics are always computed in float32, whatever the compute ``dtype``. Under ``jax.jit``
    with the batch sharded over devices, the means are over the global batch.
    """

    train: bool = False
    frozen: Sequence[str] = ()
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # A BatchNorm inside a frozen part of the network behaves as in eval mode even when
        # training: it normalizes with, and never updates, its running statistics.
        use_running_average = not self.train or is_frozen(self.scope.path, self.frozen)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))

        if use_running_average:
            return tuned_kernels.normalize(x, scale, bias, ra_mean.value, ra_var.value, self.epsilon, self.dtype)
        n = math.prod(x.shape[:-1])
        if n == 1:  # torch's check: the batch variance of one value is 0, the output would be just the bias
            raise UserError(f"Expected more than 1 value per channel when training, got input size {x.shape} "
                             f"at {'/'.join(self.scope.path)}")
        if kernels.uses("batchnorm_vjp"):
            y, mean, var = tuned_kernels.batch_norm_train(x, scale, bias, self.epsilon, self.dtype)
        else:  # XLA differentiates the formula
            y, mean, var = tuned_kernels.batch_norm_train_formula(x, scale, bias, self.epsilon, self.dtype)
        if not self.is_initializing():
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return y


def max_pool(x: Array, kernel_size: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> Array:
    """``torch.nn.functional.max_pool2d`` on NHWC, including ``ceil_mode`` and torch's gradient.

    With ``ceil_mode`` the last window may hang over the bottom/right edge (extra -inf
    padding), but torch drops a window that would start entirely in the padding.

    The tuned variant (``maxpool_jvp`` of ``jaxnets.kernels``) pools as a row pass then a column
    pass: the same maximum, and the same element receives the gradient. torch gives each
    window's gradient to its first maximum in row-major order, which is the first row holding
    the window's maximum and, in it, the first column, exactly what the two 1-D passes pick with
    their own first-maximum rule. Separable, the gradient takes k compares per element per pass
    instead of k*k per window position (XLA recomputes them in each fused window term): 2-3x
    faster on XLA:CPU. XLA's own variant is one 2-D window whose gradient (select-and-scatter)
    also goes to each window's first maximum; it differs only where a whole window is -inf, which
    it may hand to the padding (torch and the tuned variant never do).
    """
    pads = []
    for size in x.shape[1:3]:
        out = _pool_out_size(size, kernel_size, stride, padding, ceil_mode)
        extra = (out - 1) * stride + kernel_size - (size + 2 * padding)
        pads.append((padding, padding + max(extra, 0)))
    if not kernels.uses("maxpool_jvp"):
        init = np.array(-np.inf, x.dtype)  # concrete: lax picks the differentiable reduce_window_max
        return lax.reduce_window(x, init, lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
                                 [(0, 0), pads[0], pads[1], (0, 0)])
    return tuned_kernels.separable_max_pool(x, kernel_size, stride, (pads[0], pads[1]))


def _pool_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    # torch: floor_or_ceil((size + 2p - k) / s) + 1; with ceil_mode a window may start past the input's
    # end only into the left padding, so such a last window is dropped.
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise FeatureMapTooSmall(f"an internal {size}-px feature map is too small for a {kernel}x{kernel} "
                                 f"max pool (stride {stride}, padding {padding})")
    return out


def adaptive_avg_pool(x: Array, output_size: int | tuple[int, int]) -> Array:
    """``torch.nn.AdaptiveAvgPool2d`` on NHWC: bin i covers ``[floor(i*n/o), ceil((i+1)*n/o))``.

    The common cases (global pooling, an exact divisor) are plain means; the general case
    multiplies by two small constant averaging matrices, which XLA fuses well.
    """
    out_h, out_w = _pair(output_size)
    n, h, w, c = x.shape
    if (out_h, out_w) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    if h % out_h == 0 and w % out_w == 0:
        return jnp.mean(x.reshape(n, out_h, h // out_h, out_w, w // out_w, c), axis=(2, 4))
    rows = jnp.asarray(_adaptive_pool_matrix(h, out_h), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(w, out_w), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols)


def _adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def flatten(x: Array) -> Array:
    """Flatten NHWC features to (N, H*W*C). Note: torch flattens NCHW as C*H*W; the
    weight converter permutes the following Linear layer's input rows to match."""
    return x.reshape(x.shape[0], -1)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def frozen_paths(frozen: Sequence[str]) -> tuple[str, ...]:
    """``frozen_norm`` as '/'-joined module paths; torch's dots (``'layer1.0'``) work too, as in
    ``transfer.trainable_mask``. A plain string is refused: iterated, it would be single characters."""
    if isinstance(frozen, str) or not all(isinstance(path, str) for path in frozen):
        raise UserError(f"frozen_norm must be a tuple of module paths such as ('bn1', 'layer1'), got {frozen!r}")
    return tuple(path.strip().replace(".", "/").strip("/") for path in frozen)


def is_frozen(path: Sequence[str], frozen: Sequence[str]) -> bool:
    """Whether a module path (``('layer1', '0', 'bn1')``) lies at or under one of the
    ``frozen`` module paths (``'layer1'``, ``'layer1/0/bn1'``)."""
    joined = "/".join(path)
    return any(joined == f or joined.startswith(f.rstrip("/") + "/") for f in frozen)


class ConvSpec(NamedTuple):
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0


class PoolSpec(NamedTuple):
    kernel_size: int
    stride: int


class Classifier(nn.Module):
    """AlexNet's and VGG's ``classifier``: Linear(4096) + ReLU twice, with dropout, then the final Linear
    at index 6. AlexNet puts each Dropout before its Linear (Linears at 1, 4), VGG after its ReLU (0, 3).
    With ``pre_logits`` it returns the input of the final Linear (features for linear probes)."""

    num_classes: int
    dropout: float
    dropout_first: bool
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool, pre_logits: bool = False) -> Array:
        linear = partial(Linear, dtype=self.dtype, kernel_init=self.kernel_init, bias_init=self.bias_init)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        for index in (1, 4) if self.dropout_first else (0, 3):
            if self.dropout_first:
                x = drop(x)
            x = nn.relu(linear(4096, name=str(index))(x))
            if not self.dropout_first:
                x = drop(x)
        if pre_logits:
            return x
        return linear(self.num_classes, name="6")(x)


# --- model input checks -------------------------------------------------------------
# Shared by every family's ``__call__``; all run at trace time on static shapes and Python values.


class FeatureMapTooSmall(UserError):
    """A max pool got a feature map smaller than its window: the model input is too small."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}: the model input is too small")
        self.detail = detail


def check_probability(module: nn.Module, field: str) -> None:
    """A dropout rate in [0, 1], as ``torch.nn.Dropout`` requires (NaN refused too)."""
    p = getattr(module, field)
    if not 0.0 <= p <= 1.0:
        raise UserError(f"{model_name(module)}: {field} must be in [0, 1], got {p}")


def image_model_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a family's ``__call__(self, x, train, *, pre_logits, frozen_norm)``: the input must be NHWC with the
    model's ``in_chans`` channels, ``frozen_norm`` is normalized and must name BatchNorm modules, and a too-small
    input names the model input's shape and the model's minimum size rather than an internal feature map."""
    @wraps(call)
    def wrapper(self: nn.Module, x: Array, *args: Any, frozen_norm: Sequence[str] = (), **kwargs: Any) -> Any:
        _check_input_channels(self, x)
        if kwargs.get("pre_logits") and getattr(self, "features_only", False):
            raise UserError(f"{model_name(self)}: pre_logits=True asks for pooled features, but the model was "
                            f"built with features_only=True (it returns feature maps)")
        frozen = frozen_paths(frozen_norm)
        try:
            out = call(self, x, *args, frozen_norm=frozen, **kwargs)
        except FeatureMapTooSmall as error:
            raise UserError(f"{model_name(self)}: input {tuple(x.shape)} is too small{_min_size_hint(self)} "
                             f"({error.detail})") from None
        _check_frozen_norm(self, frozen)
        return out
    return wrapper


def check_in_chans(in_chans: Any, where: str) -> int:
    """``in_chans`` as an int >= 1, or a ``UserError`` naming it and ``where``."""
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise UserError(f"{where}: in_chans must be an integer >= 1, got {in_chans!r}")
    return in_chans


def _check_input_channels(module: nn.Module, x: Array) -> None:
    """NHWC input with the model's ``in_chans`` channels (3, RGB, unless the model was built for others)."""
    channels = check_in_chans(getattr(module, "in_chans", 3), model_name(module))
    shape = tuple(np.shape(x))
    if len(shape) == 4 and shape[-1] == channels:
        return
    what = "RGB images" if channels == 3 else f"{channels}-channel images"
    nchw = len(shape) == 4 and shape[1] == channels
    hint = " — NCHW? transpose with x.transpose(0, 2, 3, 1)" if nchw else ""
    other = (f"; for {shape[-1]}-channel images build the model with in_chans={shape[-1]}"
             if len(shape) == 4 and not nchw else "")
    raise UserError(f"{model_name(module)} expects NHWC {what} (N, H, W, {channels}), got {shape}{hint} "
                    f"(in_chans={channels}{other})")


def _check_frozen_norm(module: nn.Module, frozen: Sequence[str]) -> None:
    """Every ``frozen_norm`` path must lie over a BatchNorm (one that has running statistics): a typo
    would otherwise freeze nothing, silently."""
    if not frozen:
        return
    stats = module.variables.get("batch_stats", {})
    norms = {"/".join(path[:-1]) for path in _flat_paths(stats)}
    for path in frozen:
        if not any(is_frozen(norm.split("/"), (path,)) for norm in norms):
            top = sorted({norm.split("/")[0] for norm in norms})
            raise UserError(f"{model_name(module)}: frozen_norm path {path!r} matches no BatchNorm; "
                             f"BatchNorms are under: {', '.join(top) or 'none (the model has no BatchNorm)'}")


def _flat_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not hasattr(tree, "items"):
        return [prefix]
    return [path for key, value in tree.items() for path in _flat_paths(value, (*prefix, key))]


# Which registered model a module is, for error messages: ``(name, minimum input size)``, or None when it is
# no registered variant. The registry installs the lookup (it imports the models, so they cannot import it).
_describe_model: Callable[[nn.Module], tuple[str, tuple[int, int]] | None] = lambda module: None


def set_model_describer(describe: Callable[[nn.Module], tuple[str, tuple[int, int]] | None]) -> None:
    global _describe_model
    _describe_model = describe


def model_name(module: nn.Module) -> str:
    """The registered name of ``module`` (``resnet50``), else its class name: what errors about it say."""
    described = _describe_model(module)
    return described[0] if described else type(module).__name__


def _min_size_hint(module: nn.Module) -> str:
    described = _describe_model(module)
    if not described:
        return ""
    name, (h, w) = described
    return f": {name} needs at least {h}x{w} px"
