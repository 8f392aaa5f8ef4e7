"""``jaxnets.nnx``: every family as an NNX module that computes what its Linen model computes, trains with
``nnx.Optimizer`` to the Linen step's state, freezes with NNX filters as ``--freeze`` does, and round-trips
through weights files and exports.

The oracle is the Linen model itself: ``model.apply`` and a plain Linen train step (``jax.value_and_grad`` +
optax, and for freezing ``jaxnets.transfer``'s mask, optax partition and ``frozen_norm``, as ``train.py
--freeze`` builds them). One model per family at a small input, with random variables whose BatchNorm statistics
are far from 0 and 1. Per family one ``nnx.jit`` runs everything compared (the eval forward, a full step with
``wrt=nnx.Param``, a step of a frozen copy, and the Linen steps), so that each family compiles once.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from test_export import random_variables

import jaxnets
from jaxnets import nnx as jnnx
from jaxnets import transfer, trees
from jaxnets.losses import cross_entropy
from jaxnets.models.googlenet import AUX_WEIGHT

NUM_CLASSES = 10
BATCH = 4
# name -> (input size, create_model options, optimizer, what --freeze freezes): one model per family. AlexNet: dropout,
# no BatchNorm; VGG-11-BN as a backbone (its 100M-parameter classifier is AlexNet's code path): BatchNorm in a
# Sequential, a list of maps, freezing by module patterns; GoogLeNet: auxiliary heads (in the head, with their own
# BatchNorms, which keep training when the backbone is frozen), dropout, transform_input; ResNet-18: BatchNorm.
# Adam divides each gradient by its size, so where a gradient is rounding noise (VGG's conv biases, which a BatchNorm
# follows) the noise would be its update: VGG trains with SGD, GoogLeNet (no conv biases) with Adam.
FAMILIES = {
    "alexnet": (63, {}, optax.sgd(0.05, momentum=0.9), "backbone"),
    "vgg11_bn": (32, {"features_only": True}, optax.sgd(0.05, momentum=0.9), "features/0,features/1"),
    "googlenet": (32, {"transform_input": True}, optax.adam(1e-3), "backbone"),
    "resnet18": (32, {}, optax.sgd(0.05, momentum=0.9), "backbone"),
}
# The families whose full step (every parameter trained) is compared too. GoogLeNet's would take its compilation from
# about 20 s to over a minute on 2 cores: its frozen step, which trains the auxiliary heads and their BatchNorms on
# the auxiliary loss, is compared instead.
FULL_STEP = ("alexnet", "vgg11_bn", "resnet18")
# float32: the NNX and Linen computations are the same operations; what is allowed is rounding, relative to the
# largest value of each array.
TOLERANCE = 1e-5


def close(expected, actual, tolerance: float = TOLERANCE) -> None:
    expected, actual = np.asarray(expected), np.asarray(actual)
    assert expected.shape == actual.shape and expected.dtype == actual.dtype
    assert float(np.abs(expected - actual).max(initial=0)) <= tolerance * (1 + float(np.abs(expected).max(initial=0)))


def loss_of(out, labels):
    """train.py's loss: cross-entropy (GoogLeNet: main + AUX_WEIGHT x aux); a backbone's maps: their mean square."""
    if isinstance(out, jaxnets.GoogLeNetOutputs):
        return (cross_entropy(out.logits, labels).mean()
                + AUX_WEIGHT * sum(cross_entropy(aux, labels).mean() for aux in (out.aux_logits1, out.aux_logits2)))
    if isinstance(out, list):
        return sum(jnp.mean(jnp.square(m)) for m in out)
    return cross_entropy(out, labels).mean()


def linen_step(module, variables, tx, images, labels, key, frozen_norm=(), mask=None):
    """One Linen train step as jaxnets trains: the new variables."""
    params, stats = variables["params"], variables.get("batch_stats", {})

    def loss_fn(params):
        if mask is not None:
            params = transfer.stop_frozen_gradients(params, mask)
        out, updates = module.apply({"params": params, **({"batch_stats": stats} if stats else {})}, images,
                                    train=True, mutable=["batch_stats"], rngs={"dropout": key},
                                    frozen_norm=frozen_norm)
        return loss_of(out, labels), updates.get("batch_stats", {})

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return {"params": optax.apply_updates(params, updates), **({"batch_stats": stats} if stats else {})}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """Per family: the Linen module, its initial variables, and after one ``nnx.jit`` of everything: the NNX and Linen
    eval outputs, the NNX models after their steps (the full one: not GoogLeNet's), and the Linen steps' variables."""
    name = request.param
    size, options, tx, frozen = FAMILIES[name]
    full_step = name in FULL_STEP
    linen = jaxnets.create_model(name, num_classes=NUM_CLASSES, **options)
    variables = random_variables(linen, size, 0)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((BATCH, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH))

    model = jnnx.from_linen(linen, variables, rngs=nnx.Rngs(7))
    frozen_model = jnnx.from_linen(linen, variables, rngs=nnx.Rngs(7))
    trainable = frozen_model.freeze(frozen)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    frozen_optimizer = nnx.Optimizer(frozen_model, tx, wrt=trainable)
    key = nnx.clone(model.rngs).dropout()  # the dropout key the models' next training call draws
    mask = transfer.trainable_mask(name, variables["params"], frozen)
    frozen_norm = transfer.frozen_modules(name, mask)

    @nnx.jit
    def run(model, optimizer, frozen_model, frozen_optimizer, variables, images, labels):
        evaluated = nnx.view(model, deterministic=True, use_running_average=True)
        outputs = {"nnx_eval": evaluated(images), "linen_eval": linen.apply(variables, images, train=False)}
        # The NNX steps, as a user writes them.
        if full_step:
            grads = nnx.grad(lambda m: loss_of(m(images), labels))(model)
            optimizer.update(model, grads)
            outputs["linen_step"] = linen_step(linen, variables, tx, images, labels, key)
        grads = nnx.grad(lambda m: loss_of(m(images), labels), argnums=nnx.DiffState(0, trainable))(frozen_model)
        frozen_optimizer.update(frozen_model, grads)
        outputs["linen_frozen_step"] = linen_step(linen, variables, transfer.build_optimizer(tx, mask), images, labels,
                                                  key, frozen_norm, mask)
        return outputs

    outputs = run(model, optimizer, frozen_model, frozen_optimizer, variables, images, labels)
    return {"name": name, "linen": linen, "variables": variables, "model": model, "frozen_model": frozen_model,
            "frozen_norm": frozen_norm, "mask": mask, "images": images, **outputs}


def test_eval_outputs_are_the_linen_model_s(family):
    expected, actual = family["linen_eval"], family["nnx_eval"]
    assert type(actual) is type(expected)
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        close(e, a)


@pytest.mark.parametrize("family", FULL_STEP, indirect=True)
def test_a_train_step_with_nnx_optimizer_gives_the_linen_step_s_parameters_and_statistics(family):
    expected = trees.flatten(family["linen_step"])
    actual = trees.flatten(jnnx.to_linen_variables(family["model"]))
    assert actual.keys() == expected.keys()
    initial = trees.flatten(family["variables"])
    moved = [key for key in expected if not np.array_equal(expected[key], initial[key])]
    assert any(key.startswith("params/") for key in moved)  # the step did something to compare
    if "batch_stats" in family["variables"]:
        assert any(key.startswith("batch_stats/") for key in moved)
    for key in expected:
        close(expected[key], actual[key])


def test_with_the_frozen_filter_the_backbone_is_bit_identical_after_a_step(family):
    """Parameters outside the trainable filter and the statistics of frozen BatchNorms do not move by a bit (as
    ``--freeze``: BatchNorms in the frozen part run on their running statistics); the rest is the Linen ``--freeze``
    step's."""
    name, mask = family["name"], traverse_util.flatten_dict(family["mask"])
    assert family["frozen_model"].frozen_norm == family["frozen_norm"]
    initial = trees.flatten(family["variables"])
    actual = trees.flatten(jnnx.to_linen_variables(family["frozen_model"]))
    expected = trees.flatten(family["linen_frozen_step"])
    frozen_stats = [key for key in initial if key.startswith("batch_stats/")
                    and any(trees.in_module(key, module) for module in family["frozen_norm"])]
    frozen_params = ["/".join(("params", *path)) for path, trainable in mask.items() if not trainable]
    assert frozen_params and (frozen_stats or "batch_stats" not in family["variables"])
    for key in frozen_params + frozen_stats:
        np.testing.assert_array_equal(actual[key], initial[key], err_msg=f"{name}: {key} moved")
    for key in expected:
        close(expected[key], actual[key])
    moved = [key for key in expected if not np.array_equal(actual[key], initial[key])]
    assert moved and all(key not in frozen_params + frozen_stats for key in moved)


@pytest.mark.parametrize("family", ["googlenet"], indirect=True)
def test_googlenet_s_auxiliary_outputs_appear_in_training_mode_only(family):
    model, images = family["model"], family["images"]
    assert model.training
    trained = nnx.eval_shape(lambda m: m(images), model)
    assert isinstance(trained, jaxnets.GoogLeNetOutputs)
    assert [out.shape for out in trained] == [(BATCH, NUM_CLASSES)] * 3
    model.eval()
    try:
        assert not model.training and nnx.eval_shape(lambda m: m(images), model).shape == (BATCH, NUM_CLASSES)
    finally:
        model.train()
    # In the frozen step the auxiliary heads (in the head) trained on their loss, their BatchNorms on the batch.
    initial = trees.flatten(family["variables"])
    stepped = trees.flatten(jnnx.to_linen_variables(family["frozen_model"]))
    for key in ("params/aux1/fc2/kernel", "params/aux2/fc2/kernel", "batch_stats/aux1/conv/bn/mean"):
        assert not np.array_equal(stepped[key], initial[key]), key


def test_train_and_eval_switch_dropout_and_batch_norm_together():
    model = jnnx.create_model("resnet18", features_only=True, out_indices=(0,))
    assert model.training and not model.deterministic and not model.use_running_average  # as torch and NNX start
    model.eval()
    assert (model.deterministic, model.use_running_average, model.training) == (True, True, False)
    view = nnx.view(model, deterministic=False, use_running_average=False)
    assert view.training and not model.training
    model.deterministic = False
    with pytest.raises(jaxnets.UserError, match="switches dropout and BatchNorm together"):
        model(jnp.zeros((2, 32, 32, 3)))


def test_create_model_initializes_as_linen_s_init_with_the_params_key():
    model = jnnx.create_model("resnet18", num_classes=3, rngs=nnx.Rngs(params=5),
                              features_only=True, out_indices=(0,))  # the stem only: cheap to initialize
    linen = jaxnets.create_model("resnet18", features_only=True, out_indices=(0,))
    key = nnx.Rngs(params=5).params()
    expected = jax.jit(lambda k: linen.init({"params": k}, jnp.zeros((1, 224, 224, 3)), train=False))(key)
    actual = jnnx.to_linen_variables(model)
    assert jax.tree.structure(actual) == jax.tree.structure(trees.plain(expected))
    for e, a in zip(jax.tree.leaves(trees.plain(expected)), jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(e, a)


def test_the_head_filter_selects_transfer_s_head_and_the_backbone_filter_the_rest():
    for name, (size, options, _, _) in FAMILIES.items():
        if options.get("features_only"):
            continue  # a backbone has no head
        linen = jaxnets.create_model(name, num_classes=NUM_CLASSES, **options)
        shapes = jax.eval_shape(lambda linen=linen, size=size: linen.init(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
        model = nnx.eval_shape(lambda linen=linen, shapes=shapes: jnnx.from_linen(
            linen, jax.tree.map(lambda leaf: jnp.zeros(leaf.shape), shapes)))
        params = shapes["params"]
        head = {path[1:] for path, _ in nnx.to_flat_state(nnx.state(model, jnnx.head_filter(name)))}
        backbone = {path[1:] for path, _ in nnx.to_flat_state(nnx.state(model, jnnx.backbone_filter(name)))}
        expected = {path for path, in_head in traverse_util.flatten_dict(transfer.head_mask(name, params)).items()
                    if in_head}
        assert head == expected and not head & backbone
        assert head | backbone == set(traverse_util.flatten_dict(params))


# Round trips: every family but AlexNet, whose 57M-parameter file would only repeat VGG-11-BN's code path slowly.
@pytest.mark.parametrize("family", ["vgg11_bn", "googlenet", "resnet18"], indirect=True)
def test_the_state_round_trips_through_a_weights_file(family, tmp_path):
    """After a step (statistics moved), the NNX state is written as a normal jaxnets weights file, with the model's
    options (GoogLeNet's transform_input, a backbone's features_only), which both APIs load back bit for bit."""
    name, model = family["name"], family["frozen_model"]
    state = trees.flatten(jnnx.to_linen_variables(model))
    path = jnnx.save_weights(tmp_path / "nnx.safetensors", model, metadata={"source": "nnx"})
    weights_file = jaxnets.load_weights(path)
    assert weights_file.name == name and weights_file.metadata == {"source": "nnx"}
    assert weights_file.model_options == jaxnets.model_options(name, family["linen"])
    linen, variables = jaxnets.load_pretrained(name, weights=path)
    loaded = jnnx.load_pretrained(name, weights=path)
    assert linen == loaded.linen_module == family["linen"]
    for tree in (weights_file.variables, variables, jnnx.to_linen_variables(loaded)):
        flat = trees.flatten(tree)
        assert flat.keys() == state.keys()
        for key, value in flat.items():
            np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.mark.parametrize("family", ["resnet18"], indirect=True)
def test_export_model_takes_an_nnx_model_as_its_eval_forward(family, tmp_path):
    """Whatever its mode, an NNX model exports as its Linen module and current variables: the same artifact."""
    model = family["model"]
    assert model.training
    options = dict(image_size=32, verify=False, platforms=("cpu",))
    # From one line: the artifact records the source location of the export call.
    from_nnx, from_linen = (jaxnets.export_model(*args, "stablehlo", tmp_path / kind, **options)
                            for kind, args in (("nnx", (model, None)), ("linen", jnnx.to_linen(model))))
    assert (from_nnx.path / "model.stablehlo").read_bytes() == (from_linen.path / "model.stablehlo").read_bytes()
    assert json.loads((from_nnx.path / "export.json").read_text())["model"] == "resnet18"
    with pytest.raises(jaxnets.UserError, match="carries its own variables"):
        jaxnets.export_model(model, family["variables"], "stablehlo", tmp_path / "both", **options)


@pytest.mark.parametrize("family", ["resnet18"], indirect=True)
def test_class_activation_maps_take_an_nnx_model_as_its_linen_module_and_variables(family):
    from jaxnets.explain import cam

    model, images = family["model"], np.asarray(family["images"][:2])
    from_nnx = cam(model, None, images, "gradcam", "layer3")
    np.testing.assert_array_equal(from_nnx, cam(*jnnx.to_linen(model), images, "gradcam", "layer3"))
    with pytest.raises(jaxnets.UserError, match="cam: an NNX model carries its own variables"):
        cam(model, family["variables"], images)


@pytest.mark.parametrize("family", ["resnet18"], indirect=True)
def test_freeze_takes_freeze_patterns_or_filters_and_refuses_what_trains_nothing(family):
    model = jnnx.from_linen(family["linen"], family["variables"])
    trainable = model.freeze(jnnx.backbone_filter("resnet18"))
    assert model.frozen_norm == ("bn1", "layer1", "layer2", "layer3", "layer4") == family["frozen_norm"]
    assert {path for path, _ in nnx.to_flat_state(nnx.state(model, trainable))} == {
        ("params", "fc", "kernel"), ("params", "fc", "bias")}
    assert model.freeze("none") is nnx.Param and model.frozen_norm == ()
    model.freeze("conv1,bn1,layer1.0")
    assert model.frozen_norm == ("bn1", "layer1/0")
    with pytest.raises(jaxnets.UserError, match="freeze pattern 'layer9' matches no parameter"):
        model.freeze("layer9")
    with pytest.raises(jaxnets.UserError, match="freezes every parameter"):
        model.freeze(nnx.Param)


def test_variables_that_do_not_fit_and_other_modules_are_one_line_errors():
    linen = jaxnets.create_model("resnet18", features_only=True, out_indices=(0,))
    with pytest.raises(jaxnets.WeightsError, match=r"resnet18 variables: .*missing 2 key\(s\): batch_stats/bn1/mean"):
        bn1 = {"scale": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)}
        jnnx.from_linen(linen, {"params": {"conv1": {"kernel": np.zeros((7, 7, 3, 64), np.float32)}, "bn1": bn1}})
    with pytest.raises(jaxnets.UserError, match="unknown collection"):
        jnnx.from_linen(linen, {"params": {}, "intermediates": {}})
    with pytest.raises(jaxnets.UserError, match="expected a jaxnets.nnx.Model, got Linear"):
        jnnx.to_linen_variables(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


def test_the_benchmark_times_nnx_against_linen_side_by_side(tmp_path):
    """``jaxnets-benchmark --suite nnx --tiny``: every variant of every mode timed, the ratios the table shows."""
    from jaxnets.cli import benchmark as cli

    out, js = tmp_path / "nnx.md", tmp_path / "nnx.json"
    assert cli.main(["--suite", "nnx", "--tiny", "--system-malloc", "--output", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(row["model"], row["mode"]) for row in rows] == [("resnet18", "infer"), ("resnet18", "train")]
    table = [line for line in out.read_text().splitlines() if line.startswith("| resnet18")]
    for row, line in zip(rows, table, strict=True):
        assert all(row[f"{variant}_images_per_s"] > 0 for variant in ("linen", "nnx", "nnx_split"))
        assert row["nnx_over_linen"] == pytest.approx(row["times"]["linen"][0] / row["times"]["nnx"][0])  # one round
        assert f"| {row['nnx_over_linen']:.3f} |" in line
    assert "Goal: NNX >= 0.98x Linen" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--modes", "infer,backward"], "--modes: choose from infer, train"),
    (["--models", "resnet9"], "--models: unknown model 'resnet9'"),
    (["--models", "alexnet", "--image-size", "32"], "alexnet needs at least 63 px"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
])
def test_the_benchmark_s_bad_flags_are_one_line_errors_before_any_timing(argv, message, capsys):
    from jaxnets.benchmark import nnx_vs_linen as nnx_benchmark

    with pytest.raises(SystemExit) as exit_info:
        nnx_benchmark.parse_args(argv, nnx_benchmark.PROG)
    assert exit_info.value.code == 1 and message in capsys.readouterr().err
