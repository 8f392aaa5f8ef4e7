"""Pretrained backbones beyond classification, against torchvision and timm themselves.

- Feature maps (``features_only``, ``out_indices``, ``feature_info``) equal torchvision's
  ``create_feature_extractor(model, return_nodes=<feature_info nodes>)``, float32, max|diff| <= 1e-4 * (1 +
  max|torch|) (``max_rel_error``), for every registered model in eval mode, and in train mode (BatchNorm
  statistics updated) for one model per family; their state dicts go both ways, strictly.
- Any number of input channels: the stem is adapted by timm's own ``adapt_input_conv`` (the same bits), and the
  adapted model equals the RGB one on the matching input to 1e-5 relative.
- Gradient checkpointing (``remat``): the same outputs, statistics and gradients (float64 <= 1e-10, float32
  <= 1e-6 relative), and a compiled step that really keeps less memory.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from torch_oracle import (
    jax_options,
    max_rel_error,
    nchw,
    one_per_family,
    oracle_model,
    runs_eagerly,
    state_dict_numpy,
)
from torchvision.models.feature_extraction import create_feature_extractor

import jaxnets
from jaxnets import trees
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from jaxnets.models.backbone import remat_compiler_options
from jaxnets.weights import WeightsError, load_pretrained, load_weights, model_options, save_weights

TOL = 1e-4
MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in jaxnets.list_models()]
FAMILIES = one_per_family(prefer_batch_norm=True)
FAMILY_PARAMS = [p for p in MODELS if p.values[0] in FAMILIES]
# The heaviest models (more than 11 GFLOPs at 224 px: VGG-16/19, ResNet-152, the wide ResNets, ResNeXt-101) are
# compared at a size that still gives every level a map of its own (the deepest, 1/32 or 1/16, 2x2 or larger):
# batch 1 at 224 px would take most of this file's time.
SMALL_SIZE = {name: (64, 64) for name in jaxnets.list_models() if jaxnets.get_spec(name).weights.gflops > 11}


def images(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, channels), np.float32)


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=1)  # tests are grouped per model: one model in memory at a time
def case(name: str):
    """The torchvision oracle, its feature extractor at every ``feature_info`` node, and the backbone's
    variables mapped from the extractor's own state dict (no classifier)."""
    torch_model = oracle_model(name)
    nodes = [level.node for level in jaxnets.feature_info(name)]
    extractor = create_feature_extractor(torch_model, return_nodes=nodes).eval()
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(extractor))
    return torch_model, extractor, variables


def backbone(name: str, **options):
    return jaxnets.create_model(name, features_only=True, **jax_options(name, **options))


def run(model, variables, x: np.ndarray, **kwargs):
    """``model.apply(variables, x, **kwargs)``, jitted (one compilation costs less than running op by op, each
    primitive of each shape compiled on its own) unless the model is deeper than ``torch_oracle.EAGER_DEPTH``."""
    apply = functools.partial(model.apply, **kwargs)
    return (apply if runs_eagerly(variables) else jax.jit(apply))(variables, x)


def torch_maps(extractor, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = extractor(nchw(x))
    return [nhwc(value) for value in out.values()]


# --- feature maps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,size", [pytest.param(p.values[0], "odd", marks=p.marks) for p in MODELS]
                         + [pytest.param(p.values[0], "224", marks=p.marks) for p in FAMILY_PARAMS])
def test_feature_maps_equal_torchvision_feature_extractor(name, size):
    """Eval mode, every level, batch 1: every model at 67x91 (every level's map a size of its own, odd and
    non-square), one per family also at 224x224, where the maps' sizes are each level's reduction (every model's
    logits at 224 are test_models.py's)."""
    _, extractor, variables = case(name)
    height, width = SMALL_SIZE.get(name, (224, 224)) if size == "224" else (67, 91)
    x = images(1, height, width)
    maps = run(backbone(name), variables, x)
    expected = torch_maps(extractor, x)
    info = jaxnets.feature_info(name)
    assert len(maps) == len(expected) == len(info)
    for level, ours, theirs in zip(info, maps, expected, strict=True):
        assert ours.shape == theirs.shape and ours.shape[-1] == level.channels, level
        assert max_rel_error(ours, theirs) <= TOL, level
        if size == "224":  # the reduction is the map's stride (AlexNet's unpadded stem: within a pixel)
            assert abs(ours.shape[1] - height / level.reduction) <= 1, level
            assert abs(ours.shape[2] - width / level.reduction) <= 1, level


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_out_indices_select_levels_and_build_nothing_deeper(name):
    _, extractor, variables = case(name)
    info = jaxnets.feature_info(name)
    chosen = (0, len(info) - 2)
    selected = jaxnets.feature_info(name, chosen)
    assert [level.index for level in selected] == list(chosen) and selected == [info[i] for i in chosen]
    assert jaxnets.feature_info(name, (-1,)) == [info[-1]]  # negative indices count from the deepest, as timm's
    model = backbone(name, out_indices=chosen)
    # Like torchvision's extractor of those nodes (and timm), the backbone stops at the deepest level asked for.
    truncated = create_feature_extractor(case(name)[0], return_nodes=[level.node for level in selected]).eval()
    sub = jaxnets.from_torch_state_dict(name, state_dict_numpy(truncated), out_indices=chosen)
    assert trees.flatten(sub).keys() < trees.flatten(variables).keys()
    x = images(1, 67, 91, seed=1)
    maps = run(model, sub, x)
    for ours, theirs in zip(maps, torch_maps(truncated, x), strict=True):
        assert max_rel_error(ours, theirs) <= TOL


@pytest.mark.parametrize("out_indices, message", [
    ((5,), r"out_indices \(5,\): level 5 does not exist; the levels are 0..4 \(relu, layer1"),
    ((2, 1), r"out_indices \(2, 1\) must name distinct levels in increasing order"),
    ((), r"out_indices is empty"),
])
def test_bad_out_indices_are_one_line_errors(out_indices, message):
    with pytest.raises(jaxnets.UserError, match="^resnet18: " + message):
        jax.eval_shape(backbone("resnet18", out_indices=out_indices).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(jaxnets.UserError, match="out_indices=.*needs features_only=True"):
        model = jaxnets.create_model("resnet18", out_indices=(1,))
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def torch_train_maps(extractor, x: np.ndarray, dtype=torch.float32, frozen=()):
    """Train-mode maps of a copy of ``extractor`` (the modules named in ``frozen`` in eval mode) and its state
    dict afterwards (updated running statistics)."""
    model = copy.deepcopy(extractor).to(dtype).train()
    for path in frozen:
        model.get_submodule(path).eval()
    with torch.no_grad():
        out = model(nchw(x).to(dtype))
    return [nhwc(value) for value in out.values()], state_dict_numpy(model.float())


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_train_mode_maps_and_batchnorm_updates_equal_torchvision(name):
    """As in test_models: torchvision in float64 is the reference, the bound 1e-4 or twice torchvision's own
    float32 error, whichever is larger (small-batch BatchNorm amplifies rounding)."""
    _, extractor, variables = case(name)
    x = images(2, 64, 72, seed=2)
    maps, updates = run(backbone(name), variables, x, train=True, mutable=["batch_stats"])
    single, torch_state = torch_train_maps(extractor, x)
    exact, _ = torch_train_maps(extractor, x, torch.float64)
    for ours, theirs32, theirs64 in zip(maps, single, exact, strict=True):
        assert max_rel_error(ours, theirs64) <= max(TOL, 2 * max_rel_error(theirs32, theirs64))
    expected = trees.flatten(jaxnets.from_torch_state_dict(name, torch_state).get("batch_stats", {}))
    ours = trees.flatten(updates.get("batch_stats", {}))
    assert ours.keys() == expected.keys()
    assert bool(ours) == (name.endswith("_bn") or jaxnets.get_spec(name).family in ("googlenet", "resnet"))
    for key, value in ours.items():
        assert max_rel_error(value, expected[key]) <= TOL, key


@pytest.mark.xdist_group("resnet18")
def test_frozen_norm_keeps_statistics_in_a_training_backbone():
    _, extractor, variables = case("resnet18")
    x = images(2, 64, 72, seed=3)
    frozen = ("bn1", "layer1")
    maps, updates = run(backbone("resnet18"), variables, x, train=True, mutable=["batch_stats"], frozen_norm=frozen)
    expected, _ = torch_train_maps(extractor, x, torch.float64, frozen=frozen)
    for ours, theirs in zip(maps, expected, strict=True):
        assert max_rel_error(ours, theirs) <= TOL
    before, after = trees.flatten(variables["batch_stats"]), trees.flatten(updates["batch_stats"])
    for key in before:
        frozen_key = key.startswith(("bn1/", "layer1/"))
        assert np.array_equal(before[key], after[key]) == frozen_key, key


@pytest.mark.xdist_group("resnet18")
def test_bfloat16_maps_stay_close_to_float32():
    """Bound: 5 % relative L2 per map, that of the logits in test_models (which checks every model's trunk in
    bfloat16: a backbone is that trunk, stopped at its levels)."""
    name = "resnet18"
    _, _, variables = case(name)
    x = images(2, 64, 64, seed=4)
    maps32 = run(backbone(name), variables, x)
    maps16 = run(backbone(name, dtype=jnp.bfloat16), variables, x)
    for ours, ref in zip(maps16, maps32, strict=True):
        assert ours.dtype == jnp.bfloat16
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.05


# --- backbones as state dicts and weights files ---------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_backbone_state_dict_round_trip_is_exact_and_strict(name):
    torch_model, extractor, variables = case(name)
    state = state_dict_numpy(extractor)
    back = jaxnets.to_torch_state_dict(name, variables)
    assert back.keys() == state.keys()  # no classifier keys, num_batches_tracked included
    assert not any(key.startswith(jaxnets.get_spec(name).classifier.replace("/", ".")) for key in back)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    result = extractor.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Strict otherwise: a backbone key missing, or a classifier's keys given to a backbone, are named.
    missing = [key for key in state if not key.endswith("num_batches_tracked")][-1]
    with pytest.raises(jaxnets.WeightMappingError, match=rf"missing 1 key\(s\): {missing}"):
        jaxnets.from_torch_state_dict(name, {k: v for k, v in state.items() if k != missing})
    with pytest.raises(jaxnets.WeightMappingError, match=r"unexpected \d+ key\(s\)"):
        jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model), features_only=True)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """torchvision-layout weights of resnet18 (the oracle's), as a jaxnets weights file of a classifier."""
    torch_model, _, _ = case("resnet18")
    variables = jaxnets.from_torch_state_dict("resnet18", state_dict_numpy(torch_model))
    return save_weights(tmp_path_factory.mktemp("weights") / "resnet18.safetensors", "resnet18", variables)


@pytest.mark.xdist_group("resnet18")
def test_load_pretrained_backbone_drops_the_classifier_and_deeper_levels(resnet18_file):
    _, extractor, variables = case("resnet18")
    model, loaded = load_pretrained("resnet18", weights=resnet18_file, features_only=True)
    assert model.features_only and trees.flatten(loaded).keys() == trees.flatten(variables).keys()
    assert all(np.array_equal(v, trees.flatten(variables)[k]) for k, v in trees.flatten(loaded).items())
    model, loaded = load_pretrained("resnet18", weights=resnet18_file, features_only=True, out_indices=(1, 2))
    assert sorted(loaded["params"]) == ["bn1", "conv1", "layer1", "layer2"]
    x = images(1, 67, 91, seed=5)
    maps = run(model, loaded, x)
    assert [m.shape[-1] for m in maps] == [64, 128]
    for ours, theirs in zip(maps, torch_maps(extractor, x)[1:3], strict=True):
        assert max_rel_error(ours, theirs) <= TOL


@pytest.mark.xdist_group("resnet18")
def test_weights_file_round_trip_keeps_in_chans_and_backbone_settings(tmp_path, resnet18_file):
    model, variables = load_pretrained("resnet18", weights=resnet18_file, in_chans=1, features_only=True,
                                       out_indices=(0, 2), remat=True)
    recorded = model_options("resnet18", model)
    assert recorded == {"zero_init_residual": False, "shortcut": True, "in_chans": 1, "features_only": True,
                        "out_indices": (0, 2)}
    path = save_weights(tmp_path / "gray_backbone.safetensors", "resnet18", variables, model_options=recorded)
    weights_file = load_weights(path)
    assert weights_file.num_classes == 0 and weights_file.model_options["in_chans"] == 1
    rebuilt, again = load_pretrained("resnet18", weights=path)
    assert (rebuilt.in_chans, rebuilt.features_only, rebuilt.out_indices, rebuilt.remat) == (1, True, (0, 2), False)
    assert trees.flatten(again).keys() == trees.flatten(variables).keys()
    assert all(np.array_equal(v, trees.flatten(variables)[k]) for k, v in trees.flatten(again).items())
    # A backbone file under a new classifier: the classifier is fresh, everything the backbone has is kept...
    model, variables = load_pretrained("resnet18", weights=resnet18_file, in_chans=1, features_only=True)
    path = save_weights(tmp_path / "backbone.safetensors", "resnet18", variables,
                        model_options=model_options("resnet18", model))
    _, full = load_pretrained("resnet18", weights=path, num_classes=4, features_only=False)
    assert full["params"]["fc"]["kernel"].shape == (512, 4)
    assert all(np.array_equal(v, trees.flatten(full)[k]) for k, v in trees.flatten(variables).items())
    with pytest.raises(WeightsError, match="backbone weights .*pass num_classes"):
        load_pretrained("resnet18", weights=path, features_only=False)
    # ... but one of some levels only lacks the deeper ones: strictly refused.
    with pytest.raises(WeightsError, match=r"missing \d+ key\(s\): batch_stats/layer3/0/bn1/mean"):
        load_pretrained("resnet18", weights=tmp_path / "gray_backbone.safetensors", num_classes=4,
                        features_only=False, out_indices=None)
    with pytest.raises(WeightsError, match=r"'remat' is not recorded in weights files"):
        save_weights(tmp_path / "x.safetensors", "resnet18", variables, model_options={**recorded, "remat": True})


# --- any number of input channels -----------------------------------------------------------------------


def timm_adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """timm's ``adapt_input_conv`` itself where timm is installed; else its rule as timm defines it
    (timm/models/_manipulate.py): sum for 1 channel, else repeat cyclically to ``in_chans`` and scale by 3/C."""
    try:
        from timm.models import adapt_input_conv
    except ImportError:
        weight = weight.float()
        if in_chans == 1:
            return weight.sum(dim=1, keepdim=True)
        repeat = -(-in_chans // 3)
        return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / float(in_chans))
    return adapt_input_conv(in_chans, weight.clone())


@pytest.mark.parametrize("in_chans", [1, 2, 4, 6, 7])
def test_stem_adaptation_is_timms_adapt_input_conv(in_chans):
    weight = torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(in_chans))
    ours = jaxnets.adapt_input_conv(weight.numpy().transpose(2, 3, 1, 0), in_chans)
    theirs = timm_adapt_input_conv(in_chans, weight).numpy().transpose(2, 3, 1, 0)
    assert ours.shape == theirs.shape == (7, 7, in_chans, 64) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_normalization_statistics_are_extended_like_the_stem():
    assert EvalTransform().for_channels(3) == EvalTransform()
    gray = EvalTransform().for_channels(1)
    assert gray.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and gray.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    six = EvalTransform().for_channels(6)
    assert six.mean == IMAGENET_MEAN * 2 and six.std == IMAGENET_STD * 2
    assert EvalTransform().for_channels(4).mean == (*IMAGENET_MEAN, IMAGENET_MEAN[0])


def backbone_file(name: str, directory: Path, **options) -> Path:
    """The oracle's backbone (its extractor's weights) as a jaxnets weights file, RGB (GoogLeNet: without
    transform_input unless ``options`` say otherwise)."""
    _, _, variables = case(name)
    options = {"features_only": True, **({"transform_input": False} if name == "googlenet" else {}), **options}
    return save_weights(directory / f"{name}.safetensors", name, variables, model_options=options)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_adapted_backbones_equal_the_rgb_one_on_the_matching_input(name, tmp_path):
    """The maps of the first two levels (only the stem differs; what follows it is the same function of the
    same values): 1 channel on x == RGB on x repeated to 3 channels; 6 channels on concat(x, x) == RGB on x
    (1e-5 relative). Inputs here are model inputs (normalized); GoogLeNet's transform_input, which
    re-normalizes them, is off (see the next test)."""
    path = backbone_file(name, tmp_path)
    rgb, variables = load_pretrained(name, weights=path, out_indices=(0, 1))
    gray, gray_variables = load_pretrained(name, weights=path, in_chans=1, out_indices=(0, 1))
    six, six_variables = load_pretrained(name, weights=path, in_chans=6, out_indices=(0, 1))
    assert (rgb.in_chans, gray.in_chans, six.in_chans) == (3, 1, 6)
    flat, flat_gray = trees.flatten(variables), trees.flatten(gray_variables)
    assert [k for k, v in flat.items() if not np.array_equal(v, flat_gray[k])] == ["/".join(
        jaxnets.mapping.stem_kernels(name)[0])]  # only the stem changes
    x = images(2, 67, 91, channels=1, seed=6)
    for ours, theirs in zip(run(gray, gray_variables, x), run(rgb, variables, np.repeat(x, 3, -1)), strict=True):
        assert max_rel_error(ours, theirs) <= 1e-5
    y = images(2, 67, 91, seed=7)
    for ours, theirs in zip(run(six, six_variables, np.concatenate([y, y], -1)), run(rgb, variables, y), strict=True):
        assert max_rel_error(ours, theirs) <= 1e-5


@pytest.mark.xdist_group("googlenet")
def test_googlenet_transform_input_undoes_the_extended_statistics(tmp_path):
    """With transform_input (torchvision's weights) the stem sees (pixel - 0.5) / 0.5 whatever the channels: a
    gray image normalized with the 1-channel statistics gives the RGB model's output on it as RGB; an RGB image
    repeated to 6 channels, normalized with the 6-channel statistics, the RGB model's on the image."""
    path = backbone_file("googlenet", tmp_path, transform_input=True)
    rgb, rgb_variables = load_pretrained("googlenet", weights=path)
    rng = np.random.default_rng(8)
    gray, rgb_image = rng.uniform(0, 1, (2, 67, 91, 1)), rng.uniform(0, 1, (2, 67, 91, 3))
    for in_chans, pixels in ((1, gray), (6, np.concatenate([rgb_image, rgb_image], -1))):
        model, adapted = load_pretrained("googlenet", weights=path, in_chans=in_chans)
        assert model.transform_input
        stats = EvalTransform().for_channels(in_chans)
        ours = ((pixels - np.array(stats.mean)) / np.array(stats.std)).astype(np.float32)
        seen = np.repeat(gray, 3, -1) if in_chans == 1 else rgb_image
        theirs = ((seen - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)
        for a, b in zip(run(model, adapted, ours), run(rgb, rgb_variables, theirs), strict=True):
            assert max_rel_error(a, b) <= 1e-5


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.xdist_group("resnet18")
def test_wrong_channel_counts_are_one_line_errors_naming_in_chans(resnet18_file):
    gray = jaxnets.create_model("resnet18", in_chans=1)
    with pytest.raises(jaxnets.UserError) as error:
        jax.eval_shape(gray.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert one_line_error(error) == ("resnet18 expects NHWC 1-channel images (N, H, W, 1), got (2, 32, 32, 3) "
                                     "(in_chans=1; for 3-channel images build the model with in_chans=3)")
    with pytest.raises(jaxnets.UserError) as error:
        jax.eval_shape(jaxnets.create_model("vgg11").init, jax.random.key(0), jnp.zeros((2, 32, 32, 1)))
    assert one_line_error(error) == ("vgg11 expects NHWC RGB images (N, H, W, 3), got (2, 32, 32, 1) "
                                     "(in_chans=3; for 1-channel images build the model with in_chans=1)")
    with pytest.raises(jaxnets.UserError, match="resnet18: in_chans must be an integer >= 1, got 0"):
        jax.eval_shape(jaxnets.create_model("resnet18", in_chans=0).init, jax.random.key(0), jnp.zeros((1, 8, 8, 0)))
    with pytest.raises(jaxnets.UserError, match="in_chans must be an integer >= 1, got 0"):
        load_pretrained("resnet18", weights=resnet18_file, in_chans=0)
    _, gray_variables = load_pretrained("resnet18", weights=resnet18_file, in_chans=1)
    with pytest.raises(WeightsError) as error:  # only RGB stems are adapted
        jaxnets.weights.pretrained.adapt_in_chans("resnet18", gray_variables, 4)
    assert "weights for in_chans=1 (stem params/conv1/kernel (7, 7, 1, 64)) cannot be adapted" in one_line_error(error)
    with pytest.raises(jaxnets.WeightMappingError, match=r"mis-shaped 1 key\(s\): conv1.weight: got \(64, 1, 7, 7\), "
                                                         r"expected \(64, 3, 7, 7\)"):
        jaxnets.from_torch_state_dict("resnet18", jaxnets.to_torch_state_dict("resnet18", gray_variables), in_chans=3)


@pytest.mark.xdist_group("resnet18")
def test_state_dicts_of_other_channel_counts_map_both_ways(resnet18_file):
    """A torch model with a 1-channel stem (timm's in_chans=1, a user's edit) maps with in_chans read off it."""
    _, gray_variables = load_pretrained("resnet18", weights=resnet18_file, in_chans=1)
    state = jaxnets.to_torch_state_dict("resnet18", gray_variables)
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    back = trees.flatten(jaxnets.from_torch_state_dict("resnet18", state))
    assert all(np.array_equal(v, back[k]) for k, v in trees.flatten(gray_variables).items())


@pytest.mark.xdist_group("resnet18")
def test_convert_verify_compares_an_adapted_stem_with_torchvision_s_and_refuses_a_backbone(tmp_path, capsys):
    """``jaxnets-convert --verify`` of a state dict with a 4-channel stem (torchvision's conv1 adapted by timm's
    rule) compares it with torchvision's model of that stem, within --verify's tolerance; an ``--option in_chans``
    the stem contradicts, and a backbone (no logits to compare), are one-line errors naming the option."""
    from jaxnets.cli import convert

    torch_model, extractor, _ = case("resnet18")
    adapted = copy.deepcopy(torch_model)
    adapted.conv1 = torch.nn.Conv2d(4, 64, 7, 2, 3, bias=False)
    adapted.conv1.weight.data = timm_adapt_input_conv(4, torch_model.conv1.weight.detach())
    torch.save(adapted.state_dict(), tmp_path / "rgbn.pth")
    torch.save(extractor.state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "rgbn.safetensors"
    assert convert.main(["resnet18", "--from", str(tmp_path / "rgbn.pth"), "--verify", "--out", str(out)]) == 0
    assert "verified: max |logit diff| vs torchvision" in capsys.readouterr().out
    assert load_weights(out).model_options["in_chans"] == 4
    for argv, message in (
            (["rgbn.pth", "--option", "in_chans=3"], "--option in_chans=3: the state dict's resnet18 stem takes 4 "
                                                    "channels"),
            (["backbone.pth"], "--verify compares logits; resnet18 backbone weights (features_only, no classifier) "
                               "have none")):
        argv = ["resnet18", "--from", str(tmp_path / argv[0]), *argv[1:], "--verify", "--out", str(tmp_path / "x")]
        assert convert.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"jaxnets-convert: error: {message}"), err


# --- gradient checkpointing -----------------------------------------------------------------------------


# What each family's remat test runs: the whole classifier for ResNet (every block rematerialized, the loss through
# fc), a backbone for the others, up to a level that has rematerialized blocks with BatchNorm and max pooling inside
# (VGG's stages, GoogLeNet's Inception modules; AlexNet: all of it) at a fraction of the compilation time.
REMAT_CASES = {"resnet": {}, "vgg": {"features_only": True, "out_indices": (2,)},
               "googlenet": {"features_only": True, "out_indices": (2,)}, "alexnet": {"features_only": True}}


def _train_outputs(name: str, remat: bool, x: np.ndarray, variables, dtype):
    """Train-mode outputs, updated statistics and gradients of a loss over every output, jitted as train.py
    compiles a remat step (``remat_compiler_options``: on CPUs the recomputation would otherwise be merged
    away)."""
    options = REMAT_CASES[jaxnets.get_spec(name).family]
    model = jaxnets.create_model(name, dtype=dtype, remat=remat, **options, **jax_options(name))

    def loss_fn(params):
        out, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        leaves = jax.tree.leaves(out)
        weights = [jnp.sin(jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape)) for leaf in leaves]
        return sum(jnp.sum(w * leaf) for w, leaf in zip(weights, leaves, strict=True)), (out, updates)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=remat_compiler_options(remat))
    (_, (out, updates)), grads = step(variables["params"])
    return jax.tree.leaves(out), trees.flatten(updates), trees.flatten(grads)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_remat_gives_the_same_outputs_statistics_and_gradients(name):
    """float64: max |diff| / (1 + max |value|) <= 1e-10; float32 (ResNet): relative L2 error <= 1e-6 (the
    order of float32 rounding changes where the recomputation is fused differently). Train mode, so that
    BatchNorm's hand-written gradient and max pooling's custom JVP are recomputed inside the rematerialized
    blocks."""
    torch_model, _, _ = case(name)
    full = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model))
    x = images(4, 64, 64, seed=10)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda v: np.asarray(v, np.float64), full)
        plain, remat = (_train_outputs(name, r, x.astype(np.float64), wide, jnp.float64) for r in (False, True))
        _compare(plain, remat, lambda a, b: max_rel_error(b, a) <= 1e-10)
    if jaxnets.get_spec(name).family != "resnet":
        return
    plain, remat = (_train_outputs(name, r, x, full, jnp.float32) for r in (False, True))
    _compare(plain, remat, lambda a, b: np.linalg.norm(np.subtract(b, a, dtype=np.float64))
             <= 1e-6 * np.linalg.norm(np.asarray(a, np.float64)))


def _compare(plain, remat, close) -> None:
    (out, stats, grads), (out_r, stats_r, grads_r) = plain, remat
    assert len(out) == len(out_r) and out
    for a, b in zip(out, out_r, strict=True):
        assert close(a, b)
    assert grads and grads.keys() == grads_r.keys() and stats.keys() == stats_r.keys()
    for ours, theirs in ((stats, stats_r), (grads, grads_r)):
        for key in ours:
            assert close(ours[key], theirs[key]), key


def test_remat_step_recomputes_and_keeps_less_memory():
    """What remat is for, checked on the compiled program: more convolutions (the recomputation), fewer bytes of
    temporaries (the activations not kept). Without ``remat_compiler_options``, XLA:CPU merges the recomputation
    back into the forward pass and nothing is saved."""
    x = images(8, 96, 96, seed=12)  # layer4's maps 3x3: convolutions (1x1 and 2x2 maps are matrix products)

    def compiled(remat: bool, options: dict):
        model = jaxnets.create_model("resnet18", remat=remat)
        variables = jax.eval_shape(model.init, jax.random.key(0), x[:1])

        def loss(params, batch_stats):
            out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(out)
        step = jax.jit(jax.grad(loss), compiler_options=options)
        return step.lower(variables["params"], variables["batch_stats"]).compile()

    plain, remat = compiled(False, {}), compiled(True, remat_compiler_options())
    convolutions = [c.as_text().count("convolution(") for c in (plain, remat)]
    memory = [c.memory_analysis().temp_size_in_bytes for c in (plain, remat)]
    assert convolutions[1] > convolutions[0]
    assert memory[1] < 0.8 * memory[0], memory


# --- training on non-RGB data -----------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def _gray_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), mode="L").save(root / label / f"{i}.png")
    return root


def _array_folder(root: Path, channels: int) -> Path:
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            np.save(root / label / f"{i}.npy", rng.uniform(0, 1, (20, 24, channels)).astype(np.float32))
    return root


@pytest.mark.parametrize("kind", ["gray", "npy"])
def test_train_py_trains_on_grayscale_and_multispectral_folders(kind, tmp_path):
    channels = 1 if kind == "gray" else 5
    data = _gray_folder(tmp_path / "data") if kind == "gray" else _array_folder(tmp_path / "data", channels)
    workdir = tmp_path / "run"
    argv = ["--model", "resnet18", "--dataset", str(data), "--in-chans", str(channels), "--image-size", "16",
            "--batch-size", "4", "--steps", "2", "--epochs", "1", "--workdir", str(workdir), "--compile-cache", "",
            "--no-progress", *(["--remat"] if kind == "gray" else [])]
    assert train.main(argv) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["in_chans"] == channels and config["remat"] == (kind == "gray")
    weights = load_weights(workdir / "final_weights.safetensors")
    assert weights.model_options["in_chans"] == channels and "remat" not in weights.model_options
    stats = EvalTransform().for_channels(channels)
    assert weights.metadata["eval_transform"]["mean"] == pytest.approx(stats.mean)
    assert weights.metadata["eval_transform"]["std"] == pytest.approx(stats.std)
    assert weights.variables["params"]["conv1"]["kernel"].shape == (7, 7, channels, 64)
