"""What a user error is, and how the command-line tools report one.

Every deliberate check in jaxnets raises a ``UserError`` (or a subclass: ``DataError``, ``WeightsError``,
...): a ``ValueError``, so library callers catch it as before. A CLI prints a ``UserError`` or an ``OSError``
(a missing file, a full disk) as one line and exits non-zero; anything else is a bug in jaxnets and keeps
its traceback, so that it is never mistaken for a mistake of the user's.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import difflib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn


class UserError(ValueError):
    """A deliberate refusal of bad input; its message names the flag, file, key or shape at fault."""


# The commands a pip install puts on PATH (pyproject's [project.scripts]); what error messages tell a user to run.
COMMANDS = {"train": "jaxnets-train", "convert": "jaxnets-convert", "predict": "jaxnets-predict",
            "benchmark": "jaxnets-benchmark", "evaluate": "jaxnets-evaluate", "export": "jaxnets-export",
            "push": "jaxnets-push"}
_invoked: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("jaxnets_invoked_as",
                                                                                     default=())


def command(tool: str) -> str:
    """How the user runs ``tool`` (a key of ``COMMANDS``): the way it was started in this process when it was
    (``python convert_weights.py`` from a checkout), else its installed command."""
    return dict(_invoked.get()).get(tool, COMMANDS[tool])


@contextlib.contextmanager
def invoked_as(tool: str, how: str) -> Iterator[None]:
    """Within the block, messages that name ``tool`` name it as ``how``."""
    token = _invoked.set((*_invoked.get(), (tool, how)))
    try:
        yield
    finally:
        _invoked.reset(token)


def install_hint(extra: str) -> str:
    """The command that installs the optional dependencies ``extra`` into the install the user has: from a source
    checkout (an editable install, which has the project's pyproject.toml above the package) or from a wheel."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install 'jaxnets[{extra}]'"


def did_you_mean(name: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean a or b?"`` for the names in ``known`` close to ``name`` (case-insensitive), else ``""``:
    the suffix every "unknown X" message ends with."""
    close = difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's whole message on one line (white space folded), cut to ``limit`` characters: for quoting a
    third-party error inside a message of ours."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a size to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


USAGE_STATUS = 1  # a user error, be it a bad flag (argparse's own exits 2) or bad input: one status for both


def print_error(prefix: str, message: str) -> None:
    """``'<prefix>: error: <message>'`` on stderr: how every command reports a user error (argparse's form)."""
    print(f"{prefix}: error: {message}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every jaxnets command: argparse's, whose usage errors (an unknown flag, a bad value,
    ``parser.error``) print its usage and one ``prog: error:`` line as always, but exit with ``USAGE_STATUS``,
    as every other user error does (argparse exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_STATUS, f"{self.prog}: error: {message}\n")


def run_cli(prefix: str, main: Callable[[], int]) -> int:
    """``main()``'s exit status; a ``UserError`` or ``OSError`` becomes ``'<prefix>: error: <first line>'`` on
    stderr and status 1. Other exceptions propagate with their traceback: they are bugs."""
    try:
        return main()
    except (UserError, OSError) as error:
        print_error(prefix, first_line(error))
        return USAGE_STATUS
