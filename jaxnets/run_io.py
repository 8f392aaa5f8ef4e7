"""What a training run leaves behind and shows: ``config.json``, ``metrics.jsonl``, ``curves.png``,
``confusion_matrix.png``, ``gradients.png`` (with ``--log-grad-norms``), a progress bar per epoch and one summary
line per epoch.

Only the main process writes or prints (``enabled=False`` elsewhere); every other method is then a no-op.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets.errors import is_int
from jaxnets.fileio import atomic_path, write_text, writing

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
GRADIENTS_FILE = "gradients.png"
GRAD_NORM = "grad_norm/"  # a train record's key for a stage's gradient norm: grad_norm/layer1, grad_norm/features.3


def grad_norm_key(stage: str) -> str:
    """The ``metrics.jsonl`` key of a stage's gradient L2 norm (``--log-grad-norms``)."""
    return GRAD_NORM + stage


class RunLog:
    """The run directory's logs. ``resume_step`` drops records past the step a run resumes from, so an
    interrupted-and-resumed run's ``metrics.jsonl`` reads like an uninterrupted one; ``metrics=False``: a run that
    logs no records (the linear probe), whose directory then has no ``metrics.jsonl``."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: int = 0, title: str = "",
                 metrics: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.title = title  # names the run in the plots: "resnet34 on digits"
        self.metrics_path = self.run_dir / METRICS_FILE
        if not enabled:
            return
        with writing(self.run_dir, "the run directory"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if not metrics:  # a run without metrics records (the linear probe) leaves no metrics.jsonl
            return
        # Records past the resumed step go; a line that is no record stays as it was (read_metrics reports it).
        kept = [line for line, record in _metrics_lines(self.metrics_path)
                if record is None or record["step"] <= resume_step]
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def write_config(self, config_json: str) -> None:
        if self.enabled:
            write_text(self.run_dir / CONFIG_FILE, config_json)

    def log(self, step: int, epoch: float, split: str, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``: ``step``, ``epoch``, ``split`` ('train' | 'val' | 'val_ema', the EMA of
        the weights) and the metrics."""
        if not self.enabled:
            return
        record = {"step": int(step), "epoch": round(float(epoch), 4), "split": split,
                  **{k: _jsonable(v) for k, v in metrics.items()}}
        with writing(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, confusion: np.ndarray | None = None, class_names: Sequence[str] = ()) -> None:
        """``curves.png`` from ``metrics.jsonl``, ``gradients.png`` when the records have gradient norms, and, given
        a final confusion matrix, ``confusion_matrix.png``."""
        if not self.enabled:
            return
        records = read_metrics(self.metrics_path)
        plot_curves(records, self.run_dir / CURVES_FILE, self.title)
        if gradient_series(records):
            plot_gradients(records, self.run_dir / GRADIENTS_FILE, self.title)
        if confusion is not None:
            plot_confusion(confusion, class_names, self.run_dir / CONFUSION_FILE)


class Progress:
    """A tqdm bar for one epoch with loss, images/s and ETA (on the main process, if enabled)."""

    def __init__(self, epoch: int, epochs: int, total: int, initial: int, batch_size: int, enabled: bool):
        from tqdm.auto import tqdm

        self.batch_size = batch_size
        self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                        dynamic_ncols=True, leave=False, disable=not enabled, file=sys.stderr)
        self.start, self.steps = time.perf_counter(), 0

    def update(self, steps: int, loss: float | None = None) -> None:
        self.steps += steps
        self.bar.update(steps)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.images_per_second:.0f}", refresh=False)

    @property
    def images_per_second(self) -> float:
        return self.steps * self.batch_size / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()


def epoch_summary(epoch: int, epochs: int, step: int, train: dict[str, float], val: dict[str, float],
                  images_per_second: float, seconds: float, ema: dict[str, float] | None = None) -> str:
    """``epoch 3/12  step 66  train loss 0.512 acc 85.1%  val loss 0.321 top1 95.3% top5 99.7%  1200 img/s  12.3s``;
    with an EMA of the weights, its evaluation after the weights' (``ema loss 0.300 top1 95.9%``)."""
    parts = [f"epoch {epoch}/{epochs}", f"step {step}"]
    if train:
        parts.append(f"train loss {train['loss']:.4f}" + (f" acc {100 * train['accuracy']:.1f}%"
                                                          if "accuracy" in train else ""))
    parts.append(f"val loss {val['loss']:.4f} {_scores(val)}")
    if ema:
        parts.append(f"ema loss {ema['loss']:.4f} {_scores(ema)}")
    parts += [f"{images_per_second:.0f} img/s", f"{seconds:.1f}s"]
    return "  ".join(parts)


# What an evaluation reports, in order: single-label top-k, or multi-label scores
# (jaxnets.evaluation.multi_label_metrics).
SCORES = (("top1", "top1"), ("top5", "top5"), ("map", "mAP"), ("f1", "F1"), ("exact_match", "exact"))


def _scores(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {100 * metrics[key]:.2f}%" for key, name in SCORES if key in metrics)


def headline_score(metrics: dict[str, float]) -> tuple[str, float]:
    """The score a run is judged by, with its name: ``("top1", x)``, or (multi-label) ``("map", x)``."""
    name = "top1" if "top1" in metrics else "map"
    return name, float(metrics[name])


def headline_metric(metrics: dict[str, float]) -> float:
    """The number a run is judged by (``headline_score``): what picks the best checkpoint."""
    return headline_score(metrics)[1]


def headline(metrics: dict[str, float], *, full: bool = True) -> str:
    """``val top1 97.50% top5 99.72%`` or (multi-label) ``val mAP 81.20% F1 ...``: a final report's scores
    (``full=False``: the first only)."""
    scores = _scores(metrics)
    return f"val {scores if full else ' '.join(scores.split()[:2])}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``. A line that is no record (one cut short when the run was killed, or the
    disk filled, while appending it; or one edited by hand) is left out of the list, never out of the file: it
    is reported once, on stderr, as ``path:line``."""
    return [record for _, record in _metrics_lines(path) if record is not None]


_reported: set[tuple[str, int, bytes]] = set()  # the bad lines already reported by this process


def _metrics_lines(path: str | Path) -> list[tuple[bytes, dict[str, Any] | None]]:
    """Each non-blank line of ``metrics.jsonl`` as it is on disk, with its record (None for a line that is no
    record, reported once)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not (isinstance(record, dict) and is_int(record.get("step")) and isinstance(record.get("split"), str)):
            record = None
            if (str(path), number, line) not in _reported:
                _reported.add((str(path), number, line))
                shown = line[:80].decode("utf-8", errors="replace") + ("..." if len(line) > 80 else "")
                print(f"warning: {path}:{number}: not a metrics record, skipped (kept in the file): {shown}",
                      file=sys.stderr, flush=True)
        lines.append((line, record))
    return lines


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Loss (train and val) and accuracy (train, val top-1, val top-5) against steps."""
    _save(curves_figure(records, title), path)


def curves_figure(records: list[dict[str, Any]], title: str = ""):
    """The figure of ``plot_curves``. Losses on a log scale: one early spike (a first-epoch validation loss of
    180) would otherwise flatten every other loss line against zero. The title names the run (``title``) and
    its best validation top-1."""
    fig, (ax_loss, ax_acc) = _figure(1, 2, (11, 4))
    for split, key, axis, label in (("train", "loss", ax_loss, "train loss"), ("val", "loss", ax_loss, "val loss"),
                                    ("val_ema", "loss", ax_loss, "val loss (EMA)"),
                                    ("train", "accuracy", ax_acc, "train top-1 (batch)"),
                                    ("val", "top1", ax_acc, "val top-1"), ("val", "top5", ax_acc, "val top-5"),
                                    ("val_ema", "top1", ax_acc, "val top-1 (EMA)"), ("val", "map", ax_acc, "val mAP"),
                                    ("val", "f1", ax_acc, "val F1"), ("val_ema", "map", ax_acc, "val mAP (EMA)")):
        points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if split != "train" else None, markersize=3, label=label)
    for axis, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    losses = [r["loss"] for r in records if "loss" in r]
    if losses and min(losses) > 0 and all(np.isfinite(losses)):
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss (log scale)")
    key, name = ("map", "mAP") if any("map" in r for r in records) else ("top1", "top-1")
    best = max((r for r in records if r["split"] == "val" and key in r), key=lambda r: r[key], default=None)
    if best is not None:
        title = f"{title}: " if title else ""
        title += f"best val {name} {100 * best[key]:.2f}% (step {best['step']})"
    if title:
        fig.suptitle(title)
    return fig


def gradient_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Stage -> (steps, gradient norms) of the train records (``--log-grad-norms``), the stages in the order the
    records name them (the forward order)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if record["split"] != "train":
            continue
        for key, value in record.items():
            if key.startswith(GRAD_NORM):
                steps, values = series.setdefault(key[len(GRAD_NORM):], ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def plot_gradients(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Each stage's gradient L2 norm against steps, on a log axis (``gradients_figure``)."""
    _save(gradients_figure(records, title), path)


def gradients_figure(records: list[dict[str, Any]], title: str = ""):
    """The figure of ``plot_gradients``: one line per stage, coloured from the input (dark) to the classifier
    (light), so that a gradient vanishing with depth from the loss shows as dark lines below light ones. A norm of
    0 (a frozen stage) is left out: a log axis has no place for it."""
    import matplotlib

    series = gradient_series(records)
    fig, (axis,) = _figure(1, 1, (9, 4.5))
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(series), 1)))
    for colour, (stage, (steps, values)) in zip(colours, series.items(), strict=False):
        values = np.where(np.asarray(values, float) > 0, values, np.nan)
        axis.plot(steps, values, color=colour, label=stage)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("gradient L2 norm (log scale)")
    axis.grid(alpha=0.3, which="both")
    if axis.lines:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    axis.set_title(f"{title}: gradient norm per stage" if title else "gradient norm per stage")
    return fig


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Row-normalized confusion matrix (true class -> predicted class); counts written when it is small."""
    confusion = np.asarray(confusion)
    k = confusion.shape[0]
    size = min(4 + 0.4 * k, 20)
    fig, (axis,) = _figure(1, 1, (size, size))
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=axis, fraction=0.046)
    if k <= 30:
        names = list(class_names) or [str(i) for i in range(k)]
        axis.set_xticks(range(k), names, rotation=90)
        axis.set_yticks(range(k), names)
        for i, j in zip(*np.nonzero(confusion), strict=True):
            axis.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                      color="white" if rates[i, j] > 0.5 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"validation: {int(np.trace(confusion))}/{int(confusion.sum())} correct")
    _save(fig, path)


def _figure(rows: int, cols: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, list(axes.ravel())


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the temporary name does not end in .png
    finally:
        plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.item() if np.ndim(value) == 0 else value.tolist()
    return value
