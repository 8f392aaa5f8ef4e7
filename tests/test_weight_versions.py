"""torchvision's weight versions (IMAGENET1K_V1, IMAGENET1K_V2): the registry against torchvision's own
``Weights`` enums, and selection by name everywhere: ``load_pretrained``, the cache, ``convert_weights.py
--weights``, ``train.py --pretrained`` and ``jaxnets-evaluate --pretrained``.

No download is possible here: the real download path (torchvision's ``Weights.get_state_dict`` through
``torch.hub``) runs with ``torch.hub.download_url_to_file`` replaced by a copy of a random-weights file the
test saves, whose SHA-256 is made to read as torchvision's (a prefix cannot be forged for real).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch_oracle import oracle_model

import jaxnets
from jaxnets import parallel, predict, registry, trees
from jaxnets.cli import convert as convert_cli
from jaxnets.cli import train as train_cli
from jaxnets.errors import UserError
from jaxnets.weights import WeightsError, cached_weights_path, file_sha256, load_pretrained, load_weights, pretrained

REGISTERED = [(name, version) for name in jaxnets.list_models() for version in jaxnets.get_spec(name).weight_versions]
# torchvision weights for these architectures that are deliberately not registered: the SSD backbone of VGG-16,
# whose classifier has no trained values (torchvision: no categories, NaN accuracy).
NOT_CLASSIFIERS = {("vgg16", "IMAGENET1K_FEATURES")}
INTERPOLATION = {torchvision.transforms.InterpolationMode.BILINEAR: "bilinear",
                 torchvision.transforms.InterpolationMode.BICUBIC: "bicubic",
                 torchvision.transforms.InterpolationMode.NEAREST: "nearest"}


def torchvision_weights(name: str, version: str):
    return torchvision.models.get_model_weights(name)[version]


# --- the registry is torchvision's metadata --------------------------------------------------------------


@pytest.mark.parametrize(("name", "version"), REGISTERED)
def test_registered_weights_are_torchvision_s(name, version):
    ours, theirs = jaxnets.get_spec(name).weight_versions[version], torchvision_weights(name, version)
    meta, preset = theirs.meta, theirs.transforms()
    assert ours.torchvision_name == theirs.name == version
    assert ours.url == theirs.url and ours.filename == Path(theirs.url).name
    assert ours.recipe == meta["recipe"]
    metrics = meta["_metrics"]["ImageNet-1K"]
    assert (ours.acc1, ours.acc5) == (metrics["acc@1"], metrics["acc@5"])
    assert (ours.num_params, ours.gflops, ours.min_size) == (meta["num_params"], meta["_ops"], meta["min_size"])
    assert ours.categories == tuple(meta["categories"])
    transform = ours.transforms
    assert [transform.resize_size] == preset.resize_size and [transform.crop_size] == preset.crop_size
    assert transform.interpolation == INTERPOLATION[preset.interpolation] and preset.antialias is True
    assert list(transform.mean) == preset.mean and list(transform.std) == preset.std


def test_every_torchvision_classification_weights_is_registered_and_default_means_what_it_does_there():
    """torchvision's DEFAULT is its best weights (V2 where it exists); jaxnets' default, without a name, stays
    IMAGENET1K_V1 (what ``load_pretrained(name)`` always loaded)."""
    for name in jaxnets.list_models():
        spec, enum = jaxnets.get_spec(name), torchvision.models.get_model_weights(name)
        expected = [w.name for w in enum if (name, w.name) not in NOT_CLASSIFIERS]
        assert list(spec.weight_versions) == expected, name
        assert spec.get_weights("DEFAULT").torchvision_name == enum.DEFAULT.name, name
        assert spec.get_weights(None) is spec.weights and spec.weights.torchvision_name == "IMAGENET1K_V1"
    for name, version in NOT_CLASSIFIERS:  # why they are left out
        assert torchvision_weights(name, version).meta["categories"] is None
    v2 = [name for name in jaxnets.list_models() if "IMAGENET1K_V2" in jaxnets.get_spec(name).weight_versions]
    assert v2 == ["resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2",
                  "wide_resnet101_2"]


def test_wordnet_ids_are_imagenet_s_sorted_synsets_in_torchvision_s_category_order():
    """ImageNet's val folders are named by synset; torchvision's ImageFolder numbers them in sorted order,
    which is the order of the 1000 outputs: tench (n01440764) first, toilet tissue (n15075141) last."""
    import tensorflow_datasets as tfds

    wnids = registry.imagenet_wnids()
    assert len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    tfds_labels = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    assert wnids == tuple(tfds_labels.read_text().split())
    categories = registry.imagenet_categories()
    assert dict(zip(wnids, categories, strict=True))["n01440764"] == "tench"
    assert (categories[wnids.index("n01443537")], categories[-1]) == ("goldfish", "toilet tissue")


def test_weights_names_and_files_are_told_apart():
    assert all(registry.is_weights_name(n) for n in ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT", "default"))
    assert not any(registry.is_weights_name(n) for n in ("./IMAGENET1K_V2", "w.safetensors",
                                                         "runs/x/final_weights.safetensors", Path("IMAGENET1K_V2")))
    assert pretrained.resolve_weights("resnet50", Path("IMAGENET1K_V2")) == Path("IMAGENET1K_V2")
    with pytest.raises(UserError, match=r"resnet18: no weights named 'IMAGENET1K_V2'; torchvision's for resnet18: "
                                        r"IMAGENET1K_V1 \(DEFAULT = IMAGENET1K_V1\)"):
        load_pretrained("resnet18", weights="IMAGENET1K_V2")


def test_each_version_has_its_own_cache_file_named_like_torchvision_s(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path))
    assert cached_weights_path("resnet50").name == "resnet50-0676ba61.safetensors"
    assert cached_weights_path("resnet50", "IMAGENET1K_V1") == cached_weights_path("resnet50")
    assert cached_weights_path("resnet50", "IMAGENET1K_V2") == tmp_path / "weights" / "resnet50-11ad3fa6.safetensors"
    assert cached_weights_path("resnet50", "DEFAULT") == cached_weights_path("resnet50", "IMAGENET1K_V2")


# --- selection by name, through the real download path ---------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    """Two different random ResNet-50 state dicts, standing in for torchvision's V1 and V2 files."""
    directory = tmp_path_factory.mktemp("torchvision_files")
    files = {}
    for seed, version in enumerate(("IMAGENET1K_V1", "IMAGENET1K_V2")):
        files[version] = directory / f"{version}.pth"
        torch.save(oracle_model("resnet50", seed=seed).state_dict(), files[version])
    return files


@pytest.fixture(scope="module")
def forged_sha256(resnet50_files):
    """Real SHA-256 of each stand-in file -> one that starts with its version's prefix, as torchvision's does."""
    spec = jaxnets.get_spec("resnet50")
    return {file_sha256(path): spec.get_weights(version).sha256_prefix + "0" * 56
            for version, path in resnet50_files.items()}


@pytest.fixture
def hub(resnet50_files, forged_sha256, tmp_path, monkeypatch):
    """torch.hub serving the stand-in files at torchvision's URLs (their hashes reading as torchvision's),
    nothing else, and empty caches. The fixture's value is the list of URLs downloaded."""
    spec = jaxnets.get_spec("resnet50")
    served = {spec.get_weights(v).url: path for v, path in resnet50_files.items()}
    urls = []

    def download(url, dst, hash_prefix=None, progress=True):
        urls.append(url)
        if url not in served:
            raise urllib.error.URLError("Name or service not known")
        shutil.copy(served[url], dst)

    def sha256_of(path):
        real = file_sha256(path)
        return forged_sha256.get(real, real)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "jaxnets"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr("jaxnets.weights.torch_io.file_sha256", sha256_of)
    monkeypatch.setattr("jaxnets.weights.pretrained.file_sha256", sha256_of)
    return urls


def variables_of(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in trees.flatten(load_weights(path).variables).items()}


def expected_variables(pth: Path) -> dict[str, np.ndarray]:
    state = {k: v.numpy() for k, v in torch.load(pth, weights_only=True).items()}
    return {k: np.asarray(v) for k, v in trees.flatten(jaxnets.from_torch_state_dict("resnet50", state)).items()}


def test_load_pretrained_by_name_downloads_and_caches_that_version(hub, resnet50_files):
    _, variables = load_pretrained("resnet50", weights="IMAGENET1K_V2")
    v2 = jaxnets.get_spec("resnet50").get_weights("IMAGENET1K_V2")
    assert hub == [v2.url]  # torchvision's V2 file, through its Weights API
    path = cached_weights_path("resnet50", "IMAGENET1K_V2")
    weights_file = load_weights(path)
    assert weights_file.metadata["torchvision_weights"] == "IMAGENET1K_V2"
    assert weights_file.metadata["source"] == v2.url
    expected = expected_variables(resnet50_files["IMAGENET1K_V2"])
    assert all(np.array_equal(np.asarray(v), expected[k]) for k, v in trees.flatten(variables).items())
    assert not cached_weights_path("resnet50").exists()  # V1 is another file, not downloaded
    transform = predict.eval_transform("resnet50", weights_file)  # the version's own eval transform
    assert (transform.resize_size, transform.crop_size) == (232, 224)

    load_pretrained("resnet50", weights="DEFAULT")  # torchvision's alias: the same file, from the cache
    assert hub == [v2.url]
    load_pretrained("resnet50")  # no name: IMAGENET1K_V1, its own download and file
    assert hub == [v2.url, jaxnets.get_spec("resnet50").weights.url]
    assert predict.eval_transform("resnet50", load_weights(cached_weights_path("resnet50"))).resize_size == 256


def test_convert_cli_weights_flag(hub, resnet50_files, capsys):
    v2_file = resnet50_files["IMAGENET1K_V2"]
    assert convert_cli.main(["resnet50", "--weights", "IMAGENET1K_V2", "--from", str(v2_file)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(cached_weights_path("resnet50", "IMAGENET1K_V2")))
    assert load_weights(cached_weights_path("resnet50", "IMAGENET1K_V2")).metadata["torchvision_weights"] == \
        "IMAGENET1K_V2"
    assert hub == []  # a local copy of torchvision's file: nothing downloaded

    # A file that is not the version asked for is refused, in one line, writing nothing.
    assert convert_cli.main(["resnet50", "--weights", "IMAGENET1K_V1", "--from", str(v2_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not torchvision's resnet50 IMAGENET1K_V1 file resnet50-0676ba61.pth" in err
    assert not cached_weights_path("resnet50").exists()
    assert convert_cli.main(["resnet18", "--weights", "IMAGENET1K_V2"]) == 1
    assert "resnet18: no weights named 'IMAGENET1K_V2'" in capsys.readouterr().err

    # --all --weights V2: the seven models that have it, each downloading its V2 file (only resnet50's is served).
    assert convert_cli.main(["--all", "--weights", "IMAGENET1K_V2"]) == 1
    errors = capsys.readouterr().err.splitlines()
    v2_models = [n for n in jaxnets.list_models() if "IMAGENET1K_V2" in jaxnets.get_spec(n).weight_versions]
    assert hub == [jaxnets.get_spec(n).get_weights("IMAGENET1K_V2").url for n in v2_models]
    assert [line.split(":")[2].strip() for line in errors] == [n for n in v2_models if n != "resnet50"]


def test_train_pretrained_takes_a_version_name(hub, resnet50_files, tmp_path, capsys, monkeypatch):
    from jaxnets import run_setup

    config = train_cli.config_from_args(["--model", "resnet50", "--pretrained", "IMAGENET1K_V2",
                                         "--workdir", str(tmp_path / "run")])
    assert config.pretrained == "IMAGENET1K_V2"
    assert train_cli.config_from_args(["--model", "resnet50", "--pretrained"]).pretrained == "IMAGENET1K_V1"
    # An unknown name fails at once, before any data is read.
    monkeypatch.setattr(run_setup, "load_dataset", lambda *args, **kwargs: pytest.fail("data loaded"))
    assert train_cli.main(["--model", "resnet18", "--pretrained", "IMAGENET1K_V2", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("jaxnets-train: error: resnet18: no weights named 'IMAGENET1K_V2'; "
                                       "torchvision's for resnet18: IMAGENET1K_V1 (DEFAULT = IMAGENET1K_V1); "
                                       "timm's: fb_swsl_ig1b_ft_in1k, fb_ssl_yfcc100m_ft_in1k, a1_in1k; "
                                       "or hf-hub:ORG/REPO; a file so named: ./IMAGENET1K_V2\n")
    mesh = parallel.make_mesh()
    _, variables, note = run_setup.build_model(config, 3, mesh)
    assert "torchvision's IMAGENET1K_V2" in note and "re-initialized fc for 3 classes" in note
    expected = expected_variables(resnet50_files["IMAGENET1K_V2"])
    flat = trees.flatten(parallel.to_host(variables))
    assert all(np.array_equal(v, expected[k]) for k, v in flat.items() if not k.startswith("params/fc/"))
    assert flat["params/fc/kernel"].shape == (2048, 3)
    # The value earlier versions recorded for --pretrained without a name is still IMAGENET1K_V1.
    legacy = dataclasses.replace(config, pretrained="default")
    assert "torchvision's IMAGENET1K_V1" in run_setup.build_model(legacy, 3, mesh)[2]
    assert hub[-1] == jaxnets.get_spec("resnet50").weights.url


def test_evaluate_pretrained_by_name_uses_the_version_s_transform_and_reports_its_published_accuracy(
        hub, resnet50_files, tmp_path):
    from jaxnets.evaluate import REPORT_FILE, EvalConfig, evaluate

    root = tmp_path / "val"
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (240, 300, 3), np.uint8)).save(root / wnid / f"{i}.jpg")
    result = evaluate(EvalConfig(model="resnet50", pretrained="IMAGENET1K_V2", dataset=str(root),
                                 output=str(tmp_path / "out"), progress=False,
                                 worker_kind="thread"))
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["torchvision_weights"] == "IMAGENET1K_V2" and report["preprocess"] == "torchvision"
    assert report["published"]["acc1"] == 80.858 and report["published"]["acc5"] == 95.434
    assert (report["eval_transform"]["resize_size"], report["eval_transform"]["crop_size"]) == (232, 224)
    assert result.metrics["count"] == 4 and [p["label"] for p in report["predictions"]] == [0, 0, 1, 1]
    with pytest.raises(WeightsError, match="resnet18: cannot download .*resnet18-f37072fd.pth"):  # not served
        evaluate(EvalConfig(model="resnet18", pretrained="IMAGENET1K_V1", dataset=str(root), progress=False))
