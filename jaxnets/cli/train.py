"""Train a jaxnets model, data-parallel on every device, from one CPU to many hosts.

    jaxnets-train --model resnet34                       # embedded digits, no download, a few minutes
    jaxnets-train --model resnet50 --dataset tf_flowers --data-dir ~/tensorflow_datasets --pretrained
    jaxnets-train --model resnet18 --dataset /path/to/images --epochs 30

From a checkout, ``python train.py`` runs the same. Every flag is a field of ``jaxnets.config.TrainConfig``;
the work is ``jaxnets.training.train_and_evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxnets import errors, host
from jaxnets.config import TrainConfig, flag_name, recipe_settings

CONFIG_FLAG = "--config"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as argparse wants a type: its UserError becomes the flag's usage error, message kept."""
    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except errors.UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse_flag.__name__ = parse.__name__
    return parse_flag


def _flag_arguments(field: dataclasses.Field, hint: Any) -> tuple[str, dict[str, Any]]:
    """The flag and ``add_argument`` keywords of one ``TrainConfig`` field: implied by its type and default,
    plus what its ``setting`` metadata states (help, choices, a parser, ``auto`` defaults)."""
    meta = field.metadata
    kwargs: dict[str, Any] = dict(meta["argparse"])
    flag = flag_name(field.name)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    base = next(o for o in options if o is not type(None))
    help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
    default_text = None
    if base is bool and field.default is None:
        kwargs["action"] = argparse.BooleanOptionalAction  # --hflip / --no-hflip; neither: resolved
    elif base is bool and field.default:
        flag, kwargs["action"], kwargs["dest"] = f"--no-{flag[2:]}", "store_false", field.name
        help_text = f"no {help_text}" if help_text else ""
    elif base is bool:
        kwargs["action"] = "store_true"
    else:
        parse = kwargs.pop("type", None) or (_int_list if typing.get_origin(base) is tuple else base)
        kwargs["type"] = _argument_type(parse) if parse not in (int, float, str, _int_list) else parse
        if field.default is not None:
            default_text = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
    if meta["auto"] is not None:
        default_text = meta["auto"]
    kwargs["default"] = field.default
    if default_text is not None:
        help_text = f"{help_text} (default: {default_text})" if help_text else f"default: {default_text}"
    kwargs["help"] = help_text or None
    return flag, kwargs


def _wrapped_help(prog: str) -> argparse.HelpFormatter:
    """Help lines wrapped to the terminal (at most 100 columns), flags in a column of their own."""
    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    return argparse.HelpFormatter(prog, max_help_position=30, width=width)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field, generated: the field owns the default and the help."""
    # A short usage line: the generated one lists all ~60 flags in 20 lines above the help that explains them.
    p = errors.ArgumentParser(prog=prog or errors.command("train"), description=__doc__.split("\n\n")[0],
                              usage="%(prog)s [-h] [--config FILE] [--model MODEL] [--dataset DATASET] [options]",
                              formatter_class=_wrapped_help)
    p.add_argument(CONFIG_FLAG, metavar="FILE", help="start from the settings of a run's config.json (what it "
                                                      "resolved); flags given as well override them")
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        group = field.metadata["group"]
        if group is None:
            continue
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        flag, kwargs = _flag_arguments(field, hints[field.name])
        groups[group].add_argument(flag, **kwargs)
    return p


def config_from_args(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    """The run's settings: ``--config FILE``'s (when given), then the flags on the command line."""
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    given, _ = parser.parse_known_args(argv)
    if given.recipe is not None:  # the recipe's settings, under the config file's and the flags given
        parser.set_defaults(**recipe_settings(given.recipe))
    if given.config is not None:
        path = Path(given.config)
        if not path.is_file():
            raise errors.UserError(f"{CONFIG_FLAG} {given.config}: no such file")
        parser.set_defaults(**TrainConfig.settings_from_json(path.read_text(), where=f"{CONFIG_FLAG} {given.config}"))
    settings = vars(parser.parse_args(argv))
    settings.pop("config")
    return TrainConfig(**settings)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Train (or fit a linear probe); the exit status. A ``UserError`` or ``OSError`` is one line on stderr and
    status 1; anything else is a bug in jaxnets and keeps its traceback. A stop signal (SIGTERM, SIGINT) in the
    training loop saves a checkpoint and exits 128 + the signal; in a run of several processes a signal to any one
    stops all of them at the same step, and those that got none exit 128 + SIGTERM. ``argv=None`` is this process's
    command line, restarted on tcmalloc first where the system has it."""
    prog = prog or errors.command("train")
    if argv is None:
        host.use_tcmalloc()  # replaces the process; JAXNETS_ALLOCATOR=glibc: not
    host.retain_freed_memory()  # before JAX starts its threads; XLA:CPU steps page-fault less
    try:
        return errors.run_cli(prog, lambda: _run(config_from_args(argv, prog)))
    except KeyboardInterrupt:  # outside the training loop (inside it, Ctrl-C saves a checkpoint and returns)
        print(f"{prog}: interrupted outside the training loop; checkpoints already saved are kept", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(config: TrainConfig) -> int:
    if config.linear_probe:
        from jaxnets import probe

        probe.run_linear_probe(config)
        return 0
    from jaxnets import training

    result = training.train_and_evaluate(config)
    return 128 + result.interrupted if result.interrupted else 0
