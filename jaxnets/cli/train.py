"""Train a jaxnets model, data-parallel on every device, from one CPU to many hosts.

    jaxnets-train --model resnet34                       # embedded digits, no download, a few minutes
    jaxnets-train --model resnet50 --dataset tf_flowers --data-dir ~/tensorflow_datasets --pretrained
    jaxnets-train --model resnet18 --dataset /path/to/images --epochs 30

From a checkout, ``python train.py`` runs the same. Every flag is a field of ``jaxnets.config.TrainConfig``;
the work is ``jaxnets.training.train_and_evaluate``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from jaxnets import errors, host
from jaxnets.config import DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig
from jaxnets.data import DataError, parse_classes
from jaxnets.registry import list_models


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _classes(text: str) -> tuple[int, ...]:
    try:
        return parse_classes(text)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog=prog or errors.command("train"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=defaults.model, help=f"one of: {', '.join(list_models())}")
    g.add_argument("--dataset", default=defaults.dataset,
                   help="'digits' (embedded, default), a TFDS name (tf_flowers, imagenette, cifar10, imagenet2012, "
                        "...), or a folder of class subfolders (with train/ and val/ when present)")
    g.add_argument("--data-dir", help="TFDS data dir (imagenet2012: put the tars in DATA_DIR/downloads/manual)")
    g.add_argument("--image-size", type=int, help="training/eval crop size (default on digits: 16, VGG 32, AlexNet 64; "
                                                   "else the weights' 224)")
    g.add_argument("--classes", type=_classes, help="keep only these labels, remapped to 0..k-1: 0,1,2,3,4 or 5-9")
    g.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="held-out fraction of train when there is no validation split")
    g.add_argument("--min-crop-scale", type=float,
                   help="RandomResizedCrop minimal area (default 0.9 on digits, else 0.08)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for digits)")
    g.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="compute dtype (params stay float32)")
    g.add_argument("--no-aux", action="store_true", help="GoogLeNet without its auxiliary heads")
    g.add_argument("--aux-weight", type=float, default=defaults.aux_weight,
                   help="GoogLeNet: loss = main + w * (aux1 + aux2) (default 0.3, as in the paper)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="default 12 on digits, else 90")
    g.add_argument("--steps", type=int, help="stop after this many steps in total (smoke runs)")
    g.add_argument("--batch-size", type=int, help="global batch over all devices (default 32 on digits, else 128)")
    g.add_argument("--eval-batch-size", type=int, help="global eval batch (default: --batch-size)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    g.add_argument("--lr", type=float, help="learning rate per 256 images, scaled by batch/256 "
                                            "(default: sgd 0.1, adamw 1e-3)")
    g.add_argument("--momentum", type=float, default=defaults.momentum)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, help="not applied to biases and BatchNorm "
                                                      "(default: sgd 1e-4, 5e-4 on digits; adamw 0.05)")
    g.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    g.add_argument("--warmup-epochs", type=float, help="linear warmup (default 1 on digits, else 5)")
    g.add_argument("--step-epochs", type=_int_list, default=defaults.step_epochs,
                   help="--schedule step: multiply the lr by --step-gamma at these epochs")
    g.add_argument("--step-gamma", type=float, default=defaults.step_gamma)
    g.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm")
    g.add_argument("--seed", type=int, default=defaults.seed, help="initialization, data order, augmentation")

    g = p.add_argument_group("transfer learning")
    g.add_argument("--pretrained", nargs="?", const="default",
                   help="start from torchvision's ImageNet weights, or from FILE; the classifier is re-initialized")
    g.add_argument("--freeze", default=defaults.freeze, help="none | backbone | parameter path patterns: conv1,layer1")
    g.add_argument("--backbone-lr-mult", type=float, default=defaults.backbone_lr_mult,
                   help="learning rate of the backbone relative to the head (discriminative fine-tuning)")
    g.add_argument("--layer-decay", type=float, default=defaults.layer_decay,
                   help="layer-wise learning-rate decay: the backbone's last block learns at lr x D, the one "
                        "before at lr x D^2, ... down to the stem (e.g. 0.8)")
    g.add_argument("--linear-probe", choices=("svm", "logreg"),
                   help="no training: fit a linear classifier on the frozen model's features")

    g = p.add_argument_group("run, devices and hosts")
    g.add_argument("--workdir", help="checkpoints, logs, plots, final weights; the same workdir resumes "
                                     "(default runs/<model>-<dataset>)")
    g.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    g.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between logged train metrics")
    g.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (0: end of each epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                   help="the last N are kept, plus the best")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--compile-cache", help="persistent compilation cache dir ('' disables; "
                                           "default ~/.cache/jaxnets/jax_compilation_cache)")
    g.add_argument("--coordinator", help="host:port of process 0, for a multi-process run without a cluster manager")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def config_from_args(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser(prog).parse_args(argv)))


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Train (or fit a linear probe); the exit status. A ``UserError`` or ``OSError`` is one line on stderr and
    status 1; anything else is a bug in jaxnets and keeps its traceback. ``argv=None`` is this process's
    command line, restarted on tcmalloc first where the system has it."""
    prog = prog or errors.command("train")
    if argv is None:
        host.use_tcmalloc()  # replaces the process; JAXNETS_ALLOCATOR=glibc: not
    config = config_from_args(argv, prog)
    host.retain_freed_memory()  # before JAX starts its threads; XLA:CPU steps page-fault less
    try:
        return errors.run_cli(prog, lambda: _run(config))
    except KeyboardInterrupt:  # outside the training loop (inside it, Ctrl-C saves a checkpoint and returns)
        print(f"{prog}: interrupted outside the training loop; checkpoints already saved are kept", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(config: TrainConfig) -> int:
    from jaxnets import training

    if config.linear_probe:
        training.run_linear_probe(config)
        return 0
    result = training.train_and_evaluate(config)
    return 128 + result.interrupted if result.interrupted else 0
