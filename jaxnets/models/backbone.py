"""What makes every family a backbone: feature maps per stride level, and gradient checkpointing per block.

Each family declares its stride levels as data (``feature_levels``: the torchvision node a map comes from, its
channels, its reduction) and taps its forward pass at those nodes with a ``FeatureTaps``; everything else is
here, once: which levels ``out_indices`` selects, that a ``features_only`` model returns them as a list and
stops after the last one (so it builds no classifier, and no layer past the deepest level asked for, as
torchvision's ``create_feature_extractor`` and timm's ``features_only`` do), and how blocks are rematerialized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from flax import linen as nn

from jaxnets.errors import UserError

# What a rematerialized block keeps for the backward pass: nothing but its input (jax.checkpoint's default
# policy). Everything inside the block (convolutions included) is recomputed once in the backward pass: the
# most memory saved, for one extra forward pass per step. See `python -m jaxnets.benchmark --mode train --remat`.
REMAT_POLICY: Callable[..., bool] | None = jax.checkpoint_policies.nothing_saveable
# jax.checkpoint keeps a block's recomputation apart from its forward pass with optimization barriers. XLA:CPU
# removes them before common-subexpression elimination, which then merges the two: no memory is saved. A step
# of a remat model is compiled with this option on CPUs (``remat_compiler_options``); GPUs and TPUs keep the
# barriers as they are.
REMAT_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


class FeatureLevel(NamedTuple):
    """One stride level of a family, as data: ``node`` is the torchvision node the map comes from (a name that
    ``torchvision.models.feature_extraction.create_feature_extractor`` takes in ``return_nodes``)."""

    node: str
    channels: int
    reduction: int  # the map's stride relative to the input image


class FeatureInfo(NamedTuple):
    """What ``jaxnets.feature_info`` gives per returned map: its level ``index`` (what ``out_indices`` selects),
    the torchvision node it comes from, its channels and its reduction."""

    index: int
    node: str
    channels: int
    reduction: int


def select_levels(levels: Sequence[FeatureLevel], out_indices: Sequence[int] | None, where: str) -> tuple[int, ...]:
    """The level indices ``out_indices`` selects (all when None), as non-negative indices in increasing order.
    Negative indices count from the deepest level, as in Python and timm. A ``UserError`` naming ``where``
    for an index out of range, a repeated level, or levels out of order (the maps come in level order)."""
    count = len(levels)
    if out_indices is None:
        return tuple(range(count))
    if isinstance(out_indices, str | bytes) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in out_indices):
        raise UserError(f"{where}: out_indices must be a tuple of level indices, got {out_indices!r}")
    if not out_indices:
        raise UserError(f"{where}: out_indices is empty; give at least one level of 0..{count - 1}")
    bad = [i for i in out_indices if not -count <= i < count]
    if bad:
        raise UserError(f"{where}: out_indices {tuple(out_indices)}: level {bad[0]} does not exist; "
                        f"the levels are 0..{count - 1} ({', '.join(level.node for level in levels)})")
    selected = tuple(i % count for i in out_indices)
    if any(b <= a for a, b in zip(selected, selected[1:], strict=False)):
        raise UserError(f"{where}: out_indices {tuple(out_indices)} must name distinct levels in increasing order "
                        f"(the maps are returned shallowest first)")
    return selected


def feature_info(levels: Sequence[FeatureLevel], out_indices: Sequence[int] | None, where: str) -> list[FeatureInfo]:
    """The selected levels with their indices."""
    return [FeatureInfo(i, *levels[i]) for i in select_levels(levels, out_indices, where)]


class FeatureTaps:
    """One forward pass's feature maps: the family calls ``taps(node, x)`` at each of its level nodes, in order,
    and returns ``taps.maps`` as soon as a call answers True (every selected level recorded). For a model that
    is not ``features_only`` nothing is recorded and the answer is always False."""

    def __init__(self, model: nn.Module, where: str) -> None:
        features_only, out_indices = model.features_only, model.out_indices
        if out_indices is not None and not features_only:
            raise UserError(f"{where}: out_indices={tuple(out_indices)!r} selects feature maps: it needs "
                            f"features_only=True")
        levels = model.feature_levels()
        self.active = bool(features_only)
        self.wanted = [levels[i].node for i in select_levels(levels, out_indices, where)] if self.active else []
        self.recorded: dict[str, jax.Array] = {}

    def __call__(self, node: str, x: jax.Array) -> bool:
        if node in self.wanted:
            self.recorded[node] = x
        return self.active and len(self.recorded) == len(self.wanted)

    @property
    def maps(self) -> list[jax.Array]:
        """The selected levels' maps, NHWC, shallowest first."""
        return [self.recorded[node] for node in self.wanted]


def remat_compiler_options(remat: bool = True) -> dict[str, str]:
    """``compiler_options`` for ``jax.jit`` of a step of a model built with ``remat``: on XLA:CPU, those that
    let the rematerialization happen (``REMAT_CPU_COMPILER_OPTIONS``); elsewhere, and without remat, none."""
    if not remat or jax.default_backend() != "cpu":
        return {}
    return dict(REMAT_CPU_COMPILER_OPTIONS)


def checkpointed(target: Any, remat: bool) -> Any:
    """``target`` (a Module class, or a function whose first argument is a module) rematerialized with
    ``REMAT_POLICY`` when ``remat``: its activations are recomputed in the backward pass instead of being kept.
    Parameter paths do not change: ``nn.remat`` adds no scope."""
    return nn.remat(target, policy=REMAT_POLICY) if remat else target
