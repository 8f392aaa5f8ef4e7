"""What a new user meets first (issue 20): plots that show the run, help that fits a terminal, suggestions for
a mistyped model, a finished run that says so, install hints that fit the install."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxnets
from jaxnets import errors
from jaxnets.cli import train as cli
from jaxnets.run_io import curves_figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def test_one_loss_spike_does_not_flatten_the_curves_and_the_title_names_the_run():
    records = [{"step": s, "split": "train", "loss": 2.3 / s, "accuracy": 0.1 * s} for s in range(1, 9)]
    records += [{"step": 4, "split": "val", "loss": 181.7, "top1": 0.40},
                {"step": 8, "split": "val", "loss": 0.31, "top1": 0.9749}]
    fig = curves_figure(records, "resnet34 on digits")
    loss_axis = fig.axes[0]
    assert loss_axis.get_yscale() == "log"
    low, high = loss_axis.get_ylim()
    # On a log axis the 0.29 .. 2.3 train losses span most of the height next to the spike, not 1 % of it.
    assert low < 0.29 and high > 181.7
    assert fig._suptitle.get_text() == "resnet34 on digits: best val top-1 97.49% (step 8)"


def test_help_wraps_to_the_terminal_and_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = cli.build_parser("train.py").format_help()
    assert max(len(line) for line in text.splitlines()) <= 100
    flat = " ".join(text.split())
    for flag, default in (("--momentum", "0.9"), ("--val-fraction", "0.2"), ("--log-every", "10"),
                          ("--batch-size", "32 on digits, else 128"), ("--epochs", "10 on digits, else 90")):
        section = flat[flat.index(flag):]
        assert f"(default: {default})" in section[:400] or f"default: {default}" in section[:400], flag


@pytest.mark.parametrize("typed,suggested", [("resnet-50", "resnet50"), ("Resnet18", "resnet18"),
                                             ("vgg16bn", "vgg16_bn"), ("googlenet_v1", "googlenet")])
def test_a_mistyped_model_name_gets_close_matches(typed, suggested):
    with pytest.raises(jaxnets.UserError, match=rf"unknown model '{typed}'; did you mean [^;]*\b{suggested}\b"):
        jaxnets.create_model(typed)


def test_install_hints_name_a_command_that_works_for_this_install():
    hint = errors.install_hint("torch")
    # This test runs from a source checkout: an editable install of the checkout with its extra.
    assert hint == f"pip install -e '{ROOT}[torch]'"


# --- predict reads the model name from the weights file -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """resnet18 for 2 classes, as train.py writes a fine-tuned model's file (its header names the model)."""
    import jax

    from jaxnets.weights import save_weights

    model = jaxnets.create_model("resnet18", num_classes=2)
    variables = jax.jit(lambda key: model.init(key, jax.numpy.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    folder = tmp_path_factory.mktemp("run")
    Image.new("RGB", (40, 30), (200, 30, 90)).save(folder / "img.png")
    path = save_weights(folder / "final_weights.safetensors", "resnet18", variables,
                        metadata={"categories": ["ant", "bee"], "eval_transform": {"crop_size": 32}})
    return path, folder / "img.png"


def test_predict_takes_the_model_from_the_weights_file(tiny_weights, capsys):
    from jaxnets.cli import predict

    weights, image = tiny_weights
    assert predict.main(["--model", "resnet18", "--weights", str(weights), str(image)]) == 0
    named = capsys.readouterr().out
    assert predict.main(["--weights", str(weights), str(image)]) == 0
    assert capsys.readouterr().out == named and named.splitlines()[0] == str(image) and "ant" in named


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet34", "--weights", "{weights}"],
     "--model resnet34: {weights} holds resnet18 weights, not resnet34; leave out --model (the file names its model)"),
    (["--weights", "IMAGENET1K_V2"], "--model is needed for torchvision's weights (IMAGENET1K_V2)"),
    ([], "--model is needed for torchvision's weights (IMAGENET1K_V1)"),
])
def test_predict_without_a_model_it_cannot_know_or_with_another_is_one_line(tiny_weights, capsys, argv, message):
    from jaxnets.cli import predict

    weights, image = tiny_weights
    assert predict.main([a.format(weights=weights) for a in argv] + [str(image)]) == 1
    out, err = capsys.readouterr()
    expected = "jaxnets-predict: error: " + message.format(weights=weights)
    assert out == "" and err.count("\n") == 1 and err.startswith(expected), err


# --- image folders: every skipped file named, a default batch that fits a small folder ---------------------------


def _small_folder(root: Path, per_class: int = 15, bad: tuple[str, ...] = ()) -> Path:
    """``per_class`` 16-px images in each of two classes, and the ``bad`` files (unreadable) in the first."""
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    for name in bad:
        (root / "ant" / name).write_bytes(b"\x89PNG truncated")
    return root


def test_every_skipped_file_is_named_in_the_log(tmp_path):
    from jaxnets.data import DataConfig, load_dataset

    root = _small_folder(tmp_path / "pets", per_class=6, bad=("cut.png", "empty.jpg"))
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4))
    start = dataset.notes.index("skipped 2 unreadable image file(s):")
    listed = [line.split(" (")[0] for line in dataset.notes[start + 1:start + 3]]
    assert listed == [f"  {root / 'ant' / 'cut.png'}", f"  {root / 'ant' / 'empty.jpg'}"]


FOLDER_STEPS = 1


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    """train.py as a newcomer uses it on a small folder, one compile for two tests: a --batch-size that does not
    fit (refused), the run with the default batch, and the very same command again once it has finished.
    Returns the refused run's stderr, each run's stdout, and the final weights' mtime after the first run."""
    tmp = tmp_path_factory.mktemp("newcomer")
    root = _small_folder(tmp / "pets")  # 2 x 15 images; 20 % of each class held out: 24 to train on
    argv = ["--model", "resnet18", "--dataset", str(root), "--image-size", "16", "--epochs", "1",
            "--steps", str(FOLDER_STEPS), "--no-progress", "--workdir", str(tmp / "run"),
            "--compile-cache", str(tmp / "cache")]
    weights = tmp / "run" / "final_weights.safetensors"
    runs = {}
    for name, args in (("refused", ["--batch-size", "128", *argv]), ("first", argv), ("again", argv)):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runs[name] = (train.main(args), out.getvalue(), err.getvalue())
        if name == "first":
            runs["written"] = weights.stat().st_mtime_ns
    return runs, tmp / "run", weights


def test_a_default_batch_shrinks_to_a_small_folder_and_a_given_one_gets_the_value_that_fits(folder_runs):
    import jax

    runs, workdir, _ = folder_runs
    fits = 24 // jax.device_count() * jax.device_count()
    code, _, err = runs["refused"]
    assert code == 1
    assert err.count("\n") == 1 and err.rstrip().endswith(
        "24 training examples, fewer than one global batch of 128; lower --batch-size: "
        f"--batch-size {fits} fits (the largest multiple of the {jax.device_count()} device(s))"), err

    code, out, _ = runs["first"]
    assert code == 0
    peak = 0.1 * fits / 256  # --lr is per 256 images: the peak follows the batch
    assert f"--batch-size {fits} instead of the default 128, more than the 24 training examples (" in out
    assert f"sgd peak lr {peak:g} (= 0.1 x {fits}/256)" in out
    config = json.loads((workdir / "config.json").read_text())
    assert (config["batch_size"], config["eval_batch_size"], config["lr"]) == (fits, fits, 0.1)


def test_a_finished_run_says_so_and_exits_at_once(folder_runs):
    runs, _, weights = folder_runs
    (code, first, _), (code_again, out, _) = runs["first"], runs["again"]
    assert code == 0 and code_again == 0
    top1 = first.split("val top1 ")[-1].split("%")[0]
    assert (f"this run is complete (step {FOLDER_STEPS}, val top1 {top1}%, final weights {weights}): nothing to do"
            in out)
    # Nothing evaluated or rewritten:
    assert "resumed from step" not in out and weights.stat().st_mtime_ns == runs["written"]


# --- library warnings: one clear line or nothing ----------------------------------------------------------------


def test_pretrained_weights_offline_are_one_error_and_no_warning(tmp_path, monkeypatch, caplog):
    from jaxnets.weights import WeightsError, pretrained
    from jaxnets.weights import cache as weights_cache

    def offline(spec, version):
        raise WeightsError(f"{spec.name}: cannot download (offline)")

    monkeypatch.setenv(weights_cache.HOME_ENV, str(tmp_path))
    monkeypatch.setattr(pretrained, "fetch_torchvision_state_dict", offline)
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError, match=r"^resnet18: cannot download \(offline\)$"):
        pretrained.open_pretrained("resnet18")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_unprepared_tfds_dataset_offline_is_one_error_without_absl_warnings(tmp_path, monkeypatch, caplog):
    from jaxnets.data import DataConfig, DataError, tfds

    monkeypatch.setattr(tfds, "_offline_reason", lambda: "no network (test)")
    with caplog.at_level(logging.INFO), pytest.raises(DataError, match=r"^TFDS dataset 'tf_flowers' is not prepared "
                                                                        r"in .* \(no network \(test\)\); prepare it"):
        tfds.load(DataConfig(dataset="tf_flowers", data_dir=str(tmp_path)), 1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_mistyped_tfds_name_gets_close_matches_and_no_exception_name(capsys, tmp_path):
    argv = ["--dataset", "cifar-10", "--workdir", str(tmp_path / "run"), "--compile-cache", ""]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: unknown dataset 'cifar-10': not 'digits', not an existing folder, and "
                          "not a TFDS dataset; did you mean cifar10 ") and err.endswith("?\n") and err.count("\n") == 1
