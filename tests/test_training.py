"""Training logic: loss and optimizer rules (torch as the oracle), GoogLeNet's aux losses, bfloat16,
whole-set evaluation, and exact resume after a stop or a signal."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import traverse_util

from jaxnets import GoogLeNetOutputs, checkpointing, evaluation, host, losses, optimization, parallel, probe, training
from jaxnets import train_step as train_step_lib
from jaxnets.config import TrainConfig, resolve
from jaxnets.data import load_dataset
from jaxnets.run_io import CONFIG_FILE, METRICS_FILE, read_metrics
from jaxnets.run_setup import setup

# Three digit classes at 16 px, batch 16: 26 steps per epoch, seconds per step on a CPU.
TINY = TrainConfig(model="resnet18", classes=(0, 1, 2), batch_size=16, epochs=2, log_every=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jax_cache")  # shared by this session's runs: fewer compiles

    def make(name: str, **overrides) -> TrainConfig:
        workdir = tmp_path_factory.mktemp(name)
        return dataclasses.replace(TINY, workdir=str(workdir), compile_cache=cache, **overrides)
    return make


@pytest.fixture(scope="module")
def straight(tiny):
    """An uninterrupted 6-step run: the reference of the resumed ones, and a workdir other runs must not take."""
    config = tiny("straight", steps=6)
    before = jax.config.jax_compilation_cache_dir
    result = training.train_and_evaluate(config)
    host.setup_compilation_cache(before or "")  # as conftest's fixture does for each test
    return config, result


def _params(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(result.state.params))]


def test_compilation_cache_follows_the_last_setting(tmp_path):
    """JAX opens its cache once: a second directory, or '' (off), must still take effect in the same process."""
    first, second = tmp_path / "first", tmp_path / "second"

    def compile_in(directory: Path | str, name: str) -> None:
        host.setup_compilation_cache(str(directory))
        function = lambda x: x * len(name)  # noqa: E731 - a fresh function: a new compilation
        function.__name__ = name
        jax.jit(function)(np.ones(3, np.float32))

    compile_in(first, "triple")
    compile_in(second, "quadruple")
    compile_in("", "quintuple")
    names = {d.name: sorted(f.name.split("-")[0] for f in d.iterdir()) for d in (first, second)}
    assert names == {"first": ["jit_triple"], "second": ["jit_quadruple"]}
    assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 10)).astype(np.float32), rng.integers(0, 10, 6)
    ours = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), smoothing)
    assert ours.dtype == jnp.float32
    reference = torch.nn.functional.cross_entropy(torch.from_numpy(logits).bfloat16().float(), torch.from_numpy(labels),
                                                  label_smoothing=smoothing, reduction="none")
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_scales_lr_and_skips_decay_on_biases_and_batchnorm():
    config = resolve(TrainConfig(model="resnet18", batch_size=64, lr=0.4, warmup_epochs=1, weight_decay=0.1, epochs=8))
    tx, schedule = optimization.make_optimizer(config, steps_per_epoch=10)
    assert float(schedule(10)) == pytest.approx(0.4 * 64 / 256)  # peak after warmup: linear scaling rule
    assert float(schedule(0)) == 0.0 and float(schedule(80)) == pytest.approx(0.0, abs=1e-9)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    state = tx.init(params)
    for _ in range(11):  # zero gradients: only weight decay moves the parameters
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0 and float(jnp.abs(updates["bn"]["bias"]).max()) == 0


def test_layer_decay_flag_scales_each_block_by_its_depth():
    """--layer-decay reaches the optimizer: each leaf's first SGD update is lr x its layer-wise multiplier."""
    from jaxnets import registry, transfer
    config = resolve(TrainConfig(model="resnet18", batch_size=256, lr=0.1, warmup_epochs=0, weight_decay=0.0,
                                 momentum=0.0, layer_decay=0.5, epochs=1, backbone_lr_mult=0.5))
    model = registry.create_model("resnet18", num_classes=3)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]
    params = jax.tree.map(lambda p: jnp.zeros(p.shape), params)
    mask, head, frozen = optimization.freeze_masks(config, params)
    assert frozen == () and all(jax.tree.leaves(mask))
    tx, schedule = optimization.make_optimizer(config, steps_per_epoch=10, trainable_mask=mask, head_mask=head)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    lr = float(schedule(0))
    expected = jax.tree.map(lambda m, h: -lr * m * (1.0 if h else 0.5),
                            transfer.layerwise_lr_mults("resnet18", params, 0.5), head)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(updates["fc"]["kernel"][0, 0]) == pytest.approx(-lr)
    # conv1 is 10 blocks from the head: conv1, bn1, then 4 stages x 2 BasicBlocks
    assert float(updates["conv1"]["kernel"][0, 0, 0, 0]) == pytest.approx(-lr * 0.5 * 0.5**10)
    with pytest.raises(ValueError, match=r"--layer-decay must be in \(0, 1\], got 1.5"):
        resolve(TrainConfig(model="resnet18", layer_decay=1.5))


def test_grad_clip_is_one_global_norm_over_trainable_gradients_as_torch():
    """--grad-clip with learning-rate groups and a frozen leaf: torch clips all gradients together
    (clip_grad_norm_), then each group steps with its lr; a frozen parameter has no gradient to count."""
    config = resolve(TrainConfig(model="resnet18", batch_size=256, lr=0.1, warmup_epochs=0, schedule="step",
                                 step_epochs=(), epochs=1, momentum=0.9, weight_decay=0.01, grad_clip=1.0,
                                 backbone_lr_mult=0.5))
    rng = np.random.default_rng(0)
    shapes = {"conv1": {"kernel": (3, 3, 2, 4)}, "bn1": {"scale": (4,)}, "layer1": {"kernel": (4, 4)},
              "fc": {"kernel": (4, 3), "bias": (3,)}}
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    params = jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), shapes, is_leaf=is_leaf)
    trainable = {"conv1": {"kernel": False}, "bn1": {"scale": True}, "layer1": {"kernel": True},
                 "fc": {"kernel": True, "bias": True}}
    head = {"conv1": {"kernel": False}, "bn1": {"scale": False}, "layer1": {"kernel": False},
            "fc": {"kernel": True, "bias": True}}
    grads = [jax.tree.map(lambda p: 10 * rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]

    tx, schedule = optimization.make_optimizer(config, steps_per_epoch=10, trainable_mask=trainable, head_mask=head)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    for g in grads:  # the frozen leaf's gradient is not zero here: it must still not count
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = optax.apply_updates(ours, updates)

    flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")  # noqa: E731
    tensors = {k: torch.tensor(v, requires_grad=flat(trainable)[k]) for k, v in flat(params).items()}
    lr = float(schedule(0))
    group = lambda names, mult: {"params": [tensors[n] for n in names], "lr": lr * mult,  # noqa: E731
                                 "weight_decay": config.weight_decay if tensors[names[0]].ndim > 1 else 0.0}
    torch_opt = torch.optim.SGD([group(["fc/kernel"], 1.0), group(["fc/bias"], 1.0), group(["layer1/kernel"], 0.5),
                                 group(["bn1/scale"], 0.5)], lr=lr, momentum=config.momentum)
    for g in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(flat(g)[name]) if tensor.requires_grad else None
        torch.nn.utils.clip_grad_norm_([t for t in tensors.values() if t.requires_grad], config.grad_clip)
        torch_opt.step()
    for name, value in flat(ours).items():
        np.testing.assert_allclose(np.asarray(value), tensors[name].detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "--epochs must be >= 1, got 0"),  # a given 0 is an error, never the default
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("eval_batch_size", 0, "--eval-batch-size must be >= 1, got 0"),
    ("lr", float("nan"), "--lr must be > 0, got nan"),
    ("lr", -1.0, "--lr must be > 0, got -1.0"),
    ("momentum", -5.0, "--momentum must be in [0, 1), got -5.0"),
    ("label_smoothing", 2.0, "--label-smoothing must be in [0, 1), got 2.0"),
    ("warmup_epochs", -3.0, "--warmup-epochs must be >= 0, got -3.0"),
    ("grad_clip", -1.0, "--grad-clip must be > 0, got -1.0"),
    ("aux_weight", -1.0, "--aux-weight must be >= 0, got -1.0"),
    ("step_gamma", -3.0, "--step-gamma must be in (0, 1], got -3.0"),
    ("checkpoint_every", -1, "--checkpoint-every must be >= 0, got -1"),
    ("min_crop_scale", 0.0, "--min-crop-scale must be in (0, 1], got 0.0"),
    ("min_crop_scale", 3.0, "--min-crop-scale must be in (0, 1], got 3.0"),
    ("val_fraction", 1.5, "--val-fraction must be in (0, 1), got 1.5"),
    ("weight_decay", float("inf"), "--weight-decay must be >= 0, got inf"),
    ("workdir", "", "--workdir is empty"),
    ("dataset", " ", "--dataset is empty"),
])
def test_settings_out_of_range_are_refused_by_flag(field, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        resolve(TrainConfig(model="resnet18", **{field: value}))


class AuxNet(nn.Module):
    """GoogLeNet's output contract at toy size: ``GoogLeNetOutputs`` in training, logits in evaluation."""

    @nn.compact
    def __call__(self, x, train: bool = False, frozen_norm=()):
        features = x.reshape(x.shape[0], -1)
        logits = nn.Dense(3, name="fc")(features)
        if not train:
            return logits
        return GoogLeNetOutputs(logits, nn.Dense(3, name="aux2")(features), nn.Dense(3, name="aux1")(features))


def test_googlenet_aux_losses_enter_training_and_never_evaluation():
    mesh = parallel.make_mesh()
    model = AuxNet()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 2, 2, 3)).astype(np.float32), "label": np.array([0, 1, 2, 1], np.int32)}
    variables = model.init(jax.random.key(0), batch["image"], train=True)
    out = model.apply(variables, batch["image"], train=True)
    main, aux1, aux2 = (float(jnp.mean(losses.cross_entropy(x, batch["label"])))
                        for x in (out.logits, out.aux_logits1, out.aux_logits2))
    assert len({round(main, 4), round(aux1, 4), round(aux2, 4)}) == 3
    for weight in (0.3, 0.0):
        state = train_step_lib.create_train_state(model, jax.tree.map(jnp.copy, variables), optax.sgd(0.0), mesh)
        _, metrics = train_step_lib.make_train_step(mesh, aux_weight=weight)(state, parallel.to_global(batch, mesh))
        assert float(metrics["loss"]) == pytest.approx(main + weight * (aux1 + aux2), rel=1e-6)
    state = train_step_lib.create_train_state(model, jax.tree.map(jnp.copy, variables), optax.sgd(0.0), mesh)
    step = evaluation.make_eval_step(state.apply_fn, mesh, 3)
    outputs = step(state.variables, parallel.to_global({**batch, "mask": np.ones(4, bool)}, mesh))
    assert float(jnp.mean(outputs["loss"])) == pytest.approx(main, rel=1e-6)


def test_resume_after_stop_and_after_signal_equals_uninterrupted_run(tiny, straight, monkeypatch):
    _, straight = straight
    assert straight.step == 6 and straight.interrupted is None
    val_size = len(load_dataset(resolve(TINY).data_config()).val)
    assert val_size % TINY.batch_size and straight.metrics["count"] == val_size  # whole set, last batch padded

    stopped = tiny("stopped", steps=3)
    assert training.train_and_evaluate(stopped).step == 3
    resumed = training.train_and_evaluate(dataclasses.replace(stopped, steps=6))
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    # SIGINT during step 4: the step finishes, a checkpoint is saved, the run returns cleanly.
    signalled = tiny("signalled", steps=6)
    monkeypatch.setattr(training, "make_train_step", _signalling_at(4))
    result = training.train_and_evaluate(signalled)
    assert (result.step, result.interrupted) == (4, signal.SIGINT)
    monkeypatch.undo()
    resumed = training.train_and_evaluate(signalled)
    assert resumed.step == 6
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [r["step"] for r in read_metrics(f"{signalled.workdir}/{METRICS_FILE}") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log reads like one run


def _signalling_at(signal_step: int):
    """A ``make_train_step`` whose step raises SIGINT once the state reaches ``signal_step``."""
    make_train_step = training.make_train_step

    def signalling(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def wrapped(state, batch):
            new_state, metrics = step(state, batch)
            if int(parallel.to_host(new_state.step)) == signal_step:
                signal.raise_signal(signal.SIGINT)
            return new_state, metrics
        return wrapped
    return signalling


def test_stop_at_an_epoch_end_is_evaluated_on_resume(tiny, monkeypatch):
    """A stop in an epoch's last log window comes before that epoch's evaluation: the resumed run does it."""
    config = tiny("epoch_end", steps=27, log_every=100)
    steps_per_epoch = load_dataset(resolve(config).data_config()).steps_per_epoch
    assert steps_per_epoch == 26
    monkeypatch.setattr(training, "make_train_step", _signalling_at(steps_per_epoch))
    assert training.train_and_evaluate(config).interrupted == signal.SIGINT
    monkeypatch.undo()
    val_steps = lambda: [r["step"] for r in read_metrics(f"{config.workdir}/{METRICS_FILE}") if r["split"] == "val"]
    assert val_steps() == []
    assert training.train_and_evaluate(config).step == 27
    assert val_steps() == [26, 27]


class _SavedRun:
    """A checkpointer holding one step with ``meta``: what ``_check_resumable`` reads."""

    def __init__(self, meta: dict):
        self.meta = meta

    def latest_step(self) -> int:
        return 5

    def read_meta(self, step: int) -> dict:
        return self.meta


@pytest.mark.parametrize("grad_clip, backbone_lr_mult, refused", [(1.0, 0.5, True), (None, 0.5, False),
                                                                 (1.0, 1.0, False)])
def test_a_checkpoint_of_the_old_grad_clip_layout_is_refused_by_name(grad_clip, backbone_lr_mult, refused):
    """Before the optimizer state recorded its layout, --grad-clip with parameter groups nested the clip inside
    them: that state cannot restore into today's, which would read as a damaged checkpoint."""
    config = resolve(TrainConfig(model="resnet18", workdir="w", grad_clip=grad_clip,
                                 backbone_lr_mult=backbone_lr_mult))
    old = {"config": json.loads(config.to_json()), "steps_per_epoch": 26}
    layout = checkpointing.OPTIMIZER_LAYOUT
    assert training._check_resumable(_SavedRun({**old, "optimizer_layout": layout}), config, 26) == 5
    if refused:
        with pytest.raises(ValueError, match=r"of a different run: its optimizer state has an older jaxnets' "
                                             r"layout \(whose --grad-clip clipped each learning-rate group"):
            training._check_resumable(_SavedRun(old), config, 26)
    else:  # the same layout then as now
        assert training._check_resumable(_SavedRun(old), config, 26) == 5


def test_a_resumed_run_logs_each_evaluation_once_and_keeps_the_best(tiny):
    """Runs that stop at an epoch's end, then at a --checkpoint-every step: the metrics of each saved evaluation
    stay on disk, so a resumed run does not evaluate (and log) that epoch again, and the best is kept."""
    config = tiny("once", keep_checkpoints=1, log_every=100)
    steps_per_epoch = load_dataset(resolve(config).data_config()).steps_per_epoch
    training.train_and_evaluate(dataclasses.replace(config, steps=steps_per_epoch))
    training.train_and_evaluate(dataclasses.replace(config, steps=steps_per_epoch + 1, checkpoint_every=1))
    records = read_metrics(f"{config.workdir}/{METRICS_FILE}")
    assert [r["step"] for r in records if r["split"] == "val"] == [steps_per_epoch, steps_per_epoch + 1]
    checkpointer = checkpointing.Checkpointer(f"{config.workdir}/checkpoints", keep=1)
    assert checkpointer.has_metrics(steps_per_epoch + 1)  # the last step was saved with its evaluation


def test_workdir_of_another_run_is_refused_and_left_as_it_was(straight):
    config, _ = straight
    saved_config = (Path(config.workdir) / CONFIG_FILE).read_text()
    saved_metrics = read_metrics(f"{config.workdir}/{METRICS_FILE}")
    with pytest.raises(ValueError, match=r"holds a checkpoint \(step 6\) of a different run: model='resnet18'"):
        training.train_and_evaluate(dataclasses.replace(config, model="resnet34"))
    # Settings that change the optimizer state's structure are part of what a run is, too.
    with pytest.raises(ValueError, match=r"of a different run: optimizer='sgd' \(this run: 'adamw'\)"):
        training.train_and_evaluate(dataclasses.replace(config, optimizer="adamw"))
    with pytest.raises(ValueError, match=r"of a different run: freeze='none'"):
        training.train_and_evaluate(dataclasses.replace(config, freeze="backbone"))
    with pytest.raises(ValueError, match=r"of a different run: val_fraction=0.2 \(this run: 0.3\)"):
        training.train_and_evaluate(dataclasses.replace(config, val_fraction=0.3))  # would validate on trained images
    with pytest.raises(ValueError, match=r"of a different run: 26 steps per epoch \(this run: 27; the dataset, "
                                         r"or the number of processes sharing it, changed\)"):
        training._check_resumable(checkpointing.Checkpointer(f"{config.workdir}/checkpoints"), setup(config)[0], 27)
    assert checkpointing.Checkpointer(f"{config.workdir}/checkpoints").latest_step() == 6  # untouched
    assert (Path(config.workdir) / CONFIG_FILE).read_text() == saved_config
    # A linear probe would overwrite the run's logs.
    with pytest.raises(ValueError, match=r"holds a training run; a linear probe would overwrite its logs"):
        probe.run_linear_probe(dataclasses.replace(config, linear_probe="logreg"))
    assert read_metrics(f"{config.workdir}/{METRICS_FILE}") == saved_metrics


def test_diverged_training_stops_with_the_reason_and_saves_nothing(tiny):
    config = tiny("diverged", steps=4, lr=1e30)
    with pytest.raises(ValueError, match=r"training diverged: loss (nan|inf) by step \d \(try a lower --lr\); "
                                         r"no checkpoint was saved"):
        training.train_and_evaluate(config)
    assert checkpointing.Checkpointer(f"{config.workdir}/checkpoints").latest_step() is None
    assert not (Path(config.workdir) / "final_weights.safetensors").exists()
    assert all(np.isfinite(r["loss"]) for r in read_metrics(f"{config.workdir}/{METRICS_FILE}"))


def test_bfloat16_trains_with_float32_parameters(tiny):
    result = training.train_and_evaluate(tiny("bf16", dtype="bfloat16", steps=4))
    assert all(p.dtype == np.float32 for p in _params(result))
    losses = [r["loss"] for r in read_metrics(result.run_dir / METRICS_FILE) if r["split"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert 0 <= result.metrics["top1"] <= 1 and np.isfinite(result.metrics["loss"])
