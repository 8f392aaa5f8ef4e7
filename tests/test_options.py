"""One declaration per option (``jaxnets.config.setting``): the flag ranges, the resume rule, the mapping to
``DataConfig`` and the run description's parts are tables derived from it, for every ``TrainConfig`` field and for
a field a subclass adds."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from jaxnets import checkpointing
from jaxnets.checkpointing import resume_problem, resume_record
from jaxnets.config import (
    RUN,
    Log,
    TrainConfig,
    options,
    recipe_parts,
    recipe_settings,
    resolve,
    resume_keys,
    setting,
    valid_ranges,
)
from jaxnets.data import DataConfig, DataError
from jaxnets.data.config import Range, check_config, field_ranges
from jaxnets.errors import UserError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
OPTIONS = {o.name: o for o in options()}


def _outside(valid: Range) -> list[float]:
    """Values just outside ``valid``: at an open bound, the bound; past a closed one, one further."""
    below = [valid.low if valid.low_open else valid.low - 1]
    above = [] if valid.high == math.inf else [valid.high if valid.high_open else valid.high + 1]
    return below + above


def _inside(valid: Range) -> list[float]:
    """The bounds that lie in ``valid`` (the closed ones)."""
    return ([] if valid.low_open else [valid.low]) + ([] if valid.high_open or valid.high == math.inf
                                                      else [valid.high])


@pytest.mark.parametrize("name", FIELDS)
def test_a_fields_declared_range_is_its_flags_check(name):
    """Each value just outside the declared range is the flag's error, in the range's words; each closed bound
    passes. A data setting's range is DataConfig's field's, the same object."""
    option = OPTIONS[name]
    if option.data:
        assert option.valid is field_ranges(DataConfig).get(name)
    if option.valid is None:
        return
    for value in _outside(option.valid):
        assert value not in option.valid
        with pytest.raises(UserError) as raised:
            resolve(TrainConfig(**{name: value}))
        if name == "image_size":  # the model's minimum input is checked first, in its own words
            assert str(raised.value) == "--image-size 0: resnet34 needs at least 1 px"
        else:
            assert str(raised.value) == f"{option.flag} must be {option.valid}, got {value}"
    for value in _inside(option.valid):
        assert value in option.valid


@pytest.mark.parametrize("name", FIELDS)
def test_a_field_declared_resume_is_what_a_resumed_run_must_share(name):
    """A checkpoint refuses a run that changed a must-match setting, naming it, and accepts any other change."""
    saved = json.loads(resolve(TrainConfig()).to_json())
    current = {**saved, name: "<changed>"}
    problem = resume_problem(resume_record(saved, 10), resume_record(current, 10), layout_matters=False)
    if OPTIONS[name].resume:
        assert problem == f"{name}={saved[name]!r} (this run: '<changed>')"
    else:
        assert problem is None


def test_resume_keys_are_the_declared_ones_and_those_checkpoints_always_compared():
    assert checkpointing.RESUME_KEYS == resume_keys() == tuple(n for n in FIELDS if OPTIONS[n].resume)
    # the hand-written tuple this table replaced (jaxnets 4154423), num_classes (no flag) included
    assert sorted(resume_keys()) == sorted((
        "model", "dataset", "classes", "image_size", "batch_size", "seed", "no_aux", "num_classes", "val_fraction",
        "optimizer", "grad_clip", "freeze", "backbone_lr_mult", "layer_decay", "model_ema", "grad_accum_steps",
        "multi_label", "mixup_alpha", "cutmix_alpha", "auto_augment", "ra_magnitude", "random_erase", "in_chans",
        "no_shortcut"))


def test_the_ranges_are_those_the_flags_had():
    """The hand-written (flag, range) table this replaced (jaxnets 4154423), and --image-size's, now declared
    (DataConfig's: the model's minimum, checked first, is stricter)."""
    old = {
        "--batch-size": ">= 1", "--in-chans": ">= 1", "--eval-batch-size": ">= 1", "--epochs": ">= 1",
        "--steps": ">= 1", "--log-every": ">= 1", "--keep-checkpoints": ">= 1", "--checkpoint-every": ">= 0",
        "--lr": "> 0", "--momentum": "in [0, 1)", "--weight-decay": ">= 0", "--warmup-epochs": ">= 0",
        "--step-gamma": "in (0, 1]", "--label-smoothing": "in [0, 1)", "--grad-clip": "> 0", "--aux-weight": ">= 0",
        "--val-fraction": "in (0, 1)", "--min-crop-scale": "in (0, 1]", "--backbone-lr-mult": "> 0",
        "--layer-decay": "in (0, 1]", "--val-crop-size": ">= 1", "--val-resize-size": ">= 1",
        "--ra-magnitude": "in [0, 30]", "--random-erase": "in [0, 1]", "--mixup-alpha": ">= 0",
        "--cutmix-alpha": ">= 0", "--model-ema-decay": "in [0, 1)", "--model-ema-steps": ">= 1",
        "--grad-accum-steps": ">= 1",
    }
    assert {OPTIONS[name].flag: str(valid) for name, valid in valid_ranges().items()} == {
        **old, "--image-size": ">= 1"}


# A value unlike DataConfig's default for each data setting: a new data setting fails the test until it has one.
DATA_VALUES = {
    "dataset": "some/folder", "data_dir": "/data", "image_size": 40, "val_crop_size": 36, "val_resize_size": 44,
    "classes": (1, 2), "val_fraction": 0.3, "min_crop_scale": 0.5, "hflip": False, "in_chans": 1,
    "multi_label": True, "auto_augment": "ra", "ra_magnitude": 12, "random_erase": 0.25, "eval_batch_size": 24,
    "seed": 7,
}


def test_the_data_config_carries_each_declared_data_setting():
    assert set(DATA_VALUES) == {n for n in FIELDS if OPTIONS[n].data}
    config = TrainConfig(**DATA_VALUES, batch_size=8, grad_accum_steps=3)
    data = config.data_config()
    defaults = DataConfig()
    for name, value in DATA_VALUES.items():
        assert getattr(defaults, name) != value, name
        assert getattr(data, name) == value, name
    # the rest of DataConfig is what the run derives: the images per update and the weights' statistics
    assert {f.name for f in dataclasses.fields(DataConfig)} - set(DATA_VALUES) == {"batch_size", "mean", "std"}
    stats = config.spec.weights.transforms.for_channels(1)
    assert (data.batch_size, data.mean, data.std) == (24, stats.mean, stats.std)


def test_train_config_defaults_of_data_settings_are_data_configs():
    """Where TrainConfig gives a data setting a fixed default, it is DataConfig's (None: resolved per run)."""
    data_defaults = DataConfig()
    for name in DATA_VALUES:
        default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
        if default is not None:
            assert default == getattr(data_defaults, name), name


@pytest.mark.parametrize("name", sorted(field_ranges(DataConfig)))
def test_data_config_checks_the_same_ranges(name):
    """The library API's check (DataConfig built directly) reads the declared ranges too, naming the field."""
    valid = field_ranges(DataConfig)[name]
    hint = next(f.type for f in dataclasses.fields(DataConfig) if f.name == name)
    expected = ("None or " if "None" in hint else "") + ("an integer " if "int" in hint else "") + str(valid)
    for value in _outside(valid):
        config = dataclasses.replace(DataConfig(image_size=16, batch_size=8), **{name: value})
        with pytest.raises(DataError, match="^" + re.escape(f"DataConfig.{name} must be {expected}, got {value!r}")):
            check_config(config)


def test_the_eval_sizes_old_keywords_name_the_new_ones():
    for old, new in (("resize_size", "val_resize_size"), ("eval_crop_size", "val_crop_size")):
        with pytest.raises(TypeError, match=re.escape(f"DataConfig({old}=...) is now DataConfig({new}=...)")):
            DataConfig(**{old: 40})
    sizes = DataConfig(image_size=16).eval_transform
    assert (sizes.resize_size, sizes.crop_size) == (18, 16)  # the eval transform's 256/224 rule


# What training._recipe_parts(resolve(config), 7) gave for these configs before it became recipe_parts (4154423).
RECIPE_PARTS = [
    ({}, []),
    ({**recipe_settings("torchvision-v2"), "model": "resnet50", "dataset": "some/folder"},
     ["recipe torchvision-v2", "label smoothing 0.1", "mixup alpha 0.2", "cutmix alpha 1", "auto-augment ta_wide",
      "random erasing p=0.1", "EMA every 32 updates, decay 0.998908 (adjusted from 0.99998)",
      "eval resize 232 crop 224"]),
    ({"auto_augment": "ra", "ra_magnitude": 12, "random_erase": 0.25, "label_smoothing": 0.05, "mixup_alpha": 0.4},
     ["label smoothing 0.05", "mixup alpha 0.4", "auto-augment ra (magnitude 12)", "random erasing p=0.25"]),
    ({"model_ema": True, "model_ema_decay": 0.999, "model_ema_steps": 4, "cutmix_alpha": 1.5, "epochs": 3,
      "batch_size": 16}, ["cutmix alpha 1.5", "EMA every 4 updates, decay 0.978667 (adjusted from 0.999)"]),
    ({"val_crop_size": 32, "val_resize_size": 40, "auto_augment": "ta_wide"},
     ["auto-augment ta_wide", "eval resize 40 crop 32"]),
    ({"val_resize_size": 40}, []),
    ({"dataset": "some/folder", "multi_label": True, "grad_accum_steps": 2, "model_ema": True},
     ["multi-label (sigmoid binary cross-entropy)", "EMA every 32 updates, decay 0.99818 (adjusted from 0.99998)"]),
]


@pytest.mark.parametrize("settings, parts", RECIPE_PARTS)
def test_recipe_parts_are_the_run_descriptions_as_before(settings, parts):
    assert recipe_parts(resolve(TrainConfig(**settings))) == parts


def test_each_logged_setting_has_its_own_place():
    orders = [o.log.order for o in options() if o.log is not None]
    assert len(orders) == len(set(orders)) == 9


@dataclasses.dataclass(frozen=True)
class _Extended(TrainConfig):
    """A setting added with one declaration; and ``seed`` redeclared without feeding the data."""

    extra: int = setting(2, "a new setting", group=RUN, valid=Range(1), resume=True, log=Log(10, "extra {}"))
    seed: int = setting(0, "not the data's", group=RUN)


def test_a_new_declaration_appears_in_every_derived_table():
    assert valid_ranges(_Extended)["extra"] == Range(1)
    assert resume_keys(_Extended) == (*(k for k in resume_keys() if k != "seed"), "extra")
    with pytest.raises(UserError, match=r"^--extra must be >= 1, got 0$"):
        resolve(_Extended(extra=0))
    config = resolve(_Extended(extra=5, seed=3, mixup_alpha=0.5))
    assert recipe_parts(config) == ["mixup alpha 0.5", "extra 5"]
    assert config.data_config().seed == DataConfig().seed != config.seed
    assert resolve(TrainConfig(seed=3)).data_config().seed == 3


def test_a_data_setting_cannot_declare_a_second_range():
    @dataclasses.dataclass(frozen=True)
    class Twice(TrainConfig):
        val_fraction: float = setting(0.2, "", group=RUN, data=True, valid=Range(0))

    with pytest.raises(TypeError, match=r"TrainConfig.val_fraction: a data setting's range is DataConfig"):
        options(Twice)
