"""The run's description for its log: model, data, devices, batch, optimizer and the recipe's settings."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxnets import host, parallel
from jaxnets.config import TrainConfig, peak_learning_rate, recipe_parts
from jaxnets.data import Dataset
from jaxnets.train_step import TrainState


def describe_run(config: TrainConfig, dataset: Dataset, mesh: Any, state: TrainState) -> str:
    """One line: what trains on what, on which devices, with which batch, optimizer and recipe settings."""
    devices = mesh.devices.ravel()
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return (f"{config.model} ({num_params / 1e6:.1f}M params, {config.dtype}) on {dataset.name}: "
            f"{len(dataset.train)} train / {len(dataset.val)} val images, {dataset.num_classes} classes, "
            f"{config.image_size}px; {parallel.describe_topology(mesh)}{_host_malloc(devices[0].platform)}, "
            f"global batch {config.batch_size}"
            + (f" x {config.grad_accum_steps} accumulated (BatchNorm statistics per batch)"
               if config.grad_accum_steps > 1 else "")
            + f", {dataset.steps_per_epoch} {'updates' if config.grad_accum_steps > 1 else 'steps'}/epoch x "
              f"{config.epochs} epochs; "
            f"{config.optimizer} peak lr {peak_learning_rate(config):.4g} "
            f"(= {config.lr:g} x {config.update_batch_size}/256), {config.schedule} schedule"
            + (f"; backbone lr x {config.backbone_lr_mult:g}" if config.backbone_lr_mult != 1.0 else "")
            + (f"; layer-wise lr decay {config.layer_decay:g}" if config.layer_decay != 1.0 else "")
            + "".join(f"; {part}" for part in recipe_parts(config)))


def _host_malloc(platform: str) -> str:
    """On CPUs, which malloc serves XLA: it changes step times by up to a fifth (jaxnets.host)."""
    return f", malloc: {host.running_allocator()}" if platform == "cpu" else ""
