"""``jaxnets-export`` (``python -m jaxnets.export``): a model and its weights as a StableHLO, ONNX, TF SavedModel
or TFLite export directory that runs without jaxnets; the work is ``jaxnets.export.export``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxnets import errors
from jaxnets.export import EXTRAS, FORMATS, ExportResult, check_format, export
from jaxnets.export.to_onnx import DEFAULT_OPSET
from jaxnets.export.to_stablehlo import DEFAULT_PLATFORMS
from jaxnets.predict import category_names, eval_transform, open_weights
from jaxnets.registry import list_models
from jaxnets.weights import instantiate

DESCRIPTION = """\
Export a model as a directory that runs without jaxnets: the artifact, classes.txt (the weights' class names, or
ImageNet's), export.json and a README saying how to load it. The artifact takes a batch of any size of RGB images,
NHWC, at the eval crop size of the weights (--image-size to change it): float32 normalized with the weights'
mean/std, or with --with-preprocessing uint8 pixels normalized inside the model. Resizing the shorter side and the
center crop always stay outside the model (the README states the sizes). Each export is run by its own runtime in
a fresh process and compared with jaxnets' model.apply before it is written (--no-verify skips that)."""

EXAMPLES = """\
examples:
    {cmd} --model resnet50 --format onnx --out r50-onnx      # torchvision's weights
    {cmd} --weights runs/resnet18-digits --format tflite --int8 --out digits-tflite   # a run: its model
    {cmd} --weights final_weights.safetensors --format saved_model \\
        --with-preprocessing --softmax --out r50-savedmodel
    {cmd} --model googlenet --format stablehlo --platforms cpu,cuda --out googlenet-stablehlo

formats (and the pip extra each needs):
    stablehlo     jax.export, serialized (model.stablehlo; --mlir-text: also as MLIR text, model.mlir)
    onnx          jax2onnx, checked with onnxruntime: {onnx}
    saved_model   jax2tf (TensorFlow comes with jaxnets)
    tflite        the TFLite converter, float32 (--int8: also int8 weights), run with LiteRT:
                  {tf}
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    cmd = prog or errors.command("export")
    parser = errors.ArgumentParser(prog=cmd, description=DESCRIPTION,
                                   epilog=EXAMPLES.format(cmd=cmd, onnx=errors.install_hint(EXTRAS["onnx"]),
                                                          tf=errors.install_hint(EXTRAS["tflite"])),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="NAME", help=f"model name: {', '.join(list_models())}; default: the one "
                                                         "the --weights file or run directory records (needed for "
                                                         "torchvision's weights)")
    parser.add_argument("--weights", metavar="FILE|RUN_DIR",
                        help="jaxnets weights file, a train.py run directory (its final_weights.safetensors), or "
                             "torchvision's weights by name (default: IMAGENET1K_V1, converted on first use)")
    parser.add_argument("--format", required=True, help=f"artifact format: {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="input height and width (default: the weights' eval crop size, e.g. 224)")
    parser.add_argument("--with-preprocessing", action="store_true",
                        help="take uint8 RGB pixels and normalize inside the model (resize/crop stay outside)")
    parser.add_argument("--softmax", action="store_true", help="output probabilities instead of logits")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--int8", action="store_true",
                        help="tflite: also write model.int8.tflite with dynamic-range int8 weights")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help=f"stablehlo: platforms to lower for (default {','.join(DEFAULT_PLATFORMS)})")
    parser.add_argument("--mlir-text", action="store_true",
                        help="stablehlo: also write the module as MLIR text (model.mlir), weights inlined as hex: "
                             "twice their size")
    parser.add_argument("--force", action="store_true", help="replace an existing export directory")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the artifact in a fresh process against jaxnets")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command; the exit status (a user error: one line on stderr, status 1)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be a positive number of pixels, got {args.image_size}")
    return errors.run_cli(parser.prog, lambda: _print(run(args)))


def run(args: argparse.Namespace) -> ExportResult:
    """The export the parsed flags describe."""
    # Before the weights are read (or converted, or downloaded):
    check_format(args.format, int8=args.int8, mlir_text=args.mlir_text)
    weights_file = open_weights(args.model, args.weights)  # predict's: a file or run directory names its model
    model, variables = instantiate(weights_file)
    metadata = {"weights": str(weights_file.path), "weights_sha256": weights_file.sha256}
    categories = None if getattr(model, "features_only", False) else category_names(weights_file)
    return export(model, variables, args.format, args.out, transform=eval_transform(weights_file.name, weights_file),
                  image_size=args.image_size, with_preprocessing=args.with_preprocessing, softmax=args.softmax,
                  categories=categories, force=args.force, verify=args.verify, opset=args.opset,
                  int8=args.int8, platforms=tuple(p for p in args.platforms.split(",") if p),
                  mlir_text=args.mlir_text, metadata=metadata)


def _print(result: ExportResult) -> int:
    megabytes = result.size_bytes / 1e6
    print(f"wrote {result.path} ({result.format}: {', '.join(result.files.values())}; {megabytes:.1f} MB, "
          f"{result.seconds:.1f} s)")
    for check in result.verifications:
        print(f"verified {check.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
