"""A run's optimizer from its settings: SGD or AdamW on the linearly scaled learning rate, the warmup + cosine or
step schedule, gradient clipping, and ``--freeze`` / ``--backbone-lr-mult`` / ``--layer-decay`` as parameter
groups (the masks and the partition themselves are ``jaxnets.transfer``'s)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxnets import transfer
from jaxnets.config import TrainConfig, peak_learning_rate

PyTree = Any


def make_optimizer(config: TrainConfig, steps_per_epoch: int, *, trainable_mask: PyTree | None = None,
                   head_mask: PyTree | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (momentum, optionally Nesterov) or AdamW on the linearly scaled learning rate, with warmup +
    cosine or step decay, optional gradient clipping, and no weight decay on biases and BatchNorm
    parameters (the 1-D leaves). With a ``trainable_mask``, ``jaxnets.transfer.build_optimizer`` gives
    frozen leaves a zero update and no optimizer state, and clips the trainable gradients."""
    schedule = make_schedule(config, steps_per_epoch)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if config.optimizer == "adamw":
        base = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    else:
        base = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                           optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if trainable_mask is not None:
        # The masks have the parameters' structure: all that layer-wise multipliers need.
        lr_mults = (transfer.layerwise_lr_mults(config.spec, trainable_mask, config.layer_decay)
                    if config.layer_decay != 1.0 else None)
        base = transfer.build_optimizer(base, trainable_mask, head_mask=head_mask, grad_clip=config.grad_clip,
                                        backbone_lr_mult=config.backbone_lr_mult, lr_mults=lr_mults)
    elif config.grad_clip:
        base = optax.chain(optax.clip_by_global_norm(config.grad_clip), base)
    return base, schedule


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate of each update: linear warmup from 0, then cosine to 0 or step decay."""
    peak = peak_learning_rate(config)
    total = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), total, end_value=0.0)
    boundaries = {round(e * steps_per_epoch): config.step_gamma for e in config.step_epochs if 0 < e < config.epochs}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), lambda s: decay(s + warmup)], [warmup])


def freeze_masks(config: TrainConfig, params: PyTree) -> tuple[PyTree | None, PyTree | None, tuple[str, ...]]:
    """``--freeze`` / ``--backbone-lr-mult`` / ``--layer-decay`` -> (trainable mask, head mask, frozen
    BatchNorm paths); (None, None, ()) when everything trains at one learning rate."""
    if not has_parameter_groups(config):
        return None, None, ()
    spec = config.spec
    mask = transfer.trainable_mask(spec, params, config.freeze)
    return mask, transfer.head_mask(spec, params), transfer.frozen_modules(spec, mask)


def has_parameter_groups(config: TrainConfig) -> bool:
    """Whether the optimizer partitions the parameters: frozen ones, or learning-rate multipliers."""
    return config.freeze != "none" or config.backbone_lr_mult != 1.0 or config.layer_decay != 1.0
