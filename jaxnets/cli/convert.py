"""``jaxnets-convert``: torchvision weights to jaxnets weights files, and jaxnets weights back to PyTorch.

``--from FILE`` takes a torchvision model's state dict however a script saved it: nested (``{'state_dict': ...}``),
with DataParallel's ``module.``, or wrapped by a self-supervised method (MoCo, SwAV, ...; ``--layout``), whose heads,
momentum encoder, queue or prototypes are dropped and listed (``jaxnets.weights.wrappings``).

A user error (a missing file, a bad option, a conversion that does not reproduce torchvision) is one line on
stderr and exit status 1; with ``--all`` one model failing does not stop the others. Anything else is a bug
and keeps its traceback (``jaxnets.errors.run_cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxnets import errors
from jaxnets.registry import TORCHVISION_DEFAULT, get_spec, list_models
from jaxnets.weights import Conversion, cached_weights_path, convert, export_torch
from jaxnets.weights.wrappings import LAYOUTS

PROG = "jaxnets-convert"

DESCRIPTION = "Convert torchvision weights to jaxnets weights files, and jaxnets weights back to PyTorch."
EXAMPLES = """\
    {cmd} resnet50                          # torchvision's ImageNet weights (IMAGENET1K_V1) -> cache
    {cmd} resnet50 --weights IMAGENET1K_V2  # its newer weights (DEFAULT: torchvision's best)
    {cmd} --all --verify                    # every registered model
    {cmd} resnet50 --from resnet50-0676ba61.pth --verify
    {cmd} resnet18 --from my.safetensors --out my_resnet18.safetensors   # no torch needed
    {cmd} googlenet --from mine.pth --option transform_input=true   # see --option
    {cmd} resnet50 --from r-50-1000ep.pth.tar   # MoCo v3's checkpoint: a backbone (no fc), wrapping detected
    {cmd} resnet50 --from checkpoint.pth --layout swav   # the wrapping named (see --layout)
    {cmd} --to-torch finetuned.safetensors --out finetuned.pth

The cache is $JAXNETS_HOME/weights (default ~/.cache/jaxnets/weights), where load_pretrained looks.
The output is written atomically (temp file + rename) and is never the input file.
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser; its examples name the command as the user runs it (``errors.command``)."""
    parser = errors.ArgumentParser(prog=prog, description=DESCRIPTION,
                                   epilog=EXAMPLES.format(cmd=errors.command("convert")),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model name, one of jaxnets.list_models()")
    parser.add_argument("--all", action="store_true", help="convert torchvision's weights of every registered model")
    parser.add_argument("--from", dest="source", metavar="FILE",
                        help="local state dict (.pth via torch.load(weights_only=True), or .safetensors) "
                             "instead of downloading torchvision's")
    parser.add_argument("--layout", metavar="NAME", choices=list(LAYOUTS),
                        help="how --from FILE wraps the state dict, instead of detecting it: "
                             + "; ".join(f"{name}: {layout.description}" for name, layout in LAYOUTS.items())
                             + ". The method's heads, momentum encoder, queue and prototypes are dropped and listed")
    parser.add_argument("--out", metavar="PATH", help="output file (with --all: directory); default: the cache for "
                                                      "torchvision's weights, else <FILE stem>.jaxnets.safetensors")
    parser.add_argument("--weights", metavar="NAME",
                        help="which of torchvision's weights: IMAGENET1K_V1 (the default), IMAGENET1K_V2 where the "
                             "model has it, or DEFAULT (torchvision's alias for its best); with --from, the file "
                             "must be that one; with --all, every model that has it")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with torchvision on a random batch; fail above tolerance")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="model option to record (repeatable), of the model's type, e.g. dropout=0.3; not one "
                             "its variant fixes (ResNet's block_cls). A state dict does not say how its model was "
                             "built: torchvision's own file gets the options torchvision builds it with (GoogLeNet: "
                             "transform_input=true), any other file torchvision's constructor defaults (GoogLeNet: "
                             "transform_input=false); pass transform_input=true for a GoogLeNet trained with it, "
                             "e.g. fine-tuned from torchvision's weights")
    parser.add_argument("--to-torch", metavar="FLAX_FILE",
                        help="export a jaxnets weights file to a torchvision state dict at --out (.pth/.safetensors)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run the command; the exit status. ``prog`` prefixes error lines (the root ``convert_weights.py`` shim
    passes its own name)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.to_torch:
        if args.model or args.all or args.source or args.verify or args.option or args.weights or args.layout:
            parser.error("--to-torch takes only --out")
        if not args.out:
            parser.error("--to-torch needs --out FILE (.pth or .safetensors)")
        return errors.run_cli(prog, lambda: _print(f"wrote {export_torch(args.to_torch, args.out)}"))
    if bool(args.model) == args.all:
        parser.error("give one MODEL, or --all")
    if args.all and args.source:
        parser.error("--from converts one file: give MODEL, not --all")
    if args.layout and not args.source:
        parser.error("--layout says how --from FILE is wrapped: give --from FILE")
    options = dict(_parse_option(parser, option) for option in args.option)
    failures = 0
    for name in _models(parser, args):
        out = Path(args.out) / cached_weights_path(name, args.weights).name if args.all and args.out else args.out

        def convert_one(name: str = name, out: str | Path | None = out) -> int:
            return _print(_describe(convert(name, args.source, out, verify=args.verify, model_options=options,
                                            weights=args.weights, layout=args.layout)))

        failures += errors.run_cli(prog, convert_one)  # one model failing does not stop --all
    return 1 if failures else 0


def _models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The models to convert: MODEL, or with --all every model (that has the --weights asked for)."""
    if not args.all:
        return [args.model]
    if args.weights is None or args.weights == TORCHVISION_DEFAULT:
        return list_models()
    names = [name for name in list_models() if args.weights in get_spec(name).weight_versions]
    if not names:
        parser.error(f"--weights {args.weights}: no registered model has weights of that name")
    return names


def _print(line: str) -> int:
    print(line)
    return 0


def _parse_option(parser: argparse.ArgumentParser, option: str) -> tuple[str, object]:
    key, sep, value = option.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, json.loads(value)
    except ValueError:
        parser.error(f"--option {option!r}: expected KEY=JSON, e.g. transform_input=false")


def _describe(result: Conversion) -> str:
    line = f"{result.name}: {result.source} (sha256 {result.source_sha256[:12]}) -> {result.path}"
    if result.metadata.get("layout") not in (None, "torchvision"):  # what it dropped is logged as it reads
        line += f"; {result.metadata['layout']} layout"
    if result.max_abs_diff is not None:
        line += f"; verified: max |logit diff| vs torchvision {result.max_abs_diff:.2e} <= {result.tolerance:.2e}"
    return line


if __name__ == "__main__":
    sys.exit(main())
