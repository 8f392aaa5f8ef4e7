"""``convert_weights.py``: flags, exit statuses and one-line errors (called in-process through ``main``,
plus one real subprocess to prove the script runs as a script)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch_oracle import oracle_model

import jaxnets
from jaxnets.weights import load_weights, pretrained, torch_io

SCRIPT = Path(__file__).resolve().parents[1] / "convert_weights.py"
_spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "resnet18.pth"
    torch.save(oracle_model("resnet18").state_dict(), path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_convert_with_verify(resnet18_pth, tmp_path, capsys):
    out = tmp_path / "r18.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}; verified: max |logit diff| vs torchvision" in printed
    diff, tolerance = (float(v) for v in printed.split("torchvision ")[1].split(" <= "))
    assert diff <= tolerance
    assert load_weights(out).metadata["source"] == "resnet18.pth"


def test_verify_above_tolerance_fails_and_writes_nothing(resnet18_pth, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch_io, "TOLERANCE", -1.0)  # any difference, even 0, is now too much
    out = tmp_path / "r18.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth), "--out", str(out), "--verify"]) == 1
    assert "does not reproduce torchvision" in one_line_error(capsys)
    assert not out.exists()


def test_verify_catches_a_wrong_conversion_and_writes_nothing(resnet18_pth, tmp_path, capsys, monkeypatch):
    """A real mismatch, at the real tolerance: the converter scales conv1's kernel by 1.01 (a 1 % error the
    logits carry), torchvision runs the source file. ``--verify`` must see it, whatever TOLERANCE is."""
    convert = pretrained.from_torch_state_dict

    def one_percent_off(name, state_dict, **options):
        variables = convert(name, state_dict, **options)
        variables["params"]["conv1"]["kernel"] = variables["params"]["conv1"]["kernel"] * 1.01
        return variables

    monkeypatch.setattr(pretrained, "from_torch_state_dict", one_percent_off)
    out = tmp_path / "r18.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth), "--out", str(out), "--verify"]) == 1
    err = one_line_error(capsys)
    assert err.startswith("convert_weights.py: error: resnet18.pth: resnet18 in jaxnets does not reproduce "
                          "torchvision: max |logit diff| "), err
    assert err.rstrip().endswith("; nothing written"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp file left either


def test_default_output_goes_next_to_a_local_source(resnet18_pth, capsys):
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth)]) == 0
    assert load_weights(resnet18_pth.with_name("resnet18.jaxnets.safetensors")).name == "resnet18"


def test_option_is_recorded(resnet18_pth, tmp_path, capsys):
    out = tmp_path / "r18.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth), "--out", str(out),
                                 "--option", "zero_init_residual=true"]) == 0
    assert load_weights(out).model_options == {"zero_init_residual": True}


def test_to_torch_exports_pth_and_safetensors(resnet18_pth, tmp_path, capsys):
    flax_file = tmp_path / "r18.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(resnet18_pth), "--out", str(flax_file)]) == 0
    original = torch.load(resnet18_pth, weights_only=True)
    for out in (tmp_path / "back.pth", tmp_path / "back.safetensors"):
        assert convert_weights.main(["--to-torch", str(flax_file), "--out", str(out)]) == 0
        state = torch.load(out, weights_only=True) if out.suffix == ".pth" else safetensors.torch.load_file(out)
        torchvision.models.resnet18().load_state_dict(state, strict=True)
        assert all(torch.equal(state[k], v) for k, v in original.items() if "num_batches" not in k)


def test_no_source_offline_fails_with_a_one_line_hint(offline, capsys):
    assert convert_weights.main(["resnet18"]) == 1
    err = one_line_error(capsys)
    assert "cannot download https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert "python convert_weights.py resnet18 --from resnet18-f37072fd.pth" in err


def test_all_reports_every_model_and_fails(offline, capsys):
    assert convert_weights.main(["--all"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(jaxnets.list_models())
    assert all(f"{name}: cannot download" in line for name, line in zip(jaxnets.list_models(), err, strict=True))


@pytest.mark.parametrize("argv", [[], ["resnet18", "--all"], ["--all", "--from", "x.pth"], ["--to-torch", "x"],
                                  ["resnet18", "--option", "no_equals_sign"]])
def test_bad_flags_exit_1(argv, capsys):
    with pytest.raises(SystemExit) as info:
        convert_weights.main(argv)
    assert info.value.code == 1
    assert "error:" in capsys.readouterr().err


def test_script_exits_nonzero_with_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    result = subprocess.run([sys.executable, str(SCRIPT), "--to-torch", str(missing), "--out", str(tmp_path / "x.pth")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"convert_weights.py: error: {missing}: no such file\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, resnet18_pth):
    """Valid torchvision state dicts, so that a refusal is the option's doing, not the file's."""
    directory = tmp_path_factory.mktemp("sources")
    files = {"resnet18": resnet18_pth}
    for name in ("googlenet", "alexnet"):
        files[name] = directory / f"{name}.pth"
        torch.save(oracle_model(name).state_dict(), files[name])
    return files


def test_output_that_is_the_source_is_refused(resnet18_pth, tmp_path, capsys):
    source = tmp_path / "src.safetensors"
    safetensors.torch.save_file(torch.load(resnet18_pth, weights_only=True), source)
    flax_file = tmp_path / "z.safetensors"
    assert convert_weights.main(["resnet18", "--from", str(source), "--out", str(flax_file)]) == 0
    capsys.readouterr()
    for argv, file in ((["resnet18", "--from", str(source)], source), (["--to-torch", str(flax_file)], flax_file)):
        before = file.read_bytes()
        assert convert_weights.main([*argv, "--out", str(file)]) == 1
        assert f"the output is the source file {file}" in one_line_error(capsys)
        assert file.read_bytes() == before


@pytest.mark.parametrize(("name", "option", "message"), [
    ("resnet18", "stage_sizes=[1,1,1,1]", "option stage_sizes=[1, 1, 1, 1] refused: resnet18 binds "
                                          "stage_sizes=(2, 2, 2, 2), it is the architecture"),
    ("resnet18", "block_cls=1", "option block_cls=1 refused: resnet18 binds block_cls=<class"),
    ("resnet18", "zero_init_residual=1", "option zero_init_residual=1 has the wrong type: expected bool"),
    ("resnet18", "num_classes=10", "'num_classes' is not a model option"),
    ("alexnet", 'dropout="high"', 'option dropout="high" has the wrong type: expected float (a number)'),
    ("alexnet", "dropout=true", "option dropout=true has the wrong type: expected float"),
    ("googlenet", 'transform_input="yes"', 'option transform_input="yes" has the wrong type: expected bool'),
    ("googlenet", "zero_init_residual=true", "unknown option 'zero_init_residual'; accepted: aux_logits, "
                                             "dropout, dropout_aux, features_only, in_chans, out_indices, "
                                             "transform_input"),
])
def test_bad_option_is_refused_and_nothing_written(sources, tmp_path, capsys, name, option, message):
    out = tmp_path / "out.safetensors"
    assert convert_weights.main([name, "--from", str(sources[name]), "--out", str(out), "--option", option]) == 1
    assert f"convert_weights.py: error: {name}: {message}" in one_line_error(capsys)
    assert not out.exists()


def test_integer_for_a_float_option_is_recorded_as_a_float(sources, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    assert convert_weights.main(["googlenet", "--from", str(sources["googlenet"]), "--out", str(out),
                                 "--option", "dropout=0"]) == 0
    options = load_weights(out).model_options
    assert options["dropout"] == 0.0 and isinstance(options["dropout"], float)

