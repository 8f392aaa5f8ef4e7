"""Gradient flow (issue 28): per-stage gradient norms against torch's gradients, the plain (no-shortcut) ResNets
against torchvision's with their shortcuts removed, the option in weights files, and ``--log-grad-norms`` from the
flag to the model and from the records to ``gradients.png``. A run that logs the norms is test_train_families' (every
family, ``log_grad_norms=True``).

Tolerances: the train step's per-stage norms (float32) within 1e-4 of torch's, relatively (measured: 3.4e-6); the
plain nets' logits (float32) ``max_rel_error`` <= 1e-4, the suite's measure; their gradients in float64 (in float32
they are too ill-conditioned to compare), each parameter's within 1e-9 of its largest (measured: 1e-12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from torch_oracle import max_rel_error, nchw, oracle_model, state_dict_numpy, torch_options
from torchvision.models import resnet as torchvision_resnet

import jaxnets
from jaxnets import parallel, training
from jaxnets.cli.train import config_from_args
from jaxnets.config import TrainConfig, resolve
from jaxnets.errors import UserError
from jaxnets.run_io import CURVES_FILE, GRADIENTS_FILE, RunLog, gradients_figure, read_metrics
from jaxnets.run_setup import build_model
from jaxnets.train_step import create_train_state, gradient_groups, group_norms, make_train_step
from jaxnets.weights import load_pretrained, load_weights, save_weights

TOL = 1e-4
SIZE = 32  # image side: every family's minimum is below it (AlexNet's 63 is not used here)


def batch(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, SIZE, SIZE, 3), np.float32),
            "label": rng.integers(0, 1000, n).astype(np.int32)}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --- the stages: one rule for every family ----------------------------------------------------------------------

# What the rule (train_step.gradient_groups) gives: top-level modules in forward order; a Sequential (features,
# classifier) split into its layers; a BatchNorm joining the layer it normalizes (ResNet's bn1, VGG-BN's odd indices).
STAGES = {
    ("resnet18", ()): ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"],
    ("vgg11_bn", ()): ["features.0", "features.4", "features.8", "features.11", "features.15", "features.18",
                       "features.22", "features.25", "classifier.0", "classifier.3", "classifier.6"],
    ("alexnet", ()): ["features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1",
                      "classifier.4", "classifier.6"],
    ("googlenet", ()): ["conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a", "aux1",
                        "inception4b", "inception4c", "inception4d", "aux2", "inception4e", "inception5a",
                        "inception5b", "fc"],
    ("googlenet", (("aux_logits", False),)): ["conv1", "conv2", "conv3", "inception3a", "inception3b",
                                              "inception4a", "inception4b", "inception4c", "inception4d",
                                              "inception4e", "inception5a", "inception5b", "fc"],
}


@pytest.mark.parametrize(("name", "options"), list(STAGES))
def test_stages_are_top_level_modules_in_forward_order(name, options):
    model = jaxnets.create_model(name, num_classes=10, **dict(options))
    size = max(SIZE, *jaxnets.get_spec(name).weights.min_size)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False))
    groups = gradient_groups(model, variables, size)
    assert [g.name for g in groups] == STAGES[name, options]
    # every parameter is in exactly one stage
    flat = ["/".join(k) for k in traverse_util.flatten_dict(variables["params"])]
    owners = [[g.name for g in groups for p in g.paths if key.startswith("/".join(p) + "/")] for key in flat]
    assert all(len(o) == 1 for o in owners)


# --- the norms equal torch's ------------------------------------------------------------------------------------


def torch_stage_norms(torch_model, groups, images, labels) -> np.ndarray:
    """The cross-entropy's gradient by torch, per stage: the norm of the gradients of the parameters under each
    stage's modules, named as torch names them."""
    torch_model.train()
    torch_model.zero_grad()
    torch.nn.functional.cross_entropy(torch_model(nchw(images)), torch.from_numpy(labels).long()).backward()
    grads = {name: p.grad.double() for name, p in torch_model.named_parameters()}
    norms = []
    for group in groups:
        prefixes = tuple(".".join(path) + "." for path in group.paths)
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for k, g in grads.items() if k.startswith(prefixes)))))
    return np.array(norms)


@pytest.mark.parametrize("name", ["resnet18"])
def test_stage_gradient_norms_equal_torchs(name):
    """The norms the jitted step computes, against torch's gradients of the same loss on the same batch (float32:
    within 1e-4 of each stage's norm; measured: 1e-5). GoogLeNet's aux heads, whose losses enter the gradient, were
    checked here too (at 1.2e-5), but compiling its train step costs 15 to 45 s: its gradients are test_models'
    (float64), its aux losses' weight test_training's, and its stages' order is checked above."""
    torch_model = oracle_model(name)
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model))
    model = jaxnets.create_model(name, **{k: v for k, v in torch_options(name).items() if k != "init_weights"})
    groups = gradient_groups(model, variables, SIZE)
    mesh = parallel.make_mesh()
    data = batch()
    expected = torch_stage_norms(torch_model, groups, data["image"], data["label"])
    state = create_train_state(model, variables, optax.sgd(0.0), mesh)
    _, metrics = make_train_step(mesh, grad_norm_groups=groups)(state, parallel.to_global(data, mesh))
    norms = np.asarray(metrics["grad_norm"])
    assert norms.shape == (len(groups),) and np.all(expected > 0)
    np.testing.assert_allclose(norms, expected, rtol=TOL)


def test_without_the_groups_the_step_computes_no_norms():
    """The norms are outputs of the jitted step only when asked for (traced, shapes only: nothing compiles)."""
    model = jaxnets.create_model("resnet18", num_classes=3)
    mesh = parallel.make_mesh()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), train=False))
    groups = gradient_groups(model, variables, SIZE)
    state = jax.eval_shape(lambda v: create_train_state(model, v, optax.sgd(0.0), mesh), variables)
    data = jax.eval_shape(lambda: {"image": jnp.zeros((2, SIZE, SIZE, 3)), "label": jnp.zeros(2, jnp.int32)})
    shapes = {}
    for asked in (None, groups):
        _, metrics = jax.eval_shape(make_train_step(mesh, grad_norm_groups=asked), state, data)
        shapes[asked is not None] = {k: v.shape for k, v in metrics.items()}
    assert shapes == {False: {"loss": (), "accuracy": ()}, True: {"loss": (), "accuracy": (), "grad_norm": (6,)}}


# --- the plain network ------------------------------------------------------------------------------------------


def _plain_basic(self, x):
    return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def _plain_bottleneck(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)))


def plain_torchvision(name: str, monkeypatch) -> torch.nn.Module:
    """torchvision's ResNet with every shortcut removed: each block's forward without ``+ identity`` (nor the
    ``downsample`` that computed it), and the downsample modules gone."""
    monkeypatch.setattr(torchvision_resnet.BasicBlock, "forward", _plain_basic)
    monkeypatch.setattr(torchvision_resnet.Bottleneck, "forward", _plain_bottleneck)
    torch_model = oracle_model(name)
    for block in torch_model.modules():
        if isinstance(block, torchvision_resnet.BasicBlock | torchvision_resnet.Bottleneck):
            block.downsample = None
    return torch_model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # BasicBlock, Bottleneck
def test_plain_resnet_equals_torchvision_without_shortcuts(name, monkeypatch):
    """Logits for both block types; gradients (every parameter's, and the stages' norms) for BasicBlock. That
    the residual nets' backward passes are torchvision's is test_models' (float64)."""
    torch_model = plain_torchvision(name, monkeypatch)
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model), shortcut=False)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == sum(
        p.numel() for p in torch_model.parameters())
    model = jaxnets.create_model(name, shortcut=False)
    data = batch()
    with torch.no_grad():
        expected = torch_model.eval()(nchw(data["image"])).numpy()
    logits = jax.jit(model.apply)(variables, data["image"])
    assert max_rel_error(logits, expected) <= TOL
    with torch.no_grad():  # the shortcuts matter: with them, the same layers compute another function
        monkeypatch.undo()
        assert max_rel_error(logits, oracle_model(name).eval()(nchw(data["image"])).numpy()) > 0.1
    if name != "resnet18":
        return

    # Gradients in float64: in float32, train-mode BatchNorm over a batch this small (layer4's maps are 1x1) makes
    # them so ill-conditioned that torch's float32 gradients differ from its float64 ones by percents.
    monkeypatch.setattr(torchvision_resnet.BasicBlock, "forward", _plain_basic)
    groups = gradient_groups(model, variables, SIZE)
    x = data["image"].astype(np.float64)
    torch_norms = torch_stage_norms(torch_model.double(), groups, x, data["label"])
    with jax.enable_x64(True):
        model64 = jaxnets.create_model(name, dtype=jnp.float64, shortcut=False)
        variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)

        def loss(params):
            logits, _ = model64.apply({**variables64, "params": params}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, data["label"]).mean()

        grads = jax.jit(jax.grad(loss))(variables64["params"])
        norms = np.asarray(group_norms(grads, groups))
    as_torch = jaxnets.to_torch_state_dict(name, {"params": grads}, params_only=True, shortcut=False)
    errors = {key: relative_error(as_torch[key], param.grad.numpy()) for key, param in torch_model.named_parameters()}
    assert max(errors.values()) <= 1e-9, errors
    # the stages' norms, the stem's two modules (conv1, bn1) in one
    np.testing.assert_allclose(norms, torch_norms, rtol=1e-9)


def test_the_plain_net_of_a_run_is_recorded_in_its_weights_file_and_loads_back(tmp_path):
    """--no-shortcut builds the plain net (run_setup.build_model); a weights file records shortcut=False, as the
    final weights do (model_options of the model), and loading it rebuilds the plain net."""
    config = resolve(TrainConfig(model="resnet18", no_shortcut=True, image_size=SIZE))
    model, variables, _ = build_model(config, 3, parallel.make_mesh())
    variables = parallel.to_host(variables)
    assert model.shortcut is False
    assert not any("downsample" in "/".join(k) for k in traverse_util.flatten_dict(variables["params"]))
    options = jaxnets.model_options("resnet18", model)
    assert options["shortcut"] is False
    path = save_weights(tmp_path / "plain.safetensors", "resnet18", variables, model_options=options)
    assert load_weights(path).model_options["shortcut"] is False
    loaded, loaded_variables = load_pretrained("resnet18", weights=path)
    assert loaded.shortcut is False
    x = batch(2)["image"]
    np.testing.assert_array_equal(jax.jit(loaded.apply)(loaded_variables, x), jax.jit(model.apply)(variables, x))
    # the residual net records shortcut=True, and the plain net's variables do not fit it
    assert jaxnets.model_options("resnet18", jaxnets.create_model("resnet18"))["shortcut"] is True
    with pytest.raises(UserError, match="downsample"):
        save_weights(tmp_path / "wrong.safetensors", "resnet18", variables, model_options={"shortcut": True})


def test_plain_net_refuses_zero_init_residual():
    model = jaxnets.create_model("resnet18", num_classes=3, shortcut=False, zero_init_residual=True)
    with pytest.raises(UserError, match="resnet18: zero_init_residual=True needs the shortcuts"):
        model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)))


# --- train.py: the flags, metrics.jsonl, gradients.png ------------------------------------------------------------


def test_flags_set_the_model_options_and_are_refused_where_the_model_lacks_them():
    config = config_from_args(["--model", "resnet18", "--no-shortcut", "--log-grad-norms"])
    assert config.no_shortcut and config.log_grad_norms
    assert resolve(config).model_options() == {"shortcut": False}
    assert TrainConfig(model="googlenet", no_aux=True, remat=True, in_chans=1).model_options() == {
        "aux_logits": False, "remat": True, "in_chans": 1}
    assert TrainConfig().model_options() == {}
    with pytest.raises(UserError, match=r"^--no-shortcut: googlenet has no shortcuts \(ResNet"):
        resolve(TrainConfig(model="googlenet", no_shortcut=True))
    with pytest.raises(UserError, match=r"^--no-aux: resnet18 has no auxiliary heads \(GoogLeNet only\)$"):
        resolve(TrainConfig(model="resnet18", no_aux=True))
    # the plots name the network the run trained (not remat, which only changes how it computes)
    assert training._title(TrainConfig(model="resnet34", no_shortcut=True, remat=True)) == (
        "resnet34 (shortcut=False) on digits")
    assert training._title(TrainConfig(model="googlenet")) == "googlenet on digits"


def test_gradients_png_is_drawn_only_from_records_with_norms(tmp_path):
    run = RunLog(tmp_path / "run")
    run.log(1, 0.5, "train", {"loss": 1.0, "accuracy": 0.5})
    run.log(2, 1.0, "val", {"loss": 1.0, "top1": 0.5})
    run.plot()
    assert (tmp_path / "run" / CURVES_FILE).exists() and not (tmp_path / "run" / GRADIENTS_FILE).exists()
    run.log(3, 1.5, "train", {"loss": 0.9, "grad_norm/conv1": 0.5, "grad_norm/fc": 2.0})
    run.log(4, 2.0, "train", {"loss": 0.8, "grad_norm/conv1": 0.0, "grad_norm/fc": 1.0})  # 0: a frozen stage
    run.plot()
    assert (tmp_path / "run" / GRADIENTS_FILE).exists()
    (axis,) = gradients_figure(read_metrics(run.metrics_path)).axes
    assert [line.get_label() for line in axis.lines] == ["conv1", "fc"]
    assert np.isnan(axis.lines[0].get_ydata()[1])  # left out of the log axis, not drawn at 0
