"""The library API refuses what it cannot use, in one line naming the culprit, rather than return wrong results:
variables of another model, malformed ``num_classes``, options a variant fixes, a directory for a file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxnets
from jaxnets.mapping import MAX_LISTED, from_torch_state_dict, to_torch_state_dict
from jaxnets.weights import (
    WeightsError,
    load_pretrained,
    load_weights,
    read_state_dict,
    reinitialize_head,
    save_weights,
)


def zero_variables(name: str, **options) -> dict:
    """Variables of ``create_model(name, **options)`` with the right structure and shapes, all zeros: cheap."""
    model = jaxnets.create_model(name, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def torch_keys(name: str, **options) -> set[str]:
    return set(torchvision.models.get_model(name, weights=None, **options).state_dict())


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- to_torch_state_dict is as strict as from_torch_state_dict ------------------------------------


def _with_wide_conv1(variables: dict) -> dict:
    params = {**variables["params"], "conv1": {"kernel": np.zeros((7, 7, 3, 32), np.float32)}}
    return {**variables, "params": params}


WRONG_VARIABLES = {
    "params tree alone": (lambda v, other: v["params"], r"no classifier 'params/fc/kernel'"),
    "params without batch_stats": (lambda v, other: {"params": v["params"]},
                                   r"params_only=True\): missing 40 key\(s\): batch_stats/bn1/mean"),
    "resnet34 variables": (lambda v, other: other["resnet34"],
                           r"unexpected 80 key\(s\): batch_stats/layer1/2/bn1/mean"),
    "alexnet variables": (lambda v, other: other["alexnet"], r"no classifier 'params/fc/kernel'"),
    "mis-shaped conv1": (lambda v, other: _with_wide_conv1(v),
                         r"mis-shaped 1 key\(s\): params/conv1/kernel: got \(7, 7, 3, 32\), expected \(7, 7, 3, 64\)"),
    "another collection": (lambda v, other: {**v, "intermediates": {"x": np.zeros(3)}},
                           r"unexpected 1 key\(s\): intermediates/x"),
}


@pytest.fixture(scope="module")
def variables() -> dict[str, dict]:
    return {name: zero_variables(name) for name in ("resnet18", "resnet34", "alexnet")}


@pytest.mark.parametrize("case", WRONG_VARIABLES)
def test_to_torch_state_dict_refuses_variables_that_are_not_the_models(case, variables):
    wrong, message = WRONG_VARIABLES[case]
    with pytest.raises(jaxnets.WeightMappingError, match=r"^resnet18: .*" + message):
        to_torch_state_dict("resnet18", wrong(variables["resnet18"], variables))


def test_to_torch_state_dict_lists_a_bounded_number_of_keys(variables):
    with pytest.raises(jaxnets.WeightMappingError) as info:
        to_torch_state_dict("resnet18", variables["resnet34"])
    listed = one_line(info).split("unexpected 80 key(s): ", 1)[1].split(", ")
    assert len(listed) == MAX_LISTED


@pytest.mark.parametrize(("name", "options"), [
    ("resnet18", {"num_classes": 7}),
    ("googlenet", {"num_classes": 3, "aux_logits": False}),
    ("googlenet", {"num_classes": 3, "aux_logits": True}),
    ("vgg11", {}),  # no BatchNorm at all
])
def test_to_torch_state_dict_follows_the_classes_and_heads_of_the_variables(name, options):
    state = to_torch_state_dict(name, zero_variables(name, **options))
    torch_options = {"init_weights": False} if name == "googlenet" else {}
    assert state.keys() == torch_keys(name, **torch_options, **options)


def test_params_only_maps_a_params_tree_such_as_gradients(variables):
    state = to_torch_state_dict("resnet18", {"params": variables["resnet18"]["params"]}, params_only=True)
    assert state.keys() == {k for k, _ in torchvision.models.resnet18().named_parameters()}
    with pytest.raises(jaxnets.WeightMappingError, match="unexpected 40 key"):  # still strict on what it maps
        to_torch_state_dict("resnet18", variables["resnet18"], params_only=True)


# --- from_torch_state_dict takes tensors as torch hands them out ---------------------------------


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


def test_tensors_that_require_grad_are_mapped(resnet18):
    expected = from_torch_state_dict("resnet18", {k: v.numpy() for k, v in resnet18.state_dict().items()})
    state = resnet18.state_dict(keep_vars=True)  # parameters as they are: requiring grad
    assert state["conv1.weight"].requires_grad
    actual = from_torch_state_dict("resnet18", state)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_bfloat16_tensors_are_upcast_to_float32(resnet18):
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in resnet18.state_dict().items()}
    expected = from_torch_state_dict("resnet18", {k: v.float().numpy() for k, v in state.items()})
    actual = from_torch_state_dict("resnet18", state)
    assert actual["params"]["conv1"]["kernel"].dtype == np.float32
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


# --- num_classes ---------------------------------------------------------------------------------


BAD_NUM_CLASSES = [0, -1, True, 2.5, "10", None]


@pytest.mark.parametrize("num_classes", BAD_NUM_CLASSES)
def test_create_model_refuses_a_num_classes_that_is_no_positive_integer(num_classes):
    with pytest.raises(ValueError) as info:
        jaxnets.create_model("resnet18", num_classes=num_classes)
    assert one_line(info) == f"num_classes must be an integer >= 1, got {num_classes!r}"


def test_create_model_takes_numpy_integers():
    assert jaxnets.create_model("resnet18", num_classes=np.int64(3)).num_classes == 3


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    return str(save_weights(path, "resnet18", zero_variables("resnet18", num_classes=4)))


@pytest.mark.parametrize("num_classes", [0, -1, True, 2.5])
def test_load_pretrained_refuses_a_bad_num_classes(num_classes, weights_file):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        load_pretrained("resnet18", num_classes=num_classes, weights=weights_file)


def test_reinitialize_head_refuses_a_bad_num_classes(variables):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        reinitialize_head("resnet18", variables["resnet18"], 0)


# --- options a variant fixes ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "message"), [
    ("resnet18", {"stage_sizes": (1, 1, 1, 1)}, "resnet18 fixes stage_sizes=(2, 2, 2, 2); choose another model"),
    ("vgg11", {"depth": 19, "dropout": 0.1}, "vgg11 fixes depth=11; choose another model"),
    ("resnet50", {"groups": 32, "width_per_group": 4},
     "resnet50 fixes groups=1, width_per_group=64; choose another model"),
])
def test_create_model_refuses_options_the_variant_fixes(name, options, message):
    with pytest.raises(ValueError) as info:
        jaxnets.create_model(name, **options)
    assert one_line(info) == message


def test_unknown_option_lists_only_the_free_options():
    with pytest.raises(ValueError) as info:
        jaxnets.create_model("resnet18", dropout=0.1)
    assert one_line(info) == ("resnet18: unknown option(s) dropout; accepted: features_only, in_chans, out_indices, "
                              "remat, shortcut, zero_init_residual")


# --- reinitialize_head checks what it is given ---------------------------------------------------


@pytest.mark.parametrize(("given", "message"), [
    ("params", r"missing \d+ key\(s\): batch_stats/bn1/mean.*unexpected \d+ key\(s\): bn1/bias"),
    ("alexnet", r"unexpected \d+ key\(s\): params/classifier/1/bias"),
    ("resnet34", r"unexpected 80 key\(s\): batch_stats/layer1/2/bn1/mean"),
])
def test_reinitialize_head_refuses_variables_of_another_model(given, message, variables):
    tree = variables["resnet18"]["params"] if given == "params" else variables[given]
    with pytest.raises(WeightsError, match=r"^resnet18: variables do not fit the architecture.*" + message):
        reinitialize_head("resnet18", tree, 5)


# --- a directory for a file ----------------------------------------------------------------------


@pytest.mark.parametrize("read", [load_weights, read_state_dict, lambda p: load_pretrained("resnet18", weights=p)])
def test_a_directory_is_named_as_one(read, tmp_path):
    with pytest.raises(IsADirectoryError) as info:
        read(tmp_path)
    assert one_line(info) == f"{tmp_path}: is a directory, not a file; give the weights file in it"
