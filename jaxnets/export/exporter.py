"""``export`` (a model) and ``export_function`` (any function of a batch of images): one export directory
per call, its artifact written by the format's module and verified in a fresh process before it is moved in place.

Every export traces XLA's own formulations (``jaxnets.kernels.bind(fn, "xla")``), whatever this machine's kernel
choice: an artifact runs on other machines, and holds the same graph whichever machine wrote it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn

from jaxnets import kernels
from jaxnets._version import __version__
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.export import bundle, serving
from jaxnets.export import verify as verification
from jaxnets.export.extras import require
from jaxnets.export.signature import Signature, signature_of
from jaxnets.export.to_onnx import DEFAULT_OPSET
from jaxnets.export.to_stablehlo import DEFAULT_PLATFORMS
from jaxnets.export.verify import Verification
from jaxnets.layers import model_name
from jaxnets.registry import FeatureInfo, feature_info, imagenet_categories

FORMATS = ("stablehlo", "onnx", "saved_model", "tflite")
# What each format needs to convert beyond jaxnets' own dependencies, checked before any work (TensorFlow, for
# SavedModel and TFLite, is one of them; the runtime that verifies an artifact is checked by running it).
_CONVERTERS = {"onnx": ("jax2onnx", "onnx", "onnxruntime"), "saved_model": (), "tflite": (), "stablehlo": ()}


@dataclass(frozen=True)
class ExportResult:
    """What was written where: the export directory, its files (role -> name), the signature, the verifications
    (empty when not verified), the export's wall time and the directory's size."""

    path: Path
    format: str
    files: dict[str, str]
    signature: Signature
    seconds: float
    size_bytes: int
    verifications: tuple[Verification, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)  # export.json


def export(model: nn.Module, variables: Mapping[str, Any] | None, format: str, path: str | Path, *,
           transform: EvalTransform | None = None, image_size: int | None = None, with_preprocessing: bool = False,
           softmax: bool = False, categories: Sequence[str] | None = None, force: bool = False, verify: bool = True,
           opset: int = DEFAULT_OPSET, int8: bool = False, platforms: Sequence[str] = DEFAULT_PLATFORMS,
           mlir_text: bool = False, metadata: Mapping[str, Any] | None = None) -> ExportResult:
    """Export a model's eval forward pass (``model.apply(variables, images, train=False)``: a classifier's logits,
    GoogLeNet's without aux heads, a ``features_only`` backbone's list of maps) as ``format`` (one of ``FORMATS``)
    into the directory ``path``; see ``export_function``.

    The input is a batch of ``transform.crop_size`` (or ``image_size``) square images of the model's ``in_chans``
    (RGB), NHWC: float32 and normalized, or with ``with_preprocessing`` uint8 pixels that the artifact normalizes
    with ``transform``'s mean and std (default: ImageNet's eval transform at 224). ``softmax`` returns
    probabilities instead of logits. ``categories`` (default: ImageNet's for 1000 classes) go to ``classes.txt``.
    An NNX model (``jaxnets.nnx.Model``) carries its own variables: pass ``variables=None``."""
    model, variables = _linen_of(model, variables)
    channels = getattr(model, "in_chans", 3)
    transform = transform or EvalTransform()
    if image_size is not None:
        transform = transform.at_crop(image_size)
    if transform.in_chans != channels:
        transform = transform.for_channels(channels)
    levels = _feature_levels(model)
    if levels is not None and softmax:
        raise UserError("--softmax: a features_only backbone returns feature maps, not logits")
    fn = serving.model_function(model, transform, with_preprocessing=with_preprocessing, softmax=softmax)
    size = transform.crop_size
    description = {"model": model_name(model), "preprocessing": with_preprocessing, "softmax": softmax,
                   "eval_transform": transform.as_dict()}
    names = [serving.output_name(softmax)]
    if levels is not None:
        names = [f"features_{level.index}" for level in levels]
        description["features"] = [{"name": name, **level._asdict()} for name, level in zip(names, levels, strict=True)]
    return export_function(fn, variables, format, path, input_shape=(size, size, channels),
                           input_dtype="uint8" if with_preprocessing else "float32", output_names=names,
                           categories=categories, force=force, verify=verify, opset=opset, int8=int8,
                           platforms=platforms, mlir_text=mlir_text, description={**description, **(metadata or {})},
                           default_categories=levels is None)


def _linen_of(model: Any, variables: Mapping[str, Any] | None) -> tuple[nn.Module, Mapping[str, Any]]:
    """A ``jaxnets.nnx.Model`` as its Linen module and current variables (an export is of the eval forward,
    whatever the NNX model's mode); a Linen model as it is. NNX is imported only when a Linen model it is not
    (``import jaxnets`` does not load ``flax.nnx``)."""
    if isinstance(model, nn.Module):
        return model, variables
    from jaxnets import nnx as jaxnets_nnx

    return jaxnets_nnx.linen_of(model, variables, "export")


def _feature_levels(model: nn.Module) -> list[FeatureInfo] | None:
    """The levels a ``features_only`` backbone returns (None for a classifier)."""
    if not getattr(model, "features_only", False):
        return None
    return feature_info(model_name(model), getattr(model, "out_indices", None))


def export_function(fn: Callable[[Any, jax.Array], Any], params: Any, format: str, path: str | Path, *,
                    input_shape: Sequence[int], input_dtype: Any = "float32",
                    output_names: Sequence[str] | None = None, categories: Sequence[str] | None = None,
                    force: bool = False, verify: bool = True, opset: int = DEFAULT_OPSET, int8: bool = False,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS, mlir_text: bool = False,
                    description: Mapping[str, Any] | None = None, default_categories: bool = False) -> ExportResult:
    """Export ``fn(params, images)`` for a batch of any size of ``input_shape`` examples as ``format`` into the
    export directory ``path`` (see ``jaxnets.export.bundle``); ``fn`` returns an array or a list/tuple of arrays,
    each with the batch axis first (named ``output_names``). ``params`` are the weights: embedded as constants
    (StableHLO, ONNX) or stored as variables (SavedModel).

    ``verify`` runs the artifact in a fresh process with only its runtime, on random batches of 1 and 3, and
    refuses it (a ``VerificationError``, nothing written) unless it reproduces ``jax.jit(fn)`` to
    1e-4 * (1 + max |output|). ``opset``: ONNX's; ``int8``: TFLite also as ``model.int8.tflite`` with dynamic-range
    int8 weights (not held to the tolerance); ``platforms``: StableHLO's, ``mlir_text``: StableHLO's module also as
    MLIR text (``model.mlir``, twice the weights' size). An existing ``path`` is replaced only
    with ``force``. A missing optional dependency is a ``MissingDependency`` naming the pip extra."""
    check_format(format, int8=int8, mlir_text=mlir_text)
    fn = kernels.bind(fn, "xla")  # traced (signature, artifact, verification) with XLA's formulations only
    path = Path(path)
    bundle.check_destination(path, force)  # before minutes of conversion
    signature = signature_of(fn, params, input_shape, input_dtype, output_names)
    started = time.perf_counter()
    with bundle.staging(path, force) as directory:
        info = _write(format, fn, params, signature, directory, opset=opset, int8=int8, platforms=platforms,
                      mlir_text=mlir_text)
        outputs = signature.describe()
        if categories is None and default_categories and outputs["outputs"][0]["shape"][1:] == [1000]:
            categories = imagenet_categories()
        record = {"artifact_format": format, **info, **outputs, **(description or {}),
                  "jaxnets_version": __version__}
        results: tuple[Verification, ...] = ()
        if verify:
            bundle.write_metadata(directory, record, categories)  # the runtime reads export.json
            enforced = {role: role != "int8" for role in info["files"] if role in ("model", "int8")}
            results = tuple(verification.verify(fn, params, format, directory, enforced, signature))
            record["verification"] = [result.describe() for result in results]
        bundle.write_metadata(directory, record, categories)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return ExportResult(path, format, dict(info["files"]), signature, seconds, size, results, record)



def check_format(format: str, *, int8: bool = False, mlir_text: bool = False) -> None:
    """A ``UserError`` for an unknown format or an option it does not take, a ``MissingDependency`` (naming the
    pip extra) when its converter is not installed: checked before any work."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if int8 and format != "tflite":
        raise UserError(f"--int8 applies to the tflite format, not {format}")
    if mlir_text and format != "stablehlo":
        raise UserError(f"--mlir-text applies to the stablehlo format, not {format}")
    for module in _CONVERTERS[format]:
        require(module, format)


def _write(format: str, fn: Callable[[Any, jax.Array], Any], params: Any, signature: Signature, directory: Path, *,
           opset: int, int8: bool, platforms: Sequence[str], mlir_text: bool) -> dict[str, Any]:
    if format == "stablehlo":
        from jaxnets.export import to_stablehlo

        return to_stablehlo.write(fn, params, signature, directory, platforms=platforms, mlir_text=mlir_text)
    if format == "onnx":
        from jaxnets.export import to_onnx

        return to_onnx.write(fn, params, signature, directory, opset=opset)
    from jaxnets.export import to_tf

    if format == "saved_model":
        return to_tf.write_saved_model(fn, params, signature, directory)
    return to_tf.write_tflite(fn, params, signature, directory, int8=int8)
