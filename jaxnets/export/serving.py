"""A model as the function an artifact serves: its eval-mode forward pass, optionally with the normalization in
front and (for a classifier) a softmax behind.

``--with-preprocessing`` moves the last step of the eval transform into the graph: uint8 RGB at the eval crop size
in, ``(x / 255 - mean) / std`` in float32, the arithmetic of ``jaxnets.data.pil_eval.preprocess`` (what
``jaxnets.predict`` shows the model). Resizing and the center crop stay outside: they depend on each image's size,
and every runtime (PIL, OpenCV, a GPU decoder) has its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxnets.eval_transform import EvalTransform


def model_function(model: nn.Module, transform: EvalTransform, *, with_preprocessing: bool = False,
                   softmax: bool = False) -> Callable[[Any, jax.Array], Any]:
    """``serve(variables, images)``: ``model``'s eval output (logits, GoogLeNet's without aux heads; a backbone's
    feature maps), or a classifier's probabilities."""
    mean = np.asarray(transform.mean, np.float32)
    std = np.asarray(transform.std, np.float32)

    def serve(variables: Any, images: jax.Array) -> Any:
        x = (images.astype(jnp.float32) / np.float32(255) - mean) / std if with_preprocessing else images
        logits = model.apply(variables, x, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1) if softmax else logits

    return serve


def output_name(softmax: bool) -> str:
    return "probabilities" if softmax else "logits"
