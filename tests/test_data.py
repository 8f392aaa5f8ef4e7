"""The input pipeline: splits, deterministic order, per-process shards, whole-split evaluation, folders,
TFDS (mocked), bad input, and torchvision's eval transform as the oracle."""

from __future__ import annotations

import dataclasses
import io
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2

from jaxnets import predict, registry
from jaxnets.config import TrainConfig, resolve
from jaxnets.data import (
    DataConfig,
    DataError,
    Shard,
    Source,
    StreamedSplit,
    center_crop,
    decode_rgb,
    load_dataset,
    parse_classes,
    random_resized_crop,
    resize_shorter,
    sources,
    tf,
)
from jaxnets.data.image_checks import check_image
from jaxnets.data.transforms import decode_file
from jaxnets.eval_transform import EvalTransform

DIGITS = DataConfig(image_size=16, batch_size=32, min_crop_scale=0.6, hflip=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DIGITS)


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    assert (len(digits.train), len(digits.val), digits.num_classes) == (1438, 359, 10)
    assert np.all(np.bincount(digits.val.labels) >= 35)  # 20% of every class (~180 each)
    train_rows = {row.tobytes() for row in digits.train.images.reshape(len(digits.train), -1)}
    val_rows = [row.tobytes() for row in digits.val.images.reshape(len(digits.val), -1)]
    # sklearn's digits contain a few exact duplicates; the split is by index, so allow a handful.
    assert sum(row in train_rows for row in val_rows) < 5
    again = load_dataset(DIGITS)
    np.testing.assert_array_equal(again.val.labels, digits.val.labels)


def test_train_order_is_deterministic_resumable_and_new_each_epoch(digits):
    epoch0 = list(digits.train_batches(0))
    assert len(epoch0) == digits.steps_per_epoch == 1438 // 32
    assert epoch0[0]["image"].shape == (32, 16, 16, 3) and epoch0[0]["image"].dtype == np.float32
    again = list(digits.train_batches(0))
    resumed = list(digits.train_batches(0, start_step=5))
    for a, b in zip(epoch0, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(epoch0[5:], resumed, strict=True):  # same pixels: augmentation is seeded per example
        np.testing.assert_array_equal(a["image"], b["image"])
    epoch1 = next(digits.train_batches(1))
    assert not np.array_equal(epoch0[0]["label"], epoch1["label"])
    other_seed = next(load_dataset(DataConfig(**{**DIGITS.__dict__, "seed": 1})).train_batches(0))
    assert not np.array_equal(epoch0[0]["label"], other_seed["label"])


def test_each_process_loads_its_slice_of_the_same_global_batch(digits):
    shards = [load_dataset(DIGITS, process_index=p, process_count=2) for p in range(2)]
    assert shards[0].local_batch_size == 16
    whole = next(digits.train_batches(3))
    parts = [next(s.train_batches(3)) for s in shards]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    eval_parts = [list(s.eval_batches()) for s in shards]
    assert len(eval_parts[0]) == len(eval_parts[1])  # the eval step is collective: same count everywhere
    assert sum(b["mask"].sum() for part in eval_parts for b in part) == len(digits.val)


def test_eval_covers_the_whole_split_once_with_a_padded_masked_last_batch(digits):
    batches = list(digits.eval_batches())
    assert len(batches) == -(-359 // 32)
    assert all(b["image"].shape[0] == 32 for b in batches)
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, digits.val.labels)
    assert batches[-1]["mask"].sum() == 359 % 32
    images, probe_labels = zip(*digits.iterate("val"), strict=True)
    assert sum(len(x) for x in images) == 359
    np.testing.assert_array_equal(np.concatenate(probe_labels), digits.val.labels)


@dataclasses.dataclass
class ToyStream(StreamedSplit):
    """A split of a kind the library does not have, as a new source would define one: images in memory,
    streamed per process (process p reads every count-th example from the p-th). Example k's pixels are all
    ``PIXEL * k``, so that a batch says which examples it holds."""

    ids: np.ndarray
    labels: np.ndarray
    process_count: int

    PIXEL = 9

    @property
    def host_sizes(self) -> list[int]:
        return [len(self.ids[p::self.process_count]) for p in range(self.process_count)]

    def host_dataset(self, shard: Shard) -> tf.data.Dataset:
        ids = self.ids[shard.index::shard.count]
        images = np.broadcast_to((self.PIXEL * ids).astype(np.uint8)[:, None, None, None], (len(ids), 10, 12, 3))
        return tf.data.Dataset.from_tensor_slices((images, self.labels[shard.index::shard.count].astype(np.int32)))

    def relabel(self, label_map: np.ndarray) -> ToyStream:
        keep = label_map[self.labels] >= 0
        return ToyStream(self.ids[keep], label_map[self.labels][keep], self.process_count)


def _toy_examples(batches: list[dict], config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The example ids and labels of the real (unmasked) examples of ``batches``, read off the pixels."""
    keep = [b.get("mask", np.ones(len(b["label"]), bool)) for b in batches]
    images = np.concatenate([b["image"][k] for b, k in zip(batches, keep, strict=True)])
    labels = np.concatenate([b["label"][k] for b, k in zip(batches, keep, strict=True)])
    pixels = images * np.asarray(config.std, np.float32) * 255 + np.asarray(config.mean, np.float32) * 255
    ids = np.round(pixels / ToyStream.PIXEL).astype(int)
    assert np.all(ids == ids[:, :1, :1, :1]) and np.abs(pixels - ids * ToyStream.PIXEL).max() < 1e-3
    return ids[:, 0, 0, 0], labels


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_new_source_is_one_entry_in_the_table_and_batches_through_the_split_interface(monkeypatch, process_count):
    """A source defined here, put first in ``sources.SOURCES``: ``load_dataset`` picks it by its recognizer,
    and ``Dataset`` trains and evaluates on its splits through the ``Split`` interface alone: each process
    gets full batches of training examples with their labels, evaluation covers every example once, and
    ``--classes`` keeps and remaps labels."""
    config = DataConfig(dataset="toy", image_size=8, batch_size=4, hflip=True)
    asked = []

    def load(config: DataConfig, process_count: int) -> Source:
        asked.append(process_count)
        train, val = np.arange(18), np.arange(18, 27)
        return Source("toy", ("a", "b", "c"), ToyStream(train, train % 3, process_count),
                      ToyStream(val, val % 3, process_count), ["toy: 18 + 9 examples"])

    monkeypatch.setattr(sources, "SOURCES", ((lambda config: config.dataset == "toy", load), *sources.SOURCES))
    shards = [load_dataset(config, p, process_count) for p in range(process_count)]
    assert asked == [process_count] * process_count
    assert shards[0].notes == ["toy: 18 + 9 examples"] and shards[0].class_names == ("a", "b", "c")
    assert all(s.steps_per_epoch == 18 // 4 for s in shards)
    train = [list(s.train_batches(epoch=1)) for s in shards]
    assert all(len(part) == 4 and part[0]["image"].shape == (4 // process_count, 8, 8, 3) for part in train)
    ids, labels = _toy_examples([b for part in train for b in part], config)
    # A stream's epoch is drawn through a shuffle buffer over the repeated stream: ids may repeat.
    assert len(ids) == 16 and set(ids) <= set(range(18)) and np.array_equal(labels, ids % 3)
    evals = [list(s.eval_batches("val")) for s in shards]
    assert {len(part) for part in evals} == {3}  # ceil(9 / 4) batches of 4 // process_count, on every process
    ids, labels = _toy_examples([b for part in evals for b in part], config)
    assert sorted(ids) == list(range(18, 27)) and np.array_equal(labels, ids % 3)

    kept = dataclasses.replace(config, classes=(2, 0), batch_size=2)
    shards = [load_dataset(kept, p, process_count) for p in range(process_count)]
    assert shards[0].class_names == ("c", "a")
    ids, labels = _toy_examples([b for s in shards for b in s.eval_batches("val")], kept)
    assert sorted(ids) == [18, 20, 21, 23, 24, 26] and np.array_equal(labels, np.where(ids % 3 == 2, 0, 1))


def test_importing_the_data_package_leaves_tensorflow_unimported():
    """TensorFlow costs seconds to import, and torchvision imported after it crashes: jaxnets.data (every module
    of it) and the training module import it on first use only."""
    heavy = "('tensorflow', 'tensorflow_datasets', 'PIL', 'sklearn')"
    code = ("import sys, pkgutil, importlib, jaxnets.data, jaxnets.training; "
            f"print(sorted(m for m in {heavy} if m in sys.modules)); "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(jaxnets.data.__path__, 'jaxnets.data.')]; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # PIL is what jaxnets.data.pil_eval (torchvision's PIL preprocessing) is made of; the rest loads on first use.
    assert out.stdout.split() == ["[]", "['PIL']"]


def test_classes_keeps_and_remaps_labels():
    assert parse_classes("5-9") == (5, 6, 7, 8, 9)
    assert parse_classes("0,2,7-8") == (0, 2, 7, 8)
    for bad in ("", "a-b", "1,1", "-3"):
        with pytest.raises(DataError, match="--classes"):
            parse_classes(bad)
    dataset = load_dataset(DataConfig(**{**DIGITS.__dict__, "classes": (5, 6, 7, 8, 9)}))
    assert dataset.class_names == ("5", "6", "7", "8", "9")
    assert set(np.unique(dataset.train.labels)) == set(range(5))
    assert 700 < len(dataset.train) < 740
    with pytest.raises(DataError, match="10 classes"):
        load_dataset(DataConfig(**{**DIGITS.__dict__, "classes": (3, 12)}))


@pytest.mark.parametrize("size,resize,crop", [((50, 70), 37, 32), ((64, 48), 20, 16), ((8, 8), 18, 16)])
def test_eval_transform_matches_torchvision(size, resize, crop):
    """Resize(shorter side) + CenterCrop as torchvision v2 on a uint8 tensor (bilinear, antialias)."""
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = center_crop(resize_shorter(tf.constant(image), resize), crop).numpy()
    reference = v2.CenterCrop(crop)(v2.Resize(resize, antialias=True)(torch.from_numpy(image).permute(2, 0, 1)))
    reference = reference.permute(1, 2, 0).numpy().astype(np.float32)
    assert ours.shape == reference.shape
    # torchvision rounds to uint8; tf keeps floats. Interpolation kernels agree to about one gray level.
    assert np.mean(np.abs(ours - reference)) < 1.0
    assert np.max(np.abs(ours - reference)) <= 3.0


def _write_folder(root, classes=("cat", "dog"), per_class=6, size=(20, 24)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_with_held_out_split_and_a_corrupt_file(tmp_path):
    root = _write_folder(tmp_path / "pets")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4))
    assert dataset.class_names == ("cat", "dog")
    assert len(dataset.train) + len(dataset.val) == 12  # the corrupt file is skipped...
    notes = " ".join(dataset.notes)
    assert "skipped 1 unreadable image file(s)" in notes and "broken.jpg" in notes  # ...and reported
    assert "held out" in notes and "split seed" in notes
    batch = next(dataset.train_batches(0))
    assert batch["image"].shape == (4, 16, 16, 3)


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    _write_folder(tmp_path / "data" / "train", per_class=4)
    _write_folder(tmp_path / "data" / "val", classes=("dog",), per_class=2)
    dataset = load_dataset(DataConfig(dataset=str(tmp_path / "data"), image_size=16, batch_size=4))
    assert (len(dataset.train), len(dataset.val)) == (8, 2)
    assert list(dataset.val.labels) == [1, 1]  # labels follow the train/ class folders


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing" / "dir", "does not exist"),
    (lambda p: p, "no class subfolders"),
    (lambda p: (p / "a").mkdir() or p, "no readable training images"),
])
def test_bad_folders_raise_one_line_errors(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(DataConfig(dataset=str(make(tmp_path)), image_size=16, batch_size=4))
    assert "\n" not in str(info.value)


def test_folder_with_only_a_train_subfolder_holds_out_validation_from_it(tmp_path):
    _write_folder(tmp_path / "data" / "train", classes=("cat", "dog", "fish"), per_class=5)
    dataset = load_dataset(DataConfig(dataset=str(tmp_path / "data"), image_size=16, batch_size=4))
    assert dataset.class_names == ("cat", "dog", "fish")  # not one class named "train"
    assert (len(dataset.train), len(dataset.val)) == (12, 3)
    assert set(dataset.val.labels) == {0, 1, 2}
    assert "train/ without val/; held out 3 images" in " ".join(dataset.notes)
    # A flat folder may have a class named "train": images directly inside it, not class subfolders.
    flat = _write_folder(tmp_path / "vehicles", classes=("bus", "train"))
    assert load_dataset(DataConfig(dataset=str(flat), image_size=16, batch_size=4)).class_names == ("bus", "train")


def test_folder_with_val_but_no_train_split_is_refused(tmp_path):
    _write_folder(tmp_path / "data" / "val")
    with pytest.raises(DataError, match="val/ holds class folders but there is no train/ split"):
        load_dataset(DataConfig(dataset=str(tmp_path / "data"), image_size=16, batch_size=4))


@pytest.mark.parametrize("make,match", [
    (lambda p: DataConfig(**{**DIGITS.__dict__, "classes": (3,)}), r"'digits' with --classes 3: 1 class\(es\) .*\(3\)"),
    (lambda p: DataConfig(dataset=str(_write_folder(p / "one", classes=("cat",))), image_size=16, batch_size=4),
     r"one': 1 class\(es\) with training images \(cat\); a classifier needs at least 2"),
    (lambda p: DataConfig(dataset=str(_write_folder(p / "d" / "train", classes=("cat",)).parent), image_size=16,
                          batch_size=4), r"1 class\(es\) with training images \(cat\)"),
])
def test_fewer_than_two_classes_are_refused(tmp_path, make, match):
    """One class trains to loss 0 and top-1 100 % at once: a run that looks like a success."""
    with pytest.raises(DataError, match=match) as info:
        load_dataset(make(tmp_path))
    assert "\n" not in str(info.value)


def test_a_class_without_training_images_is_named_in_a_warning(tmp_path):
    root = _write_folder(tmp_path / "pets")
    (root / "eel").mkdir()
    (root / "eel" / "broken.png").write_bytes(b"not a png")
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4))
    assert dataset.class_names == ("cat", "dog", "eel")
    assert "warning: no training images for class(es) eel" in dataset.notes


def test_a_single_image_class_trains_and_the_split_of_the_others_is_unchanged(tmp_path):
    config = DataConfig(image_size=16, batch_size=4)
    before = load_dataset(DataConfig(**{**config.__dict__, "dataset": str(_write_folder(tmp_path / "a"))}))
    root = _write_folder(tmp_path / "b")
    _write_folder(root, classes=("eel",), per_class=1)
    dataset = load_dataset(DataConfig(**{**config.__dict__, "dataset": str(root)}))
    assert list(dataset.train.labels).count(2) == 1 and 2 not in dataset.val.labels  # eel's image trains
    assert "warning: class(es) eel have a single image, used for training and not validated" in dataset.notes
    # The split stays a fixed function of the files: cat's and dog's held-out images are those without eel.
    relative = [str(Path(p).relative_to(tmp_path / "a")) for p in before.val.paths]
    assert [str(Path(p).relative_to(root)) for p in dataset.val.paths] == relative
    lonely = _write_folder(tmp_path / "c", per_class=1)
    with pytest.raises(DataError, match="no class has two readable images"):
        load_dataset(DataConfig(**{**config.__dict__, "dataset": str(lonely)}))


def _encoded(fmt, mode="RGB", transparent=False, **options):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(np.kron(pixels, np.ones((4, 4, 1), np.uint8)))  # 24x32, blocky: compresses like a photo
    image = image.convert(mode)
    if transparent:  # alpha from opaque to clear: an encoder cannot drop it as it drops an opaque one
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _tf_decodes(data: bytes) -> bool:
    """Whether training's decoder reads ``data``."""
    try:
        decode_rgb(tf.constant(data))
    except tf.errors.OpError:
        return False
    return True


@pytest.mark.parametrize("fmt,options", [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("BMP", {"mode": "L"}),
    ("WEBP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"mode": "RGBA", "transparent": True}),
    ("WEBP", {"mode": "RGBA", "transparent": True, "lossless": True}),
])
def test_image_check_rejects_exactly_the_cut_files_tensorflow_fails_on(tmp_path, fmt, options):
    """Every prefix of a file: PIL's verify passes most of them, TensorFlow's decoder fails on them mid-run."""
    data = _encoded(fmt, **options)
    path = tmp_path / "image"
    for cut in [*range(1, len(data), 7), len(data) - 2, len(data) - 1, len(data)]:
        path.write_bytes(data[:cut])
        assert (check_image(str(path)) is None) == _tf_decodes(data[:cut]), (cut, len(data), check_image(str(path)))


@pytest.mark.parametrize("data,problem", [
    (_encoded("TIFF"), "TIFF data, not JPEG, PNG, GIF, BMP or WebP"),
    (_encoded("WEBP", save_all=True, append_images=[Image.new("RGB", (32, 24))]),
     "WEBP file: WebP Animation must be 4 channel RGBA"),
    (_encoded("PPM"), "PPM data"),
    (_encoded("JPEG")[:-2] + bytes(20), "JPEG file: jpeg::Uncompress failed. Invalid JPEG data"),  # no end marker
    (_encoded("BMP", mode="1"), "BMP file: Number of channels inherent in the image must be 1, 3 or 4, was 0"),
    (_encoded("BMP") + bytes(4), "BMP file: Input size should match (header_size + row_size * abs_height)"),
])
def test_image_check_rejects_what_tensorflow_cannot_decode(tmp_path, data, problem):
    (tmp_path / "x.png").write_bytes(data)
    assert problem in check_image(str(tmp_path / "x.png"))
    assert not _tf_decodes(data)


@pytest.mark.parametrize("data", [_encoded("JPEG") + bytes(100), _encoded("JPEG") + b"appended video" * 100,
                                  _encoded("PNG") + b"trailing", _encoded("MPO", save_all=True)])
def test_image_check_accepts_data_after_the_image(tmp_path, data):
    (tmp_path / "x.jpg").write_bytes(data)
    assert check_image(str(tmp_path / "x.jpg")) is None and _tf_decodes(data)


def test_webp_images_in_a_folder_train_with_the_pixels_pil_reads(tmp_path):
    """Opaque and partly transparent WebP (TensorFlow's decoder refuses RGB for the latter): alpha dropped,
    as PIL's convert("RGB") drops it."""
    root = _write_folder(tmp_path / "pets")
    files = {"opaque.webp": _encoded("WEBP", lossless=True),
             "clear.webp": _encoded("WEBP", mode="RGBA", transparent=True, lossless=True)}
    for name, data in files.items():
        (root / "dog" / name).write_bytes(data)
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4))
    webp = sorted(path for path in [*dataset.train.paths, *dataset.val.paths] if path.endswith(".webp"))
    assert webp == [str(root / "dog" / name) for name in sorted(files)]
    for path in webp:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(decode_file(tf.constant(path)).numpy(), pixels)


def test_a_palette_bmp_is_rejected_as_tensorflow_reads_its_indices_as_gray_levels(tmp_path):
    data = _encoded("BMP", mode="P")
    (tmp_path / "x.bmp").write_bytes(data)
    assert "color-palette BMP" in check_image(str(tmp_path / "x.bmp"))
    pixels = Image.open(io.BytesIO(data)).convert("RGB")
    assert not np.array_equal(tf.io.decode_image(data, channels=3).numpy(), np.asarray(pixels))  # silent corruption


def test_folder_skips_truncated_and_mislabelled_images_that_would_crash_training(tmp_path):
    root = _write_folder(tmp_path / "pets")
    (root / "dog" / "cut.jpg").write_bytes(_encoded("JPEG")[:400])
    (root / "cat" / "tiff.png").write_bytes(_encoded("TIFF"))
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=4))
    assert len(dataset.train) + len(dataset.val) == 12
    assert "skipped 2 unreadable image file(s)" in " ".join(dataset.notes)
    for split in ("train", "val"):  # decodes every remaining file: a bad one raises a TensorFlow error here
        assert sum(len(labels) for _, labels in dataset.iterate(split)) == len(dataset._split(split))


def test_tfds_dataset_via_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # online, as far as the download check can tell
    with tfds.testing.mock_data(num_examples=24):
        dataset = load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path), image_size=16, batch_size=8))
        assert dataset.num_classes == 10 and "held out" in dataset.notes[0]
        batches = list(dataset.train_batches(0))
        assert len(batches) == dataset.steps_per_epoch == 3
        again = list(dataset.train_batches(0, start_step=1))
        np.testing.assert_array_equal(batches[1]["image"], again[0]["image"])
        evals = list(dataset.eval_batches())
        assert sum(b["mask"].sum() for b in evals) == len(dataset.val)


def test_unknown_or_undownloadable_tfds_dataset(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    with pytest.raises(DataError, match="unknown dataset 'no_such_dataset_xyz'"):
        load_dataset(DataConfig(dataset="no_such_dataset_xyz"))

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] name resolution\nmore details")

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # the name resolves: tfds gets to try
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataError, match="'mnist' is not prepared in .* could not be downloaded "
                                        r"\(Failed to establish a new connection: \[Errno -3\] name resolution\)"
                       ) as info:
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert "\n" not in str(info.value) and str(info.value).endswith("prepare it there")  # --data-dir was given
    with pytest.raises(DataError, match="prepare it there or pass --data-dir where it is prepared$"):
        load_dataset(DataConfig(dataset="mnist"))


@pytest.mark.parametrize("proxy", [None, "http://proxy.example:3128"])
def test_no_network_is_told_at_once_unless_a_proxy_may_reach_it(proxy, tmp_path, monkeypatch):
    """Offline, tfds retries each file ten times with growing waits (3.5 min measured for MNIST) before it fails:
    an unresolvable TFDS host with no proxy set is refused before that, and tfds is not called."""
    import tensorflow_datasets as tfds

    def unresolvable(host, *args):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    attempts = []

    def attempt(self):
        attempts.append(self.name)
        raise ConnectionError("proxy.example: connection refused")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", attempt)
    # Proxies as requests finds them: the environment, or (macOS, Windows) the system settings.
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": proxy} if proxy else {})
    if proxy:
        with pytest.raises(DataError, match=r"could not be downloaded \(proxy.example: connection refused\)"):
            load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
        assert attempts == ["mnist"]
    else:
        with pytest.raises(DataError, match=r"could not be downloaded \(no network: storage.googleapis.com does not "
                                            r"resolve \(Name or service not known\) and no proxy is set\)"):
            load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
        assert attempts == []


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 0, "DataConfig.image_size must be an integer >= 1, got 0"),
    ("image_size", 16.5, "DataConfig.image_size must be an integer >= 1, got 16.5"),
    ("val_resize_size", 8, "DataConfig.val_resize_size must be None or an integer >= image_size (16), got 8"),
    ("batch_size", 0, "DataConfig.batch_size must be an integer >= 1, got 0"),
    ("eval_batch_size", True, "DataConfig.eval_batch_size must be None or an integer >= 1, got True"),
    ("std", (0.0, 0.2, 0.2), "DataConfig.std must be 3 finite numbers > 0 (one per channel), got (0.0, 0.2, 0.2)"),
    ("mean", (0.5, float("nan"), 0.5),
     "DataConfig.mean must be 3 finite numbers (one per channel), got (0.5, nan, 0.5)"),
    ("mean", (0.5,), "DataConfig.mean must be 3 finite numbers (one per channel), got (0.5,)"),
    ("in_chans", 0, "DataConfig.in_chans must be an integer >= 1, got 0"),
    ("val_fraction", 1.0, "DataConfig.val_fraction must be in (0, 1), got 1.0"),
    ("min_crop_scale", 2.0, "DataConfig.min_crop_scale must be in (0, 1], got 2.0"),
])
def test_data_config_the_pipeline_cannot_honour_is_refused_by_field(field, value, message):
    config = dataclasses.replace(DataConfig(image_size=16, batch_size=8), **{field: value})
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        load_dataset(config)


def _eval_reference(path, resize: int, crop: int, mean, std) -> np.ndarray:
    """torchvision v2's eval pipeline on the decoded file: Resize -> CenterCrop -> ToImage/ToDtype -> Normalize."""
    pipeline = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    with Image.open(path) as image:
        return pipeline(image.convert("RGB")).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("weights_stats", [None, ((0.2, 0.5, 0.7), (0.1, 0.3, 0.25))])
def test_eval_batches_are_normalized_as_torchvision_with_the_weights_mean_and_std(tmp_path, monkeypatch,
                                                                                  weights_stats):
    """The training pipeline's eval batches against torchvision v2, normalized with the mean and std of the
    model's weights metadata: torchvision's ImageNet ones, and (patched into the registry) per-channel values
    unlike any default, which a pipeline ignoring the weights' metadata or swapping channels would miss."""
    if weights_stats is not None:
        spec = registry.get_spec("resnet18")
        transforms = dataclasses.replace(spec.weights.transforms, mean=weights_stats[0], std=weights_stats[1])
        monkeypatch.setitem(registry._REGISTRY, "resnet18",
                            dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, transforms=transforms)))
    expected = registry.get_spec("resnet18").weights.transforms
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for label, size in (("cat", (20, 24)), ("cat", (33, 21)), ("dog", (18, 18)), ("dog", (40, 29))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / label / f"{size}-{i}.png")
    config = resolve(TrainConfig(model="resnet18", dataset=str(root), image_size=16, batch_size=4,
                                 pretrained="default")).data_config()
    assert (config.mean, config.std) == (expected.mean, expected.std)
    dataset = load_dataset(config)
    batches = list(dataset.eval_batches("train"))
    ours = np.concatenate([b["image"][b["mask"]] for b in batches])
    assert len(ours) == len(dataset.train) == 6
    reference = np.stack([_eval_reference(p, config.eval_transform.resize_size, 16, expected.mean, expected.std)
                          for p in dataset.train.paths])
    assert ours.shape == reference.shape == (6, 16, 16, 3)
    # In intensity levels (0..255): the tolerance of test_eval_transform_matches_torchvision (torchvision rounds
    # the resized image to uint8, TensorFlow keeps floats). A missing mean subtraction is ~100 levels off.
    levels = np.abs(ours - reference) * np.asarray(expected.std, np.float32) * 255
    assert np.mean(levels) < 1.0 and np.max(levels) <= 3.0


def _crop_boxes(height: int, width: int, scale: tuple[float, float], count: int, size: int = 32) -> np.ndarray:
    """(top, left, h, w) of ``count`` crops of ``random_resized_crop``, read off its output: the image holds each
    pixel's row and column, which a (bilinear, antialiased) resize keeps linear away from the borders."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))
    crop = tf.function(lambda seed: random_resized_crop(image, size, seed, scale=scale))
    inner = np.arange(2, size - 2)
    boxes = []
    for k in range(count):
        out = crop(tf.constant([3, k], tf.int64)).numpy()
        slope_r, icpt_r = np.polyfit(inner, out[inner, size // 2, 0], 1)
        slope_c, icpt_c = np.polyfit(inner, out[size // 2, inner, 1], 1)
        h, w = slope_r * size, slope_c * size  # output pixel i samples input (i + 0.5) * h / size - 0.5 + top
        boxes.append((icpt_r - 0.5 * h / size + 0.5, icpt_c - 0.5 * w / size + 0.5, h, w))
    boxes = np.asarray(boxes)
    assert np.abs(boxes - np.round(boxes)).max() < 0.1  # whole pixels: the read-out is exact
    return np.round(boxes).astype(int)


@pytest.mark.parametrize("height,width", [(160, 240), (240, 160)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_random_resized_crop_keeps_torchvision_bounds_and_fallback(height, width, scale):
    """torchvision's ``RandomResizedCrop.get_params``: area fraction in ``scale`` and ratio w/h in [3/4, 4/3] (up
    to rounding h and w), inside the image; when 10 tries fail, a center crop of the ratio clamped into range.
    A 3:2 image at scale >= 0.9 always falls back: torchvision's fallback box is the oracle."""
    boxes = _crop_boxes(height, width, scale, count=150)
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    in_range = ((h + 0.5) * (w + 0.5) >= scale[0] * height * width) & ((w - 0.5) / (h + 0.5) <= 4 / 3) \
        & ((w + 0.5) / (h - 0.5) >= 3 / 4)
    placeholder = torch.zeros(3, height, width)
    fallback = {RandomResizedCrop.get_params(placeholder, list(scale), [3 / 4, 4 / 3]) for _ in range(20)}
    if scale[0] == 0.9:
        assert len(fallback) == 1  # torchvision always falls back here
        (box,) = fallback
        assert not in_range.any() and (boxes == box).all(), (box, boxes[:3])
    else:
        assert in_range.all(), boxes[~in_range]
        area = h * w / (height * width)
        assert area.min() < 0.1 and area.max() > 0.75  # the whole scale range is drawn from (max here: 0.89)
        assert (w / h).min() < 0.8 and (w / h).max() > 1.25


# --- input channels: grayscale images, .npy arrays, 1-channel TFDS datasets ------------------------------------


def _config(dataset, in_chans: int, **kwargs) -> DataConfig:
    """A DataConfig for ``in_chans`` channels, with ImageNet's statistics extended as train.py extends them."""
    stats = EvalTransform().for_channels(in_chans)
    return DataConfig(dataset=str(dataset), image_size=16, batch_size=4, in_chans=in_chans, mean=stats.mean,
                      std=stats.std, **kwargs)


def test_grayscale_decoding_keeps_gray_files_and_takes_the_luma_of_color_ones(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    color = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    wide = rng.integers(0, 65536, (9, 11)).astype(np.uint16)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(color).save(tmp_path / "color.png")
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(color).save(tmp_path / "color.webp", lossless=True)
    decoded = {name: decode_file(tf.constant(str(tmp_path / name)), 1).numpy() for name in
               ("gray.png", "color.png", "gray.jpg", "wide.png", "color.webp")}
    assert all(image.shape == (9, 11, 1) for image in decoded.values())
    np.testing.assert_array_equal(decoded["gray.png"][..., 0], gray)  # a gray file is read as it is
    np.testing.assert_array_equal(decoded["wide.png"][..., 0], wide >> 8)  # 16 bits: the high byte, as predict
    pil_gray = {name: np.asarray(predict.read_image(tmp_path / name).convert("L"), np.float32) for name in decoded}
    # What predict shows a model of in_chans=1: the same pixels (JPEGs aside: TensorFlow's decoder computes the
    # DCT differently from PIL's, for RGB as for gray, within a few levels).
    for name in ("gray.png", "wide.png"):
        np.testing.assert_array_equal(decoded[name][..., 0], pil_gray[name], err_msg=name)
    for name in ("color.png", "color.webp"):  # luma: PIL's and TensorFlow's weights round differently
        assert np.abs(decoded[name][..., 0] - pil_gray[name]).max() <= 1, name


def test_grayscale_folder_gives_one_channel_batches(tmp_path):
    root = tmp_path / "gray"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((20, 24), 40 * i + 10 * (label == "b"), np.uint8), mode="L").save(
                root / label / f"{i}.png")
    dataset = load_dataset(_config(root, 1))
    batch = next(dataset.eval_batches())
    assert batch["image"].shape[1:] == (16, 16, 1) and next(dataset.train_batches(0))["image"].shape == (4, 16, 16, 1)
    (mean,), (std,) = dataset.config.mean, dataset.config.std
    # A constant image stays constant through resize and crop: (value / 255 - mean) / std, with 1-channel stats.
    values = np.unique(np.round((batch["image"][batch["mask"]] * std + mean) * 255, 3))
    assert set(values) <= {10.0 * v for v in range(14)} and len(values) > 1


def test_array_folder_reads_any_channel_count_scaled_by_dtype(tmp_path):
    root = tmp_path / "bands"
    values = {"u8": np.uint8(51), "u16": np.uint16(13107), "f32": np.float32(0.2)}  # all 0.2 of full scale
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for kind, value in values.items():
            np.save(root / label / f"{kind}.npy", np.full((18, 21, 5), value))
    decoded = {kind: decode_file(tf.constant(str(root / "a" / f"{kind}.npy")), 5).numpy() for kind in values}
    for kind, image in decoded.items():
        assert image.shape == (18, 21, 5) and image.dtype == np.float32
        np.testing.assert_allclose(image, 51.0, rtol=1e-6, err_msg=kind)  # 0.2 x 255 pixel units
    dataset = load_dataset(_config(root, 5))
    stats = EvalTransform().for_channels(5)
    expected = (0.2 - np.float32(stats.mean)) / np.float32(stats.std)  # the statistics extended cyclically
    for batch in dataset.eval_batches():
        assert batch["image"].shape[1:] == (16, 16, 5)
        np.testing.assert_allclose(batch["image"][batch["mask"]], np.broadcast_to(expected, (
            int(batch["mask"].sum()), 16, 16, 5)), rtol=1e-5, atol=1e-5)
    assert next(dataset.train_batches(0))["image"].shape == (4, 16, 16, 5)


def test_an_npy_file_mixed_into_an_image_folder_trains_with_the_images(tmp_path):
    root = _write_folder(tmp_path / "mixed", per_class=3)
    np.save(root / "cat" / "extra.npy", np.zeros((20, 24, 3), np.uint8))
    dataset = load_dataset(DataConfig(dataset=str(root), image_size=16, batch_size=2))
    assert len(dataset.train) + len(dataset.val) == 7
    assert sum(len(labels) for _, labels in dataset.iterate("train")) == len(dataset.train)


@pytest.mark.parametrize("make, in_chans, message", [
    (lambda root: _write_folder(root), 4, r"--in-chans 4: .*\.png is an image file, which decodes to 1 or 3 "
                                          r"channels; give 4-channel examples as \.npy arrays \(H, W, 4\)"),
    (lambda root: _npy_folder(root, 4), 5, r"--in-chans 5: .*\.npy has shape \(20, 24, 4\) \(4 channel\(s\)\); "
                                           r"the model takes \(H, W, 5\) arrays: pass --in-chans 4"),
    (lambda root: _npy_folder(root, 4), 3, r"--in-chans 3: .*has shape \(20, 24, 4\)"),
    (lambda root: "digits", 2, r"--in-chans 2: the digits \(grayscale\) have 1 channel\(s\); use --in-chans 1"),
])
def test_a_channel_count_the_data_does_not_have_is_a_one_line_error(tmp_path, make, in_chans, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset(_config(make(tmp_path / "data"), in_chans))
    assert "\n" not in str(info.value)


def _npy_folder(root: Path, channels: int) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            np.save(root / label / f"{i}.npy", np.zeros((20, 24, channels), np.float32))
    return root


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_one_channel_tfds_dataset_via_mock_data(tmp_path, monkeypatch, in_chans):
    """mnist's images are (28, 28, 1): 1 channel as they are, 3 as gray RGB (the default), 4 refused."""
    import tensorflow_datasets as tfds

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # online, as far as the download check can tell
    with tfds.testing.mock_data(num_examples=24):
        config = dataclasses.replace(_config("mnist", in_chans, data_dir=str(tmp_path)), batch_size=8)
        if in_chans == 4:
            with pytest.raises(DataError, match=r"^--in-chans 4: TFDS mnist's images \(28, 28, 1\) have 1 "
                                                r"channel\(s\); use --in-chans 1 or convert them$"):
                load_dataset(config)
            return
        dataset = load_dataset(config)
        batch = next(dataset.train_batches(0))
        assert batch["image"].shape == (8, 16, 16, in_chans)
        if in_chans == 3:
            np.testing.assert_allclose(batch["image"][..., 0] * 0.229 + 0.485,  # gray repeated, then normalized
                                       batch["image"][..., 1] * 0.224 + 0.456, rtol=0, atol=1e-6)
        assert sum(b["mask"].sum() for b in dataset.eval_batches()) == len(dataset.val)


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_streamed_epoch_is_one_reshuffled_pass_over_the_split(tmp_path, monkeypatch, process_count):
    """TFDS (mocked): each process's epoch holds each of its examples at most once, all but the remainder past
    the last whole batch, in a new order each epoch, the same order when asked again (resume), and with positions
    distinct across processes. Repeating the split before a shuffle buffer larger than it drew some examples twice
    and missed others."""
    import tensorflow_datasets as tfds

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # online, as far as the download check can tell
    with tfds.testing.mock_data(num_examples=50):
        config = DataConfig(dataset="cifar10", data_dir=str(tmp_path), image_size=16, batch_size=8)
        positions = set()
        for index in range(process_count):
            dataset = load_dataset(config, index, process_count)
            split, shard, local = dataset.train, dataset.shard, dataset.local_batch_size
            pool = [image.tobytes() for image, _ in split.host_dataset(shard).as_numpy_iterator()]
            assert len(set(pool)) == len(pool) == split.host_sizes[index]  # mock images are distinct
            orders = []
            for epoch in (0, 1):
                examples = list(split.train_examples(8, shard, 0, epoch, 0).as_numpy_iterator())
                seen = [image.tobytes() for image, _, _ in examples]
                assert len(seen) == dataset.steps_per_epoch * local == len(set(seen))
                assert set(seen) <= set(pool) and len(pool) - len(seen) < local * process_count + process_count
                again = split.train_examples(8, shard, 0, epoch, 0).as_numpy_iterator()
                assert [image.tobytes() for image, _, _ in again] == seen
                positions |= {int(p) for _, _, p in examples if epoch == 0}
                orders.append(seen)
            assert orders[0] != orders[1]
        assert len(positions) == dataset.steps_per_epoch * 8  # distinct over the processes
