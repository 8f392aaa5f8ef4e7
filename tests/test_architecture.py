"""The layout's promises: one option schema (checked when a family is registered, every recordable type
surviving a weights file), one eval-transform record, no import cycles in jaxnets/, torch imported in one
place, the benchmark outside the library's import graph, and CLIs that shorten user errors only."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import pytest

import jaxnets
from jaxnets import errors, registry
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform, resize_for_crop
from jaxnets.registry import ModelSpec, PretrainedWeights

PACKAGE = Path(jaxnets.__file__).parent
ROOT = PACKAGE.parent


# --- the option schema -------------------------------------------------------------------------------


class EveryOptionType(nn.Module):
    """A toy family with a free field of every type a weights file can record."""

    num_classes: int = 1000
    flag: bool = False
    count: int = 2
    scale: float = 1.0
    mode: str = "a"
    clip: float | None = None
    tag: str | None = None
    sizes: tuple[int, ...] = (1, 2)
    gains: tuple[float, ...] = (0.5,)
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, pre_logits: bool = False, frozen_norm=()):
        x = jnp.mean(x, axis=(1, 2))
        return x if pre_logits else nn.Dense(self.num_classes, name="fc")(x)


class UnrecordableOption(nn.Module):
    num_classes: int = 1000
    schedule: dict | None = None  # a dict option cannot be checked or rebuilt from a weights file
    dtype: object = jnp.float32


def _toy_spec(name: str, module: type[nn.Module]) -> ModelSpec:
    return ModelSpec(name, "toy", module, PretrainedWeights("https://example.invalid/toy-00000000.pth", 0.0, 0.0, 0,
                                                            0.0, (1, 1)), head=("fc",))


def test_a_family_with_an_unrecordable_option_is_refused_at_registration():
    with pytest.raises(TypeError, match=r"model 'unrecordable': option 'schedule' has type .*dict.*cannot record"):
        registry.register_model(_toy_spec("unrecordable", UnrecordableOption))
    assert "unrecordable" not in registry.list_models()


def test_the_registered_families_options_are_their_free_fields():
    assert {k: v.name for k, v in registry.options("googlenet").items()} == {
        "aux_logits": "bool", "transform_input": "bool", "dropout": "float", "dropout_aux": "float",
        "in_chans": "int", "features_only": "bool", "out_indices": "tuple[int, ...] | None", "remat": "bool"}
    # the rest is bound or reserved
    assert set(registry.options("resnet50")) == {"zero_init_residual", "shortcut", "in_chans", "features_only",
                                                 "out_indices", "remat"}
    assert {k: v.name for k, v in _toy_spec("toy", EveryOptionType).options.items()} == {
        "flag": "bool", "count": "int", "scale": "float", "mode": "str", "clip": "float | None",
        "tag": "str | None", "sizes": "tuple[int, ...]", "gains": "tuple[float, ...]"}


CHOSEN = {"flag": True, "count": 3, "scale": 0.25, "mode": "b", "clip": 2.5, "tag": None, "sizes": (4, 5, 6),
          "gains": (1.5, 2.0)}


@pytest.fixture
def toy(monkeypatch):
    spec = _toy_spec("toy_every_option", EveryOptionType)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec


def test_every_recordable_option_type_round_trips_through_final_weights(toy, tmp_path):
    """train.py records the options its model was built with in final_weights.safetensors; loading the file
    rebuilds that model, with the same types (tuples stay tuples, None stays None)."""
    from jaxnets import training
    from jaxnets.config import TrainConfig
    from jaxnets.final_weights import FINAL_WEIGHTS
    from jaxnets.weights import load_pretrained, load_weights

    model = toy.create(10, **CHOSEN)
    assert toy.recorded_options(model) == CHOSEN
    # The whole route: a training run of the toy model builds it with its defaults; record what it was built with.
    config = TrainConfig(model=toy.name, workdir=str(tmp_path / "run"), steps=1, epochs=1, progress=False,
                         compile_cache="")
    result = training.train_and_evaluate(config)
    final = result.run_dir / FINAL_WEIGHTS
    defaults = toy.recorded_options(toy.create())
    assert load_weights(final).model_options == json.loads(json.dumps(defaults))
    rebuilt, _ = load_pretrained(toy.name, weights=final)
    assert toy.recorded_options(rebuilt) == defaults

    # Each chosen value, of each type, through a file and back to the module.
    variables = jaxnets.weights.instantiate(load_weights(final))[1]
    path = jaxnets.save_weights(tmp_path / "chosen.safetensors", toy.name, variables, model_options=CHOSEN)
    rebuilt, _ = load_pretrained(toy.name, weights=path)
    assert toy.recorded_options(rebuilt) == CHOSEN
    assert type(rebuilt.sizes) is tuple and type(rebuilt.gains[0]) is float and rebuilt.tag is None


def test_a_training_run_resolves_its_model_once_per_config(monkeypatch, tmp_path):
    """The run passes the model's description down instead of its name: the registry is asked for the name
    only by ``TrainConfig.spec``, once for each of the three configs a run holds (as given, resolved, and with
    the dataset's class count), through freezing, layer-wise decay, clipping and the final weights file."""
    from jaxnets import training
    from jaxnets.config import TrainConfig

    lookups: list[str] = []

    class CountingRegistry(dict):
        def __getitem__(self, name):
            lookups.append(name)
            return super().__getitem__(name)

    monkeypatch.setattr(registry, "_REGISTRY", CountingRegistry(registry._REGISTRY))
    config = TrainConfig(model="resnet18", workdir=str(tmp_path / "run"), steps=1, epochs=1, batch_size=8,
                         image_size=16, freeze="layer1", layer_decay=0.8, grad_clip=1.0, progress=False,
                         compile_cache="")
    assert training.train_and_evaluate(config).step == 1
    assert lookups == ["resnet18"] * 3


@pytest.mark.parametrize(("options", "message"), [
    ({"sizes": [1, "2"]}, r"option sizes=\[1, \"2\"\] has the wrong type: expected tuple\[int, \.\.\.\]"),
    ({"clip": "none"}, r"option clip=\"none\" has the wrong type: expected float \| None \(a number or null\)"),
    ({"count": True}, r"option count=true has the wrong type: expected int"),
])
def test_recorded_options_of_the_wrong_type_are_refused(toy, options, message):
    with pytest.raises(UserError, match=message):
        toy.check_options(options)


# --- the eval transform --------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [16, 64, 224, 299])
def test_the_eval_transform_round_trips_through_its_record(crop):
    from jaxnets.data import DataConfig

    transform = EvalTransform().at_crop(crop)
    assert transform.resize_size == resize_for_crop(crop) == DataConfig(image_size=crop).eval_transform.resize_size
    assert EvalTransform().from_record(transform.to_record(), min_size=1, where="w") == transform
    assert EvalTransform().from_record({"crop_size": crop}, min_size=1, where="w") == transform
    explicit = EvalTransform().at_crop(crop, crop + 3)
    assert EvalTransform().from_record(json.loads(json.dumps(explicit.to_record())), min_size=1, where="w") == explicit


# --- the import graph -----------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {"jaxnets": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="jaxnets."):
        base = PACKAGE.joinpath(*info.name.split(".")[1:])
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The jaxnets modules ``module`` imports, at any depth of its code (lazy imports count too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # A module's `if __name__ == "__main__":` block runs only when the file is run as a script, when the module
    # is __main__ and not `module`: its imports (a shim calling jaxnets.cli) are no edges of the import graph.
    tree.body = [node for node in tree.body
                 if not (isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from jaxnets import host` imports the module jaxnets.host
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != module}


def test_no_import_cycles_inside_jaxnets():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert {"jaxnets.registry", "jaxnets.errors", "jaxnets.weights"} <= set(graph)

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [cycle for name in graph if (cycle := cycle_from(name))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    modules = {"jaxnets.a": tmp_path / "a.py", "jaxnets.b": tmp_path / "b.py", "jaxnets": tmp_path / "x.py"}
    modules["jaxnets.a"].write_text("def f():\n    from jaxnets import b\n")
    modules["jaxnets.b"].write_text("from . import a\nimport jaxnets\n")
    assert _imports("jaxnets.a", modules["jaxnets.a"], modules) == {"jaxnets.b"}
    assert _imports("jaxnets.b", modules["jaxnets.b"], modules) == {"jaxnets.a", "jaxnets"}


def test_no_two_modules_share_a_base_name():
    """A module's name says what it holds: one ``predict.py`` or ``metrics.py`` in the tree, never two. The
    exceptions are a package's ``__init__``/``__main__`` and ``config.py`` (the run's, and the data's)."""
    stems: dict[str, list[str]] = {}
    for name, path in _modules().items():
        stems.setdefault(path.stem, []).append(name)
    shared = {stem: names for stem, names in stems.items()
              if len(names) > 1 and stem not in ("__init__", "__main__", "config")}
    assert not shared, shared


def test_torch_is_imported_only_by_torch_io_and_the_benchmark():
    importers = sorted(name for name, path in _modules().items()
                       if any(target == "torch" or target.startswith(("torch.", "torchvision"))
                              for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                              for target in _raw_imports(node)))
    assert importers and all(name == "jaxnets.weights.torch_io" or name.startswith("jaxnets.benchmark")
                             for name in importers), importers


def _raw_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_the_library_never_imports_the_benchmark():
    modules = _modules()
    tool = ("jaxnets.benchmark", "jaxnets.cli.benchmark")  # the benchmark, and its command, which runs it
    library = {name for name in modules if not name.startswith(tool)}
    offenders = {name: sorted(t for t in _imports(name, modules[name], modules) if t.startswith(tool))
                 for name in library}
    assert not {k: v for k, v in offenders.items() if v}
    code = ("import sys, jaxnets, jaxnets.training, jaxnets.predict, jaxnets.cli.train, jaxnets.cli.convert; "
            "print(sorted(m for m in sys.modules if m.startswith('jaxnets.benchmark') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_readers_of_a_run_never_import_the_trainer():
    """jaxnets-evaluate and jaxnets-export read a run's final weights (jaxnets.final_weights), not the trainer."""
    code = ("import sys, tempfile, jaxnets.evaluate, jaxnets.evaluate.run, jaxnets.cli.export, jaxnets.predict\n"
            "try:\n    jaxnets.predict.weights_path(tempfile.mkdtemp())  # a run directory: its final weights\n"
            "except jaxnets.UserError:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'jaxnets.training'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- user errors and bugs at the command line --------------------------------------------------------------


def test_predict_reports_a_user_error_in_one_line(tmp_path, capsys):
    from jaxnets.cli import predict as cli

    assert cli.main(["--model", "resnet18", "--weights", str(tmp_path / "none.safetensors"), "x.jpg"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"jaxnets-predict: error: {tmp_path / 'none.safetensors'}: no such file\n"


def test_predict_lets_a_bug_show_its_traceback(monkeypatch):
    from jaxnets.cli import predict as cli
    from jaxnets.predict import classification

    def bug(*args, **kwargs):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(classification, "open_pretrained", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["--model", "resnet18", "x.jpg"])


def test_convert_reports_user_errors_in_one_line_and_bugs_with_a_traceback(tmp_path, monkeypatch, capsys):
    from jaxnets.cli import convert as cli

    assert cli.main(["resnet18", "--from", str(tmp_path / "missing.pth")]) == 1
    assert capsys.readouterr().err == f"jaxnets-convert: error: {tmp_path / 'missing.pth'}: no such file\n"

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(cli, "convert", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        cli.main(["resnet18", "--from", str(tmp_path / "missing.pth")])


def test_installed_commands_are_declared_and_importable():
    from importlib import import_module

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"jaxnets-train", "jaxnets-convert", "jaxnets-predict", "jaxnets-benchmark",
                            "jaxnets-evaluate", "jaxnets-export", "jaxnets-push"}
    assert set(scripts) == {f"jaxnets-{name}" for name in errors.COMMANDS}  # what error messages tell users to run
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(import_module(module), function)), target


def test_train_reports_a_user_error_in_one_line_and_lets_a_bug_show_its_traceback(tmp_path, monkeypatch, capsys):
    from jaxnets import training
    from jaxnets.cli import train as cli

    assert cli.main(["--model", "resnet18", "--lr", "-1", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "jaxnets-train: error: --lr must be > 0, got -1.0\n"

    def bug(config):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(training, "train_and_evaluate", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["--model", "resnet18", "--workdir", str(tmp_path)])
    script = subprocess.run([sys.executable, "train.py", "--model", "resnet18", "--batch-size", "0"], cwd=ROOT,
                            capture_output=True, text=True, env={**__import__("os").environ,
                                                                 "JAXNETS_ALLOCATOR": "glibc"})
    assert script.returncode == 1
    assert script.stderr.splitlines()[-1] == "train.py: error: --batch-size must be >= 1, got 0"
