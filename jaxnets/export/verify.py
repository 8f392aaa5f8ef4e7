"""An export checked against the function it came from: the artifact run by its own runtime in a fresh process
(``runtime.py``, which imports no jaxnets), its outputs compared with the jitted JAX function on the same batches.

Float artifacts must agree to ``max |diff| <= 1e-4 * (1 + max |expected|)`` per output (the tolerance jaxnets
holds its models to against torchvision, float32). A dynamic-range int8 TFLite file cannot: for it the top-1
agreement with the function is reported, not enforced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnets.errors import UserError
from jaxnets.export import runtime
from jaxnets.export.signature import Signature

RUNNER = Path(runtime.__file__)  # run as a script, in a process of its own
RELATIVE_TOLERANCE = 1e-4
BATCH_SIZES = (1, 3)


class VerificationError(UserError):
    """An artifact that does not load in its runtime, or does not reproduce the function it was exported from."""


@dataclass(frozen=True)
class Job:
    """Run artifact ``artifact`` of the export directory ``bundle`` on each batch of ``inputs``."""

    bundle: Path
    inputs: Mapping[str, np.ndarray]
    artifact: str = "model"


@dataclass(frozen=True)
class RuntimeRun:
    """What a fresh runtime process returned: per job, each batch's outputs; the runtimes it used; the watched
    packages it imported (``runtime.WATCHED``)."""

    outputs: list[dict[str, list[np.ndarray]]]
    runtimes: tuple[str, ...]
    imported: tuple[str, ...]


@dataclass(frozen=True)
class Verification:
    artifact: str
    max_abs_diff: float
    tolerance: float | None  # None: not enforced (int8)
    top1_agreement: float | None  # for 2-d outputs (classifiers)
    runtime: str
    imported: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        bound = "not enforced (int8)" if self.tolerance is None else f"<= {self.tolerance:.2e}"
        agreement = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        return (f"{self.artifact}: max |diff| vs jax {self.max_abs_diff:.2e} {bound}{agreement} "
                f"({self.runtime}, in a process without jaxnets)")


def run_in_fresh_process(jobs: Sequence[Job], timeout: float = 600) -> RuntimeRun:
    """Run ``jobs`` in one new Python process with only their runtimes (``runtime.py``)."""
    with tempfile.TemporaryDirectory(prefix="jaxnets-verify-") as tmp:
        spec = []
        for index, job in enumerate(jobs):
            inputs, outputs = Path(tmp) / f"in{index}.npz", Path(tmp) / f"out{index}.npz"
            np.savez(inputs, **job.inputs)
            spec.append({"bundle": str(job.bundle), "artifact": job.artifact, "inputs": str(inputs),
                         "outputs": str(outputs)})
        (Path(tmp) / "jobs.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run([sys.executable, str(RUNNER), str(Path(tmp) / "jobs.json")], capture_output=True,
                              text=True, env=env, timeout=timeout)
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise VerificationError(f"{jobs[0].bundle}: the runtime could not run the export: {lines[-1]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        outputs = []
        for index, job in enumerate(jobs):
            with np.load(Path(tmp) / f"out{index}.npz") as saved:
                outputs.append({key: [saved[f"{key}/{i}"] for i in range(_count(saved.files, key))]
                                for key in job.inputs})
    return RuntimeRun(outputs, tuple(report["runtimes"]), tuple(report["imported"]))


def _count(files: Sequence[str], key: str) -> int:
    return sum(1 for name in files if name.rpartition("/")[0] == key)


def unexpected_imports(format: str, run: RuntimeRun) -> list[str]:
    """Watched packages the runtime process imported beyond its format's runtime."""
    allowed = runtime.RUNTIME_PACKAGES[format] | (runtime.TFLITE_FALLBACK if "tf.lite" in run.runtimes else set())
    return [name for name in run.imported if name not in allowed]


def compare(expected: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]], *,
            enforce: bool = True) -> tuple[float, float | None, float | None]:
    """``(max |diff|, tolerance, top-1 agreement)`` over batches of outputs: the tolerance of the batch and output
    closest to failing (``None`` unless ``enforce``), the agreement over the 2-d outputs (``None`` without)."""
    worst, worst_tolerance, agree, total = 0.0, None, 0, 0
    for want_batch, got_batch in zip(expected, actual, strict=True):
        for want, got in zip(want_batch, got_batch, strict=True):
            want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
            if want.shape != got.shape:
                return float("inf"), (0.0 if enforce else None), None
            gap = np.where(np.isnan(want) & np.isnan(got), 0.0, np.abs(want - got))  # NaN where both are: equal
            diff = float(np.max(np.nan_to_num(gap, nan=np.inf), initial=0.0))  # NaN on one side only: infinitely off
            tolerance = RELATIVE_TOLERANCE * (1.0 + float(np.max(np.abs(np.nan_to_num(want)), initial=0.0)))
            if worst_tolerance is None or diff / tolerance > worst / worst_tolerance:
                worst, worst_tolerance = diff, tolerance
            if want.ndim == 2:
                agree += int(np.sum(want.argmax(-1) == got.argmax(-1)))
                total += len(want)
    return worst, (worst_tolerance if enforce else None), (agree / total if total else None)


def verification_inputs(signature: Signature, seed: int = 0) -> dict[str, np.ndarray]:
    """Random batches of sizes ``BATCH_SIZES``: standard normal values for float input, any pixel for uint8."""
    rng = np.random.default_rng(seed)
    batches = {}
    for size in BATCH_SIZES:
        shape = (size, *signature.input_shape)
        dtype = np.dtype(signature.input_dtype)
        batches[f"batch{size}"] = (rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8
                                   else rng.standard_normal(shape).astype(dtype))
    return batches


def expected_outputs(fn: Callable[[Any, jax.Array], Any], params: Any,
                     inputs: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The function's own outputs (jitted, as exported) for each batch of ``inputs``."""
    forward = jax.jit(fn)
    out = {}
    for key, batch in inputs.items():
        result = forward(params, batch)
        out[key] = [np.asarray(y) for y in (result if isinstance(result, (list, tuple)) else [result])]
    return out


def verify(fn: Callable[[Any, jax.Array], Any], params: Any, format: str, bundle: Path,
           artifacts: Mapping[str, bool], signature: Signature) -> list[Verification]:
    """Each of ``artifacts`` (file key -> whether the tolerance is enforced) against ``fn`` on random batches,
    in one fresh process; a ``VerificationError`` for an enforced artifact beyond tolerance, or a process that
    imported more than the format's runtime."""
    inputs = verification_inputs(signature)
    expected = expected_outputs(fn, params, inputs)
    run = run_in_fresh_process([Job(bundle, inputs, artifact) for artifact in artifacts])
    extra = unexpected_imports(format, run)
    if extra:
        raise VerificationError(f"{bundle}: loading the {format} export imported {', '.join(extra)}")
    results = []
    for (artifact, enforce), outputs in zip(artifacts.items(), run.outputs, strict=True):
        diff, tolerance, agreement = compare([expected[k] for k in inputs], [outputs[k] for k in inputs],
                                             enforce=enforce)
        result = Verification(artifact, diff, tolerance, agreement, ", ".join(run.runtimes), run.imported)
        if not result.ok:
            raise VerificationError(f"{bundle}: the {format} export does not reproduce the model: {result.describe()}"
                                    "; nothing written")
        results.append(result)
    return results

