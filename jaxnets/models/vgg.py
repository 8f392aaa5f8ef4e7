"""VGG-11/13/16/19, with and without BatchNorm, as torchvision builds them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets.layers import (
    Classifier,
    ConvSpec,
    PoolSpec,
    adaptive_avg_pool,
    batch_norm,
    check_probability,
    flatten,
    image_model_call,
    kaiming_normal_fan_out,
    model_name,
)
from jaxnets.models.backbone import FeatureLevel, FeatureTaps
from jaxnets.models.conv_stack import ConvStack, stack_levels

# Configurations A, B, D, E of Simonyan & Zisserman: output widths of the 3x3 convs, 0 = max pool.
CONFIGS = {
    11: (64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0),
    13: (64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0),
    16: (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0),
    19: (64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0),
}

zeros = nn.initializers.zeros
linear_init = nn.initializers.normal(0.01)  # torchvision: normal_(0, 0.01), bias 0


class VGG(nn.Module):
    """Parameters ``features/<torch index>`` and ``classifier/{0,3,6}``, as in torchvision.

    Feature levels: the ReLU before each of the five max pools (strides 1, 2, 4, 8, 16, as timm's VGG without
    its pre-logits); ``remat`` rematerializes each stage (the convolutions between two pools).
    """

    depth: int = 16
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    in_chans: int = 3
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    @property
    def _layers(self) -> tuple[ConvSpec | PoolSpec, ...]:
        return tuple(PoolSpec(2, 2) if width == 0 else ConvSpec(width, 3, 1, 1) for width in CONFIGS[self.depth])

    def feature_levels(self) -> tuple[FeatureLevel, ...]:
        return stack_levels(self._layers, self.batch_norm)

    @nn.compact
    @image_model_call
    def __call__(self, x: jax.Array, train: bool = False, *, pre_logits: bool = False,
                 frozen_norm: tuple[str, ...] = ()) -> jax.Array | list[jax.Array]:
        check_probability(self, "dropout")
        taps = FeatureTaps(self, model_name(self))
        norm = batch_norm(train, frozen_norm, dtype=self.dtype) if self.batch_norm else None
        x = ConvStack(self._layers, norm, self.dtype, kaiming_normal_fan_out, zeros, remat=self.remat,
                      name="features")(x, taps)
        if self.features_only:
            return taps.maps
        x = flatten(adaptive_avg_pool(x, 7))
        return Classifier(self.num_classes, self.dropout, dropout_first=False, dtype=self.dtype,
                          kernel_init=linear_init, bias_init=zeros, name="classifier")(x, train, pre_logits)
