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
import torchvision
from flax import linen as nn
from flax import traverse_util
from torch_oracle import (
    dropout_options,
    jax_options,
    max_rel_error,
    nchw,
    one_per_family,
    oracle_model,
    runs_eagerly,
    state_dict_numpy,
    torch_options,
)

import jaxnets

TOL = 1e-4
MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in jaxnets.list_models()]
# Family-level behaviour is checked on the first registered model of each family.
FAMILY_FIRST = [p for p in MODELS if p.values[0] in one_per_family()]


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
def _compiled(model, train: bool):
    def fn(variables, x):
        if train:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x)
    return jax.jit(fn)


def _apply(model, train: bool, variables, x):
    """The model on ``x``, jitted, or op by op for the deep ResNets (``runs_eagerly``)."""
    if runs_eagerly(variables):
        return model.apply(variables, x, train=True, mutable=["batch_stats"]) if train else model.apply(variables, x)
    return _compiled(model, train)(variables, x)


def eval_logits(model, variables, x):
    return np.asarray(_apply(model, False, variables, x))


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_torchvision(name):
    torch_model, _, variables, _ = case(name)
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert count == sum(p.numel() for p in torch_model.parameters())
    # torchvision publishes the count of the model it returns with weights: GoogLeNet without aux heads (the
    # others' parameters do not depend on the input size, their pools being adaptive: the count above is it).
    if jaxnets.get_spec(name).family == "googlenet":
        model = jaxnets.create_model(name, aux_logits=False)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
        count = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
    assert count == jaxnets.get_spec(name).weights.num_params


def eval_cases():
    """Every model at an odd, non-square size; the first of each family also at 224 (ImageNet's size). A deep
    variant stacks the same blocks as its family's first, so its own 224 run would prove nothing the 67x91 one
    and the family's 224 run do not."""
    for p in MODELS:
        sizes = [("224", (224, 224)), ("67x91", (67, 91))] if p in FAMILY_FIRST else [("67x91", (67, 91))]
        for size_id, size in sizes:
            yield pytest.param(p.values[0], size, marks=p.marks, id=f"{p.values[0]}-{size_id}")


@pytest.mark.parametrize("name,size", list(eval_cases()))
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
    out, updates = _apply(model, True, variables, x)
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
    assert bool(ours) == (name.endswith("_bn") or jaxnets.get_spec(name).family in ("googlenet", "resnet"))
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


# bfloat16 is a family's code path (each layer's dtype): the first of each family, the bottleneck and the grouped
# convolutions; the variants only repeat those layers.
@pytest.mark.parametrize("name", FAMILY_FIRST + [p for p in MODELS if p.values[0] in ("resnet50", "resnext50_32x4d")])
def test_bfloat16_compute_stays_close_to_float32(name):
    _, _, variables, _ = case(name)
    model32 = jaxnets.create_model(name, **jax_options(name))
    model16 = jaxnets.create_model(name, dtype=jnp.bfloat16, **jax_options(name))
    x = images(2, 64, 64, seed=2)
    ref = eval_logits(model32, variables, x)
    out = _apply(model16, False, variables, x)
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


# --- dropout: where it sits, which option drives it, how it scales ---------------------------------
# Every other train-mode test runs with dropout 0. Models: the first of each family that has dropout.


def dropout_cases():
    """Per model: each dropout option at 1 (torch's Dropout(p=1) zeroes its input, deterministically, as ours
    does at rate 1) and the others strictly between 0 and 1 (0.5, then 0.25); a model with a single option also
    runs it at 0.5. Each option is seen at 1 and in (0, 1), and a run whose options were swapped would put a
    rate of 1 where torchvision's is in (0, 1): one run per option (rate 0 is every other train-mode test)."""
    for p in FAMILY_FIRST:
        name, options = p.values[0], dropout_options(p.values[0])
        if not options:
            continue
        cases = []
        for one in options:
            between = iter((0.5, 0.25))  # at most two options today
            cases.append({o: 1.0 if o == one else next(between) for o in options})
        if len(options) == 1:
            cases.append({options[0]: 0.5})
        for rates in cases:
            case_id = name + "-" + ",".join(f"{k}={v}" for k, v in rates.items())
            yield pytest.param(name, rates, marks=p.marks, id=case_id)


@functools.lru_cache(maxsize=1)
def dropout_case(name: str):
    """The oracle's weights. Its biases are not zero (VGG's would be): at p = 1 a zero bias would make a
    misplaced dropout give the same (zero) logits."""
    state = state_dict_numpy(oracle_model(name))
    return state, jaxnets.from_torch_state_dict(name, state)


def torchvision_with(name: str, state: dict[str, np.ndarray], **options) -> torch.nn.Module:
    """torchvision's model built with ``options`` (no initialization: the weights are ``state``)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, **torch_options(name, **options))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def torch_train_forward_replaying(name, torch_model, dropouts, x, dtype) -> list[np.ndarray]:
    """Train-mode forward of a copy of ``torch_model`` whose random Dropouts (0 < p < 1), in call order, apply
    our ``dropouts`` masks the way torch applies its own: input * mask / (1 - p), p being the module's. Each
    also checks that it gets the input ours got (a mask over a flattened feature map is permuted from our
    NHWC flatten to torch's NCHW one)."""
    model = copy.deepcopy(torch_model).to(dtype).train()
    pending = iter(dropouts)

    def replay(module, inputs, output):
        ours, mask = next(pending)
        theirs = inputs[0].double().numpy()
        assert ours.ndim == 2 and ours.shape == theirs.shape, (module, ours.shape, theirs.shape)
        size = ours.shape[1]
        orders = [np.arange(size)] + [np.arange(size).reshape(h, w, c).transpose(2, 0, 1).ravel()
                                      for c, h, w in jaxnets.get_spec(name).flattened_linears.values()
                                      if c * h * w == size]
        order = min(orders, key=lambda order: max_rel_error(ours[:, order], theirs))
        assert max_rel_error(ours[:, order], theirs) <= 1e-3, "a dropout gets another input than torchvision's"
        return inputs[0] * torch.from_numpy(mask[:, order]).to(dtype) / (1 - module.p)

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and 0 < module.p < 1:
            module.register_forward_hook(replay)
    with torch.no_grad():
        out = model(nchw(x).to(dtype))
    assert next(pending, None) is None, "torchvision ran fewer dropouts than jaxnets"
    out = tuple(out) if isinstance(out, tuple) else (out,)
    return [o.double().numpy() for o in out]


@pytest.mark.parametrize("name,rates", list(dropout_cases()))
def test_train_mode_dropout_equals_torchvision(name, rates):
    """Train-mode logits (GoogLeNet: and aux logits) with dropout on, against torchvision built with the same
    options. At rates 0/1 this is torchvision as is: they agree only if each dropout sits where torchvision's
    does (AlexNet: before each hidden Linear; VGG: after each hidden ReLU) and is driven by the same option.
    At rates in (0, 1) our random masks are replayed in torchvision's Dropouts, in call order: same places,
    same rate per place, same 1 / (1 - p) scaling of what is kept. Smallest input torchvision accepts, batch 2
    (train-mode BatchNorm). Bound: that of the dropout-free train-mode test."""
    state, variables = dropout_case(name)
    x = images(2, *jaxnets.get_spec(name).weights.min_size, seed=5)
    model = jaxnets.create_model(name, **jax_options(name, **rates))
    torch_model = torchvision_with(name, state, **rates)
    dropouts = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and 0 < context.module.rate < 1:
            # A zero input gives 0 whatever the mask: either value will do there.
            dropouts.append((np.asarray(args[0], np.float64), np.asarray(out) != 0))
        return out

    with nn.intercept_methods(record):  # eager: the masks are concrete
        out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    if dropouts:
        between = sum(0 < rate < 1 for rate in rates.values())
        assert len(dropouts) >= between and all(0 < mask.mean() < 1 for _, mask in dropouts)
        torch32 = torch_train_forward_replaying(name, torch_model, dropouts, x, torch.float32)
        torch64 = torch_train_forward_replaying(name, torch_model, dropouts, x, torch.float64)
    else:
        torch32, _ = torch_train_forward(torch_model, state, x)
        torch64, _ = torch_train_forward(torch_model, state, x, torch.float64)
    if 1.0 in rates.values():  # p = 1 made an output independent of the input
        assert any(np.array_equal(o[0], o[1]) for o in torch64)
    out = tuple(out) if isinstance(out, tuple) else (out,)
    assert len(out) == len(torch64)
    for ours, exact, single in zip(out, torch64, torch32, strict=True):
        assert max_rel_error(ours, exact) <= max(TOL, 2 * max_rel_error(single, exact))
