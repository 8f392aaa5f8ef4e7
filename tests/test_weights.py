"""The weight workflow against torchvision itself: convert -> file -> load_pretrained -> predict -> export
-> torchvision ``load_state_dict(strict=True)``, for one model per family, plus every way it must refuse.

Checkpoints are real torchvision state dicts with random weights and randomized BatchNorm statistics
(``torch_oracle.oracle_model``), saved with ``torch.save`` and safetensors. Tolerance for float32
logits: max|jax - torch| <= 1e-4 * (1 + max|torch|) (``max_rel_error``).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from flax import traverse_util
from PIL import Image
from torch_oracle import max_rel_error, nchw, one_per_family, oracle_model

import jaxnets
from jaxnets import predict
from jaxnets.weights import (
    WeightsError,
    cached_weights_path,
    convert,
    export_torch,
    for_new_task,
    load_pretrained,
    load_weights,
    model_options,
    read_state_dict,
    reinitialize_head,
    save_weights,
)

TOL = 1e-4
NO_INIT = {"googlenet": {"init_weights": False}}  # silences torchvision's warning; the weights are loaded anyway
FAMILIES = one_per_family(prefer_batch_norm=True)  # BatchNorm variants: their statistics travel too


def torch_model(name: str, seed: int = 0) -> torch.nn.Module:
    # GoogLeNet as torchvision builds it for its ImageNet weights (converted with these options, given).
    options = get_model_kwargs(name)
    return oracle_model(name, seed, **options)


def get_model_kwargs(name: str) -> dict:
    return dict(jaxnets.get_spec(name).weights.model_kwargs)


def save_checkpoints(model: torch.nn.Module, directory: Path, stem: str) -> tuple[Path, Path]:
    pth, st = directory / f"{stem}.pth", directory / f"{stem}.safetensors"
    torch.save(model.state_dict(), pth)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    return pth, st


def flat(variables) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}


def generated_images() -> list[Image.Image]:
    """Two smooth random RGB images of different aspect ratios (neither 256 nor 224 on a side)."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in [(300, 241), (233, 347)]:
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    return images


def torchvision_logits(model: torch.nn.Module, images: list[Image.Image], name: str) -> np.ndarray:
    """The oracle: torchvision's own eval transform for these weights, then the torch model."""
    transform = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
    with torch.no_grad():
        return model(torch.stack([transform(image) for image in images])).numpy()


@pytest.fixture(scope="module")
def googlenet_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("googlenet")
    model = torch_model("googlenet")
    pth, _ = save_checkpoints(model, directory, "googlenet")
    out = directory / "googlenet.jaxnets.safetensors"
    return model, pth, convert("googlenet", pth, out, model_options=get_model_kwargs("googlenet")).path


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resnet18")
    model = torch_model("resnet18")
    pth, st = save_checkpoints(model, directory, "resnet18")
    out = convert("resnet18", pth, directory / "resnet18.jaxnets.safetensors").path
    return model, pth, st, out


# --- the whole path, every family ----------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_load_predict_export_round_trip(name, tmp_path):
    model = torch_model(name)
    pth, st = save_checkpoints(model, tmp_path, name)
    images = generated_images()
    expected = torchvision_logits(model, images, name)

    # Each file is deleted once it has been read: VGG-11's are 530 MB apiece, and CI's disk is finite.
    first = None
    for source in (pth, st):
        converted = convert(name, source, tmp_path / f"from_{source.suffix[1:]}.safetensors",
                            model_options=get_model_kwargs(name)).path
        source.unlink()
        jax_model, variables = load_pretrained(name, weights=converted)
        if first is not None:  # the same model and variables, bit for bit, predict what the first file's did
            assert jax_model == first[0]
            assert jax.tree.all(jax.tree.map(np.array_equal, variables, first[1]))
            assert jax.tree.structure(variables) == jax.tree.structure(first[1])
        else:
            first = jax_model, variables
            x = np.stack([predict.preprocess(image, jaxnets.get_spec(name).weights.transforms) for image in images])
            logits = predict.classify(jax_model, variables, x, batch_size=2)
            assert max_rel_error(logits, expected) <= TOL
            best = predict.top_k(logits, 3, jaxnets.imagenet_categories())
            expected_best = predict.top_k(expected, 3, jaxnets.imagenet_categories())
            assert [[c for c, _ in row] for row in best] == [[c for c, _ in row] for row in expected_best]

        exported = export_torch(converted, tmp_path / f"back{source.suffix}")
        converted.unlink()
        state = (torch.load(exported, weights_only=True) if exported.suffix == ".pth"
                 else safetensors.torch.load_file(exported))
        exported.unlink()
        with torch.device("meta"):  # no initialization: every tensor comes from the exported file
            back = torchvision.models.get_model(name, weights=None, **get_model_kwargs(name), **NO_INIT.get(name, {}))
        back.load_state_dict(state, strict=True, assign=True)
        for key, value in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(state[key], value), key  # weights survive the round trip bit for bit
        assert np.array_equal(torchvision_logits(back.eval(), images, name), expected)


def test_safetensors_conversion_and_load_work_without_torch(resnet18_files, tmp_path):
    model, pth, st, _ = resnet18_files
    x = np.random.default_rng(1).standard_normal((2, 40, 40, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        sys.modules["torchvision"] = None
        import numpy as np
        from jaxnets.weights import WeightsError, convert, export_torch, load_pretrained
        st, pth, out = sys.argv[1:4]
        convert("resnet18", st, out)
        model, variables = load_pretrained("resnet18", weights=out)
        np.save(out + ".logits.npy", np.asarray(model.apply(variables, np.load(sys.argv[4]))))
        export_torch(out, out + ".torch.safetensors")
        for action in (lambda: convert("resnet18", pth, out + ".2"), lambda: convert("resnet18")):
            try:
                action()
            except WeightsError as exc:
                print("REFUSED", exc)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """)
    out = tmp_path / "resnet18.safetensors"
    result = subprocess.run([sys.executable, "-c", script, str(st), str(pth), str(out), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAXNETS_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model(nchw(x)).numpy()
    assert max_rel_error(np.load(f"{out}.logits.npy"), expected) <= TOL
    exported = torchvision.models.resnet18()
    exported.load_state_dict(safetensors.torch.load_file(f"{out}.torch.safetensors"), strict=True)
    refusals = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refusals) == 2
    assert "needs torch" in refusals[0] and "resnet18.pth" in refusals[0]
    assert "needs torch" in refusals[1] and "--from" in refusals[1]


def test_the_file_format_reads_and_writes_weights_files_without_torch(resnet18_files, tmp_path):
    """``jaxnets.weights.fileformat`` (and the model it loads) where ``import torch`` cannot succeed: a machine
    without torch reads, verifies and writes jaxnets weights files, and nothing imports torch on the way."""
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        sys.modules["torchvision"] = None
        import numpy as np
        from jaxnets.weights import fileformat, instantiate
        original = fileformat.load_weights(sys.argv[1])
        copy = fileformat.save_weights(sys.argv[2], original.name, original.variables,
                                       model_options=original.model_options, metadata=original.metadata)
        again = fileformat.load_weights(copy)
        assert again.sha256 == original.sha256  # the same content, whatever the file layout
        model, variables = instantiate(again)
        logits = model.apply(variables, np.zeros((1, 32, 32, 3), np.float32), train=False)
        assert logits.shape == (1, 1000)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision") and sys.modules[m])
        print("TORCH MODULES", loaded)
    """)
    copy = tmp_path / "copy.safetensors"
    result = subprocess.run([sys.executable, "-c", script, str(resnet18_files[3]), str(copy)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TORCH MODULES []" in result.stdout
    assert load_weights(copy).variables.keys() == load_weights(resnet18_files[3]).variables.keys()


# --- refusals ------------------------------------------------------------------------------------


class CodeOnUnpickle:
    """Unpickling this object runs ``open(marker, 'w')``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_malicious_pickle_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": CodeOnUnpickle(marker)}, evil)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused.*could run code") as info:
        convert("resnet18", evil, tmp_path / "out.safetensors")
    assert "\n" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(evil, weights_only=False)  # the unsafe load does run the payload: the test is meaningful
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_source_is_refused(resnet18_files, tmp_path, suffix):
    source = resnet18_files[1 if suffix == ".pth" else 2]
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"truncated{suffix}: unreadable .*truncated or corrupt"):
        convert("resnet18", truncated, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_or_corrupted_weights_file_is_refused(resnet18_files, tmp_path):
    data = resnet18_files[3].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="truncated.safetensors: unreadable safetensors file"):
        load_pretrained("resnet18", weights=truncated)
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0x01  # one bit of one weight
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(WeightsError, match="corrupt.safetensors: content SHA-256 .* does not match"):
        load_pretrained("resnet18", weights=tmp_path / "corrupt.safetensors")


def test_cache_file_whose_hash_no_longer_matches_is_refused(resnet18_files, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path))
    cached = cached_weights_path("resnet18")
    assert cached == tmp_path / "weights" / "resnet18-f37072fd.safetensors"
    convert("resnet18", resnet18_files[1], cached)
    load_pretrained("resnet18")  # found in the cache, nothing downloaded
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"{cached}: content SHA-256"):
        load_pretrained("resnet18")


def test_torchvision_file_converts_into_the_cache(resnet18_files, tmp_path, monkeypatch):
    """A local copy of torchvision's own file (recognized by its SHA-256 prefix) fills the cache that
    load_pretrained reads; any other file is converted next to itself."""
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path))
    pth = resnet18_files[1]
    monkeypatch.setattr("jaxnets.weights.pretrained.file_sha256", lambda path: "f37072fd" + "0" * 56)
    result = convert("resnet18", pth)
    assert result.path == cached_weights_path("resnet18")
    assert result.metadata["torchvision_weights"] == "IMAGENET1K_V1"
    load_pretrained("resnet18")


def test_file_of_another_architecture_is_refused(resnet18_files, tmp_path):
    _, pth, _, converted = resnet18_files
    with pytest.raises(jaxnets.WeightMappingError, match=r"resnet18.pth: resnet34: .*missing .*layer1\.2\."):
        convert("resnet34", pth, tmp_path / "out.safetensors")
    with pytest.raises(WeightsError, match="holds resnet18 weights, not resnet34"):
        load_pretrained("resnet34", weights=converted)
    with pytest.raises(WeightsError, match="not a jaxnets weights file"):
        load_pretrained("resnet18", weights=pth)


def test_offline_download_gives_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "jaxnets"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        load_pretrained("resnet18")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message and "--from" in message and "Name or service" in message
    assert not cached_weights_path("resnet18").exists()


# --- file format and cache ------------------------------------------------------------------------


def test_weights_file_records_its_provenance(resnet18_files):
    _, pth, _, converted = resnet18_files
    weights_file = load_weights(converted)
    assert (weights_file.name, weights_file.num_classes) == ("resnet18", 1000)
    assert weights_file.jaxnets_version == jaxnets.__version__
    assert weights_file.metadata["source"] == "resnet18.pth"
    import hashlib
    assert weights_file.metadata["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    from safetensors import safe_open
    with safe_open(converted, "np") as f:  # self-describing to any safetensors reader
        header = f.metadata()
    assert header["format"] == "jaxnets.weights" and json.loads(header["model_options"]) == {}


def test_googlenet_records_the_given_options_and_those_of_its_state_dict(googlenet_files, tmp_path):
    model, _, converted = googlenet_files
    assert load_weights(converted).model_options == {"transform_input": True, "aux_logits": True}
    without_aux = tmp_path / "no_aux.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("aux")}, without_aux)
    result = convert("googlenet", without_aux, tmp_path / "g.safetensors", model_options={"transform_input": True})
    assert load_weights(result.path).model_options == {"transform_input": True, "aux_logits": False}


@pytest.mark.parametrize("transform_input", [False, True])
def test_googlenet_of_ones_own_gets_torchvision_defaults_unless_told(transform_input, tmp_path):
    """torchvision's transform_input=True belongs to its published weights, not to every GoogLeNet state dict:
    googlenet(weights=None) has False, and only the user knows how their model was built."""
    model = oracle_model("googlenet", transform_input=transform_input)
    pth, _ = save_checkpoints(model, tmp_path, "mine")
    told = {"transform_input": True} if transform_input else {}
    result = convert("googlenet", pth, tmp_path / "mine.jaxnets.safetensors", model_options=told, verify=True)
    assert load_weights(result.path).model_options == {**told, "aux_logits": True}
    jax_model, variables = load_pretrained("googlenet", weights=result.path)
    assert jax_model.transform_input is transform_input
    x = np.random.default_rng(2).standard_normal((2, 96, 96, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(nchw(x)).numpy()
    assert max_rel_error(jax.jit(jax_model.apply)(variables, x), expected) <= TOL  # jitted: one compilation


def test_torchvision_googlenet_file_gets_the_options_torchvision_builds_it_with(googlenet_files, tmp_path,
                                                                                 monkeypatch):
    """torchvision's own file (recognized by its SHA-256, as downloaded) keeps transform_input=True."""
    monkeypatch.setattr("jaxnets.weights.pretrained.file_sha256", lambda path: "1378be20" + "0" * 56)
    result = convert("googlenet", googlenet_files[1], tmp_path / "g.safetensors")
    assert result.metadata["torchvision_weights"] == "IMAGENET1K_V1"
    assert load_weights(result.path).model_options == {"transform_input": True, "aux_logits": True}


def test_wrapped_and_data_parallel_state_dicts_are_unwrapped(resnet18_files, tmp_path):
    model = resnet18_files[0]
    plain = read_state_dict(resnet18_files[1])
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
        unwrapped = read_state_dict(path)
        assert unwrapped.keys() == plain.keys()
        assert all(np.array_equal(unwrapped[k], plain[k]) for k in plain)


def test_writes_are_atomic(resnet18_files, tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous content")
    variables = load_weights(resnet18_files[3]).variables

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("jaxnets.weights.fileformat.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights(target, "resnet18", variables)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torch_export_is_atomic(resnet18_files, tmp_path, monkeypatch, suffix):
    target = tmp_path / f"back{suffix}"
    target.write_bytes(b"previous content")

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr("jaxnets.weights.fileformat.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export_torch(resnet18_files[3], target)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left behind


def same_file_as(source: Path, spelling: str, directory: Path) -> Path:
    """Another path to ``source``: the same string, a detour through ``..``, a symlink, a hard link."""
    if spelling == "dotdot":
        return source.parent / ".." / source.parent.name / source.name
    link = directory / f"{spelling}-{source.name}"
    if spelling == "symlink":
        link.symlink_to(source)
    elif spelling == "hardlink":
        link.hardlink_to(source)
    return link if spelling in ("symlink", "hardlink") else source


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_output_that_is_the_source_is_refused(resnet18_files, tmp_path, spelling):
    """The rename would put the output in place of the input, often the only copy of a user's weights."""
    _, pth, st, converted = resnet18_files
    writes = {pth: lambda out: convert("resnet18", pth, out), st: lambda out: convert("resnet18", st, out),
              converted: lambda out: export_torch(converted, out)}
    for source, write in writes.items():
        before = source.read_bytes()
        with pytest.raises(WeightsError, match="the output is the source file") as info:
            write(same_file_as(source, spelling, tmp_path))
        assert "\n" not in str(info.value)
        assert source.read_bytes() == before


def test_save_weights_refuses_variables_that_do_not_fit(resnet18_files, tmp_path):
    variables = load_weights(resnet18_files[3]).variables
    del variables["params"]["layer4"]["1"]["conv2"]
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): params/layer4/1/conv2/kernel"):
        save_weights(tmp_path / "w.safetensors", "resnet18", variables)
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"zero_init_residual": 1}, "option zero_init_residual=1 has the wrong type: expected bool"),
    ({"groups": 2}, "option groups=2 refused: resnet18 binds groups=1"),
    ({"num_classes": 10}, "'num_classes' is not a model option"),
    ({"dropout": 0.5}, "unknown option 'dropout'; accepted: features_only, in_chans, out_indices, shortcut, "
                       "zero_init_residual"),
])
def test_save_weights_refuses_options_the_model_cannot_be_built_with(resnet18_files, tmp_path, options, message):
    variables = load_weights(resnet18_files[3]).variables
    with pytest.raises(WeightsError, match=message):
        save_weights(tmp_path / "w.safetensors", "resnet18", variables, model_options=options)
    assert not (tmp_path / "w.safetensors").exists()


# --- num_classes override -------------------------------------------------------------------------


@pytest.mark.parametrize("files", ["resnet18_files", "googlenet_files"])
def test_num_classes_override_reinitializes_exactly_the_head(files, request, caplog):
    path = request.getfixturevalue(files)[-1]
    name = load_weights(path).name
    original = flat(load_weights(path).variables)
    head = jaxnets.get_spec(name).head
    with caplog.at_level(logging.WARNING, logger="jaxnets.weights"):
        model, variables = load_pretrained(name, num_classes=7, weights=path)
    assert model.num_classes == 7
    assert f"freshly initialized {', '.join(head)} for 7 classes" in caplog.text

    renewed = flat(variables)
    assert renewed.keys() == original.keys()
    renewed_keys = {k for k in original if any(k.split("/", 1)[1].startswith(m + "/") for m in head)}
    assert renewed_keys and all(not np.array_equal(renewed[k], original[k]) for k in renewed_keys)
    assert all(np.array_equal(renewed[k], original[k]) and renewed[k].dtype == original[k].dtype
               for k in original.keys() - renewed_keys)
    assert renewed[f"params/{jaxnets.get_spec(name).classifier}/kernel"].shape[-1] == 7
    for key in renewed_keys:  # BatchNorm statistics of the aux heads start fresh, as at init
        if key.endswith("/mean") or key.endswith("/var"):
            assert np.all(renewed[key] == (0.0 if key.endswith("mean") else 1.0)), key


@pytest.mark.parametrize(("files", "num_classes", "options"), [
    ("resnet18_files", 1000, {}),  # the checkpoint's number of classes: a new task all the same
    ("googlenet_files", 5, {}),
    ("googlenet_files", 5, {"aux_logits": False}),
])
def test_for_new_task_is_the_checkpoint_with_every_head_module_fresh(files, num_classes, options, request):
    """``for_new_task`` gives, bit for bit, what loading, re-initializing the head and rebuilding gives."""
    path = request.getfixturevalue(files)[-1]
    name = load_weights(path).name
    model, variables, renewed = for_new_task(name, num_classes, path, rng=3, **options)
    loaded, checkpoint = load_pretrained(name, weights=path, **options)
    recorded = model_options(name, loaded)
    expected, names = reinitialize_head(name, checkpoint, num_classes, rng=3, **recorded)
    assert model == jaxnets.create_model(name, num_classes, **recorded)
    assert renewed == names == [m for m in jaxnets.get_spec(name).head if m in variables["params"]]
    got, want, original = flat(variables), flat(expected), flat(checkpoint)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    classifier = f"params/{jaxnets.get_spec(name).classifier}/kernel"
    if got[classifier].shape == original[classifier].shape:
        assert not np.array_equal(got[classifier], original[classifier])


def test_reinitialize_head_is_seeded(resnet18_files):
    variables = load_weights(resnet18_files[3]).variables
    a, names = reinitialize_head("resnet18", variables, 5, rng=0)
    b, _ = reinitialize_head("resnet18", variables, 5, rng=0)
    c, _ = reinitialize_head("resnet18", variables, 5, rng=1)
    assert names == ["fc"]
    assert np.array_equal(a["params"]["fc"]["kernel"], b["params"]["fc"]["kernel"])
    assert not np.array_equal(a["params"]["fc"]["kernel"], c["params"]["fc"]["kernel"])
    bound = 1 / np.sqrt(512)  # torch's default Linear init, U(+-1/sqrt(fan_in))
    assert np.abs(a["params"]["fc"]["kernel"]).max() <= bound and a["params"]["fc"]["kernel"].std() > bound / 3


def test_model_options_round_trip_through_a_fine_tuned_file(googlenet_files, tmp_path):
    model, variables = load_pretrained("googlenet", num_classes=3, weights=googlenet_files[-1], aux_logits=False)
    options = model_options("googlenet", model)
    assert options["transform_input"] is True and options["aux_logits"] is False
    saved = save_weights(tmp_path / "fine_tuned.safetensors", "googlenet", variables, model_options=options)
    rebuilt, _ = load_pretrained("googlenet", weights=saved)
    assert rebuilt == model


def test_googlenet_without_aux_logits_drops_the_aux_heads(googlenet_files, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxnets.weights"):
        model, variables = load_pretrained("googlenet", weights=googlenet_files[-1], aux_logits=False)
    assert not model.aux_logits and "aux1" not in variables["params"] and "aux2" not in variables["batch_stats"]
    assert "freshly initialized" not in caplog.text
