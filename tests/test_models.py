"""Every registered model against torchvision itself (timm-style: parametrized over the registry).

Tolerance: float32 logits agree to max|jax - torch| <= 1e-4 * (1 + max|torch|) (``max_rel_error``).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from torch_oracle import jax_options, max_rel_error, nchw, oracle_model, state_dict_numpy

import jaxnets

TOL = 1e-4
MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in jaxnets.list_models()]
# Family-level behaviour is checked on the first registered model of each family.
FAMILY_FIRST = [p for p in MODELS if p.values[0] == jaxnets.list_models(jaxnets.get_spec(p.values[0]).family + "*")[0]]


@functools.lru_cache(maxsize=1)  # tests are grouped per model; keep one model in memory at a time
def case(name: str):
    torch_model = oracle_model(name)
    state = state_dict_numpy(torch_model)
    variables = jaxnets.from_torch_state_dict(name, state)
    model = jaxnets.create_model(name, **jax_options(name))
    return torch_model, state, variables, model


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), np.float32)


@functools.lru_cache(maxsize=8)
def _apply(model, train: bool, dtype=None):
    def fn(variables, x):
        if train:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x)
    return jax.jit(fn)


def eval_logits(model, variables, x):
    return np.asarray(_apply(model, False)(variables, x))


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_torchvision(name):
    torch_model, _, variables, _ = case(name)
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert count == sum(p.numel() for p in torch_model.parameters())
    # torchvision publishes the count of the model it returns with weights: GoogLeNet without aux heads.
    published = {"aux_logits": False} if jaxnets.get_spec(name).family == "googlenet" else {}
    model = jaxnets.create_model(name, **published)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) == jaxnets.get_spec(name).weights.num_params


@pytest.mark.parametrize("size", [(224, 224), (67, 91)], ids=["224", "67x91"])
@pytest.mark.parametrize("name", MODELS)
def test_eval_logits_equal_torchvision(name, size):
    torch_model, _, variables, model = case(name)
    x = images(2, *size)
    with torch.no_grad():
        expected = torch_model(nchw(x)).numpy()
    assert max_rel_error(eval_logits(model, variables, x), expected) <= TOL


def torch_train_forward(torch_model, state, x, dtype=torch.float32):
    """One train-mode forward of a copy of ``torch_model``; returns (outputs, updated state dict)."""
    model = copy.deepcopy(torch_model).to(dtype).train()
    with torch.no_grad():
        out = model(nchw(x).to(dtype))
    out = tuple(out) if isinstance(out, tuple) else (out,)
    return [o.double().numpy() for o in out], state_dict_numpy(model.float())


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_logits_and_running_stats_equal_torchvision(name):
    """Train-mode BatchNorm normalizes with statistics of a small batch, which amplifies float32
    rounding through deep nets: ResNet-152's float32 logits differ from its own float64 ones by
    ~1e-4. So the reference is torchvision in float64, and the bound is 1e-4 or twice torchvision's
    own float32 error, whichever is larger."""
    torch_model, state, variables, model = case(name)
    x = images(4, 64, 72, seed=1)
    out, updates = _apply(model, True)(variables, x)
    torch32, torch_state = torch_train_forward(torch_model, state, x)
    torch64, _ = torch_train_forward(torch_model, state, x, torch.float64)
    if jaxnets.get_spec(name).family == "googlenet":
        assert isinstance(out, jaxnets.GoogLeNetOutputs)  # (logits, aux_logits2, aux_logits1), torchvision's order
    out = tuple(out) if isinstance(out, tuple) else (out,)
    assert len(out) == len(torch64)
    for ours, exact, single in zip(out, torch64, torch32, strict=True):
        assert max_rel_error(ours, exact) <= max(TOL, 2 * max_rel_error(single, exact))

    ours = traverse_util.flatten_dict(updates.get("batch_stats", {}))
    theirs = traverse_util.flatten_dict(jaxnets.from_torch_state_dict(name, torch_state).get("batch_stats", {}))
    assert ours.keys() == theirs.keys()
    assert bool(ours) == name.endswith("_bn") or jaxnets.get_spec(name).family in ("googlenet", "resnet")
    for path, value in ours.items():
        assert max_rel_error(value, theirs[path]) <= TOL, path


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_is_exact_and_loads_strict(name):
    torch_model, state, variables, _ = case(name)
    back = jaxnets.to_torch_state_dict(name, variables)
    assert back.keys() == state.keys()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    result = torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_compute_stays_close_to_float32(name):
    _, _, variables, _ = case(name)
    model32 = jaxnets.create_model(name, **jax_options(name))
    model16 = jaxnets.create_model(name, dtype=jnp.bfloat16, **jax_options(name))
    x = images(2, 64, 64, seed=2)
    ref = eval_logits(model32, variables, x)
    out = _apply(model16, False)(variables, x)
    assert out.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel
    params16 = jax.eval_shape(lambda: model16.init(jax.random.key(0), x, train=False))["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16))


@pytest.mark.parametrize("name", FAMILY_FIRST)
def test_pre_logits_are_the_classifier_input(name):
    _, _, variables, model = case(name)
    x = images(2, 64, 64, seed=3)
    features = model.apply(variables, x, pre_logits=True)
    classifier = variables["params"]
    for part in jaxnets.get_spec(name).classifier.split("/"):
        classifier = classifier[part]
    logits = features @ classifier["kernel"] + classifier["bias"]
    assert max_rel_error(logits, eval_logits(model, variables, x)) <= TOL


LOSS_WEIGHTS = (1.0, 0.3, 0.3)  # logits, then GoogLeNet's two aux logits, as in the paper


def torch_gradients(torch_model, x, labels) -> dict[str, np.ndarray]:
    """Train-mode gradients of cross-entropy in float64."""
    model = copy.deepcopy(torch_model).double().train()
    out = model(nchw(x).double())
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    weighted = zip(LOSS_WEIGHTS[:len(outs)], outs, strict=True)
    loss = sum(w * torch.nn.functional.cross_entropy(o, torch.from_numpy(labels)) for w, o in weighted)
    loss.backward()
    return {k: p.grad.numpy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", FAMILY_FIRST + [p for p in MODELS if p.values[0] in ("resnet50", "vgg11_bn")])
def test_train_mode_gradients_equal_torchvision_in_float64(name):
    """The backward pass (GoogLeNet: main + 0.3 x aux losses) is torchvision's. Compared in float64:
    in float32, train-mode BatchNorm over a small batch makes deep nets' gradients so ill-conditioned
    that torchvision's own float32 gradients differ from its float64 ones by up to ~1e-2."""
    torch_model, _, variables, _ = case(name)
    x = images(4, 64, 72, seed=4).astype(np.float64)
    labels = np.random.default_rng(4).integers(0, 1000, 4)
    with jax.enable_x64(True):
        model = jaxnets.create_model(name, dtype=jnp.float64, **jax_options(name))
        params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])

        def loss_fn(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            outs = tuple(out) if isinstance(out, tuple) else (out,)
            weighted = zip(LOSS_WEIGHTS[:len(outs)], outs, strict=True)
            return sum(w * optax.softmax_cross_entropy_with_integer_labels(o, labels).mean() for w, o in weighted)

        grads = jaxnets.to_torch_state_dict(name, {"params": jax.jit(jax.grad(loss_fn))(params)}, params_only=True)
    expected = torch_gradients(torch_model, x, labels)
    assert grads.keys() == expected.keys()
    for key, value in expected.items():
        assert max_rel_error(grads[key], value) <= 1e-9, key
