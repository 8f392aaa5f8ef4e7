"""One training run's settings, resolved: every default that depends on the model or the dataset is
filled in before the run starts, so ``config.json`` records what actually ran."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxnets import ema as ema_lib
from jaxnets.data import DIGITS, DataConfig, DataError, parse_classes
from jaxnets.data.autoaugment import CHANNELS, MAGNITUDE_BINS, POLICIES
from jaxnets.data.config import POSITIVE_INT, Range, TooFewExamples, field_ranges
from jaxnets.errors import UserError, is_int
from jaxnets.eval_transform import EvalTransform, resize_for_crop
from jaxnets.models.googlenet import AUX_WEIGHT
from jaxnets.parallel import DISTRIBUTED
from jaxnets.registry import DEFAULT_WEIGHTS, ModelRef, ModelSpec, get_spec, is_weights_name

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
DTYPES = ("float32", "bfloat16")
# The learning rate is given for a global batch of this many images and scaled linearly with the
# batch size (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; as flax's imagenet example).
LR_REFERENCE_BATCH = 256
AUTO_AUGMENT = POLICIES  # --auto-augment, torchvision's reference names
# The data settings whose defaults are the library's (DataConfig owns them; TrainConfig's fields read them here).
DATA_DEFAULTS = DataConfig()

# Recipes: settings a run starts from (``--recipe NAME``; flags given override them; config.json records the
# result). Each is data: TrainConfig field -> value.
RECIPES: dict[str, dict[str, Any]] = {
    # torchvision's "new recipe", which trained ResNet-50's IMAGENET1K_V2 weights (80.858 % top-1, against V1's
    # 76.130 %), as its classification reference documents it: 8 GPUs x 128 images at lr 0.5, i.e. a global batch
    # of 1024 at 0.125 per 256 images; cosine after 5 linear warmup epochs, 600 epochs; TrivialAugmentWide, random
    # erasing 0.1, MixUp 0.2 / CutMix 1.0, label smoothing 0.1, EMA (every 32 updates, decay 0.99998 adjusted),
    # weight decay 2e-5 and none on the norm layers, train crop 176 (its eval sizes: RECIPE_EVAL_SIZES).
    "torchvision-v2": {
        "optimizer": "sgd", "momentum": 0.9, "nesterov": False, "lr": 0.125, "batch_size": 1024, "epochs": 600,
        "schedule": "cosine", "warmup_epochs": 5.0, "weight_decay": 2e-5, "label_smoothing": 0.1,
        "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "auto_augment": "ta_wide", "random_erase": 0.1, "hflip": True,
        "min_crop_scale": 0.08, "model_ema": True, "model_ema_steps": 32, "model_ema_decay": 0.99998,
        "image_size": 176,
    },
}


@dataclass(frozen=True)
class RecipeEvalSizes:
    """A recipe's eval sizes, as a rule of the training crop: at ``image_size`` it evaluates at resize ``resize`` /
    crop ``crop``, and at any other ``--image-size`` at the same ratios (``crop_for``, ``resize_for``), so that the
    recipe's train-test resolution ratio (FixRes: a random-resized-crop model sees objects larger than a center
    crop shows them, and is best evaluated at a larger crop) is kept at the size a run trains at."""

    image_size: int
    resize: int
    crop: int

    def crop_for(self, image_size: int) -> int:
        """The eval crop for a training crop of ``image_size``: ``crop x image_size / recipe image size``."""
        return round(self.crop * image_size / self.image_size)

    def resize_for(self, crop: int) -> int:
        """The shorter side to resize to before an eval crop of ``crop``: ``crop x resize / recipe crop``."""
        return round(crop * self.resize / self.crop)

    def describe(self, image_size: int) -> str:
        return f"the recipe's {self.resize}/{self.crop} at {self.image_size} px, scaled to {image_size} px"


# torchvision-v2: train crop 176, eval resize 232 and crop 224 (--image-size 64: resize 84, crop 81).
RECIPE_EVAL_SIZES: dict[str, RecipeEvalSizes] = {
    "torchvision-v2": RecipeEvalSizes(RECIPES["torchvision-v2"]["image_size"], resize=232, crop=224)}


@dataclass(frozen=True)
class ByDataset:
    """A default that depends on the dataset: the embedded digits (small, fast) or any other."""

    digits: Any
    other: Any

    def pick(self, config: TrainConfig) -> Any:
        return self.digits if config.dataset == DIGITS else self.other

    def __str__(self) -> str:
        return f"{self.digits} on digits, else {self.other}"


@dataclass(frozen=True)
class ByOptimizer:
    """A default that depends on ``--optimizer`` (and, through a ``ByDataset`` value, on the dataset)."""

    sgd: Any
    adamw: Any

    def pick(self, config: TrainConfig) -> Any:
        value = getattr(self, config.optimizer)
        return value.pick(config) if isinstance(value, ByDataset) else value

    def __str__(self) -> str:
        return f"sgd: {self.sgd}; adamw: {self.adamw}"


DATA, OPTIMIZATION, TRANSFER, RUN = "model and data", "optimization", "transfer learning", "run, devices and hosts"
AUGMENT = "augmentation and weight averaging"


@dataclass(frozen=True)
class Log:
    """A setting's part of the run description (``recipe_parts``), shown when the setting is in use: ``text``
    formatted with the value when the value is truthy (``"mixup alpha {:g}"``), or a function of the resolved
    config giving the text or None. ``order``: where the part goes in the description."""

    order: int
    text: str | Callable[[TrainConfig], str | None]

    def part(self, config: TrainConfig, value: Any) -> str | None:
        if callable(self.text):
            return self.text(config)
        return self.text.format(value) if value else None


@dataclass(frozen=True)
class ModelOption:
    """The model option (``create_model``'s keyword ``name``) a setting sets: the setting's value, or its negation
    for a ``--no-X`` switch (``negate``). It is given to the model only when the setting differs from its default,
    so every family trains by default; a model without the option refuses the setting (``missing``: what the error
    says the model lacks)."""

    name: str
    negate: bool = False
    missing: str | None = None

    def value(self, setting_value: Any) -> Any:
        return not setting_value if self.negate else setting_value

    def refusal(self, flag: str, model: str) -> str:
        return f"{flag}: {model} has {self.missing or f'no option {self.name}'}"


def setting(default: Any = None, help: str | Callable[[], str] = "", *, group: str | None,
            auto: ByDataset | ByOptimizer | None = None, valid: Range | None = None, resume: bool = False,
            data: bool = False, log: Log | None = None, model: ModelOption | None = None, **argparse: Any) -> Any:
    """A ``TrainConfig`` field and everything else about it, declared once: the help text, the flag group
    (``None``: no flag), the default resolved from the model or the data when the field is None (``auto``), the
    range its values must lie in (``valid``; ``resolve`` checks it), whether a resumed run must have the value
    its checkpoint was saved with (``resume``: anything that changes what a step means, the model, the data and
    how it is batched and augmented, or the optimizer state's structure), whether it feeds ``DataConfig``'s field
    of the same name (``data``: that field's declared range is the setting's; ``TrainConfig.data_config``), the
    model option it sets (``model``; ``TrainConfig.model_options``), its part of the run description (``log``),
    and argparse keywords the field's type does not imply (choices, nargs, a parser for the text). What reads
    them: ``options`` and the functions after it."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "auto": auto,
                                                        "valid": valid, "resume": resume, "data": data, "log": log,
                                                        "model": model, "argparse": argparse})


@dataclass(frozen=True)
class Option:
    """One ``TrainConfig`` field's declaration (``setting``), read back; ``valid`` is a ``data`` setting's
    ``DataConfig`` field's."""

    name: str
    group: str | None
    valid: Range | None
    resume: bool
    data: bool
    log: Log | None
    model: ModelOption | None = None
    default: Any = None

    @property
    def flag(self) -> str:
        return flag_name(self.name)


def flag_name(field_name: str) -> str:
    """The flag of a ``TrainConfig`` field: ``--val-crop-size`` for ``val_crop_size``."""
    return "--" + field_name.replace("_", "-")


def options(cls: type[TrainConfig] | None = None) -> tuple[Option, ...]:
    """Each field's declaration, in field order (``cls``: ``TrainConfig`` or a subclass)."""
    data_ranges = field_ranges(DataConfig)
    declared = []
    for field in dataclasses.fields(cls or TrainConfig):
        meta = field.metadata
        if meta["data"] and meta["valid"] is not None:
            raise TypeError(f"TrainConfig.{field.name}: a data setting's range is DataConfig.{field.name}'s")
        valid = data_ranges.get(field.name) if meta["data"] else meta["valid"]
        declared.append(Option(field.name, meta["group"], valid, meta["resume"], meta["data"], meta["log"],
                               meta["model"], field.default))
    return tuple(declared)


def valid_ranges(cls: type[TrainConfig] | None = None) -> dict[str, Range]:
    """Each setting that has a range, and the range (``resolve`` checks them)."""
    return {o.name: o.valid for o in options(cls) if o.valid is not None}


def resume_keys(cls: type[TrainConfig] | None = None) -> tuple[str, ...]:
    """The settings a resumed run must share with its checkpoint (``checkpointing.RESUME_KEYS``)."""
    return tuple(o.name for o in options(cls) if o.resume)


def recipe_parts(config: TrainConfig) -> list[str]:
    """The parts of the run description that name the modern-recipe settings a resolved run uses (none by
    default), each as its setting's ``log`` says, in their ``order``."""
    logged = sorted((o for o in options(type(config)) if o.log is not None), key=lambda o: o.log.order)
    return [part for o in logged if (part := o.log.part(config, getattr(config, o.name)))]


def _auto_augment_part(config: TrainConfig) -> str | None:
    if not config.auto_augment:
        return None
    return f"auto-augment {config.auto_augment}" + (f" (magnitude {config.ra_magnitude})"
                                                     if config.auto_augment == "ra" else "")


def _eval_sizes_part(config: TrainConfig) -> str | None:
    if config.val_crop_size == config.image_size:
        return None
    part = f"eval resize {config.val_resize_size} crop {config.val_crop_size}"
    rule = RECIPE_EVAL_SIZES.get(config.recipe)
    if rule is None or config.image_size == rule.image_size:
        return part
    if (config.val_crop_size, config.val_resize_size) == (crop := rule.crop_for(config.image_size),
                                                          rule.resize_for(crop)):
        return f"{part} ({rule.describe(config.image_size)})"
    return part


def _ema_part(config: TrainConfig) -> str | None:
    if not config.model_ema:
        return None
    return (f"EMA every {config.model_ema_steps} updates, decay {ema_lib.decay_of(config):.6g} (adjusted from "
            f"{config.model_ema_decay:g})")


def _recipe_eval_help(size: str) -> str:
    """``--val-crop-size``'s (``size='crop'``) or ``--val-resize-size``'s default under each recipe, for the help."""
    if size == "crop":
        return "; ".join(f"{name} {rule.crop} at {rule.image_size}" for name, rule in RECIPE_EVAL_SIZES.items())
    return "; ".join(f"{name} x {rule.resize}/{rule.crop}" for name, rule in RECIPE_EVAL_SIZES.items())


def _model_names() -> str:
    from jaxnets.registry import list_models

    return f"one of: {', '.join(list_models())}"


# resume=True (checkpointing.RESUME_KEYS): a resumed run must have the value its checkpoint was saved with, because
# another changes what a step means or the optimizer state's structure: the model and its input (--in-chans shapes
# the stem and the data); the data, how it is batched (the step counts updates: --grad-accum-steps sets the images
# per update) and labelled (--multi-label changes the labels and the loss); the augmentation, drawn per step and per
# example from the seed (a run resumed with another would not continue the one it resumes); which parameters train
# and how their updates are transformed; --model-ema, which adds the average to the state.
@dataclass(frozen=True)
class TrainConfig:
    """Every setting of ``train.py``, one flag each (``--batch-size`` for ``batch_size``); ``None`` means
    "resolved from the model and the dataset" (``resolve``). Each field is declared once, with all there is to
    know about it (``setting``)."""

    # model and data
    model: str = setting("resnet34", _model_names, group=DATA, resume=True)
    dataset: str = setting(DIGITS, "'digits' (embedded), a TFDS name (tf_flowers, imagenette, cifar10, "
                                   "imagenet2012, ...), or a folder of class subfolders (with train/ and val/ "
                                   "when present)", group=DATA, resume=True, data=True)
    data_dir: str | None = setting(None, "TFDS data dir (imagenet2012: put the tars in DATA_DIR/downloads/manual)",
                                   group=DATA, data=True)
    image_size: int | None = setting(None, "training crop size, and the eval crop unless --val-crop-size or a "
                                           "--recipe (default on digits: 16, VGG 32, AlexNet 64; else the weights' "
                                           "224)", group=DATA,
                                     resume=True, data=True)
    val_crop_size: int | None = setting(None, "eval: center crop (default: --image-size; with a --recipe, its eval "
                                              f"crop scaled to --image-size: {_recipe_eval_help('crop')})", group=DATA,
                                        data=True, log=Log(9, _eval_sizes_part))
    val_resize_size: int | None = setting(None, "eval: resize the shorter side to this before the crop (default: "
                                                f"the crop x 256/224; with a --recipe, {_recipe_eval_help('resize')})",
                                          group=DATA, data=True)
    classes: tuple[int, ...] | None = setting(None, "keep only these labels, remapped to 0..k-1: 0,1,2,3,4 or 5-9",
                                              group=DATA, resume=True, data=True, type=parse_classes)
    val_fraction: float = setting(DATA_DEFAULTS.val_fraction, "held-out fraction of train when there is no "
                                  "validation split", group=DATA, resume=True, data=True)
    min_crop_scale: float | None = setting(None, "RandomResizedCrop minimal area", group=DATA,
                                           auto=ByDataset(0.9, 0.08), data=True)
    hflip: bool | None = setting(None, "random horizontal flips (digits are not mirror-symmetric)", group=DATA,
                                 auto=ByDataset(False, True), data=True)
    dtype: str = setting("float32", "compute dtype (parameters and the loss stay float32)", group=DATA,
                         choices=DTYPES)
    no_aux: bool = setting(False, "GoogLeNet without its auxiliary heads", group=DATA, resume=True,
                           model=ModelOption("aux_logits", negate=True, missing="no auxiliary heads (GoogLeNet only)"))
    no_shortcut: bool = setting(False, "ResNet without its shortcuts: the plain network of the same depth (He et al. "
                                       "2016), no identity and no projection shortcut", group=DATA, resume=True,
                                model=ModelOption("shortcut", negate=True,
                                                  missing="no shortcuts (ResNet, ResNeXt, Wide ResNet only)"))
    in_chans: int = setting(DATA_DEFAULTS.in_chans, "input channels: 1 reads images as grayscale, 3 as RGB; a "
                            "folder of .npy arrays (H, W, C) gives C. A pretrained stem is adapted (timm's "
                            "adapt_input_conv), and the normalization statistics with it", group=DATA, resume=True,
                            data=True, model=ModelOption("in_chans"))
    remat: bool = setting(False, "rematerialize each block's activations in the backward pass (gradient "
                                 "checkpointing): less memory, a slower step", group=DATA,
                          model=ModelOption("remat"))
    aux_weight: float = setting(AUX_WEIGHT, "GoogLeNet: loss = main + w * (aux1 + aux2), as in the paper",
                                group=DATA, valid=Range(0))
    multi_label: bool = setting(DATA_DEFAULTS.multi_label, "each image has any number of classes: a folder with "
                                "labels.csv (file,label;label;...) or a TFDS dataset whose label is a sequence of "
                                "classes; sigmoid binary cross-entropy, and mAP, F1 and exact match instead of top-k",
                                group=DATA, resume=True, data=True,
                                log=Log(2, "multi-label (sigmoid binary cross-entropy)"))
    # augmentation and averaging
    auto_augment: str | None = setting(None, "torchvision's automatic augmentation after the crop and flip: ra "
                                             "(RandAugment), ta_wide (TrivialAugmentWide), imagenet (AutoAugment's "
                                             "ImageNet policy)", group=AUGMENT, resume=True, data=True,
                                       log=Log(6, _auto_augment_part), choices=AUTO_AUGMENT)
    ra_magnitude: int = setting(DATA_DEFAULTS.ra_magnitude, f"RandAugment's magnitude bin, 0-{MAGNITUDE_BINS - 1}",
                                group=AUGMENT, resume=True, data=True)
    random_erase: float = setting(DATA_DEFAULTS.random_erase, "probability of torchvision's RandomErasing (a box "
                                  "of 2-33 %% of the image, aspect 0.3-3.3, set to 0 after normalization)",
                                  group=AUGMENT, resume=True, data=True, log=Log(7, "random erasing p={:g}"))
    mixup_alpha: float = setting(0.0, "MixUp: each batch blended with itself rolled by one, lambda ~ Beta(a, a), "
                                      "labels alike (torchvision's MixUp; 0: off)", group=AUGMENT, resume=True,
                                 valid=Range(0), log=Log(4, "mixup alpha {:g}"))
    cutmix_alpha: float = setting(0.0, "CutMix: a box of the rolled batch pasted in (torchvision's CutMix; 0: off); "
                                       "with --mixup-alpha, one of the two per batch", group=AUGMENT, resume=True,
                                  valid=Range(0), log=Log(5, "cutmix alpha {:g}"))
    model_ema: bool = setting(False, "an exponential moving average of the weights and BatchNorm statistics, "
                                     "evaluated each epoch beside them; the final weights are the average's",
                              group=AUGMENT, resume=True, log=Log(8, _ema_part))
    model_ema_decay: float = setting(0.99998, "EMA decay, adjusted as torchvision's reference: 1 - min(1, (1 - d) x "
                                              "global batch x --model-ema-steps / epochs)", group=AUGMENT,
                                     valid=Range(0, 1, high_open=True))
    model_ema_steps: int = setting(32, "update the EMA every N optimizer updates of an epoch (a copy of the weights "
                                       "during warmup)", group=AUGMENT, valid=POSITIVE_INT)
    # optimization
    epochs: int | None = setting(None, "", group=OPTIMIZATION, auto=ByDataset(10, 90), valid=POSITIVE_INT)
    steps: int | None = setting(None, "stop after this many steps in total (smoke runs); the schedule still "
                                      "spans --epochs", group=OPTIMIZATION, valid=POSITIVE_INT)
    batch_size: int | None = setting(None, "global batch over all devices and processes; left to its default, it "
                                           "shrinks to fit a smaller training set (logged)", group=OPTIMIZATION,
                                     auto=ByDataset(32, 128), valid=POSITIVE_INT, resume=True)
    eval_batch_size: int | None = setting(None, "global eval batch (default: --batch-size)", group=OPTIMIZATION,
                                          data=True)
    optimizer: str = setting("sgd", "", group=OPTIMIZATION, choices=OPTIMIZERS, resume=True)
    lr: float | None = setting(None, f"learning rate per {LR_REFERENCE_BATCH} images, scaled by "
                                     f"batch/{LR_REFERENCE_BATCH}", group=OPTIMIZATION,
                               auto=ByOptimizer(sgd=0.1, adamw=1e-3), valid=Range(0, low_open=True))
    momentum: float = setting(0.9, "", group=OPTIMIZATION, valid=Range(0, 1, high_open=True))
    nesterov: bool = setting(False, "", group=OPTIMIZATION)
    weight_decay: float | None = setting(None, "not applied to biases and BatchNorm", group=OPTIMIZATION,
                                         auto=ByOptimizer(sgd=ByDataset(5e-4, 1e-4), adamw=0.05), valid=Range(0))
    schedule: str = setting("cosine", "", group=OPTIMIZATION, choices=SCHEDULES)
    warmup_epochs: float | None = setting(None, "linear warmup", group=OPTIMIZATION, auto=ByDataset(1.0, 5.0),
                                          valid=Range(0))
    step_epochs: tuple[int, ...] = setting((30, 60, 80), "--schedule step: multiply the lr by --step-gamma at "
                                                         "these epochs", group=OPTIMIZATION)
    step_gamma: float = setting(0.1, "", group=OPTIMIZATION, valid=Range(0, 1, low_open=True))
    label_smoothing: float = setting(0.0, "", group=OPTIMIZATION, valid=Range(0, 1, high_open=True),
                                     log=Log(3, "label smoothing {:g}"))
    grad_clip: float | None = setting(None, "clip the global norm of the trainable gradients", group=OPTIMIZATION,
                                      valid=Range(0, low_open=True), resume=True)
    grad_accum_steps: int = setting(1, "gradient accumulation: each update averages the gradients of N batches of "
                                       "--batch-size (N x --batch-size images per update; the lr scales with it; "
                                       "BatchNorm statistics stay per batch)", group=OPTIMIZATION,
                                    valid=POSITIVE_INT, resume=True)
    seed: int = setting(0, "initialization, data order, augmentation", group=OPTIMIZATION, resume=True, data=True)
    recipe: str | None = setting(None, "start from a recipe's settings (flags given override them): "
                                       "torchvision-v2 is torchvision's ResNet-50 IMAGENET1K_V2 recipe",
                                 group=OPTIMIZATION, choices=tuple(RECIPES), log=Log(1, "recipe {}"))
    # transfer learning
    pretrained: str | None = setting(None, "start from torchvision's ImageNet weights (no value: IMAGENET1K_V1), "
                                           "weights by name (torchvision's IMAGENET1K_V2, DEFAULT its best; timm's "
                                           "tags: a1_in1k; self-supervised: dino), a Hub repo "
                                           "(hf-hub:ORG/REPO[@REVISION]), or a jaxnets weights FILE (a file named "
                                           "like a bare word: ./NAME); the classifier is re-initialized",
                                     group=TRANSFER, nargs="?", const=DEFAULT_WEIGHTS, metavar="NAME|FILE")
    freeze: str = setting("none", "none | backbone | parameter path patterns: conv1,layer1", group=TRANSFER,
                          resume=True)
    backbone_lr_mult: float = setting(1.0, "learning rate of the backbone relative to the head (discriminative "
                                           "fine-tuning)", group=TRANSFER, valid=Range(0, low_open=True), resume=True)
    layer_decay: float = setting(1.0, "layer-wise learning-rate decay: the backbone's last block learns at "
                                      "lr x D, the one before at lr x D^2, ... down to the stem (e.g. 0.8)",
                                 group=TRANSFER, valid=Range(0, 1, low_open=True), resume=True)
    linear_probe: str | None = setting(None, "no training: fit a linear classifier on the frozen model's features",
                                       group=TRANSFER, choices=("svm", "logreg"))
    # run, devices and hosts
    workdir: str | None = setting(None, "checkpoints, logs, plots, final weights; the same workdir resumes "
                                        "(default runs/<model>-<dataset>)", group=RUN)
    devices: int | None = setting(None, "use the first N devices (default: all)", group=RUN)
    log_every: int = setting(10, "steps between logged train metrics", group=RUN, valid=POSITIVE_INT)
    log_grad_norms: bool = setting(False, "log the gradient L2 norm of each stage (stem, each block or layer, each "
                                          "auxiliary head, the classifier) with the train metrics, and plot them in "
                                          "gradients.png", group=RUN)
    checkpoint_every: int = setting(0, "steps between checkpoints (0: at the end of each epoch only)", group=RUN,
                                    valid=Range(0))
    keep_checkpoints: int = setting(3, "the last N are kept, plus the best validation top-1", group=RUN,
                                    valid=POSITIVE_INT)
    progress: bool = setting(True, "progress bars", group=RUN)
    compile_cache: str | None = setting(None, "persistent compilation cache dir ('' disables; default "
                                              "~/.cache/jaxnets/jax_compilation_cache)", group=RUN)
    coordinator: str | None = setting(None, "host:port of process 0, for a multi-process run without a cluster "
                                            "manager", group=RUN)
    num_processes: int | None = setting(None, "", group=RUN)
    process_id: int | None = setting(None, "", group=RUN)
    local_devices: str | None = setting(None, "devices this process drives: all, auto (under Slurm and Open MPI: "
                                              "its share of the host's GPUs by processes per host; else all) or "
                                              "indices 0,1,... (default: auto)", group=RUN,
                                        metavar="all|auto|0,1,...")
    distributed: str = setting("auto", "auto: join the multi-process run a cluster environment describes (Slurm, "
                                       "Open MPI, Kubernetes, TPU pods) or --coordinator gives; off: a single "
                                       "process even inside one (e.g. one srun step of an allocation)", group=RUN,
                               choices=DISTRIBUTED)
    # the model's output count, a setting of the run but no flag: the dataset gives it
    num_classes: int | None = setting(None, "set from the dataset", group=None, resume=True)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def settings_from_json(cls, text: str, where: str) -> dict[str, Any]:
        """The settings a ``config.json`` (``to_json``'s) records, each checked against its field's type:
        what ``train.py --config FILE`` starts from. ``where`` (the file) prefixes the errors."""
        try:
            recorded = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not JSON ({error})") from None
        if not isinstance(recorded, dict):
            raise UserError(f"{where}: expected a JSON object of settings, got {type(recorded).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(recorded) - set(hints))
        if unknown:
            raise UserError(f"{where}: unknown setting {unknown[0]!r}; settings are TrainConfig's fields "
                            f"({', '.join(sorted(hints))})")
        return {key: _typed(value, hints[key], f"{where}: {key}") for key, value in recorded.items()}

    @functools.cached_property
    def spec(self) -> ModelSpec:
        """The model's description (the registry's), looked up once: what the run passes down instead of
        the name, so nothing on its way looks the name up again."""
        return get_spec(self.model)

    def data_config(self) -> DataConfig:
        """What the input pipeline is asked for: each ``data`` setting as it is, the images of one optimizer
        update (``update_batch_size``), and the normalization statistics for ``in_chans`` (``normalization``)."""
        transforms = self.normalization
        fed = {o.name: getattr(self, o.name) for o in options(type(self)) if o.data}
        return DataConfig(**fed, batch_size=self.update_batch_size, mean=transforms.mean, std=transforms.std)

    @functools.cached_property
    def normalization(self) -> EvalTransform:
        """The statistics the images are normalized with, for ``in_chans``: the ``--pretrained`` weights' own (a
        timm tag may have others than ImageNet's: resnet34.ra4_e3600_r224_in1k's 0.5 and 0.5), else those of
        the model's torchvision weights (``weights.pretrained_transform``: a Hub repo or a file is opened, and
        converted on first use as the run would)."""
        if self.pretrained is None:
            return self.spec.weights.transforms.for_channels(self.in_chans)
        from jaxnets.weights import pretrained_transform

        weights = None if self.pretrained == "default" else self.pretrained  # "default": older config.json
        return pretrained_transform(self.spec, weights).for_channels(self.in_chans)

    def model_options(self) -> dict[str, Any]:
        """The options the model is built with (``create_model``'s keywords), from the settings that declare one
        (``setting(model=...)``), each only where the setting differs from its default."""
        return {o.model.name: o.model.value(value) for o in options(type(self))
                if o.model is not None and (value := getattr(self, o.name)) != o.default}

    @property
    def update_batch_size(self) -> int | None:
        """Images per optimizer update: ``--grad-accum-steps`` batches of ``--batch-size`` (what one step of the
        input pipeline gives, split into micro-batches by the train step)."""
        return None if self.batch_size is None else self.batch_size * self.grad_accum_steps


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill in the defaults that depend on the model and the dataset; check the choices."""
    spec = config.spec  # raises for an unknown model
    # An unknown weights name fails now, not once the data is loaded ("default": earlier versions' config.json).
    if config.pretrained != "default" and is_weights_name(config.pretrained):
        from jaxnets.weights import resolve_weights  # names only: nothing is downloaded

        resolve_weights(spec, config.pretrained)
    _check_choices(config)
    digits = config.dataset == DIGITS
    if config.image_size is not None:
        image_size = config.image_size
    elif digits:  # small and fast (the digits are 8x8), but never below what the model accepts (AlexNet: 63 px)
        image_size = 16 * math.ceil(max(16, *spec.weights.min_size) / 16)
    else:
        image_size = spec.weights.transforms.crop_size
    check_image_size(spec, image_size)
    for flag, value in (("--dataset", config.dataset), ("--workdir", config.workdir)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty")
    auto = {f.name: f.metadata["auto"].pick(config) for f in dataclasses.fields(config)
            if f.metadata.get("auto") is not None and getattr(config, f.name) is None}
    resolved = dataclasses.replace(config, **auto, image_size=image_size)
    resolved = dataclasses.replace(
        resolved,
        workdir=_default(config.workdir, str(Path("runs") / f"{config.model}-{Path(config.dataset).name or 'data'}")),
        eval_batch_size=_default(config.eval_batch_size, resolved.batch_size),
    )
    _check_ranges(resolved)
    _check_model_options(resolved)
    resolved = dataclasses.replace(resolved, **_eval_sizes(spec, resolved))
    _check_recipe_settings(resolved)
    return config if resolved == config else resolved  # a resolved config is its own resolution (spec kept)


def check_image_size(model: ModelRef, image_size: int, flag: str = "--image-size") -> None:
    """``--image-size`` against the model's minimum input (below it an internal feature map is empty)."""
    spec = get_spec(model)
    minimum = max(spec.weights.min_size)
    if image_size < minimum:
        raise UserError(f"{flag} {image_size}: {spec.name} needs at least {minimum} px")


def peak_learning_rate(config: TrainConfig) -> float:
    """``lr * images_per_update / 256``: the linear scaling rule (an update is ``--grad-accum-steps`` batches)."""
    return config.lr * config.update_batch_size / LR_REFERENCE_BATCH


def fit_batch_size(config: TrainConfig, too_few: TooFewExamples, devices: int, *,
                   given: bool) -> tuple[TrainConfig, str]:
    """``config`` with the largest ``--batch-size`` that gives the ``too_few.examples`` training examples one step
    (a multiple of the ``devices``; ``--grad-accum-steps`` batches per update), and the log line saying so: what a
    default batch larger than a small dataset becomes. The eval batch follows where it was the batch's default;
    the peak learning rate follows by itself (``--lr`` is per 256 images). A batch size the user ``given`` is
    kept: the error names the value that fits."""
    fits = too_few.examples // config.grad_accum_steps // devices * devices
    if fits < 1:
        raise DataError(f"{too_few}: not even one example per device (of {devices}) fits; use fewer --devices")
    if given:
        per = f"{devices} device(s)" + (f" x --grad-accum-steps {config.grad_accum_steps}"
                                         if config.grad_accum_steps > 1 else "")
        raise DataError(f"{too_few}: --batch-size {fits} fits (the largest multiple of the {per})")
    eval_batch_size = fits if config.eval_batch_size == config.batch_size else config.eval_batch_size
    fitted = dataclasses.replace(config, batch_size=fits, eval_batch_size=eval_batch_size)
    return fitted, (f"--batch-size {fits} instead of the default {config.batch_size}, more than the "
                    f"{too_few.examples} training examples (the peak lr follows: --lr is per {LR_REFERENCE_BATCH} "
                    f"images); give --batch-size to choose")


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` (``RECIPES``), with ``recipe`` itself: what ``train.py --recipe NAME``
    starts from. In Python: ``TrainConfig(**{**recipe_settings('torchvision-v2'), 'model': 'resnet50'})``."""
    _check_choice("--recipe", name, tuple(RECIPES))
    return {**RECIPES[name], "recipe": name}


def _eval_sizes(spec: ModelSpec, config: TrainConfig) -> dict[str, int]:
    """The eval crop and resize, each unless given, checked: ``--image-size`` and the crop's 256/224 rule; with a
    ``--recipe`` that has eval sizes (``RECIPE_EVAL_SIZES``), the recipe's, scaled to ``--image-size``."""
    rule = RECIPE_EVAL_SIZES.get(config.recipe)
    crop = _default(config.val_crop_size, rule.crop_for(config.image_size) if rule else config.image_size)
    check_image_size(spec, crop, "--val-crop-size")
    resize = _default(config.val_resize_size, rule.resize_for(crop) if rule else resize_for_crop(crop))
    if resize < crop:
        raise UserError(f"--val-resize-size {resize} is below the eval crop {crop} (--val-crop-size)")
    return {"val_crop_size": crop, "val_resize_size": resize}


def _check_recipe_settings(config: TrainConfig) -> None:
    """The combinations of the recipe's settings that cannot run as asked."""
    if config.auto_augment is not None and config.in_chans not in CHANNELS:
        raise UserError(f"--auto-augment works on 1- or 3-channel images (torchvision's policies), not "
                        f"--in-chans {config.in_chans}")
    if config.multi_label:
        for flag, conflict in (("--dataset digits", config.dataset == DIGITS),
                               ("--classes", config.classes is not None),
                               ("--linear-probe", config.linear_probe is not None)):
            if conflict:
                raise UserError(f"--multi-label does not apply to {flag} (single-label)")


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from JSON) as the field type ``hint`` wants it (a list becomes a tuple), or a UserError."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and is_int(value):
            return value
        if option is float and (is_int(value) or isinstance(value, float)):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list) and all(is_int(v) for v in value):
            return tuple(value)
    names = {type(None): "null", bool: "bool", int: "int", float: "number", str: "str"}
    expected = " or ".join(names.get(o, "list of int") for o in options)
    raise UserError(f"{where} must be {expected}, got {json.dumps(value)}")


def _default(value: Any, default: Any) -> Any:
    """``value`` unless it was not given (None): a given 0 is checked, never silently replaced."""
    return default if value is None else value


def _check_ranges(config: TrainConfig) -> None:
    """Each setting against its declared range (``setting(valid=...)``; a data setting's is ``DataConfig``'s)."""
    for option in options(type(config)):
        value = getattr(config, option.name)
        if option.valid is not None and value is not None and value not in option.valid:
            raise UserError(f"{option.flag} must be {option.valid}, got {value}")


def _check_model_options(config: TrainConfig) -> None:
    """Each model option a setting sets (``setting(model=...)``) is one the model has, else the setting's error."""
    given = config.model_options()
    for option in options(type(config)):
        if option.model is not None and option.model.name in given and option.model.name not in config.spec.options:
            raise UserError(option.model.refusal(option.flag, config.model))


def _check_choices(config: TrainConfig) -> None:
    """Each setting declared with ``choices`` holds one of them (or None): argparse checks flags, this the
    library's TrainConfig."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("argparse", {}).get("choices")
        value = getattr(config, field.name)
        if choices is not None and value is not None:
            _check_choice(flag_name(field.name), value, tuple(choices))


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
