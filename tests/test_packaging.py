"""What the install gives (issue 31): the test extra takes torch from the torch extra (one statement of it) and
not the ONNX exporter, whose jax2onnx pins orbax-checkpoint below the release the library resolves; the README
tells a CPU-only machine how to get CPU torch before the command that would pull the CUDA build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_the_test_extra_takes_torch_from_its_extra_and_leaves_the_onnx_exporter_out():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    test = extras["test"]
    assert {_name(r) for r in test}.isdisjoint({"jax2onnx", "onnx", "onnxruntime", "torch", "torchvision"}), test
    (own,) = [r for r in test if _name(r) == "jaxnets"]
    assert {"torch", "tf-export"} <= set(re.search(r"\[(.*)\]", own).group(1).split(","))
    stating_torch = [name for name, requirements in extras.items() if "torch" in {_name(r) for r in requirements}]
    assert stating_torch == ["torch"]
    assert "jax2onnx" in {_name(r) for r in extras["onnx"]}


def test_the_readme_gives_the_cpu_route_before_the_test_command_and_ci_runs_the_onnx_tests():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cpu_route = readme.index("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    test_command = readme.index('pip install -e ".[test]" && python -m pytest')
    assert cpu_route < test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.index('pip install --quiet -e ".[test]"') < ci.index('pip install --quiet -e ".[onnx]"')
    assert "tests/test_export.py -k onnx" in ci
