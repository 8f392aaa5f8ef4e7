"""Linear probe: feature extraction (batched, padded, data-parallel) and scikit-learn classifiers on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from test_transfer import random_variables

import jaxnets
from jaxnets.data.folder import INDEX_DIR
from jaxnets.locks import LOCK_FILE
from jaxnets.probe import CLASSIFIER_FILE, FEATURES_FILE, METRICS_FILE, extract_features, linear_probe

TESTS = Path(__file__).parent


def digit_batches(size: int, indices: np.ndarray, batch_size: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits, upsampled to size x size RGB and normalized to about zero mean, unit std."""
    digits = load_digits()
    batches = []
    for start in range(0, len(indices), batch_size):
        index = indices[start:start + batch_size]
        images = np.kron(digits.images[index] / 16.0, np.ones((size // 8, size // 8)))
        images = np.repeat(images[..., None], 3, axis=-1)
        images = np.pad(images, [(0, 0), (0, size % 8), (0, size % 8), (0, 0)])
        batches.append((((images - 0.3) / 0.4).astype(np.float32), digits.target[index]))
    return batches


def split(num_train: int, num_val: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(load_digits().target))
    return order[:num_train], order[num_train:num_train + num_val]


@pytest.fixture(scope="module")
def resnet18():
    model = jaxnets.create_model("resnet18", num_classes=10)
    return model, random_variables(model, 32)


def test_extract_features_keeps_every_example_of_a_partial_last_batch(resnet18):
    model, variables = resnet18
    images = np.random.default_rng(0).normal(size=(13, 32, 32, 3)).astype(np.float32)
    labels = np.arange(13)
    batches = [(images[i:i + 5], labels[i:i + 5]) for i in range(0, 13, 5)]  # 5, 5, 3
    features, got_labels = extract_features(model, variables, batches)
    expected = model.apply(variables, images, train=False, pre_logits=True)
    assert features.shape == (13, 512) and features.dtype == np.float32
    # Batches of 5 and 3 against one of 13: the same float32 sums blocked differently by the matrix products.
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5 * (1 + float(np.abs(expected).max())))
    np.testing.assert_array_equal(got_labels, labels)


def test_extract_features_is_data_parallel_over_a_mesh():
    """8 CPU devices: a batch of 5 is padded to 8, split one example per device, and the result is the
    single-device one."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from test_transfer import random_variables
        import jaxnets
        from jaxnets.probe import extract_features
        assert jax.device_count() == 8
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        model = jaxnets.create_model("resnet18", num_classes=10)
        variables = random_variables(model, 32)
        images = np.random.default_rng(0).normal(size=(13, 32, 32, 3)).astype(np.float32)
        batches = [(images[:5], np.arange(5)), (images[5:], np.arange(5, 13))]
        parallel, labels = extract_features(model, variables, batches, mesh=mesh)
        single, _ = extract_features(model, variables, batches)
        assert parallel.shape == (13, 512), parallel.shape
        np.testing.assert_array_equal(labels, np.arange(13))
        np.testing.assert_allclose(parallel, single, rtol=1e-4, atol=1e-4)  # features reach ~20
        print("OK")
    """)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("vgg11_bn", 32), ("googlenet", 32), ("alexnet", 64)])
def test_linear_probe_on_digits_with_a_random_backbone(name, size):
    """Random conv features + a linear SVM separate digits far above chance (10%)."""
    model = jaxnets.create_model(name, num_classes=10)
    train, val = split(250, 150)
    metrics = linear_probe(model, random_variables(model, size), digit_batches(size, train),
                           digit_batches(size, val), kind="svm")
    print(name, metrics)
    assert metrics["num_train"] == 250 and metrics["num_val"] == 150
    assert metrics["top1"] > 0.75
    assert metrics["top5"] >= metrics["top1"]


def test_logreg_probe_saves_features_and_a_reloadable_classifier(resnet18, tmp_path):
    model, variables = resnet18
    train, val = split(300, 100)
    metrics = linear_probe(model, variables, digit_batches(32, train), digit_batches(32, val), kind="logreg",
                           out_dir=tmp_path / "probe")
    assert metrics["top1"] > 0.75
    saved = np.load(tmp_path / "probe" / FEATURES_FILE)
    assert saved["train_features"].shape == (300, 512) and saved["val_features"].shape == (100, 512)
    np.testing.assert_array_equal(saved["val_labels"], load_digits().target[val])
    classifier = joblib.load(tmp_path / "probe" / CLASSIFIER_FILE)
    accuracy = np.mean(classifier.predict(saved["val_features"]) == saved["val_labels"])
    assert accuracy == pytest.approx(metrics["top1"])
    assert json.loads((tmp_path / "probe" / METRICS_FILE).read_text())["kind"] == "logreg"


def test_probe_bad_input_raises_clear_errors(resnet18):
    model, variables = resnet18
    batches = digit_batches(32, np.arange(20))
    with pytest.raises(ValueError, match="unknown linear probe 'knn'; choose one of svm, logreg"):
        linear_probe(model, variables, batches, batches, kind="knn")
    with pytest.raises(ValueError, match=r"batch 0: expected NHWC images and one label per image"):
        extract_features(model, variables, [(np.zeros((2, 32, 32)), np.zeros(2))])
    with pytest.raises(ValueError, match=r"batch 0: expected an \(images, labels\) pair"):
        extract_features(model, variables, [np.zeros((3, 32, 32, 3))])
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, variables, [])


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_probe_refuses_unnormalized_integer_images(resnet18, dtype):
    """uint8 pixels were taken as floats 0..255: features of the wrong input distribution, silently."""
    model, variables = resnet18
    images = np.full((4, 32, 32, 3), 200, np.uint8).astype(dtype)
    message = rf"batch 0: images are {np.dtype(dtype)}; the probe needs normalized float images"
    with pytest.raises(ValueError, match=message):
        linear_probe(model, variables, [(images, np.arange(4))], [(images, np.arange(4))])


def test_the_probe_on_a_small_folder_shrinks_its_default_batch_as_training_does(tmp_path, capsys):
    """A folder smaller than the default batch of 128: the probe lowers it as training does (run_setup.batch_fits_data,
    config.fit_batch_size), with the same log line; and leaves no files of a training run behind, which would refuse
    the next probe in its workdir."""
    import jax
    from PIL import Image

    sys.path.insert(0, str(TESTS.parent))
    import train

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        (images / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(images / name / f"{i}.png")
    workdir = tmp_path / "probe"
    argv = ["--model", "resnet18", "--dataset", str(images), "--image-size", "16", "--linear-probe",
            "logreg", "--no-progress", "--workdir", str(workdir), "--compile-cache", ""]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    fits = metrics["num_train"] // jax.device_count() * jax.device_count()
    assert metrics["num_train"] + metrics["num_val"] == 24 and metrics["num_train"] < 128
    assert (f"--batch-size {fits} instead of the default 128, more than the {metrics['num_train']} training "
            f"examples (") in out
    config = json.loads((workdir / "config.json").read_text())
    assert (config["batch_size"], config["eval_batch_size"]) == (fits, fits)
    # No files of a training run (an empty checkpoints/ and metrics.jsonl were): another probe may use the workdir.
    assert sorted(p.name for p in workdir.iterdir()) == sorted([LOCK_FILE, "config.json", FEATURES_FILE,
                                                                CLASSIFIER_FILE, METRICS_FILE, INDEX_DIR])
