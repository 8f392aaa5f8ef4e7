"""An exponential moving average of the weights, as torchvision's classification reference keeps one
(``--model-ema``): ``utils.ExponentialMovingAverage``, an ``AveragedModel`` over the parameters and the buffers
(BatchNorm statistics), updated every ``--model-ema-steps`` optimizer updates of an epoch, its decay adjusted to
the batch size, and reset to a copy of the weights during warmup.

The average lives in the train state (``TrainState.ema``: ``params``, ``batch_stats`` and ``count``, the
``n_averaged`` of torch's ``AveragedModel``), is updated inside the jitted step and checkpointed with it, so a
resumed run continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp

PyTree = Any


class EmaSettings(Protocol):
    """The settings of a run the average depends on (``jaxnets.config.TrainConfig`` has them)."""

    model_ema: bool
    model_ema_decay: float
    model_ema_steps: int
    epochs: int
    warmup_epochs: float

    @property
    def update_batch_size(self) -> int:
        """Images per optimizer update."""


def adjusted_decay(decay: float, images_per_update: int, every: int, epochs: int) -> float:
    """torchvision's adjustment, which keeps the average's horizon the same whatever the batch size, the update
    interval and the length of the run: ``1 - min(1, (1 - decay) * world_size * batch_size * every / epochs)``
    (``world_size * batch_size`` is the global batch of one optimizer update)."""
    adjust = images_per_update * every / epochs
    return 1.0 - min(1.0, (1.0 - decay) * adjust)


@dataclass(frozen=True)
class EmaSchedule:
    """When and how the average is updated: ``decay`` (adjusted) every ``every`` updates of an epoch of
    ``steps_per_epoch`` updates; during the first ``warmup_epochs`` each update copies the weights."""

    decay: float
    every: int
    steps_per_epoch: int
    warmup_epochs: float


def schedule_of(config: EmaSettings, steps_per_epoch: int) -> EmaSchedule | None:
    """``--model-ema``'s schedule (None without it): torchvision's decay adjusted to the images per update, the
    update interval and the run's epochs."""
    if not config.model_ema:
        return None
    return EmaSchedule(decay_of(config), config.model_ema_steps, steps_per_epoch, config.warmup_epochs)


def decay_of(config: EmaSettings) -> float:
    """``--model-ema-decay`` adjusted as torchvision's reference does (``adjusted_decay``)."""
    return adjusted_decay(config.model_ema_decay, config.update_batch_size, config.model_ema_steps, config.epochs)


def init(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    """The average at the start: a copy of the weights, nothing averaged yet (``n_averaged = 0``)."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - own buffers: the state is donated
    return {"params": copy(params), "batch_stats": copy(batch_stats), "count": jnp.zeros((), jnp.int32)}


def update(ema: dict[str, PyTree], params: PyTree, batch_stats: PyTree, step: jax.Array,
           schedule: EmaSchedule) -> dict[str, PyTree]:
    """The average after optimizer update number ``step`` (1-based: the state's step once updated) produced
    ``params`` and ``batch_stats``. As torchvision's loop: after the update at index ``i`` of an epoch, if
    ``i % every == 0``, ``AveragedModel.update_parameters`` (the first call copies, later ones blend
    ``decay * average + (1 - decay) * weights``, parameters and buffers alike) and, while ``epoch <
    warmup_epochs``, ``n_averaged`` back to 0."""
    epoch, index = jnp.divmod(step - 1, schedule.steps_per_epoch)

    def averaged(ema):
        first = ema["count"] == 0
        blend = lambda avg, new: jnp.where(first, new, schedule.decay * avg + (1.0 - schedule.decay) * new)  # noqa: E731
        count = jnp.where(epoch < schedule.warmup_epochs, 0, ema["count"] + 1)
        return {"params": jax.tree.map(blend, ema["params"], params),
                "batch_stats": jax.tree.map(blend, ema["batch_stats"], batch_stats), "count": count.astype(jnp.int32)}
    return jax.lax.cond(index % schedule.every == 0, averaged, lambda ema: ema, ema)


def variables(ema: dict[str, PyTree]) -> dict[str, PyTree]:
    """The average as model variables."""
    return {"params": ema["params"], **({"batch_stats": ema["batch_stats"]} if ema["batch_stats"] else {})}
