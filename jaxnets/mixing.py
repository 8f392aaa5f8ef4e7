"""MixUp and CutMix with the semantics of ``torchvision.transforms.v2.MixUp`` and ``CutMix`` (as torchvision's
classification reference applies them: to each batch, one of the two chosen with equal probability when both
are set), on the global batch inside the jitted train step.

Each batch is paired with itself rolled by one example (``batch.roll(1, 0)``), ``lambda ~ Beta(alpha, alpha)``.
MixUp blends the images and the (one-hot or multi-hot) targets: ``rolled * (1 - lam) + batch * lam``. CutMix
pastes a box of the rolled images, centred on a uniform pixel with sides ``sqrt(1 - lam)`` of the image's
(clipped at the borders), and mixes the targets by the area actually kept. The draws come from a key folded
from the run's key and the step, so a resumed run mixes every batch as the uninterrupted run did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Mixing:
    """``--mixup-alpha`` and ``--cutmix-alpha`` (0: off)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)


class MixParams(NamedTuple):
    """One batch's draw: whether it is CutMix, ``lam`` and the CutMix box ``(x1, y1, x2, y2)`` (int32)."""

    cutmix: jax.Array
    lam: jax.Array
    box: jax.Array


def draw(key: jax.Array, height: int, width: int, mixing: Mixing) -> MixParams:
    """torchvision's draws for one batch: which of the two (when both are set), ``lam`` from its Beta, and
    (CutMix) the box's centre, uniform over the pixels."""
    choice_key, lam_key, x_key, y_key = jax.random.split(key, 4)
    if mixing.mixup_alpha and mixing.cutmix_alpha:
        cutmix = jax.random.bernoulli(choice_key)
    else:
        cutmix = jnp.asarray(bool(mixing.cutmix_alpha))
    alpha = jnp.where(cutmix, mixing.cutmix_alpha, mixing.mixup_alpha).astype(jnp.float32)
    lam = jax.random.beta(lam_key, alpha, alpha)
    centre_x = jax.random.randint(x_key, (), 0, width)
    centre_y = jax.random.randint(y_key, (), 0, height)
    return MixParams(cutmix=cutmix, lam=lam, box=cutmix_box(lam, centre_x, centre_y, height, width))


def cutmix_box(lam: jax.Array, centre_x: jax.Array, centre_y: jax.Array, height: int, width: int) -> jax.Array:
    """``(x1, y1, x2, y2)``: torchvision's box, half-sides ``int(0.5 * sqrt(1 - lam) * side)``, clipped."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_w = jnp.floor(r * width).astype(jnp.int32)
    half_h = jnp.floor(r * height).astype(jnp.int32)
    return jnp.stack([jnp.maximum(centre_x - half_w, 0), jnp.maximum(centre_y - half_h, 0),
                      jnp.minimum(centre_x + half_w, width), jnp.minimum(centre_y + half_h, height)]).astype(jnp.int32)


def _blend(x: jax.Array, lam: jax.Array) -> jax.Array:
    """``x.roll(1, 0) * (1 - lam) + x * lam``, torchvision's order of operations."""
    lam = jnp.asarray(lam, jnp.float32)
    return jnp.roll(x, 1, axis=0) * (1.0 - lam).astype(x.dtype) + x * lam.astype(x.dtype)


def _paste(images: jax.Array, box: jax.Array) -> jax.Array:
    """The box ``(x1, y1, x2, y2)`` of the rolled NHWC images pasted into the batch."""
    height, width = images.shape[1:3]
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= box[1]) & (rows < box[3]) & (cols >= box[0]) & (cols < box[2])
    return jnp.where(inside[None, :, :, None], jnp.roll(images, 1, axis=0), images)


def kept_fraction(box: jax.Array, height: int, width: int) -> jax.Array:
    """CutMix's ``lam_adjusted``: the fraction of each image outside the pasted box."""
    return 1.0 - ((box[2] - box[0]) * (box[3] - box[1])).astype(jnp.float32) / (width * height)


def mixup(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``MixUp`` at ``lam``: NHWC images and (N, classes) targets blended with the batch rolled by one."""
    return _blend(images, lam), _blend(targets, lam)


def cutmix(images: jax.Array, targets: jax.Array, box: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``CutMix`` with ``box``: the rolled images' box pasted in, the targets mixed by the area kept."""
    return _paste(images, box), _blend(targets, kept_fraction(box, *images.shape[1:3]))


def mix_images(images: jax.Array, params: MixParams) -> jax.Array:
    """A batch's images mixed as its draw says (the targets follow with ``mix_targets``, once the number of
    classes is known from the logits)."""
    return jax.lax.cond(params.cutmix, lambda: _paste(images, params.box), lambda: _blend(images, params.lam))


def mix_targets(targets: jax.Array, params: MixParams, height: int, width: int) -> jax.Array:
    """A batch's (N, classes) targets mixed as its ``height`` x ``width`` images were."""
    return _blend(targets, jnp.where(params.cutmix, kept_fraction(params.box, height, width), params.lam))
