"""The torch-semantics building blocks against torch.nn.functional, over many sizes.

These are what make fidelity hold at every input size, not only the sizes the model tests use.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn
from torch_oracle import nchw

from jaxnets import layers, tuned_kernels


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode",
                         [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 0, True), (3, 1, 1, True), (2, 2, 0, False),
                          (3, 2, 1, True), (3, 3, 1, True)])
def test_max_pool_matches_torch_at_every_size(kernel, stride, padding, ceil_mode):
    pool = jax.jit(layers.max_pool, static_argnums=(1, 2, 3, 4))
    for h, w in itertools.product(range(1, 20), (kernel + 1, 13)):
        x = rand(1, h, w, 2, seed=h)
        try:
            expected = F.max_pool2d(nchw(x), kernel, stride, padding, ceil_mode=ceil_mode)
        except RuntimeError:  # torch refuses: so must we, with a clear message
            with pytest.raises(ValueError, match=f"an internal {h}-px feature map is too small"):
                layers.max_pool(x, kernel, stride, padding, ceil_mode)
            continue
        np.testing.assert_array_equal(pool(x, kernel, stride, padding, ceil_mode), nhwc(expected), err_msg=f"{h}x{w}")


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode",
                         [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, True), (3, 3, 1, True)])
def test_max_pool_gradient_matches_torch_with_ties_and_infinities(kernel, stride, padding, ceil_mode):
    """The custom gradient gives each window's gradient to its first maximum, as torch does, also when every
    value of a window ties (small integers) or is -inf (never to the padding)."""
    def grad(x, g, *static):
        return jax.vjp(lambda x: layers.max_pool(x, *static), x)[1](g)[0]
    grad = jax.jit(grad, static_argnums=(2, 3, 4, 5))
    rng = np.random.default_rng(kernel * 10 + stride)
    for h, w in itertools.product(range(kernel, 12), (kernel + 1, 10)):
        x = rng.integers(-1, 3, (2, h, w, 3)).astype(np.float32)
        x[x < 0] = -np.inf
        x_torch = nchw(x).requires_grad_()
        y = F.max_pool2d(x_torch, kernel, stride, padding, ceil_mode=ceil_mode)
        g = rng.standard_normal(y.shape, np.float32)
        y.backward(torch.from_numpy(g))
        got = grad(x, g.transpose(0, 2, 3, 1), kernel, stride, padding, ceil_mode)
        # Overlapping windows add their gradients in another order than torch: float32 rounding only.
        np.testing.assert_allclose(got, nhwc(x_torch.grad), rtol=1e-6, atol=1e-6, err_msg=f"{h}x{w}")


def test_adaptive_avg_pool_matches_torch_bins():
    for h, w, out in itertools.product((1, 3, 7, 13, 17), (4, 9), (1, 4, 7)):
        x = rand(2, h, w, 3, seed=h * w)
        expected = nhwc(F.adaptive_avg_pool2d(nchw(x), out))
        np.testing.assert_allclose(layers.adaptive_avg_pool(x, out), expected, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{h}x{w}->{out}")


@pytest.mark.parametrize("kernel,stride,padding,groups",
                         [(7, 2, 3, 1), (3, 2, 1, 1), (11, 4, 2, 1), (3, 2, 1, 4), (1, 1, 0, 1), (1, 2, 0, 1)])
def test_conv_pads_symmetrically_like_torch(kernel, stride, padding, groups):
    conv = layers.Conv2d(8, kernel, stride, padding, groups)
    for size in (kernel, 15, 16, 33):
        x = rand(1, size, size + 1, 4, seed=size)
        variables = conv.init(jax.random.key(0), x)
        weight = torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy())
        bias = torch.from_numpy(np.array(variables["params"]["bias"]))
        expected = nhwc(F.conv2d(nchw(x), weight, bias, stride, padding, groups=groups))
        np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_max_pool_supports_forward_mode_differentiation():
    x = rand(2, 9, 9, 3)
    tangent = rand(2, 9, 9, 3, seed=1)
    y, dy = jax.jvp(lambda x: layers.max_pool(x, 3, 2, 1), (x,), (tangent,))
    _, vjp = jax.vjp(lambda x: layers.max_pool(x, 3, 2, 1), x)
    cotangent = rand(*y.shape, seed=2)
    # <J t, c> == <t, J^T c>: the forward-mode rule and the gradient describe the same linear map.
    np.testing.assert_allclose(np.vdot(dy, cotangent), np.vdot(tangent, vjp(cotangent)[0]), rtol=1e-5)


def test_batch_norm_updates_running_var_with_unbiased_variance_like_torch():
    x = rand(3, 5, 4, 6)
    bn = layers.batch_norm(train=True, eps=1e-3)()
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    torch_bn = torch.nn.BatchNorm2d(6, eps=1e-3).train()
    expected = nhwc(torch_bn(nchw(x)).detach())
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], torch_bn.running_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], torch_bn.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16])
def test_batch_norm_gradient_equals_the_differentiated_formula(dtype):
    """The hand-written training-mode gradient, including the cotangents of the batch mean and
    variance (outputs too, for the running averages), against autodiff of the plain formula in
    float64. In bfloat16 (statistics stay float32) the output's multiply-add rounds twice at |x * mul| ~ 4:
    up to 2 x 2^-6 apart."""
    def formula(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        mul = scale * jax.lax.rsqrt(var + 1e-3)
        return x * mul + bias - mean * mul, mean, var

    def f64(tree):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(3 + 2 * rng.standard_normal((3, 5, 4, 6)), dtype)
        scale, bias = (jnp.asarray(rng.standard_normal(6), jnp.promote_types(dtype, jnp.float32)) for _ in "sb")
        outputs, vjp = jax.vjp(lambda *a: tuned_kernels.batch_norm_train(*a, 1e-3, dtype), x, scale, bias)
        cotangents = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in outputs)
        got = (*outputs, *vjp(cotangents))
        expected_outputs, expected_vjp = jax.vjp(formula, *f64((x, scale, bias)))
        expected = (*expected_outputs, *expected_vjp(f64(cotangents)))
        assert [g.dtype for g in got] == [x.dtype, scale.dtype, scale.dtype, x.dtype, scale.dtype, scale.dtype]
        tolerance = 1e-12 if dtype == jnp.float64 else 2 ** -5
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tolerance, atol=tolerance)


def test_frozen_batch_norm_normalizes_with_and_keeps_running_statistics():
    class Net(nn.Module):
        frozen: tuple[str, ...]

        @nn.compact
        def __call__(self, x):
            return layers.batch_norm(train=True, frozen=self.frozen)(name="bn")(x)

    x = 3.0 + rand(4, 3, 3, 2)
    variables = Net(()).init(jax.random.key(0), x)
    variables = {**variables, "batch_stats": {"bn": {"mean": np.array([0.5, -1.0], np.float32),
                                                     "var": np.array([2.0, 0.5], np.float32)}}}
    y, updates = Net(("bn",)).apply(variables, x, mutable=["batch_stats"])
    stats = variables["batch_stats"]["bn"]
    np.testing.assert_allclose(y, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    _, updates = Net(()).apply(variables, x, mutable=["batch_stats"])  # not frozen: stats move
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], stats["mean"])


def test_is_frozen_matches_whole_path_components():
    assert layers.is_frozen(("layer1", "0", "bn1"), ("layer1",))
    assert layers.is_frozen(("layer1", "0", "bn1"), ("layer1/0/bn1",))
    assert not layers.is_frozen(("layer10", "bn1"), ("layer1",))
    assert not layers.is_frozen(("bn1",), ())


def test_training_batch_norm_needs_more_than_one_value_per_channel():
    """torch raises here; the batch variance of one value is 0, so the output would be just the bias and the
    running variance would decay towards 0."""
    class Net(nn.Module):
        train: bool
        frozen: tuple[str, ...] = ()

        @nn.compact
        def __call__(self, x):
            return layers.batch_norm(train=self.train, frozen=self.frozen)(name="bn")(x)

    one = rand(1, 1, 1, 4)
    variables = Net(False).init(jax.random.key(0), one)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size \(1, 1, 1, 4\) at bn"):
        Net(True).apply(variables, one, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm2d(4).train()(nchw(one))  # the same error as torch
    Net(False).apply(variables, one)  # eval mode and frozen BatchNorms use the running statistics: fine
    Net(True, ("bn",)).apply(variables, one, mutable=["batch_stats"])
    Net(True).apply(variables, rand(2, 1, 1, 4), mutable=["batch_stats"])


def test_too_small_pool_input_is_named_an_internal_feature_map():
    with pytest.raises(layers.FeatureMapTooSmall, match=r"an internal 2-px feature map is too small for a 3x3 max "
                                                        r"pool \(stride 2, padding 0\): the model input is too small"):
        layers.max_pool(rand(1, 2, 2, 1), 3, 2)
