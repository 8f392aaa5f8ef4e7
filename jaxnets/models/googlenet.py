"""GoogLeNet (Inception v1) as torchvision builds it, auxiliary classifiers included.

torchvision's details, kept: every conv is conv (no bias) + BatchNorm(eps=1e-3) + ReLU; the
"5x5" branch is a 3x3 conv; max pools use ``ceil_mode=True``; the auxiliary heads pool
adaptively to 4x4 and only run in training mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, extend_to_channels
from jaxnets.layers import (
    Conv2d,
    Linear,
    PoolSpec,
    adaptive_avg_pool,
    batch_norm,
    check_probability,
    flatten,
    image_model_call,
    max_pool,
    model_name,
    truncated_normal,
)
from jaxnets.models.backbone import FeatureLevel, FeatureTaps, checkpointed

init = truncated_normal(0.01)  # torchvision: trunc_normal_(std=0.01, a=-2, b=2) for conv and linear weights

# After the stem: Inception modules (name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
# and ceil-mode max pools between them.
BLOCKS = (
    ("inception3a", 64, 96, 128, 16, 32, 32), ("inception3b", 128, 128, 192, 32, 96, 64), PoolSpec(3, 2),
    ("inception4a", 192, 96, 208, 16, 48, 64), ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64), ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128), PoolSpec(2, 2),
    ("inception5a", 256, 160, 320, 32, 128, 128), ("inception5b", 384, 192, 384, 48, 128, 128),
)
AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}
# The outputs at each stride (2 to 32), as torchvision nodes (the module names), with their channels.
FEATURE_LEVELS = (FeatureLevel("conv1", 64, 2), FeatureLevel("conv3", 192, 4), FeatureLevel("inception3b", 480, 8),
                  FeatureLevel("inception4e", 832, 16), FeatureLevel("inception5b", 1024, 32))
# Training loss = main + AUX_WEIGHT * (aux1 + aux2): the paper's weight, and torchvision's reference recipe's.
AUX_WEIGHT = 0.3


class GoogLeNetOutputs(NamedTuple):
    """What torchvision's GoogLeNet returns in training mode with ``aux_logits``."""

    logits: jax.Array
    aux_logits2: jax.Array
    aux_logits1: jax.Array


class BasicConv2d(nn.Module):
    features: int
    kernel_size: int
    norm: Callable[..., nn.Module]
    stride: int = 1
    padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=False, dtype=self.dtype,
                   kernel_init=init, name="conv")(x)
        return nn.relu(self.norm(name="bn")(x))


class Branch(nn.Module):
    """A torch ``nn.Sequential`` branch: BasicConv2d layers ``(features, kernel)``, optionally
    after a 3x3/1 ceil-mode max pool at index 0 (branch4)."""

    convs: Sequence[tuple[int, int]]
    norm: Callable[..., nn.Module]
    pool_first: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool_first:
            x = max_pool(x, 3, 1, 1, ceil_mode=True)
        for index, (features, kernel) in enumerate(self.convs, start=int(self.pool_first)):
            x = BasicConv2d(features, kernel, self.norm, padding=kernel // 2, dtype=self.dtype, name=str(index))(x)
        return x


class Inception(nn.Module):
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = dict(norm=self.norm, dtype=self.dtype)
        return jnp.concatenate([
            BasicConv2d(self.ch1x1, 1, name="branch1", **conv)(x),
            Branch(((self.ch3x3red, 1), (self.ch3x3, 3)), name="branch2", **conv)(x),
            Branch(((self.ch5x5red, 1), (self.ch5x5, 3)), name="branch3", **conv)(x),  # torchvision: 3x3, not 5x5
            Branch(((self.pool_proj, 1),), pool_first=True, name="branch4", **conv)(x),
        ], axis=-1)


class InceptionAux(nn.Module):
    num_classes: int
    norm: Callable[..., nn.Module]
    dropout: float = 0.7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = adaptive_avg_pool(x, 4)
        x = flatten(BasicConv2d(128, 1, self.norm, dtype=self.dtype, name="conv")(x))
        x = nn.relu(Linear(1024, self.dtype, init, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Linear(self.num_classes, self.dtype, init, name="fc2")(x)


class GoogLeNet(nn.Module):
    """Parameters ``conv1..3``, ``inception3a..5b``, ``aux1``/``aux2``, ``fc``, as in torchvision.

    In training mode with ``aux_logits`` the call returns ``GoogLeNetOutputs``; otherwise logits. Feature
    levels: ``FEATURE_LEVELS``; ``remat`` rematerializes each Inception module. A ``features_only`` model has no
    auxiliary heads.
    """

    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.2
    dropout_aux: float = 0.7
    in_chans: int = 3
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    def feature_levels(self) -> tuple[FeatureLevel, ...]:
        return FEATURE_LEVELS

    @nn.compact
    @image_model_call
    def __call__(self, x: jax.Array, train: bool = False, *, pre_logits: bool = False,
                 frozen_norm: tuple[str, ...] = ()) -> jax.Array | GoogLeNetOutputs | list[jax.Array]:
        check_probability(self, "dropout")
        check_probability(self, "dropout_aux")
        taps = FeatureTaps(self, model_name(self))
        norm = batch_norm(train, frozen_norm, eps=1e-3, dtype=self.dtype)
        conv = dict(norm=norm, dtype=self.dtype)
        if self.transform_input:
            x = transform_input(x)
        x = BasicConv2d(64, 7, stride=2, padding=3, name="conv1", **conv)(x)
        if taps("conv1", x):
            return taps.maps
        x = max_pool(x, 3, 2, ceil_mode=True)
        x = BasicConv2d(64, 1, name="conv2", **conv)(x)
        x = BasicConv2d(192, 3, padding=1, name="conv3", **conv)(x)
        if taps("conv3", x):
            return taps.maps
        x = max_pool(x, 3, 2, ceil_mode=True)

        # Aux heads run in training mode only, but are built at init so their parameters exist.
        run_aux = (self.aux_logits and (train or self.is_initializing()) and not pre_logits
                   and not self.features_only)
        aux = {}
        inception = checkpointed(Inception, self.remat)
        for block in BLOCKS:
            if isinstance(block, PoolSpec):
                x = max_pool(x, *block, ceil_mode=True)
                continue
            name, *widths = block
            x = inception(*widths, **conv, name=name)(x)
            if taps(name, x):
                return taps.maps
            if run_aux and name in AUX_AFTER:
                head = AUX_AFTER[name]
                aux[head] = InceptionAux(self.num_classes, norm, self.dropout_aux, self.dtype, name=head)(x, train)
        x = adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        if pre_logits:
            return x
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = Linear(self.num_classes, self.dtype, init, name="fc")(x)
        if train and self.aux_logits:
            return GoogLeNetOutputs(logits, aux["aux2"], aux["aux1"])
        return logits


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's ``transform_input``: re-normalize ImageNet-normalized input to the (x - 0.5) / 0.5
    normalization the original Inception weights were trained with.

    With other than 3 channels the input is normalized with ImageNet's statistics extended to those channels
    (``eval_transform.extend_to_channels``, what the input pipeline and ``predict`` use), and these are undone
    here: the stem still sees (pixel - 0.5) / 0.5 in every channel, what its (adapted) filters were trained on.
    """
    channels = x.shape[-1]
    mean = jnp.array(extend_to_channels(IMAGENET_MEAN, channels), x.dtype)
    std = jnp.array(extend_to_channels(IMAGENET_STD, channels), x.dtype)
    return x * (std / 0.5) + (mean - 0.5) / 0.5
