"""torchvision's modern training recipe in train.py: MixUp/CutMix against torchvision.transforms.v2 (same lambda and
box: same images and targets; lambda ~ Beta), the EMA against torchvision's ExponentialMovingAverage update rule
replayed in numpy, gradient accumulation against one large batch (float64), bit-exact resume with everything on,
and --recipe torchvision-v2 (flags override it, config.json records it)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import torch
from torchvision.transforms import v2

from jaxnets import ema, final_weights, mixing, parallel, train_step, training
from jaxnets.cli.train import config_from_args
from jaxnets.config import RECIPES, TrainConfig, recipe_parts, resolve
from jaxnets.ema import EmaSchedule
from jaxnets.run_io import CONFIG_FILE, METRICS_FILE, read_metrics
from jaxnets.weights import load_weights


class TinyNet(nn.Module):
    """A convolution, an optional BatchNorm and a linear head: the step's contract at toy size."""

    batch_norm: bool = True
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, frozen_norm=()):
        x = nn.Conv(4, (3, 3), param_dtype=x.dtype)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=x.dtype)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes, param_dtype=x.dtype)(x)


def _batch(rng: np.random.Generator, n: int, dtype=np.float32, size: tuple[int, int] = (6, 8)) -> dict[str, np.ndarray]:
    return {"image": rng.normal(size=(n, *size, 3)).astype(dtype), "label": rng.integers(0, 3, n).astype(np.int32)}


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), parallel.to_host(tree))


# --- MixUp and CutMix ------------------------------------------------------------------------------------


def test_mixup_and_cutmix_equal_torchvisions_for_the_same_lambda_and_box(monkeypatch):
    """torchvision's MixUp / CutMix with their draws fixed (lambda, and CutMix's box centre through torch.randint) on
    a batch of NCHW images: our NHWC images and one-hot targets equal theirs (MixUp to float32 rounding: 1e-6;
    CutMix exactly), and CutMix's box is theirs (an image 10 high and 14 wide, so that the axes cannot swap)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 10, 14, 3)).astype(np.float32)
    labels = np.array([0, 3, 1, 4, 3])
    targets = jax.nn.one_hot(labels, 5)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    for lam in (0.3, 0.875):
        transform = v2.MixUp(alpha=0.5, num_classes=5)
        monkeypatch.setattr(transform._dist, "sample", lambda shape, lam=lam: torch.tensor([lam]))
        theirs_images, theirs_targets = transform(nchw, torch.from_numpy(labels))
        ours_images, ours_targets = mixing.mixup(jnp.asarray(images), targets, jnp.float32(lam))
        np.testing.assert_allclose(ours_images, theirs_images.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours_targets, theirs_targets.numpy(), rtol=1e-6, atol=1e-7)
    for lam, centre in ((0.3, (2, 9)), (0.6, (13, 0)), (0.05, (7, 5))):
        transform = v2.CutMix(alpha=1.0, num_classes=5)
        monkeypatch.setattr(transform._dist, "sample", lambda shape, lam=lam: torch.tensor([lam]))
        draws = iter([torch.tensor([centre[0]]), torch.tensor([centre[1]])])  # randint(W), then randint(H)
        monkeypatch.setattr(torch, "randint", lambda *args, draws=draws, **kwargs: next(draws))
        theirs_images, theirs_targets = transform(nchw, torch.from_numpy(labels))
        monkeypatch.undo()
        box = mixing.cutmix_box(jnp.float32(lam), centre[0], centre[1], 10, 14)
        ours_images, ours_targets = mixing.cutmix(jnp.asarray(images), targets, box)
        np.testing.assert_array_equal(ours_images, theirs_images.permute(0, 2, 3, 1).numpy())
        np.testing.assert_allclose(ours_targets, theirs_targets.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.2, 0.0), (0.2, 1.0)])
def test_lambda_follows_beta_and_each_batch_draws_mixup_or_cutmix(mixup_alpha, cutmix_alpha):
    """Over 4000 draws, lambda of each kind is Beta(alpha, alpha) (Kolmogorov-Smirnov, p > 1e-3: fails for an alpha
    off by a third) and, with both set, half the batches are CutMix (binomial test, p > 1e-3)."""
    config = mixing.Mixing(mixup_alpha, cutmix_alpha)
    draws = jax.jit(jax.vmap(lambda key: mixing.draw(key, 10, 14, config)))(jax.random.split(jax.random.key(3), 4000))
    cutmix, lam = np.asarray(draws.cutmix), np.asarray(draws.lam, np.float64)
    for chosen, alpha in ((~cutmix, mixup_alpha), (cutmix, cutmix_alpha)):
        assert (alpha > 0) == bool(chosen.any())
        if alpha:
            assert scipy.stats.kstest(lam[chosen], scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    if mixup_alpha and cutmix_alpha:
        assert scipy.stats.binomtest(int(cutmix.sum()), len(cutmix), 0.5).pvalue > 1e-3
    assert bool(mixing.draw(jax.random.key(0), 10, 14, mixing.Mixing(0.0, 1.0)).cutmix)  # CutMix alone: always


def test_the_step_mixes_and_smooths_the_targets_as_torch():
    """The train step's loss equals torch's CrossEntropyLoss(label_smoothing=0.1) on the logits of the mixed images
    against the mixed one-hot targets, for the step's own draw (key: the step's dropout key folded with MIX_STREAM),
    over steps that draw both kinds."""
    mesh = parallel.make_mesh()
    model = TinyNet(batch_norm=False)
    batch = _batch(np.random.default_rng(1), 4)
    variables = model.init(jax.random.key(0), batch["image"])
    config = mixing.Mixing(0.2, 1.0)
    state = train_step.create_train_state(model, jax.tree.map(jnp.copy, variables), optax.sgd(0.0), mesh, seed=5)
    step = train_step.make_train_step(mesh, label_smoothing=0.1, mixing=config)

    @jax.jit
    def reference_inputs(step_number):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), step_number), train_step.MIX_STREAM)
        draw = mixing.draw(key, 6, 8, config)
        images = mixing.mix_images(jnp.asarray(batch["image"]), draw)
        targets = mixing.mix_targets(jax.nn.one_hot(batch["label"], 3), draw, 6, 8)
        return model.apply(variables, images), targets, draw.cutmix

    kinds = set()
    for step_number in range(4):
        state, metrics = step(state, parallel.to_global(batch, mesh))
        logits, targets, cutmix = (np.array(x) for x in reference_inputs(step_number))
        kinds.add(bool(cutmix))
        expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets),
                                                     label_smoothing=0.1)
        assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert kinds == {True, False}


# --- EMA -------------------------------------------------------------------------------------------------


def test_ema_is_torchvisions_exponential_moving_average_replayed(tmp_path):
    """The step's EMA after 9 updates (3 epochs of 3, every 2 updates, 1 warmup epoch) against torchvision's rule
    replayed in numpy from references/classification: the decay adjusted as train.py does (adjust = world_size *
    batch_size * model_ema_steps / epochs; alpha = min(1, (1 - decay) * adjust)), utils.ExponentialMovingAverage =
    AveragedModel(use_buffers=True) (first update copies, then decay * avg + (1 - decay) * param, parameters and
    BatchNorm buffers), updated when i % model_ema_steps == 0 and n_averaged reset to 0 while epoch <
    lr_warmup_epochs. float32, rtol 1e-6."""
    batch_size, every, epochs, steps_per_epoch, warmup, decay = 4, 2, 3, 3, 1, 0.9
    config = resolve(TrainConfig(model="resnet18", batch_size=batch_size, model_ema=True, model_ema_decay=decay,
                                 model_ema_steps=every, epochs=epochs, warmup_epochs=float(warmup)))
    schedule = ema.schedule_of(config, steps_per_epoch)
    world_size, per_gpu = 1, batch_size  # torchvision's --batch-size is per GPU
    torch_decay = 1.0 - min(1.0, (1.0 - decay) * (world_size * per_gpu * every / epochs))
    assert schedule == EmaSchedule(pytest.approx(torch_decay, abs=1e-15), every, steps_per_epoch, warmup)

    mesh = parallel.make_mesh()
    model = TinyNet()
    rng = np.random.default_rng(2)
    variables = model.init(jax.random.key(1), _batch(rng, batch_size)["image"])
    state = train_step.create_train_state(model, variables, optax.sgd(0.3, momentum=0.9), mesh, model_ema=True)
    step = train_step.make_train_step(mesh, ema_schedule=schedule)
    weights = [_host(state.variables)]  # AveragedModel deep-copies the model as it is
    for _ in range(epochs * steps_per_epoch):
        state, _ = step(state, parallel.to_global(_batch(rng, batch_size), mesh))
        weights.append(_host(state.variables))

    average, n_averaged = weights[0], 0
    for epoch in range(epochs):
        for i in range(steps_per_epoch):  # train_one_epoch: optimizer.step(), then the EMA
            current = weights[epoch * steps_per_epoch + i + 1]
            if i % every == 0:
                if n_averaged == 0:
                    average = current
                else:
                    average = jax.tree.map(lambda a, p: torch_decay * a + (1.0 - torch_decay) * p, average, current)
                n_averaged += 1
                if epoch < warmup:
                    n_averaged = 0
    ours = _host({"params": state.ema["params"], "batch_stats": state.ema["batch_stats"]})
    assert int(state.ema["count"]) == n_averaged == 4
    for path, ours_leaf in jax.tree_util.tree_leaves_with_path(ours):
        expected = average
        for key in path:
            expected = expected[key.key]
        np.testing.assert_allclose(ours_leaf, expected, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(ours["params"]["Dense_0"]["kernel"], weights[-1]["params"]["Dense_0"]["kernel"])


# --- gradient accumulation -----------------------------------------------------------------------------------


def test_accumulated_micro_batches_give_the_update_of_one_large_batch():
    """A model without BatchNorm, float64: N = 2 accumulation steps of 4 images give the update of one step of the 8
    (the k-th micro-batch takes rows k, k + N, ...; any split averages to the same gradient), to 1e-10, over two
    updates of SGD with momentum, weight decay and a warmup schedule counted in updates."""
    with jax.enable_x64(True):
        mesh = parallel.make_mesh()
        model = TinyNet(batch_norm=False)
        rng = np.random.default_rng(4)
        batches = [_batch(rng, 8, np.float64) for _ in range(2)]
        variables = model.init(jax.random.key(2), batches[0]["image"])
        schedule = optax.linear_schedule(0.0, 0.5, 2)
        tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(schedule, momentum=0.9))
        params = {}
        for n in (1, 2):
            state = train_step.create_train_state(model, jax.tree.map(jnp.copy, variables), tx, mesh)
            step = train_step.make_train_step(mesh, grad_accum_steps=n)
            for batch in batches:
                state, metrics = step(state, parallel.to_global(batch, mesh))
            assert int(state.step) == 2 and metrics["loss"].dtype == jnp.float64
            params[n] = _host(state.params)
        for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2]), strict=True):
            assert a.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
        assert not np.allclose(jax.tree.leaves(params[1])[0], jax.tree.leaves(variables)[0])


def test_accumulation_updates_batchnorm_statistics_per_micro_batch():
    """BatchNorm statistics with accumulation: those of the micro-batches in turn (rows 0, 2, 4, ... then 1, 3, ...),
    as N forward passes in torch would leave them, not those of the whole batch."""
    mesh = parallel.make_mesh()
    model = TinyNet()
    batch = _batch(np.random.default_rng(5), 8)
    variables = model.init(jax.random.key(3), batch["image"])
    state = train_step.create_train_state(model, jax.tree.map(jnp.copy, variables), optax.sgd(0.0), mesh)
    state, _ = train_step.make_train_step(mesh, grad_accum_steps=2)(state, parallel.to_global(batch, mesh))
    expected = variables
    for k in range(2):
        _, updates = model.apply(expected, batch["image"][k::2], train=True, mutable=["batch_stats"])
        expected = {**expected, **updates}
    whole = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])[1]["batch_stats"]
    for ours, theirs, other in zip(jax.tree.leaves(_host(state.batch_stats)), jax.tree.leaves(expected["batch_stats"]),
                                   jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert not np.allclose(ours, other, rtol=1e-5, atol=1e-6)


RECIPE_IMPORTS = """from __future__ import annotations
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxnets import mixing, parallel, train_step
from jaxnets.ema import EmaSchedule"""


def recipe_steps(out: str | None = None) -> list[np.ndarray]:
    """Three float64 updates of TinyNet with MixUp/CutMix, 2-step accumulation and the EMA on whatever devices
    this process has, as flat leaves of the state's arrays (saved to ``out`` when given: the subprocess)."""
    with jax.enable_x64(True):
        mesh = parallel.make_mesh()
        model, rng = TinyNet(), np.random.default_rng(6)
        batches = [_batch(rng, 8, np.float64) for _ in range(3)]
        variables = model.init(jax.random.key(4), batches[0]["image"])
        state = train_step.create_train_state(model, variables, optax.sgd(0.2, momentum=0.9), mesh, model_ema=True)
        step = train_step.make_train_step(mesh, label_smoothing=0.1, mixing=mixing.Mixing(0.2, 1.0), grad_accum_steps=2,
                                        ema_schedule=EmaSchedule(0.5, 1, 3, 0.0))
        for batch in batches:
            state, _ = step(state, parallel.to_global(batch, mesh))
        leaves = jax.tree.leaves(_host(state.arrays()))
    if out:
        np.savez(out, *leaves)
    return leaves


def test_the_recipe_step_is_the_same_on_four_devices(tmp_path):
    """Data parallelism: mixing on the global batch, micro-batches spread over the devices, BatchNorm statistics
    and the EMA give one device's state on a mesh of four (float64, to 1e-10: only reduction orders differ)."""
    # The subprocess runs this module's own definitions, without importing the module (torch, torchvision).
    code = "\n\n".join([RECIPE_IMPORTS, *(inspect.getsource(f) for f in (TinyNet, _batch, _host, recipe_steps)),
                          f"assert jax.device_count() == 4\nrecipe_steps({str(tmp_path / 'four.npz')!r})\n"])
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    four_devices = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    one = recipe_steps()
    output = four_devices.communicate(timeout=300)[0]
    assert four_devices.returncode == 0, output[-3000:]
    with np.load(tmp_path / "four.npz") as four:
        assert len(four.files) == len(one)
        for i, leaf in enumerate(one):
            np.testing.assert_allclose(four[f"arr_{i}"], leaf, rtol=0, atol=1e-10)


# --- the whole recipe in a run ---------------------------------------------------------------------------------

EVERYTHING = dict(model="resnet18", classes=(0, 1, 2), batch_size=8, eval_batch_size=64, grad_accum_steps=2, epochs=2,
                  log_every=1,
                  progress=False, model_ema=True, model_ema_steps=2, mixup_alpha=0.2, cutmix_alpha=1.0,
                  auto_augment="ta_wide", random_erase=0.25, label_smoothing=0.1, warmup_epochs=0.0)


def test_resume_with_the_whole_recipe_is_bit_identical(tmp_path_factory):
    """EMA + MixUp + CutMix + TrivialAugmentWide + random erasing + accumulation: a run stopped at step 2 and
    resumed to 4 ends with the uninterrupted run's parameters, BatchNorm statistics, optimizer state and EMA, bit
    for bit, and its metrics.jsonl (EMA evaluations included) reads like the uninterrupted one's."""
    cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
    make = lambda name, **kw: TrainConfig(**{**EVERYTHING, **kw}, compile_cache=cache,  # noqa: E731
                                          workdir=str(tmp_path_factory.mktemp(name)))
    straight = training.train_and_evaluate(make("straight", steps=4))
    stopped = make("stopped", steps=2)
    assert training.train_and_evaluate(stopped).step == 2
    resumed = training.train_and_evaluate(dataclasses.replace(stopped, steps=4))
    assert resumed.step == straight.step == 4
    for a, b in zip(jax.tree.leaves(_host(straight.state.arrays())), jax.tree.leaves(_host(resumed.state.arrays())),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.state.ema["count"]) == 2  # updates 1 and 3 of the 26-update epoch
    logs = [[(r["step"], r["split"]) for r in read_metrics(Path(run.run_dir) / METRICS_FILE)]
            for run in (straight, resumed)]
    assert logs[0] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "val"), (4, "val_ema")]
    assert logs[1] == [(1, "train"), (2, "train"), (2, "val"), (2, "val_ema"), (3, "train"), (4, "train"), (4, "val"),
                       (4, "val_ema")]
    header = load_weights(Path(straight.run_dir) / final_weights.FINAL_WEIGHTS).metadata
    assert header["weights"] == "ema" and header["val_top1"] == straight.ema_metrics["top1"]
    assert header["ema_decay"] == pytest.approx(1 - min(1.0, 2e-5 * 16 * 2 / 2))


# --- --recipe -----------------------------------------------------------------------------------------------


def test_recipe_sets_torchvisions_v2_settings_that_flags_override_and_config_json_records(tmp_path):
    """--recipe torchvision-v2 is the table's settings (lr 0.5 at 1024 images, i.e. 0.125 per 256), each flag given
    wins whatever its position, and config.json records the resolved values, replayable with --config."""
    config = resolve(config_from_args(["--model", "resnet50", "--label-smoothing", "0", "--recipe", "torchvision-v2",
                                       "--epochs", "3", "--workdir", str(tmp_path)]))
    table = RECIPES["torchvision-v2"]
    assert config.recipe == "torchvision-v2" and config.label_smoothing == 0.0 and config.epochs == 3
    for key, value in table.items():
        if key not in ("label_smoothing", "epochs"):
            assert getattr(config, key) == value, key
    assert config.lr * config.batch_size / 256 == pytest.approx(0.5)  # torchvision: --lr 0.5, 8 GPUs x 128
    assert (config.image_size, config.val_resize_size, config.val_crop_size) == (176, 232, 224)
    sizes = config.data_config().eval_transform
    assert (sizes.resize_size, sizes.crop_size) == (232, 224)
    (tmp_path / CONFIG_FILE).write_text(config.to_json())
    assert resolve(config_from_args(["--config", str(tmp_path / CONFIG_FILE)])) == config
    recorded = json.loads(config.to_json())
    assert recorded["mixup_alpha"] == 0.2 and recorded["model_ema"] is True and recorded["auto_augment"] == "ta_wide"


def test_the_recipes_eval_sizes_follow_the_image_size_and_given_sizes_win():
    """torchvision-v2 trains at 176 and evaluates at 232/224: at --image-size 64 it evaluates at the same ratios,
    crop round(224 x 64/176) = round(81.45) = 81 and resize round(81 x 232/224) = round(83.89) = 84, and says so;
    --val-crop-size and --val-resize-size given win (a given crop gets the recipe's resize ratio)."""
    recipe = ["--model", "resnet50", "--dataset", "some/folder", "--recipe", "torchvision-v2"]
    config = resolve(config_from_args([*recipe, "--image-size", "64"]))
    assert (config.image_size, config.val_resize_size, config.val_crop_size) == (64, 84, 81)
    sizes = config.data_config().eval_transform
    assert (sizes.resize_size, sizes.crop_size) == (84, 81)
    assert recipe_parts(config)[-1] == "eval resize 84 crop 81 (the recipe's 232/224 at 176 px, scaled to 64 px)"
    given = resolve(config_from_args([*recipe, "--image-size", "64", "--val-crop-size", "72", "--val-resize-size",
                                      "80"]))
    assert (given.val_resize_size, given.val_crop_size) == (80, 72)
    assert recipe_parts(given)[-1] == "eval resize 80 crop 72"
    crop_only = resolve(config_from_args([*recipe, "--image-size", "64", "--val-crop-size", "64"]))
    assert (crop_only.val_resize_size, crop_only.val_crop_size) == (66, 64)  # round(64 x 232/224) = round(66.29)


def test_the_default_run_turns_none_of_the_recipe_on():
    config = resolve(config_from_args(["--model", "resnet34"]))
    assert (config.recipe, config.auto_augment, config.random_erase, config.mixup_alpha, config.cutmix_alpha,
            config.model_ema, config.grad_accum_steps, config.multi_label) == (None, None, 0.0, 0.0, 0.0, False, 1,
                                                                                 False)
    assert (config.val_crop_size, config.val_resize_size) == (config.image_size, 18)  # the 256/224 rule, as before
    assert ema.schedule_of(config, 45) is None


@pytest.mark.parametrize("overrides, message", [
    ({"mixup_alpha": -1.0}, "--mixup-alpha must be >= 0, got -1.0"),
    ({"cutmix_alpha": float("nan")}, "--cutmix-alpha must be >= 0, got nan"),
    ({"random_erase": 1.5}, "--random-erase must be in [0, 1], got 1.5"),
    ({"ra_magnitude": 31}, "--ra-magnitude must be in [0, 30], got 31"),
    ({"model_ema_decay": 1.0}, "--model-ema-decay must be in [0, 1), got 1.0"),
    ({"model_ema_steps": 0}, "--model-ema-steps must be >= 1, got 0"),
    ({"grad_accum_steps": 0}, "--grad-accum-steps must be >= 1, got 0"),
    ({"auto_augment": "autoaugment"}, "--auto-augment 'autoaugment': choose one of ra, ta_wide, imagenet"),
    ({"auto_augment": "ra", "in_chans": 4}, "--auto-augment works on 1- or 3-channel images (torchvision's "
                                            "policies), not --in-chans 4"),
    ({"recipe": "timm"}, "--recipe 'timm': choose one of torchvision-v2"),
    ({"multi_label": True}, "--multi-label does not apply to --dataset digits (single-label)"),
    ({"model": "vgg11", "val_crop_size": 16}, "--val-crop-size 16: vgg11 needs at least 32 px"),
    ({"val_resize_size": 10}, "--val-resize-size 10 is below the eval crop 16 (--val-crop-size)"),
])
def test_bad_recipe_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        resolve(TrainConfig(**{"model": "resnet18", **overrides}))
