"""``jaxnets-evaluate`` (``python -m jaxnets.evaluate``): flags -> ``EvalConfig`` -> ``evaluate``.

A user error (a missing file, an unknown dataset, classes that match none of the model's) is one line on
stderr and exit status 1; anything else is a bug and keeps its traceback (``jaxnets.errors.run_cli``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxnets import errors, explain
from jaxnets.data.pil_eval import WORKER_KINDS
from jaxnets.eval_transform import EVAL_SIZES
from jaxnets.evaluate.inputs import PREPROCESS, SPLITS
from jaxnets.evaluate.run import DEFAULT_BATCH, EvalConfig, evaluate
from jaxnets.parallel import DISTRIBUTED
from jaxnets.registry import DEFAULT_WEIGHTS

DESCRIPTION = ("Evaluate weights on a dataset: top-1, top-5, loss, per-class accuracy, confusion matrix, and every "
               "image's top-5 in eval.json.")
EXAMPLES = """\
    {cmd} --model resnet50 --pretrained IMAGENET1K_V2 --dataset ~/imagenet/val   # 1000 synset folders
    {cmd} --model resnet50 --pretrained --dataset imagenet2012 --data-dir ~/tensorflow_datasets
    {cmd} --weights runs/resnet18-flowers            # a train.py run: its final weights on what it held out
    {cmd} --weights my_resnet18.safetensors --dataset photos/ --preprocess tf
    {cmd} --weights resnet50_a1_in1k.safetensors --dataset ~/imagenet/val --eval-size test   # timm's 288 px

Class folders are matched to the model's outputs by name: ImageNet's synset folders (n01440764, ...) to
ImageNet's outputs, a fine-tuned model's recorded class names to its own. --preprocess torchvision (the default
for torchvision's weights) decodes and resizes with PIL exactly as torchvision's weights.transforms(); tf is
train.py's tf.data pipeline (the default for train.py's weights). Weights converted from timm's are shown
timm's eval transform (their pretrained_cfg: crop_pct, bicubic, ...), pixel for pixel with --preprocess
torchvision.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The argument parser; its examples name the command as the user runs it (``errors.command``)."""
    parser = errors.ArgumentParser(prog=prog, description=DESCRIPTION,
                                   epilog=EXAMPLES.format(cmd=errors.command("evaluate")),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model name (see jaxnets.list_models()); with --weights, read from the file")
    parser.add_argument("--weights", metavar="FILE|RUN_DIR",
                        help="a jaxnets weights file, or a train.py run directory (its final weights, and by default "
                             "its dataset)")
    parser.add_argument("--pretrained", nargs="?", const=DEFAULT_WEIGHTS, metavar="NAME",
                        help=f"torchvision's weights by name (no value: {DEFAULT_WEIGHTS}; IMAGENET1K_V2; DEFAULT is "
                             "torchvision's alias for its best), from the cache, converted on first use")
    parser.add_argument("--dataset", help="a folder of class folders (ImageNet's val layout: 1000 synset folders), "
                                          "with train/ and val/ when present; 'digits'; or a TFDS name "
                                          "(imagenet2012, ...)")
    parser.add_argument("--data-dir", help="TFDS data dir (imagenet2012: the tars in DATA_DIR/downloads/manual)")
    parser.add_argument("--split", choices=SPLITS,
                        help="default: the validation split (a folder's val/, TFDS validation, the held-out part "
                             "of a dataset without one), for a train.py run directory on its own dataset always the "
                             "images it held out; else all images of a folder of class folders only")
    parser.add_argument("--preprocess", choices=PREPROCESS,
                        help="torchvision: PIL, identical pixels to torchvision's weights.transforms() (default for "
                             "torchvision's and other PyTorch weights); tf: train.py's tf.data pipeline (default "
                             "for train.py's weights)")
    parser.add_argument("--eval-size", choices=EVAL_SIZES, default=EvalConfig.eval_size,
                        help="for weights converted from timm's (timm's pretrained_cfg in their metadata): its "
                             "input size and crop_pct (default), or its test_input_size and test_crop_pct (test)")
    parser.add_argument("--batch-size", type=int, help=f"global batch over all devices (default {DEFAULT_BATCH}, "
                                                       "rounded up to a multiple of the device count)")
    parser.add_argument("--workers", type=int, help="processes (or threads) decoding and resizing images for "
                                                    "--preprocess torchvision (default: the CPU count)")
    parser.add_argument("--worker-kind", choices=WORKER_KINDS,
                        help="process (scales with the cores) or thread (starts at once; PIL holds the GIL for ~15 "
                             "%% of the work, which caps threads near 6 cores) (default: process)")
    parser.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    parser.add_argument("--distributed", choices=DISTRIBUTED, default="auto",
                        help="auto: join the multi-process cluster JAX detects (Slurm, Open MPI, ...); off: one "
                             "process, whatever the environment (an srun -n1 step beside a training run)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--output", metavar="DIR", help="where eval.json and eval_confusion_matrix.png go (default: "
                                                        "next to the weights file; runs/eval-<weights>-<dataset> "
                                                        "for --pretrained)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cam-errors", type=int, metavar="N",
                        help="also draw the class activation maps of the N most confident mistakes and the N least "
                             "confident hits, as two contact sheets (cam_mistakes.png, cam_hits.png) next to eval.json")
    parser.add_argument("--cam-method", choices=list(explain.METHODS), metavar="METHOD",
                        help=f"the maps' method for --cam-errors: one of {', '.join(explain.METHODS)} (default "
                             f"{EvalConfig.cam_method})")
    parser.add_argument("--cam-layer", metavar="NODE",
                        help="the torchvision node --cam-errors explains (layer4, features.42, inception5b, ...; "
                             "default: the model's last feature level)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command; the exit status (a user error: one line on stderr, status 1)."""
    prog = prog or errors.command("evaluate")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for flag in ("cam_method", "cam_layer"):
        if getattr(args, flag) is not None and args.cam_errors is None:
            parser.error(f"--{flag.replace('_', '-')} needs --cam-errors N")
    for flag in ("batch_size", "workers", "devices", "cam_errors"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    config = EvalConfig(model=args.model, weights=args.weights, pretrained=args.pretrained, dataset=args.dataset,
                        data_dir=args.data_dir, split=args.split, preprocess=args.preprocess, eval_size=args.eval_size,
                        batch_size=args.batch_size, workers=args.workers, devices=args.devices,
                        distributed=args.distributed, dtype=args.dtype,
                        output=args.output, progress=not args.no_progress,
                        cam_errors=args.cam_errors, cam_layer=args.cam_layer,
                        **({"worker_kind": args.worker_kind} if args.worker_kind else {}),
                        **({"cam_method": args.cam_method} if args.cam_method else {}))
    return errors.run_cli(prog, lambda: (evaluate(config), 0)[1])
