"""The jaxnets weights file: a safetensors file with a header that describes it, and the checks that keep a
file that could not be loaded back from ever being written.

Keys are Flax variable paths (``params/layer1/0/conv1/kernel``, ``batch_stats/bn1/mean``); the string header
holds the model name, number of classes, model options, jaxnets version, free-form metadata (source and its
SHA-256, ...) and the SHA-256 of the content itself. Unlike a pickle, reading safetensors cannot execute code,
and it is fast (memory-mapped, no per-object decoding). This module needs numpy and safetensors, never torch:
a machine without torch reads and writes these files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxnets import errors, trees
from jaxnets._version import __version__
from jaxnets.errors import UserError
from jaxnets.fileio import atomic_path
from jaxnets.mapping import layout_problems, variable_shapes
from jaxnets.registry import NO_CLASSIFIER, RESERVED_OPTIONS, ModelRef, get_spec

FORMAT = "jaxnets.weights"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

PathLike = str | os.PathLike


class WeightsError(UserError):
    """A weights file or source that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class WeightsFile:
    """The content of a jaxnets weights file, hash-verified."""

    name: str
    variables: dict[str, Any]
    model_options: dict[str, Any]
    metadata: dict[str, Any]
    num_classes: int = 0
    jaxnets_version: str = ""
    sha256: str = ""  # of the content (tensors and header), recorded at save time
    path: Path | None = None


# --- writing and reading -------------------------------------------------------------------------------


def save_weights(path: PathLike, name: ModelRef, variables: Mapping[str, Any], *,
                 model_options: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``variables`` of model ``name`` atomically (temp file + rename) as a jaxnets weights file.

    The variables must fit ``create_model(name, num_classes, **model_options)``: a file that cannot be
    loaded back is never written. A backbone (``model_options`` with ``features_only=True``) is recorded with
    ``num_classes`` 0 (``NO_CLASSIFIER``). ``metadata`` (JSON-serializable) is stored as is: ``source``,
    ``source_sha256``, ``categories`` (class names, shown by ``jaxnets.predict``), ...
    """
    path = Path(path)
    spec = get_spec(name)
    model_options = check_model_options(spec, model_options or {}, where=f"{path}: ")
    tensors = {key: np.ascontiguousarray(np.asarray(value)) for key, value in trees.flatten(variables).items()}
    classifier = f"params/{spec.classifier}/kernel"
    if model_options.get("features_only"):
        num_classes = NO_CLASSIFIER  # a backbone: the header says so, and records features_only
    elif classifier not in tensors:
        raise WeightsError(f"{path}: {spec.name} variables have no classifier {classifier!r}; "
                           f"not {spec.name} variables? (a backbone's: model_options features_only=True)")
    else:
        num_classes = int(tensors[classifier].shape[-1])
    check_fits(f"{path}: {spec.name}", {k: v.shape for k, v in tensors.items()},
               expected_shapes(spec, num_classes, model_options))
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": spec.name,
        "num_classes": str(num_classes),
        "model_options": _to_json(model_options, path, "model_options"),
        "jaxnets_version": __version__,
        "metadata": _to_json(dict(metadata or {}), path, "metadata"),
    }
    header["sha256"] = content_sha256(tensors, header)
    return write_safetensors(path, tensors, header)


def load_weights(path: PathLike) -> WeightsFile:
    """Read a jaxnets weights file and check its content hash; raise ``WeightsError`` naming the
    file when it is truncated, corrupt, or not a jaxnets weights file."""
    path = Path(path)
    convert = errors.command("convert")
    try:
        header, tensors = read_safetensors(path)
    except WeightsError:
        if path.suffix == SUFFIX:
            raise
        raise WeightsError(f"{path}: not a jaxnets weights file (a {SUFFIX} file); convert a PyTorch checkpoint "
                           f"first: {convert} MODEL --from {path}") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a jaxnets weights file (no {FORMAT!r} header); "
                           f"convert a torchvision state dict with: {convert} MODEL --from {path}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"{path}: format version {header['format_version']} is newer than this jaxnets "
                           f"reads ({FORMAT_VERSION}); upgrade jaxnets")
    recorded = header.pop("sha256", "")
    actual = content_sha256(tensors, header)
    if actual != recorded:
        raise WeightsError(f"{path}: content SHA-256 {actual[:16]}... does not match the recorded "
                           f"{recorded[:16] or '<none>'}...: the file is corrupt or was modified; "
                           f"delete it and convert again")
    try:
        return WeightsFile(
            name=header["name"],
            variables=trees.unflatten(tensors),
            model_options=json.loads(header["model_options"]),
            metadata=json.loads(header["metadata"]),
            num_classes=int(header["num_classes"]),
            jaxnets_version=header.get("jaxnets_version", ""),
            sha256=recorded,
            path=path,
        )
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: incomplete jaxnets header ({type(exc).__name__}: {exc})") from None


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray], header: Mapping[str, str]) -> Path:
    """``tensors`` and the string ``header`` as a safetensors file at ``path``, atomically: the one place
    jaxnets writes safetensors (weights files and torch-layout exports alike)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(header))
    return path


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """``(header, tensors)`` of any safetensors file, or a ``WeightsError`` naming it when it is unreadable."""
    require_file(path)
    try:
        with safe_open(path, framework="np") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise WeightsError(f"{path}: unreadable safetensors file, truncated or corrupt "
                           f"({errors.one_line(exc)})") from None


def require_file(path: Path) -> None:
    """A clear error for a path that is no file, before a reader reports something obscure."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a file; give the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def refuse_overwriting(source: PathLike, out: PathLike) -> None:
    """The atomic rename would replace the source by the output, often its only copy: refuse."""
    try:
        same = os.path.samefile(source, out)  # also through links and other spellings of the path
    except OSError:  # one of them does not exist
        same = Path(source).resolve() == Path(out).resolve()
    if same:
        raise WeightsError(f"{out}: the output is the source file {source}; writing it would replace the source: "
                           f"choose another output path")


# --- hashes ----------------------------------------------------------------------------------------------


def content_sha256(tensors: Mapping[str, np.ndarray], header: Mapping[str, str]) -> str:
    """SHA-256 over the header and every tensor's key, dtype, shape and bytes, in key order:
    independent of the file layout, so it survives rewrites and catches any change of content."""
    digest = hashlib.sha256(json.dumps(dict(header), sort_keys=True).encode())
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(json.dumps([key, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: how torchvision names its files, and what a conversion records as its source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --- what a file records, and whether variables fit it ----------------------------------------------------


def check_model_options(name: ModelRef, options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``options`` as a weights file of ``name`` records them: the registry's ``ModelSpec.check_options``
    (the one option schema), its refusal raised as a ``WeightsError``."""
    try:
        return get_spec(name).check_options(options, where)
    except UserError as exc:
        raise WeightsError(str(exc)) from None


def model_options(name: ModelRef, model: nn.Module) -> dict[str, Any]:
    """The ``create_model`` options ``model`` was built with: what ``save_weights(model_options=...)``
    should record so that loading the file rebuilds the same model (GoogLeNet's ``transform_input``!).
    The registry's ``ModelSpec.recorded_options``."""
    return get_spec(name).recorded_options(model)


def expected_shapes(name: ModelRef, num_classes: int, options: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat Flax variable key -> shape of ``create_model(name, num_classes, **options)``."""
    spec = get_spec(name)
    for reserved in RESERVED_OPTIONS:
        if reserved in options:
            raise WeightsError(f"{spec.name}: {reserved!r} is not a model option here; pass it as its own argument")
    shapes = variable_shapes(spec, num_classes=num_classes, **options)
    return {"/".join(path): shape for path, shape in shapes.items()}


def check_fits(where: str, shapes: Mapping[str, tuple], expected: Mapping[str, tuple]) -> None:
    """A ``WeightsError`` listing the missing, unexpected and mis-shaped keys when ``shapes`` is not ``expected``."""
    problems = layout_problems(shapes, expected)
    if problems:
        raise WeightsError(f"{where}: variables do not fit the architecture (another model?): " + "; ".join(problems))


def check_variables(where: str, variables: Mapping[str, Any], expected: Mapping[str, tuple]) -> None:
    """``check_fits`` for a variables tree."""
    check_fits(where, {k: np.shape(v) for k, v in trees.flatten(variables).items()}, expected)


def _to_json(value: Mapping[str, Any], path: Path, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as exc:
        raise WeightsError(f"{path}: {what} must be JSON-serializable ({exc})") from None
