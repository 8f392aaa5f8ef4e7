"""AlexNet as torchvision builds it (the "one weird trick" variant with 64/192/384/256/256 filters)."""

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
    check_probability,
    flatten,
    image_model_call,
    model_name,
)
from jaxnets.models.backbone import FeatureLevel, FeatureTaps
from jaxnets.models.conv_stack import ConvStack, stack_levels

POOL = PoolSpec(3, 2)
FEATURES = (ConvSpec(64, 11, 4, 2), POOL, ConvSpec(192, 5, 1, 2), POOL,
            ConvSpec(384, 3, 1, 1), ConvSpec(256, 3, 1, 1), ConvSpec(256, 3, 1, 1), POOL)


class AlexNet(nn.Module):
    """Parameters ``features/{0,3,6,8,10}`` and ``classifier/{1,4,6}``, as in torchvision.

    torchvision leaves AlexNet on torch's default initializers, and so do we. Feature levels: the ReLU before
    each max pool (``features.1``, ``.4``, ``.11``; strides 4, 8, 16); ``remat`` rematerializes each stage.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    in_chans: int = 3
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    def feature_levels(self) -> tuple[FeatureLevel, ...]:
        return stack_levels(FEATURES, batch_norm=False)

    @nn.compact
    @image_model_call
    def __call__(self, x: jax.Array, train: bool = False, *, pre_logits: bool = False,
                 frozen_norm: tuple[str, ...] = ()) -> jax.Array | list[jax.Array]:
        check_probability(self, "dropout")
        taps = FeatureTaps(self, model_name(self))
        del frozen_norm  # AlexNet has no BatchNorm
        x = ConvStack(FEATURES, dtype=self.dtype, remat=self.remat, name="features")(x, taps)
        if self.features_only:
            return taps.maps
        x = flatten(adaptive_avg_pool(x, 6))
        return Classifier(self.num_classes, self.dropout, dropout_first=True, dtype=self.dtype,
                          name="classifier")(x, train, pre_logits)
