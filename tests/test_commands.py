"""The six commands have one home, ``jaxnets.cli``: each installed command's entry point is a ``main`` there, and
the ways a checkout runs them (``python train.py``, ``python -m jaxnets.predict``, ...) reach the same code."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import tomllib

import jaxnets

ROOT = Path(jaxnets.__file__).parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# How a checkout runs each command, and the name its usage line shows then.
CHECKOUT = {"jaxnets-train": (["train.py"], "train.py"),
            "jaxnets-convert": (["convert_weights.py"], "convert_weights.py"),
            "jaxnets-predict": (["-m", "jaxnets.predict"], "python -m jaxnets.predict"),
            "jaxnets-evaluate": (["-m", "jaxnets.evaluate"], "python -m jaxnets.evaluate"),
            "jaxnets-export": (["-m", "jaxnets.export"], "python -m jaxnets.export"),
            "jaxnets-benchmark": (["-m", "jaxnets.benchmark"], "python -m jaxnets.benchmark"),
            "jaxnets-push": (["-m", "jaxnets.cli.push"], "python -m jaxnets.cli.push")}


def test_every_installed_command_is_a_main_in_jaxnets_cli():
    assert set(SCRIPTS) == set(CHECKOUT)
    for command, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert module == f"jaxnets.cli.{command.removeprefix('jaxnets-')}" and function == "main", target


def _entry_help(command: str) -> str:
    """What the installed command's entry function prints for ``--help`` (it exits with status 0)."""
    module, _, function = SCRIPTS[command].partition(":")
    out = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(out):
        getattr(import_module(module), function)(["--help"])
    assert done.value.code == 0, command
    return out.getvalue()


def _options(help_text: str) -> set[str]:
    return {word.strip(",[]") for word in help_text.split() if word.startswith("--")}


@pytest.mark.parametrize("command", sorted(CHECKOUT))
def test_each_entry_point_prints_its_help_under_the_installed_name(command):
    text = _entry_help(command)
    assert text.startswith(f"usage: {command} ") and "--help" in _options(text), text[:200]


@pytest.mark.xdist_group("subprocess")
def test_each_checkout_path_prints_the_same_help_under_its_own_name():
    """One process per path, all at once: the shims delegate to ``jaxnets.cli`` (the same options as the entry
    point), name the command as it was run, and ``python -m`` warns of no module imported twice."""
    environment = {**os.environ, "JAXNETS_ALLOCATOR": "glibc"}  # no restart on tcmalloc: the help only
    runs = {command: subprocess.Popen([sys.executable, *args, "--help"], cwd=ROOT, env=environment, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for command, (args, _) in CHECKOUT.items()}
    for command, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (command, err)
        assert out.startswith(f"usage: {CHECKOUT[command][1]} "), (command, out[:200])
        assert "RuntimeWarning" not in err, (command, err)
        assert _options(out) == _options(_entry_help(command)), command


def test_the_export_subpackage_and_its_modules_are_reachable_and_its_function_is_export_model():
    import jaxnets.export.bundle

    assert jaxnets.export.bundle.FORMAT == "jaxnets.export"
    assert jaxnets.export.__name__ == "jaxnets.export" and not callable(jaxnets.export)
    assert jaxnets.export_model is jaxnets.export.export
    assert {"export", "export_model"} <= set(jaxnets.__all__)


@pytest.mark.xdist_group("subprocess")
def test_importing_the_commands_loads_neither_the_benchmark_nor_torch():
    """``jaxnets.cli.benchmark`` imports the benchmark only when it runs: the commands stay in the library's
    import graph, which never holds the benchmark or torch."""
    code = ("import sys; import " + ", ".join(target.partition(":")[0] for target in SCRIPTS.values()) + "; "
            "print(sorted(m for m in sys.modules if m.startswith('jaxnets.benchmark') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# Each command's arguments that reach its parser's own checks (a positional argument where it needs one).
USAGE_ERRORS = {"jaxnets-train": ["--epochs", "many"], "jaxnets-convert": ["--all", "resnet18"],
                "jaxnets-predict": ["--top", "0", "x.png"], "jaxnets-evaluate": ["--batch-size", "0"],
                "jaxnets-export": ["--format", "onnx"], "jaxnets-benchmark": ["--suite", "nope"],
                "jaxnets-push": ["run", "not a repo"]}


@pytest.mark.parametrize("command", sorted(CHECKOUT))
def test_a_usage_error_is_argparse_s_one_line_and_exit_status_1_as_every_user_error(command, capsys):
    """An unknown flag (argparse's own check) and a bad value (the command's checks after parsing): the usage,
    one ``<command>: error:`` line, and status 1, the status of every user error (argparse's is 2)."""
    module, _, function = SCRIPTS[command].partition(":")
    main = getattr(import_module(module), function)
    for argv in (["--no-such-flag"], USAGE_ERRORS[command]):
        if command == "jaxnets-benchmark" and argv == ["--no-such-flag"]:
            continue  # its suites' parsers (jaxnets.benchmark) are their own: test_benchmark
        try:
            status = main(argv)
        except SystemExit as done:
            status = done.code
        err = capsys.readouterr().err.splitlines()
        assert status == 1, (argv, err)
        assert err[-1].startswith(f"{command}: error: ") and "Traceback" not in "".join(err), (argv, err)
