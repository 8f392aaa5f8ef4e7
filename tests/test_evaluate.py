"""``jaxnets-evaluate`` against torchvision's own evaluation: ``ImageFolder`` + ``weights.transforms()`` + model.

The offline ImageNet-style check: a folder of real photos (scikit-learn's two sample photos, cropped, flipped,
rescaled, saved as JPEG and PNG in RGB, L, LA, RGBA, P and CMYK) in ImageNet synset folders, evaluated with a
converted random-weights torchvision model of each family. torchvision must see the same pixels (max |diff| =
0 in float32), give the same top-1 to every image and the same accuracy; train.py's own evaluation is the
oracle of ``--preprocess tf`` on a run directory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images
from torch_oracle import one_per_family, oracle_model
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

import jaxnets
from jaxnets import errors, registry
from jaxnets.cli.evaluate import main
from jaxnets.data import DataConfig, Shard, load_dataset, pil_eval
from jaxnets.data.indexed import padded_layout
from jaxnets.evaluate import REPORT_FILE, EvalConfig, evaluate, load_eval_data, map_classes
from jaxnets.final_weights import FINAL_WEIGHTS
from jaxnets.weights import convert, save_weights

ROOT = Path(__file__).resolve().parents[1]
WNIDS = registry.imagenet_wnids()
DECOYS = ("n01440764", "n15075141")  # ImageNet's first and last class: tench, toilet tissue
PROB_TOLERANCE = 1e-4  # |softmax probability, jaxnets - torchvision|, float32 (measured: below 2e-6)


def photo_variants() -> list[tuple[str, Image.Image]]:
    """Real photos in the shapes and modes a folder of images has: (file name, image)."""
    out = []
    for n, array in enumerate(load_sample_images().images):  # china.jpg, flower.jpg: 427 x 640 RGB
        photo = Image.fromarray(array)
        rgba = photo.crop((40, 0, 520, 400)).copy()
        rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 480, dtype=np.uint8), (400, 1))))
        palette = photo.resize((300, 200)).quantize(64)
        palette.info["transparency"] = 3
        out += [
            (f"p{n}_full.jpg", photo),
            (f"p{n}_crop.png", photo.crop((120, 40, 440, 370))),  # nearly square
            (f"p{n}_flip_down.jpg", photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((320, 213))),
            (f"p{n}_tall.jpg", photo.transpose(Image.Transpose.ROTATE_90).resize((300, 451))),
            (f"p{n}_small_up.png", photo.resize((150, 100))),  # upsampled to 256
            (f"p{n}_gray.jpg", photo.convert("L").crop((0, 0, 500, 427))),
            (f"p{n}_gray_alpha.png", photo.convert("LA").resize((260, 300))),
            (f"p{n}_rgba.png", rgba),
            (f"p{n}_palette.png", palette),
            (f"p{n}_cmyk.jpg", photo.convert("CMYK").crop((100, 100, 600, 427))),
            (f"p{n}_wide.png", photo.crop((0, 150, 640, 330))),  # 640 x 180: shorter side upsampled
        ]
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("photos")
    paths = []
    for name, image in photo_variants():
        path = directory / name
        image.save(path, quality=92) if name.endswith(".jpg") else image.save(path)
        paths.append(path)
    return paths


def torchvision_pixels(path: Path, version: str = "IMAGENET1K_V1") -> np.ndarray:
    """What torchvision's ImageFolder + the weights' transforms() feed the model (HWC)."""
    preset = torchvision.models.get_model_weights("resnet50")[version].transforms()
    return preset(default_loader(path)).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("version", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_pil_preprocessing_is_torchvision_s_to_the_last_bit(photos, version):
    transform = jaxnets.get_spec("resnet50").get_weights(version).transforms
    for path in photos:
        ours, theirs = pil_eval.load(path, transform), torchvision_pixels(path, version)
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (224, 224, 3)
        assert np.max(np.abs(ours - theirs)) == 0.0, path.name


def synset_folder(root: Path, photos: list[Path], predicted: np.ndarray) -> Path:
    """The photos in ImageNet synset folders: every other one in the folder of the class torchvision's model
    predicts for it, the others in two decoy classes, so the accuracy is neither 0 nor 1 and a folder
    mapped to the wrong output shows."""
    for i, (path, label) in enumerate(zip(photos, predicted, strict=True)):
        wnid = WNIDS[label] if i % 2 == 0 else DECOYS[(i // 2) % 2]
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / wnid / path.name).write_bytes(path.read_bytes())
    return root


def torchvision_logits(model: torch.nn.Module, images: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.stack(images[i:i + 8])) for i in range(0, len(images), 8)]).numpy()


@pytest.mark.parametrize("name", one_per_family(prefer_batch_norm=True))
def test_evaluation_agrees_with_torchvision_on_real_photos(name, photos, tmp_path):
    torch_model = oracle_model(name)
    photos = photos[::2] + photos[1:4:2]  # a dozen: every mode and shape, less time for the big models
    # torchvision's own evaluation: ImageFolder (its loader) + the weights' transforms() + the model, over the
    # photos in one folder; its predictions then decide the synset folders, which only relabel those files.
    preset = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
    staging = tmp_path / "staging"
    (staging / "all").mkdir(parents=True)
    for path in photos:
        (staging / "all" / path.name).write_bytes(path.read_bytes())
    staged = ImageFolder(str(staging), transform=preset)
    logits = dict(zip([Path(f).name for f, _ in staged.samples],
                      torchvision_logits(torch_model, [image for image, _ in staged]), strict=True))
    root = synset_folder(tmp_path / "val", photos, np.array([logits[p.name].argmax() for p in photos]))
    folder = ImageFolder(str(root))
    expected = np.stack([logits[Path(f).name] for f, _ in folder.samples])
    labels = np.array([WNIDS.index(folder.classes[target]) for target in folder.targets])
    expected_top1 = expected.argmax(1)

    # jaxnets: the torch file converted, then evaluated
    torch.save(torch_model.state_dict(), tmp_path / f"{name}.pth")
    weights = convert(name, tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors").path
    result = evaluate(EvalConfig(weights=str(weights), dataset=str(root), batch_size=6, workers=2, progress=False,
                                 worker_kind="thread"))
    report = json.loads((tmp_path / REPORT_FILE).read_text())  # next to the weights file

    assert report["preprocess"] == "torchvision" and report["split"] == "all"
    assert [p["file"] for p in report["predictions"]] == [path for path, _ in folder.samples]
    assert [p["label"] for p in report["predictions"]] == labels.tolist()
    top1 = np.array([p["top5"][0][0] for p in report["predictions"]])
    assert np.array_equal(top1, expected_top1)  # 100 % of the images
    assert 0 < result.metrics["top1"] < 1
    assert result.metrics["top1"] == np.mean(expected_top1 == labels)
    top5 = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    assert result.metrics["top5"] == np.mean(np.any(top5 == labels[:, None], axis=1))
    probs = torch.softmax(torch.from_numpy(expected), 1).numpy()
    for row, p in zip(probs, report["predictions"], strict=True):
        ours = np.array(p["top5"])
        assert np.max(np.abs(ours[:, 1] - row[ours[:, 0].astype(int)])) <= PROB_TOLERANCE
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(expected), torch.from_numpy(labels)).item()
    assert result.metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert (tmp_path / "eval_confusion_matrix.png").stat().st_size > 0


def test_tf_preprocessing_evaluates_the_same_images_a_few_levels_off(photos, tmp_path):
    """``--preprocess tf`` (train.py's pipeline) covers the same images in the same order; its pixels differ
    from torchvision's by a few levels (TensorFlow's JPEG decoder and resize), which is what the PIL path is for."""
    root = synset_folder(tmp_path / "val", photos, np.zeros(len(photos), int))
    transform = registry.EvalTransform()
    outputs = [(w,) for w in WNIDS]
    data = load_eval_data(str(root), None, None, transform, 8, outputs)
    pil = np.concatenate([b["image"][b["mask"]] for b in data.batches("torchvision", transform, 2)])
    tf = np.concatenate([b["image"][b["mask"]] for b in data.batches("tf", transform, 2)])
    assert pil.shape == tf.shape == (len(photos), 224, 224, 3)
    files = [data.describe(i) for i in range(len(data))]
    assert files == [path for path, _ in ImageFolder(str(root)).samples]
    np.testing.assert_array_equal(pil, np.stack([torchvision_pixels(Path(f)) for f in files]))
    levels = np.abs(pil - tf) * 0.226 * 255  # in 0..255 levels (std ~0.226)
    assert 0 < np.median(levels) < 3 and np.max(levels) < 80


def test_a_grayscale_model_is_evaluated_on_one_channel_and_only_through_the_tf_pipeline(tmp_path):
    """A model of ``in_chans=1`` (its transform has one mean and std) gets (crop, crop, 1) images: the files'
    gray levels normalized with its statistics (no resize at the crop size); the RGB-only PIL path refuses it."""
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(tmp_path / str(i % 2) / f"{i}.png")
    transform = registry.EvalTransform(resize_size=32, crop_size=32).for_channels(1)
    data = load_eval_data(str(tmp_path), None, None, transform, 2, [("0",), ("1",)])
    images = np.concatenate([b["image"][b["mask"]] for b in data.batches("tf", transform, 1)])
    pixels = np.stack([np.asarray(Image.open(data.describe(i)), np.float32)[..., None] for i in range(len(data))])
    expected = (pixels / 255 - np.float32(transform.mean)) / np.float32(transform.std)
    assert images.shape == (3, 32, 32, 1) and np.max(np.abs(images - expected)) <= 1e-5
    with pytest.raises(jaxnets.UserError, match=r"^--preprocess torchvision reads RGB images; this model takes "
                                                r"in_chans=1 channels: use --preprocess tf$"):
        data.batches("torchvision", transform, 1)


def test_tfds_images_are_decoded_by_pil_from_their_files(tmp_path, monkeypatch):
    """imagenet2012 from TFDS (mocked: random JPEGs) with --preprocess torchvision: PIL decodes the stored JPEG
    files, as torchvision decodes ImageNet's; the pixels are torchvision's transforms() of those files."""
    import socket

    import tensorflow_datasets as tfds

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])
    transform = registry.EvalTransform()
    outputs = [(w,) for w in WNIDS]
    with tfds.testing.mock_data(num_examples=7):
        data = load_eval_data("imagenet2012", str(tmp_path), None, transform, 4, outputs)
        batches = list(data.batches("torchvision", transform, 2))
        builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
        files = list(builder.as_dataset(split="validation", shuffle_files=False, as_supervised=True,
                                        read_config=tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1),
                                        decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    assert data.split_name == "val" and len(data) == len(files) == 7 and len(batches) == 2
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    preset = torchvision.models.get_model_weights("resnet50").IMAGENET1K_V1.transforms()
    for image, (encoded, label), got in zip(images, files, np.concatenate([b["label"][b["mask"]] for b in batches]),
                                            strict=True):
        with Image.open(io.BytesIO(encoded)) as file:
            expected = preset(file.convert("RGB")).numpy().transpose(1, 2, 0)
        assert np.max(np.abs(image - expected)) == 0.0 and got == label


def test_every_image_counts_once_whatever_the_batch_and_process_count():
    for size, local, processes in [(23, 4, 1), (23, 4, 2), (5, 8, 2), (16, 2, 4), (1, 1, 3)]:
        seen = []
        for p in range(processes):
            index, real = padded_layout(size, local, Shard(p, processes))
            assert len(index) == len(real) == -(-size // (local * processes)) * local  # same batches everywhere
            seen += index[real].tolist()
        assert sorted(seen) == list(range(size)), (size, local, processes)


def test_classes_map_to_the_model_s_outputs_by_name():
    imagenet = [(w, n) for w, n in zip(WNIDS, registry.imagenet_categories(), strict=True)]
    mapped, _ = map_classes(["n01443537", "n15075141"], imagenet)
    assert mapped.tolist() == [1, 999]
    assert map_classes(["goldfish", "tench"], imagenet)[0].tolist() == [1, 0]
    mapped, notes = map_classes(["3", "4", "5"], [("4",), ("5",)])  # a run trained on --classes 4,5
    assert mapped.tolist() == [-1, 0, 1] and "left out the images of 1 class(es) the model does not know: 3" in notes[0]
    mapped, notes = map_classes(["a", "b"], [("class 0",), ("class 1",)])
    assert mapped.tolist() == [0, 1] and "by position" in notes[0]
    with pytest.raises(jaxnets.UserError, match="the dataset's 3 classes .* match none of the model's 2 outputs"):
        map_classes(["a", "b", "c"], [("x",), ("y",)])


def test_a_name_two_outputs_answer_to_is_not_guessed():
    """A recorded class name given to two outputs (``crane`` the bird and the machine, in some ImageNet lists)
    maps a folder so named to neither."""
    outputs = [("n1", "crane"), ("n2", "crane"), ("n3", "tench")]
    assert map_classes(["crane", "tench", "n2"], outputs)[0].tolist() == [-1, 2, 1]


def train_run(run: Path, variables=None, categories: tuple[str, ...] = tuple("0123456789"), dataset: str = "digits",
              val_fraction: float = 0.2) -> Path:
    """A train.py run directory (on the digits): config.json and final weights as train.py writes them."""
    run.mkdir()
    if variables is None:
        variables = jax_init(jaxnets.create_model("resnet18", num_classes=len(categories)))
    save_weights(run / FINAL_WEIGHTS, "resnet18", variables, model_options={},
                 metadata={"source": "train.py", "dataset": dataset, "categories": list(categories),
                           "eval_transform": {"resize_size": 18, "crop_size": 16}})
    (run / "config.json").write_text(json.dumps({"model": "resnet18", "dataset": dataset,
                                                 "val_fraction": val_fraction}))
    return run


def jax_init(model):
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda: model.init(jax.random.key(3), jnp.zeros((1, 16, 16, 3))))()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("digits") / "run")


def test_a_run_directory_is_evaluated_on_its_validation_split_as_train_py_evaluates_it(digits_run):
    run = digits_run
    result = evaluate(EvalConfig(weights=str(run), batch_size=32, progress=False, worker_kind="thread"))
    assert result.report["preprocess"] == "tf" and result.report["split"] == "val"
    assert result.output == run and (run / REPORT_FILE).is_file()

    # The oracle: the model applied to train.py's evaluation batches of the same split (its tf.data pipeline),
    # the numbers counted here from the logits of the real (unmasked) images.
    dataset = load_dataset(DataConfig(dataset="digits", image_size=16, val_resize_size=18, batch_size=32))
    model, variables = jaxnets.load_pretrained("resnet18", weights=run / FINAL_WEIGHTS)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, labels = [], []
    for batch in dataset.eval_batches("val"):
        logits.append(np.asarray(forward(variables, batch["image"]), np.float64)[batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    log_norm = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    assert result.metrics["count"] == len(labels) == len(dataset.val)
    assert result.metrics["top1"] == np.mean(top5[:, 0] == labels)
    assert result.metrics["top5"] == np.mean(np.any(top5 == labels[:, None], axis=1))
    assert result.metrics["loss"] == pytest.approx(np.mean(log_norm - logits[np.arange(len(labels)), labels]), rel=1e-5)
    per_class = {row["class"]: row["count"] for row in result.report["per_class"]}
    assert per_class == {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=10))}


def test_a_model_of_some_classes_is_evaluated_on_those_classes_only(digits_run, tmp_path):
    variables = jaxnets.load_weights(digits_run / FINAL_WEIGHTS).variables  # its head cut to 2 classes
    head = variables["params"]["fc"]
    variables["params"]["fc"] = {"kernel": head["kernel"][:, [7, 3]], "bias": head["bias"][[7, 3]]}
    run = train_run(tmp_path / "run", variables, categories=("7", "3"))  # as a run with --classes 7,3
    result = evaluate(EvalConfig(weights=str(run), preprocess="torchvision", batch_size=16, progress=False,
                                 worker_kind="thread"))
    dataset = load_dataset(DataConfig(dataset="digits", image_size=16, batch_size=32))
    val_labels = dataset.val.labels
    assert result.metrics["count"] == int(np.sum((val_labels == 7) | (val_labels == 3)))
    assert {p["label"] for p in result.report["predictions"]} == {0, 1}
    assert any("left out the images of 8 class(es)" in note for note in result.report["notes"])


def _flat_folder(root: Path, per_class: int, suffix: str = ".png", channels: int = 3) -> Path:
    """``per_class`` 16-px examples in each of the classes ant and bee, no train/ or val/ folders: images, or
    ``.npy`` arrays of ``channels`` channels."""
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, channels), dtype=np.uint8)
            if suffix == ".npy":
                np.save(root / name / f"{i}.npy", pixels)
            else:
                Image.fromarray(pixels).save(root / name / f"{i}{suffix}")
    return root


def test_a_folder_run_is_evaluated_on_the_images_it_held_out_never_on_its_training_images(tmp_path, capsys):
    """A run on a flat folder (no val/) held out --val-fraction of each class: by default the evaluation is of
    those images, named as such, whatever a flat folder's own default (all images) is. 2 x 15 images at
    --val-fraction 0.25: round(0.25 x 15) = 4 of each class held out, 8 in all. 8 images are one batch of the
    default 64, after which nothing is left to time: no rate is made up."""
    root = _flat_folder(tmp_path / "pets", per_class=15)
    run = train_run(tmp_path / "run", categories=("ant", "bee"), dataset=str(root), val_fraction=0.25)
    assert main(["--weights", str(run), "--no-progress", "--worker-kind", "thread"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / REPORT_FILE).read_text())
    held_out = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4, val_fraction=0.25))
    assert report["split"] == "val" and report["metrics"]["count"] == len(held_out.val) == 2 * 4
    files = [p["file"] for p in report["predictions"]]
    assert sorted(files) == sorted(held_out.val.paths.tolist()) and not set(files) & set(held_out.train.paths)
    assert f"{run}: evaluated on the 8 images the run held out for validation (--split val)" in out
    assert "resnet18 on pets (val, 8 images, --preprocess tf)" in out
    assert "images/s" not in out and "in one batch, compiling included: too few images to time" in out
    assert report["images_per_second"] is None

    # Asked for, the other splits; two batches of 16 and 14: a rate, timed after the first.
    assert main(["--weights", str(run), "--split", "all", "--batch-size", "16", "--output", str(tmp_path / "all"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "all" / REPORT_FILE).read_text())
    assert report["split"] == "all" and report["metrics"]["count"] == 30 and report["images_per_second"] > 0
    assert f"{report['images_per_second']:.1f} images/s" in capsys.readouterr().out


def test_data_of_other_channels_than_the_weights_names_no_flag_evaluate_lacks(tmp_path, capsys):
    """The model's channels come from the weights, not from a flag of jaxnets-evaluate: the message says so, and
    names train.py's --in-chans only as how other weights are made."""
    root = _flat_folder(tmp_path / "bands", per_class=2, suffix=".npy", channels=4)
    run = train_run(tmp_path / "run", categories=("ant", "bee"))  # in_chans=3
    assert main(["--weights", str(run), "--dataset", str(root), "--no-progress"]) == 1
    assert capsys.readouterr().err == (
        f"jaxnets-evaluate: error: {run / FINAL_WEIGHTS}: a model of in_chans=3 (its weights decide), but "
        f"{root / 'ant' / '0.npy'} has shape (16, 16, 4) (4 channel(s)): evaluate it on 3-channel data, or evaluate "
        f"weights trained with jaxnets-train --in-chans 4\n")


def test_cli_errors_are_one_line_and_bugs_keep_their_traceback(digits_run, tmp_path, capsys, monkeypatch):
    cases = [
        (["--dataset", "digits"], "give the weights to evaluate"),
        (["--pretrained", "--dataset", "digits"], "--pretrained needs --model NAME"),
        (["--model", "resnet18", "--pretrained", "IMAGENET1K_V9", "--dataset", "digits"],
         "resnet18: no weights named 'IMAGENET1K_V9'"),
        (["--weights", str(tmp_path / "missing.safetensors"), "--dataset", "digits"], "missing.safetensors"),
    ]
    for argv, message in cases:
        assert main(argv, prog="jaxnets-evaluate") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jaxnets-evaluate: error: ") and message in err, err
    run = digits_run
    assert main(["--weights", str(run), "--dataset", str(tmp_path / "nowhere/")]) == 1
    assert "does not exist" in capsys.readouterr().err

    def bug(config):
        raise KeyError("an internal bug")

    monkeypatch.setattr("jaxnets.cli.evaluate.evaluate", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["--weights", str(run)])
    assert errors.COMMANDS["evaluate"] == "jaxnets-evaluate"


@pytest.mark.xdist_group("subprocess")
def test_three_devices_give_the_same_report_as_one(photos, tmp_path):
    """``python -m jaxnets.evaluate`` on 3 CPU devices, 20 images in global batches of 6 (the last padded):
    every image once, the same predictions as one device in this process."""
    torch_model = oracle_model("resnet18")
    root = synset_folder(tmp_path / "val", photos[:20], np.zeros(20, int))
    torch.save(torch_model.state_dict(), tmp_path / "r.pth")
    weights = convert("resnet18", tmp_path / "r.pth", tmp_path / "r.safetensors").path
    one = evaluate(EvalConfig(weights=str(weights), dataset=str(root), batch_size=4, output=str(tmp_path / "one"),
                              progress=False, worker_kind="thread")).report
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "jaxnets.evaluate", "--weights", str(weights), "--dataset", str(root),
                           "--batch-size", "6", "--output", str(tmp_path / "three"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    three = json.loads((tmp_path / "three" / REPORT_FILE).read_text())
    assert three["devices"] == 3 and three["metrics"]["count"] == one["metrics"]["count"] == 20
    assert [p["file"] for p in three["predictions"]] == [p["file"] for p in one["predictions"]]
    for a, b in zip(three["predictions"], one["predictions"], strict=True):
        assert a["label"] == b["label"] and a["top5"][0][0] == b["top5"][0][0]
        assert np.allclose(np.array(a["top5"])[:, 1], np.array(b["top5"])[:, 1], atol=1e-5)
    assert "top-1" in done.stdout and "report:" in done.stdout
