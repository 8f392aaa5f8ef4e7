"""What an evaluation leaves behind and shows: ``eval.json`` (the metrics, per-class accuracy, the most
confused pairs and every image's top-5), ``eval_confusion_matrix.png``, and tables on stdout."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from jaxnets.eval_transform import EvalTransform
from jaxnets.evaluate import metrics as m
from jaxnets.evaluate.inputs import EvalData
from jaxnets.evaluation import Records
from jaxnets.fileio import write_text
from jaxnets.predict.classification import write_png
from jaxnets.run_io import plot_confusion

REPORT_FILE = "eval.json"
CONFUSION_FILE = "eval_confusion_matrix.png"  # not train.py's confusion_matrix.png, which a run directory holds
CAM_FILES = {"mistakes": "cam_mistakes.png", "hits": "cam_hits.png"}  # --cam-errors' contact sheets
SHOWN_CLASSES = 30  # per-class rows printed: all up to this many classes, else the worst this many


def build(about: dict[str, Any], names: Sequence[str], data: EvalData, records: Records, metrics: dict[str, Any],
          *, preprocess: str, transform: EvalTransform, images_per_second: float | None, seconds: float,
          devices: int) -> dict[str, Any]:
    """The content of ``eval.json``: ``about`` the weights (model, file, hashes, torchvision's version and
    published accuracy), then the evaluation; ``names``: the model's class names, one per output."""
    num_outputs = len(names)
    predictions = []
    for index in range(len(records)):
        row: dict[str, Any] = {"index": index}
        file = data.describe(index)
        if file is not None:
            row["file"] = file
        row["label"] = int(records.label[index])
        row["top5"] = [[int(c), round(float(p), 6)] for c, p in zip(records.top[index], records.prob[index],
                                                                      strict=True)]
        predictions.append(row)
    return {
        **about,
        "dataset": data.name, "split": data.split_name, "preprocess": preprocess,
        "eval_transform": transform.as_dict(),
        "notes": data.notes, "metrics": metrics, "devices": devices, "seconds": round(seconds, 3),
        "images_per_second": None if images_per_second is None else round(images_per_second, 2),
        "per_class": m.per_class(records, names, num_outputs),
        "most_confused": m.most_confused(records, names),
        "predictions": predictions,
    }


def write(output: Path, payload: dict[str, Any], records: Records, names: Sequence[str]) -> None:
    """``eval.json`` and the confusion matrix image into ``output``."""
    write_text(output / REPORT_FILE, json.dumps(payload, indent=1) + "\n")
    if len(records):
        matrix, labels = m.confusion(records, names)
        plot_confusion(matrix, labels, output / CONFUSION_FILE)


def show(payload: dict[str, Any], output: Path | None) -> None:
    """The summary, the per-class table and the most confused pairs, on stdout."""
    for note in payload["notes"]:
        print(note)
    metrics = payload["metrics"]
    if not metrics.get("count"):
        print("no images evaluated")
        return
    line = (f"{payload['model']} on {payload['dataset']} ({payload['split']}, {metrics['count']} images, "
            f"--preprocess {payload['preprocess']}): top-1 {100 * metrics['top1']:.3f} %")
    if "top5" in metrics:
        line += f", top-5 {100 * metrics['top5']:.3f} %"
    rate = payload["images_per_second"]
    line += f", loss {metrics['loss']:.4f}; " + (f"{rate:.1f} images/s" if rate is not None else
                                                 f"{payload['seconds']:.1f} s in one batch, compiling included: "
                                                 "too few images to time")
    print(line)
    if payload["published"]:
        print(f"torchvision publishes {payload['torchvision_weights']}: acc@1 {payload['published']['acc1']:.3f} %, "
              f"acc@5 {payload['published']['acc5']:.3f} % (ImageNet-1k val, 50000 images)")
    rows = payload["per_class"]
    if len(rows) > SHOWN_CLASSES:
        rows = sorted(rows, key=lambda r: (r["top1"], r["index"]))[:SHOWN_CLASSES]
        print(f"the {SHOWN_CLASSES} classes of lowest top-1 accuracy:")
    print(_table(["class", "images", "top-1 %"] + (["top-5 %"] if "top5" in metrics else []),
                 [[r["class"], r["count"], f"{100 * r['top1']:.1f}"] + ([f"{100 * r['top5']:.1f}"] if "top5" in r
                                                                          else []) for r in rows]))
    if payload["most_confused"]:
        print("most confused (true -> predicted):")
        print(_table(["true", "predicted", "images", "of"],
                     [[p["true"], p["predicted"], p["count"], p["of"]] for p in payload["most_confused"][:10]]))
    if output is not None:
        print(f"report: {output / REPORT_FILE}; confusion matrix: {output / CONFUSION_FILE}")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, the first column left-aligned, the others right-aligned."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                   strict=True)))
                     for row in cells)


def write_cam_sheets(output: Path, sheets: dict[str, Image.Image]) -> list[Path]:
    """``--cam-errors``' contact sheets (``run.cam_sheets``) into ``output`` as ``CAM_FILES`` names them."""
    return [write_png(output / CAM_FILES[group], sheet) for group, sheet in sheets.items()]
