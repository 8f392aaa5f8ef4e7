"""AlexNet as torchvision builds it (the "one weird trick" variant with 64/192/384/256/256 filters)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets.layers import (
    Classifier,
    ConvSpec,
    ConvStack,
    PoolSpec,
    adaptive_avg_pool,
    check_probability,
    flatten,
    image_model_call,
)

POOL = PoolSpec(3, 2)
FEATURES = (ConvSpec(64, 11, 4, 2), POOL, ConvSpec(192, 5, 1, 2), POOL,
            ConvSpec(384, 3, 1, 1), ConvSpec(256, 3, 1, 1), ConvSpec(256, 3, 1, 1), POOL)


class AlexNet(nn.Module):
    """Parameters ``features/{0,3,6,8,10}`` and ``classifier/{1,4,6}``, as in torchvision.

    torchvision leaves AlexNet on torch's default initializers, and so do we.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    @image_model_call
    def __call__(self, x: jax.Array, train: bool = False, *, pre_logits: bool = False,
                 frozen_norm: tuple[str, ...] = ()) -> jax.Array:
        check_probability(self, "dropout")
        del frozen_norm  # AlexNet has no BatchNorm
        x = ConvStack(FEATURES, dtype=self.dtype, name="features")(x)
        x = flatten(adaptive_avg_pool(x, 6))
        return Classifier(self.num_classes, self.dropout, dropout_first=True, dtype=self.dtype,
                          name="classifier")(x, train, pre_logits)

