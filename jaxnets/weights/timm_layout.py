"""timm's state-dict layout <-> torchvision's, for the architectures jaxnets has: numpy only, no timm needed.

timm's ``resnet*``, ``resnext*`` and ``wide_resnet*`` state dicts have torchvision's keys and shapes. Its VGG
does not: timm replaces torchvision's classifier (``classifier.0/3/6``, Linear layers after an adaptive 7x7 average
pool) by ``pre_logits`` (``ConvMlp``: ``fc1`` a 7x7 convolution, ``fc2`` a 1x1 convolution) and ``head.fc`` (a
Linear layer after a global average pool), and has no adaptive pool (timm's ``vgg.py``, ``_filter_fn``).

At 224 px the last feature map is 7x7, so ``fc1`` sees the map torchvision's ``classifier.0`` sees, once, and the
global pool over its 1x1 output is the identity: the two compute the same logits. At any other size they differ
(torchvision pools to 7x7 first; timm slides ``fc1`` over the map and averages its outputs). jaxnets builds
torchvision's VGG: weights in timm's layout load into it exactly, and give timm's logits at 224 px only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnets.registry import ModelRef, get_spec
from jaxnets.weights.fileformat import WeightsError

# timm's VGG key prefix -> torchvision's (timm's _filter_fn, reversed).
VGG_KEYS = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
# The input size at which timm's VGG equals torchvision's (a 7x7 last feature map).
VGG_EXACT_SIZE = 224
VGG_CHANNELS, VGG_POOL = 512, 7  # the last feature map's channels and torchvision's adaptive-pool side


def is_timm_layout(model: ModelRef, state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a VGG state dict in timm's layout (has a ``pre_logits.`` or ``head.fc.`` key); for
    every other family timm's layout is torchvision's, and this is False."""
    return get_spec(model).family == "vgg" and any(k.startswith(tuple(VGG_KEYS)) for k in state)


def from_timm_state_dict(model: ModelRef, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (timm's layout, or torchvision's already) in torchvision's layout, the arrays as they are where
    nothing changes. VGG: ``pre_logits.fc1.weight`` (O, 512, 7, 7) becomes ``classifier.0.weight`` (O, 25088) by
    a reshape, no transpose: torch's ``flatten`` before ``classifier.0`` orders the inputs C, H, W, the order
    of a conv kernel's (I, kH, kW) axes. ``fc2`` (O, I, 1, 1) becomes ``classifier.3.weight`` (O, I)."""
    if not is_timm_layout(model, state):
        return dict(state)
    out = {}
    for key, value in state.items():
        new = _renamed(key, VGG_KEYS)
        if new.endswith(".weight") and new.startswith(("classifier.0.", "classifier.3.")):
            value = np.asarray(value)
            if value.ndim != 4:
                raise WeightsError(f"{key}: expected timm's conv weight (out, in, kh, kw), got shape {value.shape}")
            value = value.reshape(value.shape[0], -1)
        out[new] = value
    return out


def to_timm_state_dict(model: ModelRef, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (torchvision's layout) in timm's: ``from_timm_state_dict`` reversed (VGG's ``classifier.0.weight``
    (O, 25088) reshaped to timm's 7x7 conv (O, 512, 7, 7), ``classifier.3.weight`` to (O, I, 1, 1)); the other
    families unchanged."""
    if get_spec(model).family != "vgg":
        return dict(state)
    back = {v: k for k, v in VGG_KEYS.items()}
    out = {}
    for key, value in state.items():
        new = _renamed(key, back)
        if key == "classifier.0.weight":
            value = np.asarray(value).reshape(-1, VGG_CHANNELS, VGG_POOL, VGG_POOL)
        elif key == "classifier.3.weight":
            value = np.asarray(value)[:, :, None, None]
        out[new] = value
    return out


def _renamed(key: str, prefixes: Mapping[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key
