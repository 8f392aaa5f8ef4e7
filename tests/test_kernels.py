"""Kernel variants (jaxnets.kernels): which one runs per backend and CPU, the explicit choice (``kernels.using``,
``kernels.bind``; ``JAXNETS_KERNELS`` only the process default), and that every variant computes the same
numbers, forced one by one: eval and train outputs, BatchNorm statistics and gradients, in float64 (where only the
order of additions can differ), and against torch where torch is the oracle."""

from __future__ import annotations

import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torch_oracle import nchw

import jaxnets
from jaxnets import host, kernels, layers
from jaxnets.errors import UserError
from jaxnets.models.resnet import Bottleneck, ResNet

ALL = frozenset(kernels.VARIANTS)


# --- the choice -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gpu", "tpu", "METAL"])
def test_accelerators_run_xla_s_own_formulations(backend):
    choice = kernels.choose("auto", backend, "avx512")
    assert choice.tuned == frozenset() and choice.reason == f"{backend} backend: XLA's own"


def test_cpus_run_what_was_measured_for_their_class_and_unmeasured_ones_xla_s():
    for cpu, tuned in kernels.CPU_CHOICES.items():
        assert kernels.choose("auto", "cpu", cpu).tuned == tuned
    assert kernels.choose("auto", "cpu", "baseline") == kernels.KernelChoice(
        frozenset(), "baseline CPU, not measured: XLA's own")


def test_the_variable_sets_the_process_default_over_backend_and_cpu(monkeypatch):
    for setting, tuned in [("xla", frozenset()), ("tuned", ALL), ("maxpool_jvp, eigen_conv",
                                                                  {"maxpool_jvp", "eigen_conv"})]:
        monkeypatch.setenv(kernels.ENV_VARIABLE, setting)
        assert kernels.current().tuned == tuned
    monkeypatch.setenv(kernels.ENV_VARIABLE, "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels.current().tuned == frozenset() and host.xla_cpu_options() == {}


@pytest.mark.parametrize("setting", ["", "fast", "xla,tuned", "matmul_1x1,convs"])
def test_an_unknown_setting_is_a_one_line_error_naming_the_variable(setting, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VARIABLE, setting)
    with pytest.raises(UserError, match=r"^JAXNETS_KERNELS=.*: expected auto, xla, tuned or a comma-separated list"):
        kernels.current()


def test_using_overrides_the_default_innermost_first_and_restores_it(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VARIABLE, "tuned")
    assert kernels.current().tuned == ALL
    with kernels.using("xla") as outer:
        assert kernels.current() == outer and outer.tuned == frozenset() and outer.reason == "kernels.using=xla"
        with kernels.using({"maxpool_jvp", "eigen_conv"}):
            assert kernels.current().tuned == {"maxpool_jvp", "eigen_conv"} and kernels.uses("maxpool_jvp")
            assert host.xla_cpu_options() == host.xla_cpu_options(kernels.resolve("eigen_conv"))
        assert kernels.current() == outer and not kernels.uses("maxpool_jvp")
        assert host.xla_cpu_options() == {}
        monkeypatch.setenv(kernels.ENV_VARIABLE, "maxpool_jvp")  # the default changes nothing inside a using
        assert kernels.current() == outer
    assert kernels.current().tuned == {"maxpool_jvp"}  # outside, the default again (read each time)
    with kernels.using("auto"):  # auto inside a context: the backend's and CPU's choice, not the variable's
        assert kernels.current() == kernels.choose("auto", jax.default_backend(), kernels.cpu_class())
    with pytest.raises(UserError, match=r"^--kernels='fast': expected auto, xla, tuned"), \
            kernels.using("fast", source="--kernels"):
        pass
    assert kernels.current().tuned == {"maxpool_jvp"}  # a refused setting leaves nothing behind


def test_a_context_is_per_thread_and_the_choice_round_trips_as_a_setting():
    seen = {}
    with kernels.using("tuned"):
        thread = threading.Thread(target=lambda: seen.update(choice=kernels.current()))
        thread.start()
        thread.join()
    assert seen["choice"] == kernels.default()  # a thread starts outside the caller's using
    for setting in ("xla", "tuned", "matmul_1x1,eigen_conv"):
        choice = kernels.resolve(setting)
        assert kernels.resolve(choice.setting()).tuned == choice.tuned


def count_tuned(jaxpr_text: str) -> dict[str, int]:
    return {variant: jaxpr_text.count(marker) for variant, marker in MARKERS.items()}


def test_a_bound_step_keeps_its_builder_s_choice_whatever_the_context_at_call_time():
    """``jax.jit`` does not key its cache on the context: a step built with ``bind`` under one choice traces and
    compiles to the same program under another (counted in its jaxpr and in its lowered StableHLO)."""
    model = ResNet(stage_sizes=(1, 1), block_cls=Bottleneck, num_classes=5)
    x = np.zeros((2, 32, 32, 3), np.float32)
    variables = model.init(jax.random.key(0), x)

    def train_forward(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    programs = {}
    for built in ("xla", "tuned"):
        with kernels.using(built):
            step = jax.jit(kernels.bind(train_forward))  # as the step builders do: the choice of their context
        assert step.kernel_choice == kernels.resolve(built)
        for called in ("tuned", "xla") if built == "xla" else ("xla", "tuned"):  # first traced under the other
            with kernels.using(called):
                programs[built, called] = (count_tuned(str(jax.make_jaxpr(step)(variables, x))),
                                           step.lower(variables, x).as_text().count("stablehlo.convolution"))
    for built in ("xla", "tuned"):
        assert programs[built, "xla"] == programs[built, "tuned"], programs
    xla, tuned = programs["xla", "xla"], programs["tuned", "tuned"]
    assert tuned[0]["batchnorm_vjp"] > 0 == xla[0]["batchnorm_vjp"]
    assert xla[0]["maxpool_jvp"] == 1 and tuned[0]["maxpool_jvp"] == 2  # one 2-D window, two 1-D passes
    assert xla[1] > tuned[1]  # 1x1 convolutions as matrix products
    with kernels.using("tuned"):  # and the other way round: bind with an explicit choice
        assert kernels.bind(kernels.current, "xla")().tuned == frozenset()


def test_cpu_class_from_flags_and_xla_s_isa_limit(tmp_path):
    avx512 = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"})
    assert kernels.classify(avx512) == "avx512"
    assert kernels.classify(avx512, kernels.xla_max_isa("--xla_cpu_max_isa=avx2")) == "avx2"
    assert kernels.classify(avx512, kernels.xla_max_isa("--a=1 --xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AVX512")) \
        == "avx512"  # the last one counts, as in XLA's flag parsing
    assert kernels.classify(frozenset({"avx", "avx2"})) == "avx2"
    assert kernels.classify(frozenset({"avx", "avx2"}), "AVX") == "baseline"
    assert kernels.classify(frozenset({"asimd", "sve"})) == "baseline"  # an ARM CPU: not measured
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n")
    assert kernels.cpu_flags(str(cpuinfo)) == {"fpu", "sse4_2", "avx", "avx2", "fma"}
    assert kernels.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_reports_name_each_variant_and_the_reason():
    text = kernels.choose("auto", "cpu", "avx2").describe()
    assert text.endswith("(avx2 CPU)") and all(kernels.DESCRIPTIONS[v][0] in text for v in kernels.CPU_CHOICES["avx2"])
    assert kernels.choose("xla", "cpu", "avx2").describe() == ("1x1 conv as conv, reduce_window max pool, "
                                                               "autodiff BatchNorm grad, conv of <=2x2 maps as conv, "
                                                               "YNNPACK convolutions "
                                                               "(JAXNETS_KERNELS=xla)")


# --- the variants compute the same numbers -----------------------------------------------------------------


def run_with(setting: str | frozenset, fn, *args):
    """``fn(*args)`` jitted under ``setting``, as a step builder does (``kernels.bind``; the compile options of
    the same choice); test_each_variant_changes_what_a_model_runs shows the setting takes effect."""
    choice = kernels.resolve(setting)
    return jax.jit(kernels.bind(fn, choice), compiler_options=host.xla_cpu_options(choice))(*args)


def assert_trees_close(a, b, rtol, atol=0.0):
    jax.tree.map(partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


def grads(fn, *args):
    """Outputs and the gradient of a fixed random projection of them with respect to every argument."""
    def scalar(*args):
        out = fn(*args)
        return sum(jnp.vdot(jnp.cos(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape), o)
                   for o in jax.tree.leaves(out))
    return fn(*args), jax.grad(scalar, argnums=tuple(range(len(args))))(*args)


def rand(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_matmul_1x1_equals_the_convolution(stride):
    conv = layers.Conv2d(6, 1, stride, dtype=jnp.float64)
    with jax.enable_x64(True):
        x = rand(2, 7, 9, 5)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), conv.init(jax.random.key(0), x))
        f = lambda params, x: grads(conv.apply, params, x)
        tuned, xla = (run_with(s, f, params, x) for s in ({"matmul_1x1"}, "xla"))
    assert_trees_close(tuned, xla, rtol=1e-13)


@pytest.mark.parametrize("size,kernel,stride,padding", [(1, 3, 1, 1), (2, 3, 1, 1), (4, 3, 2, 1), (3, 3, 2, 0),
                                                         (2, 7, 2, 3), (5, 3, 3, 1)])
def test_small_map_matmul_equals_the_convolution(size, kernel, stride, padding):
    """Output maps of 1x1 and 2x2 pixels, with taps that read only padding (left out) and taps that do not."""
    conv = layers.Conv2d(6, kernel, stride, padding, dtype=jnp.float64)
    with jax.enable_x64(True):
        x = rand(3, size, 2 if size == 1 else size, 5)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), conv.init(jax.random.key(0), x))
        f = lambda params, x: grads(conv.apply, params, x)
        with kernels.using("small_map_matmul"):
            text = str(jax.make_jaxpr(conv.apply)(params, x))
        tuned, xla = (run_with(s, f, params, x) for s in ({"small_map_matmul"}, "xla"))
    assert "conv_general_dilated" not in text and "dot_general" in text
    assert_trees_close(tuned, xla, rtol=1e-12, atol=1e-15)  # float64 sums in another order


def test_separable_max_pool_equals_xla_s_window_with_ties():
    """Integer values: ties everywhere, as after a ReLU. Both give each window's gradient to its first maximum."""
    x = np.random.default_rng(0).integers(0, 3, (2, 11, 10, 3)).astype(np.float32)
    for static in [(3, 2, 1, False), (3, 2, 0, True), (2, 2, 0, False), (3, 1, 1, True)]:
        f = lambda x, static=static: grads(lambda x: layers.max_pool(x, *static), x)
        tuned, xla = (run_with(s, f, x) for s in ({"maxpool_jvp"}, "xla"))
        assert_trees_close(tuned, xla, rtol=1e-6, atol=1e-6)  # overlapping windows add in another order


def test_xla_s_max_pool_matches_torch_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (2, 11, 10, 3)).astype(np.float32)
    x_torch = nchw(x).requires_grad_()
    y = F.max_pool2d(x_torch, 3, 2, 0, ceil_mode=True)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(torch.from_numpy(g))
    with kernels.using("xla"):
        out, vjp = jax.vjp(lambda x: layers.max_pool(x, 3, 2, 0, True), x)
    np.testing.assert_array_equal(out, y.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(vjp(g.transpose(0, 2, 3, 1))[0], x_torch.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)


def test_batch_norm_gradients_are_the_same_hand_written_or_differentiated():
    bn = layers.batch_norm(train=True, eps=1e-3, dtype=jnp.float64)()
    with jax.enable_x64(True):
        x = 3 + 2 * rand(4, 5, 3, 6)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), bn.init(jax.random.key(0), x))
        variables["params"] = {"scale": rand(6, seed=1), "bias": rand(6, seed=2)}
        f = lambda params, x: grads(lambda p, x: bn.apply({**variables, "params": p}, x, mutable=["batch_stats"]),
                                    params, x)
        tuned, xla = (run_with(s, f, variables["params"], x) for s in ({"batchnorm_vjp"}, "xla"))
    assert_trees_close(tuned, xla, rtol=1e-12, atol=1e-12)


def test_eigen_convolutions_are_a_compile_option_with_the_same_numbers():
    conv = partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x, w = rand(2, 12, 12, 16, dtype=np.float32), rand(3, 3, 16, 8, seed=1, dtype=np.float32)
    hlo = {}
    for setting in ("eigen_conv", "xla"):
        with kernels.using(setting):
            step = jax.jit(kernels.bind(lambda x, w: grads(conv, x, w)), compiler_options=host.xla_cpu_options())
        compiled = step.lower(x, w).compile()
        hlo[setting] = (compiled.as_text(), compiled(x, w))
    if not host.xla_cpu_options(kernels.resolve("eigen_conv")):
        pytest.skip("this XLA:CPU has no YNNPACK fusion options")
    assert "__ynn_fusion" not in hlo["eigen_conv"][0]
    # Two algorithms, float32: the outputs agree to rounding (|y| ~ 12, 144-term sums).
    assert_trees_close(hlo["eigen_conv"][1], hlo["xla"][1], rtol=1e-5, atol=1e-4)


# What each variant puts into a traced model: XLA's formulations have more convolutions (the 1x1 ones), one
# 2-D max-pool window instead of two 1-D ones, and no custom_vjp (the hand-written BatchNorm gradient).
MARKERS = {"matmul_1x1": "conv_general_dilated", "maxpool_jvp": "reduce_window_max", "batchnorm_vjp": "custom_vjp_call"}


def test_each_variant_changes_what_a_model_runs_and_nothing_else():
    model = ResNet(stage_sizes=(1, 1), block_cls=Bottleneck, num_classes=5)
    x = np.zeros((2, 32, 32, 3), np.float32)
    variables = model.init(jax.random.key(0), x)
    counts = {}
    for setting in ("xla", *MARKERS):
        with kernels.using(setting):
            jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
        counts[setting] = count_tuned(str(jaxpr))
    for variant in MARKERS:
        assert {v for v in MARKERS if counts[variant][v] != counts["xla"][v]} == {variant}, counts


def test_a_whole_resnet_trains_identically_with_every_variant_or_none():
    """A two-stage bottleneck ResNet has all four: 1x1 convolutions (stride 1, and stride 2 downsampling), the
    stem's padded max pool, BatchNorm everywhere, 3x3 and 7x7 convolutions. Eval logits, train logits, updated
    statistics and parameter gradients. (Two stages: at 32 px a ResNet's last stages are 1x1, and BatchNorm over
    two values makes gradients so ill-conditioned that the order of additions shows at 1e-8.)"""
    model = ResNet(stage_sizes=(1, 1), block_cls=Bottleneck, num_classes=5, dtype=jnp.float64)
    with jax.enable_x64(True):
        x = rand(2, 32, 32, 3)
        labels = np.array([1, 3])
        variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                                 model.init(jax.random.key(0), x.astype(np.float32)))

        def run(variables, x):
            def loss(params):
                logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                              mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)
            (_, (logits, updates)), gradients = jax.value_and_grad(loss, has_aux=True)(variables["params"])
            return model.apply(variables, x), logits, updates, gradients

        tuned, xla = (run_with(s, run, variables, x) for s in ("tuned", "xla"))
    assert_trees_close(tuned, xla, rtol=1e-10, atol=1e-12)


def test_a_registered_model_gives_the_same_outputs_traced_under_xla_or_tuned():
    """ResNet-18 at 32 px in float32 (every variant runs: its last stage's maps are 1x1, ``small_map_matmul``):
    eval logits, train logits and updated statistics agree to float32 rounding, rtol 1e-4 and atol 1e-4 (sums of
    up to 4608 products in another order)."""
    model = jaxnets.create_model("resnet18", num_classes=10)
    x = rand(4, 32, 32, 3, dtype=np.float32)
    variables = model.init(jax.random.key(0), x)

    def run(variables, x):
        return model.apply(variables, x), model.apply(variables, x, train=True, mutable=["batch_stats"])

    outputs = {}
    for setting in ("xla", "tuned"):
        with kernels.using(setting):
            step = kernels.bind(run)  # a new function: jax's trace caches would hand ``run`` its first trace
        outputs[setting] = jax.jit(step)(variables, x)
        assert (count_tuned(str(jax.make_jaxpr(step)(variables, x)))["batchnorm_vjp"] > 0) == (setting == "tuned")
    assert not np.array_equal(outputs["xla"][0], outputs["tuned"][0])  # two programs, not one compiled twice
    assert_trees_close(outputs["tuned"], outputs["xla"], rtol=1e-4, atol=1e-4)
