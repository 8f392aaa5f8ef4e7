"""Registry, clear errors, every-input-size fidelity and torchvision's initialization."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from scipy import stats
from torch_oracle import (
    jax_options,
    max_rel_error,
    nchw,
    one_per_family,
    oracle_model,
    state_dict_numpy,
    torch_options,
)

import jaxnets
from jaxnets.mapping import torch_key
from jaxnets.registry import bound_options

# One model per family (its BatchNorm variant where it has one), and the first with grouped convolutions
# (ResNeXt: a fan-in per group, in the mapping and in the initializers).
FAMILY_MODELS = one_per_family(prefer_batch_norm=True) + [
    name for name in jaxnets.list_models() if bound_options(name).get("groups", 1) > 1][:1]


def test_registry_lists_torchvision_names_with_their_published_metadata():
    names = jaxnets.list_models()
    assert len(names) == 19 and jaxnets.list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    for name in names:
        published = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        weights = jaxnets.get_spec(name).weights
        assert weights.url == published.url
        assert (weights.acc1, weights.acc5) == tuple(published.meta["_metrics"]["ImageNet-1K"].values())
        assert weights.num_params == published.meta["num_params"]
        assert weights.gflops == published.meta["_ops"]
        assert weights.min_size == published.meta["min_size"]
        assert weights.categories == tuple(published.meta["categories"])
        transform = published.transforms()
        assert (weights.transforms.resize_size, weights.transforms.crop_size) == (*transform.resize_size,
                                                                                  *transform.crop_size)
        assert weights.transforms.interpolation == transform.interpolation.value
        assert weights.transforms.mean == tuple(transform.mean) and weights.transforms.std == tuple(transform.std)


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; did you mean resnet18.*; "
                                         "known models: alexnet, .*googlenet, resnet18"):
        jaxnets.create_model("resnet19")


def test_unknown_option_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError, match="resnet18: unknown option.*dropout.*accepted:.*zero_init_residual"):
        jaxnets.create_model("resnet18", dropout=0.1)


def test_state_dict_of_another_architecture_is_refused_by_key():
    state = state_dict_numpy(torchvision.models.resnet34())
    with pytest.raises(jaxnets.WeightMappingError, match=r"resnet18: .*unexpected \d+ key\(s\): layer1\.2\."):
        jaxnets.from_torch_state_dict("resnet18", state)
    with pytest.raises(jaxnets.WeightMappingError, match="has no classifier 'classifier.6.weight'"):
        jaxnets.from_torch_state_dict("alexnet", state)


def test_wrong_shape_is_refused_naming_key_and_shapes():
    state = state_dict_numpy(torchvision.models.resnet18())
    state["layer2.0.conv1.weight"] = np.zeros((128, 64, 5, 5), np.float32)
    with pytest.raises(jaxnets.WeightMappingError, match=r"layer2\.0\.conv1\.weight: got \(128, 64, 5, 5\), "
                                                         r"expected \(128, 64, 3, 3\)"):
        jaxnets.from_torch_state_dict("resnet18", state)


def test_any_number_of_classes_and_missing_aux_heads_are_inferred():
    torch_model = oracle_model("googlenet", num_classes=7, aux_logits=False)
    variables = jaxnets.from_torch_state_dict("googlenet", state_dict_numpy(torch_model))
    assert "aux1" not in variables["params"] and variables["params"]["fc"]["kernel"].shape == (1024, 7)
    x = np.random.default_rng(0).standard_normal((1, 40, 40, 3), np.float32)
    model = jaxnets.create_model("googlenet", num_classes=7, aux_logits=False)
    with torch.no_grad():
        assert max_rel_error(jax.jit(model.apply)(variables, x), torch_model(nchw(x)).numpy()) <= 1e-4


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_fidelity_from_the_minimum_input_size_up(name):
    """torchvision's smallest legal input, and odd/non-square sizes around it."""
    torch_model = oracle_model(name)
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model))
    model = jaxnets.create_model(name, **jax_options(name))
    min_h, min_w = jaxnets.get_spec(name).weights.min_size
    apply = jax.jit(model.apply)  # one compilation per size costs less than running each op on its own
    for h, w in [(min_h, min_w), (min_h + 1, min_w + 6), (min_h + 21, min_w + 34)]:
        x = np.random.default_rng(h * w).standard_normal((2, h, w, 3), np.float32)
        with torch.no_grad():
            expected = torch_model(nchw(x)).numpy()
        assert max_rel_error(apply(variables, x), expected) <= 1e-4, (h, w)


INIT_CASES = [(name, {}) for name in FAMILY_MODELS] + [("resnet50", {"zero_init_residual": True})]


KS_SAMPLE = 1 << 16  # values of each tensor the Kolmogorov-Smirnov test compares (i.i.d.: a prefix is a sample)
KS_ALPHA = 1e-6  # per tensor, fixed seeds. Uniform vs normal of the same std: p ~ 1e-27 at 16384 values, 1e-99 at 65536


@pytest.mark.parametrize("name,options", INIT_CASES)
def test_initialization_follows_torchvision(name, options):
    """Same distribution per tensor: constants exactly; random tensors, whatever their size, by a two-sample
    Kolmogorov-Smirnov test against torchvision's tensor (same distribution not rejected at 1e-6, which tells
    a uniform from a normal of the same std on any tensor of 16k values or more), plus std and mean."""
    torch.manual_seed(0)
    torch_state = state_dict_numpy(torchvision.models.get_model(name, weights=None, **torch_options(name, **options)))
    model = jaxnets.create_model(name, **jax_options(name, **options))
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))()
    random_tensors = 0
    for path, value in traverse_util.flatten_dict(variables).items():
        ours = np.asarray(value)
        theirs = torch_state[torch_key("/".join(path[1:-1]), path[-1])]
        assert ours.size == theirs.size, path
        if np.all(theirs == theirs.flat[0]):
            np.testing.assert_array_equal(ours, np.full_like(ours, theirs.flat[0]), err_msg=str(path))
            continue
        random_tensors += 1
        ks = stats.ks_2samp(ours.ravel()[:KS_SAMPLE], theirs.ravel()[:KS_SAMPLE])
        assert ks.pvalue > KS_ALPHA, (path, ks.statistic, ks.pvalue)
        if theirs.size >= 64:  # below, a sample std is too noisy to bound usefully; the KS test still runs
            ratio = ours.std() / theirs.std()
            bound = 0.1 if theirs.size >= 4096 else 0.35
            assert abs(ratio - 1) < bound, (path, ratio)
            assert abs(ours.mean()) < 4 * theirs.std() / np.sqrt(theirs.size) + 1e-6, path
    assert random_tensors > 0


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_model_table_is_the_registry():
    """README's model table says it is tested against torchvision's weight metadata: it must list every
    registered model and each of its weights, in order, with the registry's figures at the table's precision (and
    the registry is torchvision's metadata: ``test_registry_lists_torchvision_names_with_their_published_metadata``
    and tests/test_weight_versions.py)."""
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (\w+) \| ([\d.]+) M \| ([\d.]+) \| (\d+) / (\d+) (\w+) \| "
                      r"([\d.]+) \| ([\d.]+) \|$", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert [row[:2] for row in rows] == [(name, version) for name in jaxnets.list_models()
                                         for version in jaxnets.get_spec(name).weight_versions]
    for name, version, *figures in rows:
        spec = jaxnets.get_spec(name)
        w, t = spec.weight_versions[version], spec.weight_versions[version].transforms
        expected = [spec.family, f"{w.num_params / 1e6:.2f}", f"{w.gflops:.2f}", str(t.resize_size), str(t.crop_size),
                    t.interpolation, f"{w.acc1:.3f}", f"{w.acc5:.3f}"]
        assert figures == expected, (name, version)
