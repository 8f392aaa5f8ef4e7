"""Linear probe: a frozen backbone's pooled pre-logit features + a scikit-learn linear classifier.

The original AlexNet + SVM transfer recipe: features are extracted once (jitted, batched, data-parallel
over a mesh: ``jaxnets.evaluation``), standardized, and fed to ``LinearSVC`` or ``LogisticRegression``.
``run_linear_probe`` is ``train.py --linear-probe``: the same on a run's data, with its results in the workdir.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import joblib
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from jaxnets import evaluation, kernels, parallel
from jaxnets.checkpointing import CHECKPOINTS_DIR, Checkpointer
from jaxnets.config import TrainConfig
from jaxnets.errors import UserError
from jaxnets.run_io import METRICS_FILE as RUN_METRICS_FILE
from jaxnets.run_io import RunLog
from jaxnets.run_setup import batch_fits_data, build_model, owned_workdir, setup, start

PROBES = ("svm", "logreg")
FEATURES_FILE = "probe_features.npz"
CLASSIFIER_FILE = "probe_classifier.joblib"
METRICS_FILE = "probe_metrics.json"


def extract_features(model: nn.Module, variables: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled pre-logit features (float32) and labels of every example in ``batches``.

    Every batch is padded to one fixed size (a multiple of the mesh size), so the forward pass compiles
    once; the padding rows are dropped again (``jaxnets.evaluation``). With a ``mesh`` the batch is split over
    all its devices and the variables are replicated (single-process meshes).
    """
    devices = mesh.devices.size if mesh is not None else 1
    forward = _pre_logits(model, mesh, kernels.current())
    # Placed once: numpy variables would otherwise be copied to the device on every batch.
    variables = jax.device_put(variables, parallel.replicated(mesh) if mesh is not None else None)

    outputs, labels = [], []
    padded_size = 0
    for index, batch in enumerate(batches):
        images, batch_labels = _unpack(batch, index)
        n = images.shape[0]
        padded_size = max(padded_size, math.ceil(n / devices) * devices)
        # Dispatched asynchronously: the next batch is prepared while this one runs.
        outputs.append((forward(variables, evaluation.pad_rows(images, padded_size)), n))
        labels.append(batch_labels)
    if not outputs:
        raise UserError("extract_features: no batches")
    return np.concatenate([np.asarray(out)[:n] for out, n in outputs]), np.concatenate(labels)


@functools.cache
def _pre_logits(model: nn.Module, mesh: Mesh | None,
                choice: kernels.KernelChoice) -> Callable[[Any, np.ndarray], jax.Array]:
    """The jitted feature extractor of ``model`` under the kernel ``choice``: compiled once per model, mesh, choice
    and batch shape."""
    with kernels.using(choice):
        return evaluation.make_forward(model.apply, mesh, pre_logits=True)


def linear_probe(model: nn.Module, variables: Any, train_batches: Iterable, val_batches: Iterable, *,
                 kind: str = "svm", out_dir: str | Path | None = None, seed: int = 0,
                 mesh: Mesh | None = None) -> dict[str, float | int]:
    """Fit a linear classifier on frozen features; validation top-1 (and top-5 with >= 5 classes).

    With ``out_dir``, saves the features (``probe_features.npz``), the fitted scaler + classifier
    (``probe_classifier.joblib``, scikit-learn's recommended persistence) and the metrics (``probe_metrics.json``).
    """
    classifier = make_classifier(kind, seed)
    x_train, y_train = extract_features(model, variables, train_batches, mesh=mesh)
    x_val, y_val = extract_features(model, variables, val_batches, mesh=mesh)
    if not np.all(np.isfinite(x_train)) or not np.all(np.isfinite(x_val)):
        raise UserError("linear probe: the backbone produced non-finite features")
    classifier.fit(x_train, y_train)
    metrics: dict[str, float | int] = {"top1": topk_accuracy(classifier, x_val, y_val, 1)}
    if len(classifier.classes_) >= 5:
        metrics["top5"] = topk_accuracy(classifier, x_val, y_val, 5)
    metrics.update(num_train=len(y_train), num_val=len(y_val), feature_dim=int(x_train.shape[1]))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / FEATURES_FILE, train_features=x_train, train_labels=y_train,
                 val_features=x_val, val_labels=y_val)
        joblib.dump(classifier, out / CLASSIFIER_FILE)
        (out / METRICS_FILE).write_text(json.dumps({"kind": kind, **metrics}, indent=2) + "\n")
    return metrics


def make_classifier(kind: str, seed: int = 0) -> Pipeline:
    """Standardize, then a linear classifier: features of different layers differ in scale by orders
    of magnitude, and both solvers converge far better on unit-variance inputs."""
    if kind == "svm":
        linear = LinearSVC(C=1.0, max_iter=5000, random_state=seed)
    elif kind == "logreg":
        linear = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    else:
        raise UserError(f"unknown linear probe {kind!r}; choose one of {', '.join(PROBES)}")
    return make_pipeline(StandardScaler(), linear)


def topk_accuracy(classifier: Pipeline, features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the ``k`` highest decision scores."""
    if k == 1:
        return float(np.mean(classifier.predict(features) == labels))
    top = classifier.classes_[evaluation.top_k_indices(classifier.decision_function(features), k)]
    return float(np.mean(evaluation.in_top(top, labels)))


def _unpack(batch: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        images, labels = batch
    except (TypeError, ValueError):
        raise UserError(f"batch {index}: expected an (images, labels) pair, got {type(batch).__name__}") from None
    images = np.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise UserError(f"batch {index}: images are {images.dtype}; the probe needs normalized float images "
                        "(the weights' transforms mean/std, as jaxnets.data produces)")
    images = images.astype(np.float32)
    if images.ndim != 4 or len(labels) != images.shape[0]:
        raise UserError(f"batch {index}: expected NHWC images and one label per image, "
                        f"got images {images.shape} and {len(labels)} labels")
    return images, np.asarray(labels)


def run_linear_probe(config: TrainConfig) -> dict[str, float]:
    """``--linear-probe svm|logreg``: fit a linear classifier on the frozen model's pre-logit features of
    the (eval-transformed) training set and score it on the validation set; results in the workdir."""
    fit_batch = batch_fits_data(config)  # a default batch shrinks to a small dataset, as training's does
    config = start(config)
    with owned_workdir(Path(config.workdir).absolute(), enabled=parallel.is_main_process()) as opening:
        metrics = _run_linear_probe(config, fit_batch)
        opening.done()
        return metrics


def _run_linear_probe(config: TrainConfig, fit_batch: bool) -> dict[str, float]:
    config, mesh, dataset = setup(config, fit_batch=fit_batch)
    if jax.process_count() > 1:
        raise UserError("--linear-probe runs in a single process")
    workdir = Path(config.workdir).absolute()
    checkpoints = workdir / CHECKPOINTS_DIR  # opened only where it exists: a probe leaves no empty one behind
    if ((checkpoints.is_dir() and Checkpointer(checkpoints).latest_step() is not None)
            or (workdir / RUN_METRICS_FILE).exists()):
        raise UserError(f"--workdir {config.workdir} holds a training run; a linear probe would overwrite its logs, "
                        f"use another --workdir")
    run = RunLog(workdir, metrics=False)
    run.print(f"run directory: {workdir}")
    for note in dataset.notes:
        run.print(note)
    run.write_config(config.to_json())
    model, variables, note = build_model(config, dataset.num_classes, mesh)
    if note:
        run.print(note)
    metrics = linear_probe(model, variables, dataset.iterate("train"), dataset.iterate("val"),
                           kind=config.linear_probe, out_dir=workdir, seed=config.seed, mesh=mesh)
    run.print(f"linear probe ({config.linear_probe}) on {config.model} features: "
              + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics
