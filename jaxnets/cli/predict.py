"""``jaxnets-predict`` (``python -m jaxnets.predict``): the top-K classes of each image, or with multi-label
weights every class above ``--threshold``; the work is ``jaxnets.predict``.

With ``--cam METHOD --cam-dir DIR`` it also writes each image's class activation map (``jaxnets.explain``) for its
top class, laid over the image at its original size, as ``DIR/<stem>.<method>.png``.

A user error (a missing weights file, backbone weights) is one line on stderr and exit status 1, as is a file
that cannot be read as an image (the others are still classified); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from jaxnets import errors, explain, predict
from jaxnets.data.pil_eval import READ_ERRORS
from jaxnets.errors import UserError
from jaxnets.eval_transform import EVAL_SIZES, EvalTransform
from jaxnets.evaluation import THRESHOLD
from jaxnets.predict import classification
from jaxnets.weights import instantiate


def build_parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog=errors.command("predict"),
                                   description="Top-K ImageNet (or fine-tuned) classes of each image.")
    parser.add_argument("--model", help="model name, e.g. resnet50 (see jaxnets.list_models()); default: the one "
                                        "the --weights file records (needed for torchvision's weights)")
    parser.add_argument("--weights", help="jaxnets weights file, or torchvision's weights by name (IMAGENET1K_V2; "
                                          "default: IMAGENET1K_V1), converted into the cache on first use")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, metavar="P",
                        help=f"multi-label weights (train.py --multi-label): show every class whose sigmoid "
                             f"probability reaches P, instead of the top K (default {THRESHOLD})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--eval-size", choices=EVAL_SIZES, default="default",
                        help="for weights converted from timm's: its input size and crop_pct (default), or its "
                             "test_input_size and test_crop_pct (test)")
    parser.add_argument("--cam", choices=list(explain.METHODS), metavar="METHOD",
                        help=f"also write each image's class activation map for its top class, over the image, "
                             f"into --cam-dir: one of {', '.join(explain.METHODS)}")
    parser.add_argument("--cam-dir", metavar="DIR", help="where --cam writes <image stem>.<METHOD>.png")
    parser.add_argument("--cam-layer", metavar="NODE",
                        help="the torchvision node --cam explains (layer4, features.42, inception5b, ...; default: "
                             "the model's last feature level)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.top < 1 or args.batch_size < 1:
        parser.error("--top and --batch-size must be at least 1")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.cam is None and (args.cam_dir is not None or args.cam_layer is not None):
        errors.print_error(prog, f"{'--cam-dir' if args.cam_dir is not None else '--cam-layer'} needs --cam METHOD")
        return errors.USAGE_STATUS
    if args.cam is not None and args.cam_dir is None:
        errors.print_error(prog, f"--cam {args.cam} needs --cam-dir DIR (where the pictures go)")
        return errors.USAGE_STATUS
    try:
        weights_file = predict.open_weights(args.model, args.weights)
        model, variables = instantiate(weights_file)
        if getattr(model, "features_only", False):
            raise UserError(f"{weights_file.path}: {weights_file.name} backbone weights (features_only): no classifier "
                            f"to classify with")
        transform = predict.eval_transform(weights_file.name, weights_file, args.eval_size)
        if args.cam is not None:
            check_cam_layer(model, weights_file.name, args.cam_layer)
    except (OSError, UserError) as exc:  # anything else is a bug in jaxnets: its traceback shows
        errors.print_error(prog, str(exc))
        return errors.USAGE_STATUS
    categories = predict.category_names(weights_file)
    multi_label = predict.is_multi_label(weights_file)
    forward = predict.make_forward(model)
    variables = jax.device_put(variables)
    batch_size = min(args.batch_size, len(args.images))
    failed = 0
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []  # --cam: (path, model input, logits) of each readable image
    for paths in predict.chunks(args.images, batch_size):
        readable, arrays = [], []
        for path in paths:
            try:
                arrays.append(predict.load_input(path, transform))
                readable.append(path)
            except READ_ERRORS as exc:
                errors.print_error(prog, f"{path}: cannot read image ({exc})")
                failed += 1
        if not arrays:
            continue
        logits = predict.batch_logits(forward, variables, np.stack(arrays), batch_size)
        answers = (predict.above_threshold(logits, args.threshold, categories) if multi_label
                   else predict.top_k(logits, args.top, categories))
        if args.cam is not None:
            kept.extend(zip(readable, arrays, logits, strict=True))
        for path, best in zip(readable, answers, strict=True):
            print(path)
            for category, probability in best:
                print(f"  {probability:7.4f}  {category}")
            if not best:
                print(f"  (no class at probability {args.threshold:g} or more)")
    if kept:
        try:
            for path in write_cams(model, variables, kept, args, transform, categories, multi_label):
                print(f"wrote {path}")
        except (OSError, UserError) as exc:  # a storage failure (fileio.StorageError), an image changed on disk
            errors.print_error(prog, str(exc))
            return errors.USAGE_STATUS
    if failed:
        errors.print_error(prog, f"{failed} of {len(args.images)} image(s) could not be read")
    return errors.USAGE_STATUS if failed else 0


def check_cam_layer(model: nn.Module, name: str, layer: str | None) -> None:
    """``--cam-layer`` must be one of the model's feature nodes: said here, so the error names the flag."""
    nodes = explain.target_nodes(model)
    if layer is not None and layer not in nodes:
        raise UserError(f"--cam-layer {layer}: not a feature node of {name}; choose one of {', '.join(nodes)}")


def write_cams(model: nn.Module, variables: Any, kept: Sequence[tuple[str, np.ndarray, np.ndarray]],
               args: argparse.Namespace, transform: EvalTransform, categories: Sequence[str],
               multi_label: bool) -> Iterator[Path]:
    """The overlay of each kept image's map for its top class (multi-label too), written into ``--cam-dir``; yields
    each file once written.
    All maps come from one ``explain.cam`` call, so a short last chunk compiles nothing more."""
    paths, inputs, logits = zip(*kept, strict=True)
    logits = np.stack(logits)
    targets = np.argmax(logits, axis=-1)
    probs = predict.sigmoid(logits) if multi_label else predict.softmax(logits)
    maps = explain.cam(model, variables, np.stack(inputs), args.cam, args.cam_layer, targets,
                       batch_size=args.batch_size)
    for path, name, cam_map, target, row in zip(paths, classification.cam_file_names(paths, args.cam), maps, targets,
                                                probs, strict=True):
        picture = explain.overlay(classification.cam_background(path, transform), cam_map,
                                  explain.caption(categories[target], float(row[target])), transform=transform)
        yield classification.write_png(Path(args.cam_dir) / name, picture)
