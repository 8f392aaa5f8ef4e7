"""AlexNet's and VGG's ``features``: a torch ``nn.Sequential`` of Conv2d [+ BatchNorm2d] + ReLU and MaxPool2d,
run as stages (the convolutions up to a max pool, and that pool), each one feature level and, with ``remat``,
one rematerialized block."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets.layers import Conv2d, ConvSpec, Initializer, PoolSpec, max_pool, torch_default_kernel_init
from jaxnets.models.backbone import FeatureLevel, FeatureTaps, checkpointed


class Stage(NamedTuple):
    """Convolutions ``(torch index, spec)`` up to a max pool (None for a stack that ends in a convolution); the
    torch index of the last ReLU, where the stage's feature map is taken (before the pool)."""

    convs: tuple[tuple[int, ConvSpec], ...]
    pool: PoolSpec | None
    last_relu: int


def stages(layers: Sequence[ConvSpec | PoolSpec], batch_norm: bool) -> tuple[Stage, ...]:
    """``layers`` cut at each max pool, with torch's Sequential indices: conv, [BatchNorm,] ReLU, ..., MaxPool."""
    result, convs, index = [], [], 0
    for layer in layers:
        if isinstance(layer, PoolSpec):
            result.append(Stage(tuple(convs), layer, index - 1))
            convs, index = [], index + 1
        else:
            convs.append((index, layer))
            index += 3 if batch_norm else 2
    if convs:
        result.append(Stage(tuple(convs), None, index - 1))
    return tuple(result)


def stack_levels(layers: Sequence[ConvSpec | PoolSpec], batch_norm: bool, name: str = "features") -> tuple[
        FeatureLevel, ...]:
    """One level per stage: the activation before its pool, with the stride of everything before it."""
    levels, reduction = [], 1
    for stage in stages(layers, batch_norm):
        for _, conv in stage.convs:
            reduction *= conv.stride
        levels.append(FeatureLevel(f"{name}.{stage.last_relu}", stage.convs[-1][1].features, reduction))
        if stage.pool is not None:
            reduction *= stage.pool.stride
    return tuple(levels)


class ConvStack(nn.Module):
    """Submodules are named by their torch index (``0``, ``1``, ...) so parameter paths read like torchvision's
    state dict keys. ``taps`` records each stage's map before its pool (``features.<index of the ReLU>``)."""

    layers: Sequence[ConvSpec | PoolSpec]
    norm: Callable[..., nn.Module] | None = None
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, taps: FeatureTaps | None = None) -> jax.Array:
        for stage in stages(self.layers, self.norm is not None):
            x = checkpointed(self._convs(stage), self.remat)(self, x)
            if taps is not None and taps(f"{self.name}.{stage.last_relu}", x):
                return x
            if stage.pool is not None:
                x = max_pool(x, stage.pool.kernel_size, stage.pool.stride)
        return x

    def _convs(self, stage: Stage) -> Callable[[nn.Module, jax.Array], jax.Array]:
        def run(module: nn.Module, x: jax.Array) -> jax.Array:
            for index, conv in stage.convs:
                x = Conv2d(*conv, dtype=self.dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
                           name=str(index), parent=module)(x)
                if self.norm is not None:
                    x = self.norm(name=str(index + 1), parent=module)(x)
                x = nn.relu(x)
            return x
        return run
