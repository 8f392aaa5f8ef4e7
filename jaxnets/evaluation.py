"""The one evaluation core: a model's eval-mode forward pass over padded batches split over a device mesh, each
real example's outputs (top-k, probabilities, loss) back on the host, and the numbers computed from them.

Every evaluation goes through here: ``train.py``'s validation (``validate``), ``jaxnets-evaluate``
(``jaxnets.evaluate.run``: ``make_eval_step`` and ``run_pass``), the linear probe's features and ``jaxnets.predict``
(``make_forward`` and ``pad_rows``). A batch is padded to a fixed size, so the forward pass compiles once, with a
mask of its real rows; only those rows come back (``run_pass``, or the caller's ``[:count]``).

The metrics are pure numpy over per-example records, so every figure is a count over examples a test can recount:
top-1, top-5, the mean cross-entropy, the confusion matrix, and for multi-label models scikit-learn's mAP, F1 and
exact match.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxnets import host, kernels, parallel
from jaxnets.losses import binary_cross_entropy, cross_entropy

PyTree = Any
Batch = dict[str, np.ndarray]
TOP_K = 5  # predictions recorded per example; top-5 accuracy needs 5 outputs
THRESHOLD = 0.5  # a multi-label model predicts a class when its sigmoid probability reaches this


# --- the forward pass ---------------------------------------------------------------------------------------


def _outputs(apply_fn: Callable, variables: PyTree, images: jax.Array, pre_logits: bool = False) -> jax.Array:
    """Eval-mode outputs in float32 (logits, or the pooled features before the classifier): never aux heads."""
    return apply_fn(variables, images, train=False, **({"pre_logits": True} if pre_logits else {})).astype(jnp.float32)


def jit_over_mesh(function: Callable, mesh: Any | None) -> Callable:
    """``function(variables, batch)`` jitted under the kernel choice current now (``jaxnets.kernels``): without
    a mesh on the default device, with one the variables replicated and the batch split over it, the result
    replicated (every process gets every row)."""
    if mesh is None:
        return jax.jit(kernels.bind(function), compiler_options=host.xla_cpu_options())
    # jaxnets' meshes have one axis (parallel.make_mesh); another mesh (the probe takes any) splits over all of its.
    split = (parallel.batch_sharding(mesh) if tuple(mesh.axis_names) == (parallel.DATA_AXIS,)
             else NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    replicated = parallel.replicated(mesh)
    return jax.jit(kernels.bind(function), in_shardings=(replicated, split), out_shardings=replicated,
                   compiler_options=host.xla_cpu_options())


def make_forward(apply_fn: Callable, mesh: Any | None = None, *,
                 pre_logits: bool = False) -> Callable[[PyTree, np.ndarray], jax.Array]:
    """``forward(variables, images) -> float32 outputs``: logits, or with ``pre_logits`` the pooled features;
    compiled once per batch shape. ``apply_fn`` is a model's ``apply``."""
    return jit_over_mesh(lambda variables, images: _outputs(apply_fn, variables, images, pre_logits), mesh)


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` with zero rows appended up to ``size``: every batch of a pass has one shape (one compilation);
    the caller keeps the first ``len(rows)`` results."""
    if len(rows) > size:
        raise ValueError(f"{len(rows)} rows exceed the padded size {size}")
    return np.pad(rows, [(0, size - len(rows))] + [(0, 0)] * (rows.ndim - 1))


def make_eval_step(apply_fn: Callable, mesh: Any, k: int, *, multi_label: bool = False) -> Callable:
    """``step(variables, batch) -> outputs``: each example's ``label``, ``mask``, its ``k`` best outputs ``top``
    (best first) with their softmax probabilities ``prob``, and its cross-entropy ``loss``, replicated to every
    process. ``multi_label``: ``label`` (the multi-hot targets), ``mask``, ``logits`` and the binary cross-entropy
    instead (the metrics need every score)."""

    def step(variables: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = _outputs(apply_fn, variables, batch["image"])
        labels = batch["label"]
        if multi_label:
            return {"label": labels, "mask": batch["mask"], "logits": logits,
                    "loss": binary_cross_entropy(logits, labels)}
        top_logits, top = jax.lax.top_k(logits, k)
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return {"label": labels, "mask": batch["mask"], "top": top, "prob": jnp.exp(top_logits - log_norm),
                "loss": cross_entropy(logits, labels)}

    return jit_over_mesh(step, mesh)


def run_pass(step: Callable, variables: PyTree, batches: Iterable[Batch], mesh: Any, *,
             on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Every batch (this process's share of each global batch, with its ``mask``) through ``step``, the next
    ones loading and on their way to the devices meanwhile: the outputs of the real examples, in order (an
    empty dict for no batches). ``on_batch(n)`` is called as each batch's ``n`` real examples arrive."""
    parts: list[dict[str, np.ndarray]] = []
    pending: deque = deque()

    def collect(outputs: dict[str, jax.Array]) -> None:
        out = parallel.to_host(outputs)
        keep = out.pop("mask").astype(bool)
        parts.append({name: value[keep] for name, value in out.items()})
        if on_batch is not None:
            on_batch(int(keep.sum()))

    for batch in parallel.prefetch_to_mesh(batches, mesh):
        pending.append(step(variables, batch))
        if len(pending) > 1:  # fetch the previous batch's outputs while this one computes
            collect(pending.popleft())
    while pending:
        collect(pending.popleft())
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}


# --- top-k ----------------------------------------------------------------------------------------------------


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The columns of the ``k`` highest scores of each row, highest first (ties: the lower column first, as
    ``jax.lax.top_k``)."""
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :k]


def in_top(top: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether each row's label is among its ``top`` (k best outputs)."""
    return np.any(top == np.asarray(labels)[:, None], axis=1)


# --- the numbers -----------------------------------------------------------------------------------------------


@dataclass
class Records:
    """One row per evaluated example, in evaluation order: ``label`` (the model's output index of its class),
    ``top`` (the k best outputs, best first), their softmax probabilities ``prob``, and its cross-entropy."""

    label: np.ndarray  # int (N,)
    top: np.ndarray  # int (N, k)
    prob: np.ndarray  # float32 (N, k)
    loss: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def of(cls, outputs: dict[str, np.ndarray]) -> Records:
        """The records in ``run_pass``'s outputs of a single-label step (none: no batches)."""
        if not outputs:
            return cls(*(np.zeros((0,) + shape) for shape in ((), (1,), (1,), ())))
        return cls(outputs["label"], outputs["top"], outputs["prob"], outputs["loss"])

    @classmethod
    def concatenate(cls, parts: Sequence[Records]) -> Records:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("label", "top", "prob", "loss")))

    @property
    def predicted(self) -> np.ndarray:
        return self.top[:, 0]

    @property
    def in_top5(self) -> np.ndarray:
        return in_top(self.top[:, :TOP_K], self.label)


def summary(records: Records, num_outputs: int) -> dict[str, float | int]:
    """top-1, top-5 (with 5 outputs or more), mean cross-entropy, and the number of examples."""
    if not len(records):
        return {"count": 0}
    metrics: dict[str, float | int] = {"top1": float(np.mean(records.predicted == records.label))}
    if num_outputs >= TOP_K:
        metrics["top5"] = float(np.mean(records.in_top5))
    metrics["loss"] = float(np.mean(records.loss, dtype=np.float64))
    metrics["count"] = len(records)
    return metrics


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, ``num_classes`` square."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def multi_label_metrics(targets: np.ndarray, logits: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """``map``: the mean over classes of scikit-learn's average precision, over the classes with a positive
    example (a class with none has no precision-recall curve; no such class: 0); ``f1`` (macro over all classes,
    0 where undefined) and ``f1_micro`` at sigmoid probability ``threshold``; ``exact_match``: the predicted set
    of classes is the true one."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score  # on first use: seconds to import

    targets = np.asarray(targets, bool)
    logits = np.asarray(logits, np.float64)
    predicted = 1.0 / (1.0 + np.exp(-logits)) >= threshold
    per_class = [average_precision_score(targets[:, c], logits[:, c]) for c in np.flatnonzero(targets.any(axis=0))]
    return {"map": float(np.mean(per_class)) if per_class else 0.0,
            "f1": float(f1_score(targets, predicted, average="macro", zero_division=0)),
            "f1_micro": float(f1_score(targets, predicted, average="micro", zero_division=0)),
            "exact_match": float(accuracy_score(targets, predicted))}


def validate(step: Callable, variables: PyTree, batches: Iterable[Batch], mesh: Any, num_classes: int, *,
             multi_label: bool = False) -> tuple[dict[str, float], np.ndarray | None]:
    """``train.py``'s evaluation of a split with ``make_eval_step``'s ``step``: the mean loss, top-1 (and top-5
    with >= 5 classes) and the count, with the confusion matrix; for a multi-label step the loss,
    ``multi_label_metrics`` and the count, and no confusion matrix."""
    outputs = run_pass(step, variables, batches, mesh)
    if not outputs:
        raise ValueError("validate: no batches to evaluate")
    if multi_label:
        loss = float(np.mean(outputs["loss"], dtype=np.float64))
        return {"loss": loss, **multi_label_metrics(outputs["label"], outputs["logits"]),
                "count": len(outputs["loss"])}, None
    records = Records.of(outputs)
    metrics = summary(records, num_classes)  # its loss is the same mean: first, as the multi-label one
    return {"loss": metrics.pop("loss"), **metrics}, confusion_matrix(records.label, records.predicted, num_classes)
