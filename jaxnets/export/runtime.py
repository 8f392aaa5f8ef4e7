"""Run exported jaxnets artifacts with their format's runtime alone: a script, never imported by jaxnets.

    python runtime.py JOBS.json        # JOBS: [{"bundle": DIR, "artifact": "model", "inputs": A.npz,
                                       #         "outputs": B.npz}, ...]

For each job it loads ``export.json`` and the artifact (``files[artifact]``) of the export directory ``bundle``,
runs every array of ``inputs`` (each one batch) and writes the outputs to ``outputs`` as ``<key>/<i>`` (the i-th
output of the batch ``key``). Last, it prints one JSON line: the runtime it used and which of the watched packages
the process imported. The watched packages that are not the format's runtime cannot be imported in the process
at all, so a run shows that the artifact needs nothing else (``jaxnets.export.verify`` runs it in a fresh process
and checks the report).

It imports the standard library, numpy and one runtime: ``jax`` for StableHLO (``jax.export.deserialize``),
``onnxruntime``, ``tensorflow`` for a SavedModel, ``ai_edge_litert`` for TFLite (``tf.lite.Interpreter`` where
LiteRT is not installed). It is also what the export directory's README shows as the way to load each format.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Packages whose presence in sys.modules the report states; those not of the format's runtime cannot be imported
# at all in this process (TensorFlow, for one, imports jax whenever it can: blocked, it does without).
WATCHED = ("jaxnets", "flax", "jax", "jaxlib", "tensorflow", "onnxruntime", "ai_edge_litert", "torch")
RUNTIME_PACKAGES = {"stablehlo": {"jax", "jaxlib"}, "onnx": {"onnxruntime"}, "saved_model": {"tensorflow"},
                    "tflite": {"ai_edge_litert"}}
TFLITE_FALLBACK = {"tensorflow"}  # tf.lite's interpreter, where LiteRT is not installed

Runner = Callable[[np.ndarray], list[np.ndarray]]


def metadata(bundle: Path) -> dict:
    return json.loads((bundle / "export.json").read_text(encoding="utf-8"))


def load(bundle: Path, artifact: str = "model") -> tuple[Runner, str]:
    """The artifact ``artifact`` of an export directory as a function from one batch to its outputs (in the
    order of ``export.json``'s ``outputs``), and the runtime's name and version."""
    meta = metadata(bundle)
    path = bundle / meta["files"][artifact]
    names = [output["name"] for output in meta["outputs"]]
    return LOADERS[meta["artifact_format"]](path, meta["input"]["name"], names)


def _stablehlo(path: Path, input_name: str, names: list[str]) -> tuple[Runner, str]:
    import jax
    from jax import export

    exported = export.deserialize(bytearray(path.read_bytes()))

    def run(images: np.ndarray) -> list[np.ndarray]:
        out = exported.call(images)
        return [np.asarray(y) for y in (out if isinstance(out, (list, tuple)) else [out])]

    return run, f"jax {jax.__version__}"


def _onnx(path: Path, input_name: str, names: list[str]) -> tuple[Runner, str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda images: session.run(names, {input_name: images})), f"onnxruntime {onnxruntime.__version__}"


def _saved_model(path: Path, input_name: str, names: list[str]) -> tuple[Runner, str]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(images: np.ndarray) -> list[np.ndarray]:
        out = serve(**{input_name: tf.constant(images)})
        return [out[name].numpy() for name in names]

    return run, f"tensorflow {tf.__version__}"


def _tflite(path: Path, input_name: str, names: list[str]) -> tuple[Runner, str]:
    try:
        from ai_edge_litert import interpreter as litert

        runtime = "ai_edge_litert"
    except ImportError:  # LiteRT is TFLite's runtime outside TensorFlow; TensorFlow's own copy does the same
        from tensorflow import lite as litert

        runtime = "tf.lite"
    interpreter = litert.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")  # resizes the input to each batch

    def run(images: np.ndarray) -> list[np.ndarray]:
        out = runner(**{input_name: images})
        return [np.asarray(out[name]) for name in names]

    return run, runtime


LOADERS = {"stablehlo": _stablehlo, "onnx": _onnx, "saved_model": _saved_model, "tflite": _tflite}


def allowed_packages(formats: set[str]) -> set[str]:
    """The watched packages the runtimes of ``formats`` are."""
    allowed = set().union(*(RUNTIME_PACKAGES[f] for f in formats))
    if "tflite" in formats and importlib.util.find_spec("ai_edge_litert") is None:
        allowed |= TFLITE_FALLBACK
    return allowed


class _Blocked(importlib.abc.MetaPathFinder):
    """Makes packages unimportable: what this process may not use, it cannot use."""

    def __init__(self, packages: set[str]):
        self.packages = packages

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] in self.packages:
            raise ImportError(f"{fullname} is blocked in this process: the export must run without it")


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    allowed = allowed_packages({metadata(Path(job["bundle"]))["artifact_format"] for job in jobs})
    sys.meta_path.insert(0, _Blocked(set(WATCHED) - allowed))
    runtimes = set()
    for job in jobs:
        run, runtime = load(Path(job["bundle"]), job.get("artifact", "model"))
        runtimes.add(runtime)
        with np.load(job["inputs"]) as batches:
            outputs = {f"{key}/{i}": y for key in batches.files for i, y in enumerate(run(batches[key]))}
        np.savez(job["outputs"], **outputs)
    print(json.dumps({"runtimes": sorted(runtimes), "imported": [m for m in WATCHED if m in sys.modules]}))
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.exit(main(sys.argv))
