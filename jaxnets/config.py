"""One training run's settings, resolved: every default that depends on the model or the dataset is
filled in before the run starts, so ``config.json`` records what actually ran."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxnets.data import DIGITS, DataConfig
from jaxnets.errors import UserError
from jaxnets.registry import get_spec

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
DTYPES = ("float32", "bfloat16")
# The learning rate is given for a global batch of this many images and scaled linearly with the
# batch size (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; as flax's imagenet example).
LR_REFERENCE_BATCH = 256
# Settings a resumed run must share with the checkpoint it resumes: anything else changes what a
# step means (the model, the data, how it is batched) or the optimizer state's structure (which
# parameters train, how their updates are transformed) and would make the resumed run a different run.
RESUME_KEYS = ("model", "dataset", "classes", "image_size", "batch_size", "seed", "no_aux", "num_classes",
               "val_fraction", "optimizer", "grad_clip", "freeze", "backbone_lr_mult", "layer_decay")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of ``train.py``; ``None`` means "resolved from the model and the dataset"."""

    model: str = "resnet34"
    dataset: str = DIGITS
    data_dir: str | None = None
    workdir: str | None = None  # default runs/<model>-<dataset>
    image_size: int | None = None  # digits: 16 (VGG 32, AlexNet 64); else the weights' crop size (224)
    batch_size: int | None = None  # global, over all devices and processes; digits 32, else 128
    eval_batch_size: int | None = None  # default batch_size
    epochs: int | None = None  # digits: 12; else 90
    steps: int | None = None  # stop after this many steps in total (smoke runs); the schedule still spans epochs
    optimizer: str = "sgd"
    lr: float | None = None  # per LR_REFERENCE_BATCH images; sgd 0.1, adamw 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None  # sgd 1e-4 (5e-4 on digits), adamw 0.05
    schedule: str = "cosine"
    warmup_epochs: float | None = None  # digits: 1; else 5
    step_epochs: tuple[int, ...] = (30, 60, 80)  # --schedule step: decay by step_gamma at these epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    dtype: str = "float32"  # compute dtype; parameters and loss stay float32
    aux_weight: float = 0.3  # GoogLeNet: loss = main + aux_weight * (aux1 + aux2)
    no_aux: bool = False  # GoogLeNet without auxiliary heads
    seed: int = 0
    val_fraction: float = 0.2
    classes: tuple[int, ...] | None = None
    min_crop_scale: float | None = None  # RandomResizedCrop scale=(min, 1); digits 0.9, else 0.08
    hflip: bool | None = None  # digits: False (digits are not mirror-symmetric); else True
    pretrained: str | None = None  # 'default' (torchvision's weights) or a weights file
    freeze: str = "none"
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0  # layer-wise LR decay: last backbone block x decay, the one before x decay**2, ...
    linear_probe: str | None = None  # 'svm' | 'logreg': fit a linear classifier on frozen features instead
    devices: int | None = None  # default: all devices
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    keep_checkpoints: int = 3  # the last N, plus the best validation top-1
    progress: bool = True
    compile_cache: str | None = None  # default ~/.cache/jaxnets/jax_compilation_cache; '' disables
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    num_classes: int | None = None  # set from the dataset

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def data_config(self) -> DataConfig:
        transforms = get_spec(self.model).weights.transforms
        return DataConfig(
            dataset=self.dataset, data_dir=self.data_dir, image_size=self.image_size,
            mean=transforms.mean, std=transforms.std, batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size, seed=self.seed, val_fraction=self.val_fraction,
            classes=self.classes, min_crop_scale=self.min_crop_scale, hflip=self.hflip)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill in the defaults that depend on the model and the dataset; check the choices."""
    spec = get_spec(config.model)  # raises for an unknown model
    _check_choice("--optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("--schedule", config.schedule, SCHEDULES)
    _check_choice("--dtype", config.dtype, DTYPES)
    digits = config.dataset == DIGITS
    if config.image_size is not None:
        image_size = config.image_size
    elif digits:  # small and fast (the digits are 8x8), but never below what the model accepts (AlexNet: 63 px)
        image_size = 16 * math.ceil(max(16, *spec.weights.min_size) / 16)
    else:
        image_size = spec.weights.transforms.crop_size
    check_image_size(config.model, image_size)
    for flag, value in (("--dataset", config.dataset), ("--workdir", config.workdir)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty")
    adamw = config.optimizer == "adamw"
    batch_size = _default(config.batch_size, 32 if digits else 128)
    resolved = dataclasses.replace(
        config,
        workdir=_default(config.workdir, str(Path("runs") / f"{config.model}-{Path(config.dataset).name or 'data'}")),
        image_size=image_size,
        batch_size=batch_size,
        eval_batch_size=_default(config.eval_batch_size, batch_size),
        epochs=_default(config.epochs, 12 if digits else 90),
        lr=_default(config.lr, 1e-3 if adamw else 0.1),
        weight_decay=_default(config.weight_decay, 0.05 if adamw else (5e-4 if digits else 1e-4)),
        warmup_epochs=_default(config.warmup_epochs, 1.0 if digits else 5.0),
        min_crop_scale=_default(config.min_crop_scale, 0.9 if digits else 0.08),
        hflip=_default(config.hflip, not digits),
    )
    _check_ranges(resolved)
    if spec.family != "googlenet" and resolved.no_aux:
        raise UserError(f"--no-aux: {config.model} has no auxiliary heads (GoogLeNet only)")
    return resolved


def check_image_size(model: str, image_size: int) -> None:
    """``--image-size`` against the model's minimum input (below it an internal feature map is empty)."""
    minimum = max(get_spec(model).weights.min_size)
    if image_size < minimum:
        raise UserError(f"--image-size {image_size}: {model} needs at least {minimum} px")


def peak_learning_rate(config: TrainConfig) -> float:
    """``lr * global_batch / 256``: the linear scaling rule."""
    return config.lr * config.batch_size / LR_REFERENCE_BATCH


def resume_mismatch(saved: dict[str, Any], config: TrainConfig) -> str | None:
    """Why a checkpointed run cannot be resumed with ``config`` (None when it can)."""
    current = json.loads(config.to_json())
    for key in RESUME_KEYS:
        if key in saved and saved[key] != current[key]:
            return f"{key}={saved[key]!r} (this run: {current[key]!r})"
    return None


def _default(value: Any, default: Any) -> Any:
    """``value`` unless it was not given (None): a given 0 is checked, never silently replaced."""
    return default if value is None else value


# (flag, TrainConfig field, the range its values must lie in, as text and as a test). Numbers outside
# them train without an error but not as asked: a negative --grad-clip flips the gradients.
_RANGES: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("--batch-size", "batch_size", ">= 1", lambda v: v >= 1),
    ("--eval-batch-size", "eval_batch_size", ">= 1", lambda v: v >= 1),
    ("--epochs", "epochs", ">= 1", lambda v: v >= 1),
    ("--steps", "steps", ">= 1", lambda v: v >= 1),
    ("--log-every", "log_every", ">= 1", lambda v: v >= 1),
    ("--keep-checkpoints", "keep_checkpoints", ">= 1", lambda v: v >= 1),
    ("--checkpoint-every", "checkpoint_every", ">= 0", lambda v: v >= 0),
    ("--lr", "lr", "> 0", lambda v: v > 0),
    ("--momentum", "momentum", "in [0, 1)", lambda v: 0 <= v < 1),
    ("--weight-decay", "weight_decay", ">= 0", lambda v: v >= 0),
    ("--warmup-epochs", "warmup_epochs", ">= 0", lambda v: v >= 0),
    ("--step-gamma", "step_gamma", "in (0, 1]", lambda v: 0 < v <= 1),
    ("--label-smoothing", "label_smoothing", "in [0, 1)", lambda v: 0 <= v < 1),
    ("--grad-clip", "grad_clip", "> 0", lambda v: v > 0),
    ("--aux-weight", "aux_weight", ">= 0", lambda v: v >= 0),
    ("--val-fraction", "val_fraction", "in (0, 1)", lambda v: 0 < v < 1),
    ("--min-crop-scale", "min_crop_scale", "in (0, 1]", lambda v: 0 < v <= 1),
    ("--backbone-lr-mult", "backbone_lr_mult", "> 0", lambda v: v > 0),
    ("--layer-decay", "layer_decay", "in (0, 1]", lambda v: 0 < v <= 1),
)


def _check_ranges(config: TrainConfig) -> None:
    for flag, field, expected, ok in _RANGES:
        value = getattr(config, field)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"{flag} must be {expected}, got {value}")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
