"""The export directory: the artifact with what a deployment needs beside it, written all at once or not at all.

    <out>/model.onnx | model.stablehlo (+ model.mlir) | saved_model/ | model.tflite (+ model.int8.tflite)
    <out>/classes.txt     class names, line i = class i (when known)
    <out>/export.json     what the artifact takes and gives, how it was made (machine-readable)
    <out>/README.txt      the same for people, with how to load it

Everything is written into a temporary directory next to ``<out>`` and renamed into place when complete (and
verified), so a failed or interrupted export leaves no half-written directory. An existing ``<out>`` is replaced
only with ``force``, and never when it is a non-empty directory that is no jaxnets export (``--out ~`` with
``--force`` must not delete a home directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxnets.errors import UserError
from jaxnets.fileio import writing

EXPORT_JSON = "export.json"
CLASSES = "classes.txt"
README = "README.txt"
FORMAT = "jaxnets.export"  # export.json's "format": what marks a directory as one of ours
FORMAT_VERSION = 1


class OutputExists(UserError):
    """The output path exists and replacing it was not asked for (or is refused)."""


def check_destination(path: Path, force: bool) -> None:
    """Refuse an existing ``path`` without ``force``, and a non-empty directory that is no export even with it;
    and a path below a file."""
    existing = next(parent for parent in path.parents if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{path}: cannot create it, {existing} is a file, not a directory")
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputExists(f"{path} already exists; pass --force (force=True) to replace it")
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not _is_export(path):
        raise OutputExists(f"{path}: refusing to replace a directory that is not a jaxnets export (no {EXPORT_JSON} "
                           f"with format {FORMAT!r}); choose another --out")


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / EXPORT_JSON).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def staging(path: Path, force: bool) -> Iterator[Path]:
    """A fresh directory next to ``path`` to write the export into; renamed to ``path`` when the block succeeds
    (replacing what was there only with ``force``), deleted when it fails."""
    check_destination(path, force)
    with writing(path, "export"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        check_destination(path, force)  # something may have appeared there meanwhile
        with writing(path, "export"):
            os.chmod(tmp, 0o755)  # mkdtemp's 0o700 is no choice of the user's
            if path.exists() or path.is_symlink():
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_metadata(directory: Path, description: Mapping[str, Any], categories: Sequence[str] | None) -> None:
    """``export.json``, ``README.txt`` and, with ``categories``, ``classes.txt`` into ``directory``."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **description}
    if categories is not None:
        (directory / CLASSES).write_text("".join(f"{name}\n" for name in categories), encoding="utf-8")
        record["classes"] = CLASSES
    (directory / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (directory / README).write_text(readme(record), encoding="utf-8")


_ROLES = {"model": "the model", "mlir_text": "the StableHLO module as MLIR text (for other StableHLO runtimes)",
          "int8": "the model with dynamic-range int8 weights", "weights": "the ONNX model's weights (external data)"}
_LOADING = {
    "stablehlo": """\
    from jax import export                      # any JAX, no jaxnets or Flax
    exported = export.deserialize(bytearray(open("{dir}/{model}", "rb").read()))
    outputs = exported.call(images)              # on any of the platforms above
    text = exported.mlir_module()                # the StableHLO module as MLIR text, weights inlined""",
    "onnx": """\
    import onnxruntime
    session = onnxruntime.InferenceSession("{dir}/{model}")
    outputs = session.run(None, {{"{input}": images}})""",
    "saved_model": """\
    import tensorflow as tf
    serve = tf.saved_model.load("{dir}/{model}").signatures["serving_default"]
    outputs = serve({input}=tf.constant(images))     # a dict by output name""",
    "tflite": """\
    from ai_edge_litert.interpreter import Interpreter   # pip install ai-edge-litert (or tf.lite.Interpreter)
    runner = Interpreter(model_path="{dir}/{model}").get_signature_runner("serving_default")
    outputs = runner({input}=images)                      # a dict by output name; any batch size""",
}


def readme(record: Mapping[str, Any]) -> str:
    """The README of an export directory, from its ``export.json`` record."""
    fmt, files, inputs = record["artifact_format"], record["files"], record["input"]
    transform = record.get("eval_transform")
    lines = [f"{record.get('model') or 'A function'} exported by jaxnets {record['jaxnets_version']} "
             f"as {fmt} ({record['converter']}).", "", "Files:"]
    lines += [f"  {name:<18} {_ROLES.get(role, role)}" for role, name in files.items()]
    if "classes" in record:
        lines.append(f"  {record['classes']:<18} class names, line i is class i")
    lines += [f"  {EXPORT_JSON:<18} what the artifact takes and gives (machine-readable)", ""]
    shape = " x ".join(str(d) for d in inputs["shape"])
    kind = {1: "grayscale", 3: "RGB"}.get(inputs["shape"][-1], f"{inputs['shape'][-1]}-channel")
    lines.append(f"Input '{inputs['name']}': {inputs['dtype']}, {shape} (NHWC: a batch of {kind} images, channels "
                 f"last; any batch size).")
    if transform and record.get("preprocessing"):
        lines.append(f"  uint8 pixel values 0-255; the model normalizes them inside: (x / 255 - mean) / std, "
                     f"mean {transform['mean']}, std {transform['std']}.")
    elif transform:
        lines.append(f"  float32, already normalized: (pixels / 255 - mean) / std per channel, mean "
                     f"{transform['mean']}, std {transform['std']}.")
    if transform:
        lines.append(f"  Resizing and cropping stay outside the model: {_resize_and_crop(transform)}.")
    levels = {level["name"]: level for level in record.get("features", [])}
    for output in record["outputs"]:
        level = levels.get(output["name"])
        where = f" (torchvision node {level['node']}, stride {level['reduction']})" if level else ""
        lines.append(f"Output '{output['name']}': {output['dtype']}, "
                     f"{' x '.join(str(d) for d in output['shape'])}{where}.")
    if record.get("platforms"):
        lines.append(f"Platforms: {', '.join(record['platforms'])}.")
    if record.get("opset"):
        lines.append(f"ONNX opset {record['opset']}.")
    lines += ["", "Load and run it (images: a numpy array as above):", "",
              _LOADING[fmt].format(dir="<this directory>", model=files["model"], input=inputs["name"]), ""]
    for check in record.get("verification", []):
        lines.append(f"Verified at export: {check}")
    return "\n".join(lines) + "\n"


def _resize_and_crop(transform: dict) -> str:
    """The eval resize and crop in words (``EvalTransform.describe``'s, for a record that may predate crop_mode)."""
    size, crop, how = transform["resize_size"], transform["crop_size"], transform["interpolation"]
    resize = {"center": f"resize the shorter side to {size} px", "squash": f"resize to {size} x {size} px",
              "border": f"resize the longer side to {size} px"}[transform.get("crop_mode", "center")]
    crop_how = "pad and center-crop" if transform.get("crop_mode") == "border" else "center-crop"
    return f"{resize} ({how}, antialiased, as PIL and torchvision do), then {crop_how} {crop} x {crop}"
