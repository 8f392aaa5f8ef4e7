"""Bad model input fails at trace time with one clear line: layout, channels, size, dropout, frozen_norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import dropout_options, one_per_family

import jaxnets

FAMILIES = one_per_family(prefer_batch_norm=True)


def init_shapes(model, shape: tuple[int, ...], **kwargs):
    """Variables as shapes only: every check here runs while tracing, nothing is computed."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), **kwargs))


@pytest.mark.parametrize("name", FAMILIES)
def test_nchw_input_is_refused_at_init_with_a_transpose_hint(name):
    """It used to build a model with a (7, 7, 64, 64) stem kernel that then ran on NCHW input."""
    expected = (rf"{name} expects NHWC RGB images \(N, H, W, 3\), got \(2, 3, 64, 64\) "
                r"— NCHW\? transpose with x.transpose\(0, 2, 3, 1\)")
    with pytest.raises(ValueError, match=expected):
        init_shapes(jaxnets.create_model(name), (2, 3, 64, 64))


@pytest.mark.parametrize("shape", [(2, 64, 64, 1), (64, 64, 3), (2, 64, 64, 4)])
def test_wrong_channels_or_rank_is_refused_on_proper_variables(shape):
    model = jaxnets.create_model("resnet18")
    variables = init_shapes(model, (1, 64, 64, 3))
    with pytest.raises(ValueError) as error:
        jax.eval_shape(lambda: model.apply(variables, jnp.zeros(shape)))
    hint = (f" (in_chans=3; for {shape[-1]}-channel images build the model with in_chans={shape[-1]})"
            if len(shape) == 4 else " (in_chans=3)")
    assert str(error.value).splitlines()[0] == f"resnet18 expects NHWC RGB images (N, H, W, 3), got {shape}{hint}"


@pytest.mark.parametrize("name", [name for name in FAMILIES if max(jaxnets.get_spec(name).weights.min_size) > 1])
def test_too_small_input_names_the_model_input_and_its_minimum(name):
    """The minimum is torchvision's published ``min_size`` (the registry's, tested against it)."""
    minimum, width = jaxnets.get_spec(name).weights.min_size
    assert minimum == width
    model = jaxnets.create_model(name)
    small = minimum - 1
    expected = (rf"{name}: input \(1, {small}, {small}, 3\) is too small: {name} needs at least "
                rf"{minimum}x{minimum} px \(an internal \d+-px feature map is too small")
    with pytest.raises(ValueError, match=expected):
        init_shapes(model, (1, small, small, 3))
    init_shapes(model, (1, minimum, minimum, 3))  # the minimum itself works


@pytest.mark.parametrize("name, field", [(name, field) for name in FAMILIES for field in dropout_options(name)])
@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_outside_zero_one_is_refused(name, field, p):
    model = jaxnets.create_model(name, **{field: p})
    with pytest.raises(ValueError, match=rf"{name}: {field} must be in \[0, 1\], got {p}"):
        init_shapes(model, (1, 64, 64, 3))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_bounds_are_accepted(p):
    init_shapes(jaxnets.create_model("alexnet", dropout=p), (1, 64, 64, 3))


@pytest.fixture(scope="module")
def resnet18():
    model = jaxnets.create_model("resnet18", num_classes=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) + 1.0
    return model, variables, x


def train_stats(model, variables, x, frozen_norm) -> dict:
    _, updates = model.apply(variables, x, train=True, frozen_norm=frozen_norm, mutable=["batch_stats"])
    return updates["batch_stats"]


def test_frozen_norm_accepts_torch_dots(resnet18):
    model, variables, x = resnet18
    stats, before = train_stats(model, variables, x, ("layer1.0",)), variables["batch_stats"]
    np.testing.assert_array_equal(stats["layer1"]["0"]["bn1"]["mean"], before["layer1"]["0"]["bn1"]["mean"])
    assert not np.allclose(stats["layer1"]["1"]["bn1"]["mean"], before["layer1"]["1"]["bn1"]["mean"])
    jax.tree.map(np.testing.assert_array_equal, stats, train_stats(model, variables, x, ("layer1/0",)))


@pytest.mark.parametrize("frozen_norm, message", [
    ("bn1", r"frozen_norm must be a tuple of module paths such as \('bn1', 'layer1'\), got 'bn1'"),
    (("layer9",), r"resnet18: frozen_norm path 'layer9' matches no BatchNorm; BatchNorms are under: bn1, layer1"),
    (("conv1",), r"frozen_norm path 'conv1' matches no BatchNorm"),
])
def test_frozen_norm_that_would_freeze_nothing_is_refused(resnet18, frozen_norm, message):
    model, variables, x = resnet18
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.apply(variables, x, train=True, frozen_norm=frozen_norm, mutable=["batch_stats"]))


def test_frozen_norm_on_a_model_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match=r"vgg11: frozen_norm path 'features' matches no BatchNorm; .*no BatchNorm"):
        init_shapes(jaxnets.create_model("vgg11"), (1, 32, 32, 3), frozen_norm=("features",))
