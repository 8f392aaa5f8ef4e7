"""Registry, clear errors, every-input-size fidelity and torchvision's initialization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from torch_oracle import jax_options, max_rel_error, nchw, oracle_model, state_dict_numpy, torch_options

import jaxnets
from jaxnets.mapping import torch_key

FAMILY_MODELS = ["alexnet", "vgg11_bn", "googlenet", "resnet18", "resnext50_32x4d"]


def test_registry_lists_torchvision_names_with_their_published_metadata():
    names = jaxnets.list_models()
    assert len(names) == 19 and jaxnets.list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    for name in names:
        published = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        weights = jaxnets.get_spec(name).weights
        assert weights.url == published.url
        assert (weights.acc1, weights.acc5) == tuple(published.meta["_metrics"]["ImageNet-1K"].values())
        assert weights.num_params == published.meta["num_params"]
        assert weights.min_size == published.meta["min_size"]
        assert weights.categories == tuple(published.meta["categories"])
        transform = published.transforms()
        assert (weights.transforms.resize_size, weights.transforms.crop_size) == (*transform.resize_size,
                                                                                  *transform.crop_size)
        assert weights.transforms.interpolation == transform.interpolation.value
        assert weights.transforms.mean == tuple(transform.mean) and weights.transforms.std == tuple(transform.std)


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; known models: alexnet, .*googlenet, resnet18"):
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
        assert max_rel_error(model.apply(variables, x), torch_model(nchw(x)).numpy()) <= 1e-4


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_fidelity_from_the_minimum_input_size_up(name):
    """torchvision's smallest legal input, and odd/non-square sizes around it."""
    torch_model = oracle_model(name)
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model))
    model = jaxnets.create_model(name, **jax_options(name))
    min_h, min_w = jaxnets.get_spec(name).weights.min_size
    for h, w in [(min_h, min_w), (min_h + 1, min_w + 6), (min_h + 21, min_w + 34)]:
        x = np.random.default_rng(h * w).standard_normal((2, h, w, 3), np.float32)
        with torch.no_grad():
            expected = torch_model(nchw(x)).numpy()
        assert max_rel_error(model.apply(variables, x), expected) <= 1e-4, (h, w)


INIT_CASES = [(name, {}) for name in FAMILY_MODELS] + [("resnet50", {"zero_init_residual": True})]


@pytest.mark.parametrize("name,options", INIT_CASES)
def test_initialization_follows_torchvision(name, options):
    """Same distributions per tensor: constants exactly, random tensors by standard deviation."""
    torch.manual_seed(0)
    torch_state = state_dict_numpy(torchvision.models.get_model(name, weights=None, **torch_options(name, **options)))
    model = jaxnets.create_model(name, **jax_options(name, **options))
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))()
    for path, value in traverse_util.flatten_dict(variables).items():
        ours = np.asarray(value)
        theirs = torch_state[torch_key("/".join(path[1:-1]), path[-1])]
        if np.all(theirs == theirs.flat[0]):
            np.testing.assert_array_equal(ours, np.full_like(ours, theirs.flat[0]), err_msg=str(path))
        elif theirs.size >= 64:
            ratio = ours.std() / theirs.std()
            bound = 0.1 if theirs.size >= 4096 else 0.35
            assert abs(ratio - 1) < bound, (path, ratio)
            assert abs(ours.mean()) < 4 * theirs.std() / np.sqrt(theirs.size) + 1e-6, path
