"""Variables trees as flat ``'/'``-joined keys and back: the one spelling of a leaf's path.

A key is ``'params/layer1/0/conv1/kernel'``: the collection, the module path (torchvision's module names)
and the leaf. Weights files store these keys, freeze patterns and error messages show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util


def plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts, whatever the Mapping type (FrozenDict, ...), so that flattening sees every leaf."""
    return {k: plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{'params': {'fc': {'bias': b}}}`` -> ``{'params/fc/bias': b}``."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(plain(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten``."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def in_module(key: str, module: str) -> bool:
    """Whether flat key ``'params/aux1/conv/bn/scale'`` lies under module path ``'aux1'`` (any collection)."""
    return key.partition("/")[2].startswith(module + "/")
