"""The run's description for its log: model, data, devices, batch, optimizer and the recipe's settings; and the
warning a from-scratch run on a small dataset gets."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxnets import host, parallel
from jaxnets.config import TrainConfig, peak_learning_rate, recipe_parts
from jaxnets.data import DIGITS, Dataset
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


# Below this many training images per class (on average), a run from scratch learns its training images rather than
# their classes: a newcomer's 39 photos (13 per class) at 224 px trained to 97-100 % and validated at 33 %. ImageNet
# has about 1300 per class; "a few hundred" is where small-data advice starts.
FEW_IMAGES_PER_CLASS = 300


def small_data_warning(config: TrainConfig, num_train: int, num_classes: int) -> str | None:
    """The log's warning when ``config`` trains from scratch on fewer than ``FEW_IMAGES_PER_CLASS`` training images per
    class (``num_train`` over ``num_classes``), naming what works on small datasets; None otherwise. Not for the
    embedded digits: 8x8 images learnt at 16 px, where ~140 per class train well (the default run:
    95-98 % top-1)."""
    per_class = num_train / max(num_classes, 1)
    if config.pretrained is not None or config.dataset == DIGITS or per_class >= FEW_IMAGES_PER_CLASS:
        return None
    return (f"warning: {num_train} training images for {num_classes} classes ({per_class:.0f} per class) are few to "
            f"train {config.model} from scratch at {config.image_size} px: expect it to learn the training images "
            f"and little else; on small datasets --pretrained (fine-tune ImageNet weights), a smaller --image-size "
            f"or --linear-probe with --pretrained do better")


def _host_malloc(platform: str) -> str:
    """On CPUs, which malloc serves XLA: it changes step times by up to a fifth (jaxnets.host)."""
    return f", malloc: {host.running_allocator()}" if platform == "cpu" else ""
