"""ResNet v1.5 (stride on the 3x3 conv), ResNeXt and Wide ResNet, as torchvision builds them; and, for teaching,
their plain networks (``shortcut=False``: He et al. 2016's "plain" baseline, the same layers without a shortcut)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets.errors import UserError
from jaxnets.layers import (
    Conv2d,
    Linear,
    adaptive_avg_pool,
    batch_norm,
    image_model_call,
    kaiming_normal_fan_out,
    max_pool,
    model_name,
)
from jaxnets.models.backbone import FeatureLevel, FeatureTaps, checkpointed

ModuleFactory = Callable[..., nn.Module]


def conv(features: int, kernel_size: int, stride: int = 1, groups: int = 1, *, dtype: Any, name: str) -> Conv2d:
    """torchvision's conv1x1/conv3x3: no bias, padding kernel//2, kaiming-normal fan-out init."""
    return Conv2d(features, kernel_size, stride, kernel_size // 2, groups, use_bias=False, dtype=dtype,
                  kernel_init=kaiming_normal_fan_out, name=name)


class ResidualBlock(nn.Module):
    """What both block types take; ``last_norm`` is the BatchNorm closing the residual branch
    (zero-initialized scale with ``zero_init_residual``); ``shortcut=False``: the block is its branch alone
    (``block_output``)."""

    planes: int
    stride: int
    norm: ModuleFactory
    last_norm: ModuleFactory
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32
    shortcut: bool = True
    expansion = 1


class BasicBlock(ResidualBlock):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64 (as torchvision)")
        y = nn.relu(self.norm(name="bn1")(conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)))
        y = self.last_norm(name="bn2")(conv(self.planes, 3, dtype=self.dtype, name="conv2")(y))
        return block_output(self, y, x)


class Bottleneck(ResidualBlock):
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        y = nn.relu(self.norm(name="bn1")(conv(width, 1, dtype=self.dtype, name="conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(conv(width, 3, self.stride, self.groups, dtype=self.dtype, name="conv2")(y)))
        y = self.last_norm(name="bn3")(conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y))
        return block_output(self, y, x)


def block_output(block: ResidualBlock, branch: jax.Array, x: jax.Array) -> jax.Array:
    """``relu(branch + shortcut(x))``; in a plain network (``shortcut=False``) ``relu(branch)``: no identity and no
    projection either, so the block has no ``downsample`` and the only path from the loss to the stem goes
    through every convolution, as in He et al. 2016's plain baseline (Fig. 3, middle)."""
    if not block.shortcut:
        return nn.relu(branch)
    return nn.relu(branch + shortcut(block, x))


def shortcut(block: ResidualBlock, x: jax.Array) -> jax.Array:
    """Identity, or torchvision's ``downsample`` (1x1 conv + BN) when the shape changes."""
    out = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out:
        return x
    return Downsample(out, block.stride, block.norm, block.dtype, name="downsample")(x)


class Downsample(nn.Module):
    """torchvision's ``downsample`` Sequential: ``0`` the 1x1 conv, ``1`` the BatchNorm."""

    features: int
    stride: int
    norm: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(name="1")(conv(self.features, 1, self.stride, dtype=self.dtype, name="0")(x))


class Stage(nn.Module):
    """``layer1`` ... ``layer4``: blocks named ``0``, ``1``, ...; the first one may downsample. With ``remat``,
    each block is rematerialized."""

    block_cls: type[ResidualBlock]
    num_blocks: int
    planes: int
    stride: int
    block_kwargs: dict
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = checkpointed(self.block_cls, self.remat)
        for i in range(self.num_blocks):
            x = block_cls(self.planes, self.stride if i == 0 else 1, name=str(i), **self.block_kwargs)(x)
        return x


class ResNet(nn.Module):
    """Parameters ``conv1``, ``bn1``, ``layer{1..4}/<block>/...``, ``fc``, as in torchvision.

    Feature levels: the stem's ReLU (torchvision's node ``relu``, stride 2) and ``layer1``..``layer4`` (strides
    4 to 32), as timm's; ``remat`` rematerializes each residual block.

    ``shortcut=False`` is the plain network of the same depth (``block_output``): every shortcut goes, the
    identities and the ``downsample`` projections alike, and every other layer and initializer stays. It cannot
    be combined with ``zero_init_residual``, whose zero-initialized branches would then output zeros.
    """

    stage_sizes: Sequence[int]
    block_cls: type[ResidualBlock]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    shortcut: bool = True
    in_chans: int = 3
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    def feature_levels(self) -> tuple[FeatureLevel, ...]:
        stem = FeatureLevel("relu", 64, 2)
        return (stem, *(FeatureLevel(f"layer{i + 1}", 64 * 2**i * self.block_cls.expansion, 4 * 2**i)
                        for i in range(len(self.stage_sizes))))

    @nn.compact
    @image_model_call
    def __call__(self, x: jax.Array, train: bool = False, *, pre_logits: bool = False,
                 frozen_norm: tuple[str, ...] = ()) -> jax.Array | list[jax.Array]:
        if self.zero_init_residual and not self.shortcut:
            raise UserError(f"{model_name(self)}: zero_init_residual=True needs the shortcuts (shortcut=False makes "
                            "every block start at zero, and the network output a constant)")
        taps = FeatureTaps(self, model_name(self))
        norm = batch_norm(train, frozen_norm, dtype=self.dtype)
        # zero_init_residual: each residual branch starts at zero, so every block starts as an identity.
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        last_norm = batch_norm(train, frozen_norm, dtype=self.dtype, scale_init=last_scale)
        x = nn.relu(norm(name="bn1")(conv(64, 7, 2, dtype=self.dtype, name="conv1")(x)))
        if taps("relu", x):
            return taps.maps
        x = max_pool(x, 3, 2, 1)
        block_kwargs = dict(norm=norm, last_norm=last_norm, groups=self.groups,
                            width_per_group=self.width_per_group, dtype=self.dtype, shortcut=self.shortcut)
        for i, num_blocks in enumerate(self.stage_sizes):
            x = Stage(self.block_cls, num_blocks, 64 * 2**i, 1 if i == 0 else 2, block_kwargs, self.remat,
                      name=f"layer{i + 1}")(x)
            if taps(f"layer{i + 1}", x):
                return taps.maps
        x = adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        if pre_logits:
            return x
        return Linear(self.num_classes, self.dtype, name="fc")(x)  # torch's default Linear init
