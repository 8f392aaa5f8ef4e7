"""Self-supervised ResNet-50 checkpoints: each method's wrapping unwrapped to torchvision's backbone.

The test writes each file from one random torchvision ResNet-50 (randomized BatchNorm statistics) in the layout
the method's own code saves it, read from its repository:

- DINO (``hubconf.py dino_resnet50``), Barlow Twins (``main.py``: ``backbone.state_dict()``, ``fc`` an Identity),
  VICReg (``main_vicreg.py``, its ``resnet.py`` has torchvision's keys and no ``fc``): plain keys, no ``fc``;
- SwAV (``src/resnet50.py``, saved through DistributedDataParallel): ``module.`` + ``projection_head``
  (Linear-BN-ReLU-Linear, 2048-2048-128) + ``prototypes`` (3000); DeepCluster-v2: three prototype heads
  ``prototypes.prototypes0..2``, as ``main_deepclusterv2.py`` saves it (``{'epoch', 'state_dict', 'optimizer'}``);
- MoCo v2 (``moco/builder.py``, ``main_moco.py``): ``{'epoch', 'arch', 'state_dict', 'optimizer'}``, keys
  ``module.encoder_q.`` (its ``fc`` the MLP projector), ``module.encoder_k.``, ``module.queue`` (128 x 65536),
  ``module.queue_ptr``;
- MoCo v3 (``moco/builder.py MoCo_ResNet``): ``module.base_encoder.`` (``fc`` a 2-layer MLP with BatchNorm),
  ``module.momentum_encoder.``, ``module.predictor.``, plus ``scaler``.

The dropped modules are filled with random values of their exact shapes (the momentum encoder and the queue as a
random row broadcast, which ``torch.save`` stores small). Every file must convert to variables bit-identical to
the backbone's own state dict, whose feature maps are checked once against torchvision's
``create_feature_extractor`` (max|diff| <= 1e-4 * (1 + max|torch|)); so each conversion gives torchvision's maps.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch_oracle import max_rel_error, nchw, oracle_model
from torchvision.models.feature_extraction import create_feature_extractor

import jaxnets
from jaxnets import trees
from jaxnets.cli import convert as convert_cli
from jaxnets.weights import WeightsError, file_sha256, load_weights, self_supervised
from jaxnets.weights import cache as weights_cache
from jaxnets.weights.self_supervised import SELF_SUPERVISED, open_cached
from jaxnets.weights.torch_io import read_wrapped
from jaxnets.weights.wrappings import LAYOUTS, WrappingError, unwrap

TOL = 1e-4
PLAIN = ("dino", "barlowtwins", "vicreg")  # one file: their published files have the same keys


def filler(value: torch.Tensor) -> torch.Tensor:
    """Random values of ``value``'s shape and dtype: floats as one random row broadcast (small on disk)."""
    if not value.is_floating_point() or value.dim() < 2:
        return torch.randn(value.shape).to(value.dtype) if value.is_floating_point() else value.clone()
    return torch.randn(value.shape[-1]).expand(value.shape)


def mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``."""
    layers = []
    for i in range(num_layers):
        dim1, dim2 = input_dim if i == 0 else mlp_dim, output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


def keys_of(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": filler(value) for key, value in module.state_dict().items()}


def swav_heads(prototypes: nn.Module) -> dict[str, torch.Tensor]:
    head = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True), nn.Linear(2048, 128))
    return {**keys_of("projection_head.", head), **keys_of("prototypes.", prototypes)}


def checkpoints(backbone: dict[str, torch.Tensor]) -> dict[str, dict]:
    """What each method saves (``torch.save``'s argument), from the backbone's state dict (no ``fc``)."""
    dp = lambda state: {f"module.{key}": value for key, value in state.items()}  # noqa: E731  DistributedDataParallel
    multi = nn.Module()
    for i in range(3):
        multi.add_module(f"prototypes{i}", nn.Linear(128, 3000, bias=False))
    moco_v2_fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    moco_v3_fc, predictor = mlp(2, 2048, 4096, 256), mlp(2, 256, 4096, 256, last_bn=False)
    encoder = lambda fc: {**backbone, **keys_of("fc.", fc)}  # noqa: E731  the encoder with its projector as fc
    momentum = lambda fc: {key: filler(value) for key, value in encoder(fc).items()}  # noqa: E731
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0048, "momentum": 0.9, "params": [0, 1]}]}
    return {
        "plain": backbone,
        "swav": dp({**backbone, **swav_heads(nn.Linear(128, 3000, bias=False))}),
        "deepcluster_v2": {"epoch": 800, "state_dict": dp({**backbone, **swav_heads(multi)}), "optimizer": optimizer},
        "mocov2": {"epoch": 800, "arch": "resnet50", "optimizer": optimizer, "state_dict": dp({
            **{f"encoder_q.{k}": v for k, v in encoder(moco_v2_fc).items()},
            **{f"encoder_k.{k}": v for k, v in momentum(moco_v2_fc).items()},
            "queue": torch.randn(65536).expand(128, 65536), "queue_ptr": torch.zeros(1, dtype=torch.long)})},
        "mocov3": {"epoch": 1000, "arch": "resnet50", "optimizer": optimizer, "scaler": {"scale": 65536.0},
                   "state_dict": dp({**{f"base_encoder.{k}": v for k, v in encoder(moco_v3_fc).items()},
                                     **{f"momentum_encoder.{k}": v for k, v in momentum(moco_v3_fc).items()},
                                     **keys_of("predictor.", predictor)})},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(torchvision model, {file kind: path}, backbone variables)``, built once: ResNet-50 is slow here."""
    directory = tmp_path_factory.mktemp("ssl")
    model = oracle_model("resnet50")
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    paths = {}
    for kind, obj in checkpoints(backbone).items():
        paths[kind] = directory / f"{kind}.pth.tar"
        torch.save(obj, paths[kind])
    variables = jaxnets.from_torch_state_dict("resnet50", {k: v.numpy() for k, v in backbone.items()})
    yield model, paths, variables
    raw_checkpoint.cache_clear()
    shutil.rmtree(directory, ignore_errors=True)


def kind_of(method: str) -> str:
    return "plain" if method in PLAIN else method


@functools.cache
def raw_checkpoint(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_variables(actual, expected):
    flat_actual, flat_expected = trees.flatten(actual), trees.flatten(expected)
    assert flat_actual.keys() == flat_expected.keys()
    assert all(np.array_equal(flat_actual[k], flat_expected[k]) for k in flat_expected)


def test_backbone_feature_maps_equal_torchvision(files):
    """The reference every conversion below must equal bit for bit: jaxnets' maps at every level are
    torchvision's, batch 1 at 64 px (every level a map of its own, the deepest 2x2)."""
    model, _, variables = files
    nodes = [level.node for level in jaxnets.feature_info("resnet50")]
    extractor = create_feature_extractor(model, return_nodes=nodes).eval()
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3), np.float32)
    maps = jax.jit(jaxnets.create_model("resnet50", features_only=True).apply)(variables, x)
    with torch.no_grad():
        expected = [value.numpy().transpose(0, 2, 3, 1) for value in extractor(nchw(x)).values()]
    assert len(maps) == len(expected) == 5
    for ours, theirs in zip(maps, expected, strict=True):
        assert ours.shape == theirs.shape and max_rel_error(ours, theirs) <= TOL


@pytest.mark.parametrize("method", list(SELF_SUPERVISED))
def test_each_wrapping_converts_to_the_backbone_and_lists_what_it_drops(files, method):
    _, paths, variables = files
    path, registered = paths[kind_of(method)], SELF_SUPERVISED[method].layout
    raw = raw_checkpoint(path)
    keys = list(raw.get("state_dict", raw))
    detected = unwrap(raw, where=str(path), model="resnet50")
    forced = read_wrapped(path, registered, model="resnet50")
    assert detected.layout == ("torchvision" if method in PLAIN else registered) and forced.layout == registered
    expected_dropped = {
        "plain": set(),
        "swav": {k for k in keys if k.startswith(("module.projection_head.", "module.prototypes."))},
        "deepcluster_v2": {k for k in keys if k.startswith(("module.projection_head.", "module.prototypes."))},
        "mocov2": {k for k in keys if not k.startswith("module.encoder_q.") or k.startswith("module.encoder_q.fc.")},
        "mocov3": {k for k in keys if not k.startswith("module.base_encoder.")
                   or k.startswith("module.base_encoder.fc.")},
    }[kind_of(method)]
    assert set(forced.dropped) == set(detected.dropped) == expected_dropped
    assert len(forced.state) + len(forced.dropped) == len(keys) == len(set(keys))
    assert_same_variables(jaxnets.from_torch_state_dict("resnet50", forced.state), variables)


def test_dropped_keys_are_summarized_by_module(files):
    summary = read_wrapped(files[1]["mocov3"], model="resnet50").dropped_summary()
    assert summary == ["module.base_encoder.fc. (10 keys)", "module.momentum_encoder. (328 keys)",
                       "module.predictor. (7 keys)"]


def test_torchvision_state_dicts_are_unwrapped_as_before(files):
    """Nested, DataParallel-prefixed or plain, a classifier's state dict keeps every key, fc included."""
    state = {k: v.numpy() for k, v in files[0].state_dict().items()}
    for wrapped in (state, {f"module.{k}": v for k, v in state.items()}, {"model": state, "epoch": 3}):
        result = unwrap(wrapped, where="x.pth", model="resnet50")
        assert (result.layout, result.dropped, list(result.state)) == ("torchvision", [], list(state))


def test_unknown_wrapping_is_one_line_naming_the_prefixes(files):
    state = {f"module.encoder_x.{k}": v for k, v in files[0].state_dict().items()}
    state["module.queue"] = np.zeros((2, 3), np.float32)
    with pytest.raises(WrappingError) as info:
        unwrap({"state_dict": state}, where="odd.pth", model="resnet50")
    message = str(info.value)
    assert "\n" not in message and message.startswith("odd.pth['state_dict']: unknown wrapping of a resnet50 state")
    assert "key prefixes found: module.encoder_x. (320 keys), module.queue (1 key);" in message


@pytest.mark.parametrize("forced,kind,message", [
    ("swav", "mocov3", "not a swav checkpoint (no key starts prototypes.weight); key prefixes found: "
                       "module.base_encoder. (328 keys), module.momentum_encoder. (328 keys), module.predictor. "
                       "(7 keys); its keys look like mocov3's"),
    ("dino", "mocov2", "not a dino checkpoint (expected plain keys)"),
    ("mocov3", "plain", "not a mocov3 checkpoint (no key starts base_encoder.); key prefixes found: (no prefix) "
                        "(318 keys); its keys look like torchvision's"),
])
def test_a_forced_layout_the_file_does_not_have_is_refused(files, forced, kind, message):
    with pytest.raises(WrappingError, match=r"^x\.pth") as info:
        unwrap(raw_checkpoint(files[1][kind]), forced, where="x.pth", model="resnet50")
    assert message in str(info.value) and "\n" not in str(info.value)


# --- jaxnets-convert ---------------------------------------------------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_convert_cli_detects_the_wrapping_and_writes_a_backbone(files, tmp_path, capsys):
    out = tmp_path / "mocov3.safetensors"
    assert convert_cli.main(["resnet50", "--from", str(files[1]["mocov3"]), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    converted = load_weights(out)
    assert converted.model_options == {"features_only": True} and converted.num_classes == 0
    assert_same_variables(converted.variables, files[2])


@pytest.mark.parametrize("argv,message", [
    (["--layout", "bogus"], "argument --layout: invalid choice: 'bogus'"),
    (["--layout", "dino", "--weights", "IMAGENET1K_V1"], "--layout says how --from FILE is wrapped"),
])
def test_convert_cli_bad_layout_flags_exit_1(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        convert_cli.main(["resnet50", *argv])
    assert info.value.code == 1 and message in capsys.readouterr().err


def test_convert_cli_layout_is_forced_and_recorded(files, tmp_path, capsys):
    out = tmp_path / "dino.safetensors"
    assert convert_cli.main(["resnet50", "--from", str(files[1]["plain"]), "--layout", "dino", "--out",
                             str(out)]) == 0
    assert "dino layout" in capsys.readouterr().out and load_weights(out).metadata["layout"] == "dino"
    assert convert_cli.main(["resnet50", "--from", str(files[1]["mocov3"]), "--layout", "swav", "--out",
                             str(tmp_path / "no.safetensors")]) == 1
    assert "not a swav checkpoint" in one_line_error(capsys) and not (tmp_path / "no.safetensors").exists()


def test_convert_cli_unknown_wrapping_exits_1_naming_the_prefixes(files, tmp_path, capsys):
    odd = tmp_path / "odd.pth"
    torch.save({"model": {f"net.{k}": v for k, v in files[0].state_dict().items()}}, odd)
    assert convert_cli.main(["resnet50", "--from", str(odd)]) == 1
    assert "unknown wrapping of a resnet50 state dict: key prefixes found: net. (320 keys)" in one_line_error(capsys)


# --- the registered weights: download, hash check, cache ----------------------------------------------------


@pytest.fixture
def dino_entry(files, tmp_path, monkeypatch):
    """The registered DINO weights, served from the test's file (file:// URL, its SHA-256) into an empty cache."""
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "home"))
    path = files[1]["plain"]
    return dataclasses.replace(SELF_SUPERVISED["dino"], url=path.as_uri(), sha256=file_sha256(path))


def test_open_cached_downloads_checks_converts_and_records_provenance(files, dino_entry, monkeypatch):
    path = open_cached("resnet50", dino_entry)
    assert path == weights_cache.cache_dir() / "resnet50-dino.safetensors"
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [path.name]
    weights = load_weights(path)
    assert weights.model_options == {"features_only": True}
    assert {k: weights.metadata[k] for k in ("method", "source_url", "source_sha256", "licence", "layout")} == {
        "method": "DINO", "source_url": dino_entry.url, "source_sha256": dino_entry.sha256, "licence": "Apache-2.0",
        "layout": "dino"}
    assert_same_variables(weights.variables, files[2])
    monkeypatch.setattr(self_supervised, "download", lambda *args, **kwargs: pytest.fail("downloaded again"))
    assert open_cached("resnet50", dino_entry) == path


@pytest.mark.parametrize("hashes,message", [
    ({"sha256": "0" * 64}, "invalid hash value"),
    ({"md5_prefix": "00000000"}, "is not the published 00000000..."),
])
def test_a_hash_mismatch_is_one_line_and_caches_nothing(dino_entry, hashes, message):
    with pytest.raises(WeightsError, match=f"^{dino_entry.url}: .*{message}") as info:
        open_cached("resnet50", dataclasses.replace(dino_entry, **hashes))
    assert "\n" not in str(info.value)
    assert [p.name for p in weights_cache.cache_dir().iterdir() if not p.name.endswith(".lock")] == []


def test_registered_names_are_resnet50_s_and_weights_names():
    assert self_supervised.lookup("resnet18", "dino") is None and self_supervised.lookup("resnet50", "nope") is None
    for name, entry in SELF_SUPERVISED.items():
        assert self_supervised.lookup("resnet50", name) is entry and entry.layout in LAYOUTS
        assert entry.url.endswith("/" + entry.filename) and entry.sha256 is None  # none is published


def test_load_pretrained_dino_is_the_backbone_and_classes_put_a_new_head_on_it(files, dino_entry, monkeypatch):
    """``weights="dino"`` end to end: the backbone as published; asked for classes (as ``train.py --pretrained
    dino`` asks), a classifier whose backbone is the file's, bit for bit, and whose head is new."""
    monkeypatch.setitem(SELF_SUPERVISED, "dino", dino_entry)
    model, variables = jaxnets.load_pretrained("resnet50", weights="dino")
    assert model.features_only
    assert_same_variables(variables, files[2])
    classifier, with_head = jaxnets.load_pretrained("resnet50", weights="dino", num_classes=10)
    assert not classifier.features_only and with_head["params"]["fc"]["kernel"].shape == (2048, 10)
    flat, backbone = trees.flatten(with_head), trees.flatten(variables)
    assert {k for k in flat if not k.startswith("params/fc/")} == set(backbone)
    assert all(np.array_equal(flat[k], backbone[k]) for k in backbone)
    assert jaxnets.weights.for_new_task("resnet50", 10, "dino")[2] == ["fc"]
