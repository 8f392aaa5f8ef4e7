"""The automatic augmentation policies and random erasing (jaxnets.data.autoaugment, jaxnets.data.erasing) against
torchvision.transforms.v2 itself: every operation on real photos (scikit-learn's bundled sample images) at several
magnitudes, the policies' tables, random erasing's box distribution; and their place in the pipeline (seeded per
example, resumable, never at evaluation)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision  # noqa: F401 - before TensorFlow (tests/conftest.py)
from torchvision.transforms import InterpolationMode, RandomErasing, v2
from torchvision.transforms.v2 import functional as F

from jaxnets.data import DataConfig, erasing, load_dataset, tf
from jaxnets.data import autoaugment as aa
from jaxnets.data.transforms import policy_and_erasing

BILINEAR = InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two crops of scikit-learn's sample photos (china.jpg, flower.jpg), uint8 RGB (60, 76, 3): small, not square;
    and uniform noise of that size, whose every level pair hits the float32 rounding boundaries photos rarely do."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    noise = np.random.default_rng(0).integers(0, 256, (60, 76, 3), dtype=np.uint8)
    return [np.ascontiguousarray(images[0][150:210, 300:376]), np.ascontiguousarray(images[1][200:260, 180:256]),
            noise]


def _torchvision(name: str, image: torch.Tensor, m: float) -> torch.Tensor:
    """What torchvision's ``_AutoAugmentBase._apply_image_or_video_transform`` calls for op ``name`` at magnitude
    ``m``, with the reference recipe's bilinear interpolation and fill 0 (tensor kernels, CHW)."""
    shear = math.degrees(math.atan(m))
    calls = {
        "Identity": lambda: image,
        "ShearX": lambda: F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                                   interpolation=BILINEAR, center=[0, 0]),
        "ShearY": lambda: F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear],
                                   interpolation=BILINEAR, center=[0, 0]),
        "TranslateX": lambda: F.affine(image, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0],
                                       interpolation=BILINEAR),
        "TranslateY": lambda: F.affine(image, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0],
                                       interpolation=BILINEAR),
        "Rotate": lambda: F.rotate(image, angle=m, interpolation=BILINEAR),
        "Brightness": lambda: F.adjust_brightness(image, 1.0 + m),
        "Color": lambda: F.adjust_saturation(image, 1.0 + m),
        "Contrast": lambda: F.adjust_contrast(image, 1.0 + m),
        "Sharpness": lambda: F.adjust_sharpness(image, 1.0 + m),
        "Posterize": lambda: F.posterize(image, int(m)),
        "Solarize": lambda: F.solarize(image, 255 * m),
        "AutoContrast": lambda: F.autocontrast(image),
        "Equalize": lambda: F.equalize(image),
        "Invert": lambda: F.invert(image),
    }
    return calls[name]()


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Magnitudes from the policies' tables (TrivialAugmentWide's widest, RandAugment's at 9/30, AutoAugment's), signed.
MAGNITUDES = {
    "Identity": [0.0], "ShearX": [0.3, -0.99, 0.033], "ShearY": [-0.3, 0.99], "TranslateX": [32.0, -13.7],
    "TranslateY": [-32.0, 4.5], "Rotate": [30.0, -135.0, 4.5, 90.0], "Brightness": [0.99, -0.99, 0.27],
    "Color": [0.9, -0.66, 0.27], "Contrast": [0.99, -0.9, 0.33], "Sharpness": [0.99, -0.99, 0.27],
    "Posterize": [2.0, 4.0, 7.0, 8.0], "Solarize": [0.0, float(np.float32(1 / 3)), 0.7, 1.0],
    "AutoContrast": [0.0], "Equalize": [0.0], "Invert": [0.0],
}


@pytest.mark.parametrize("name", list(aa.OPS))
def test_each_op_matches_torchvision_on_photos(photos, name):
    """Colour ops: torchvision's uint8 pixels exactly (its float32 arithmetic and fused multiply-adds reproduced).
    Geometric ops resample bilinearly: TensorFlow's sampler and torch's ``grid_sample`` compute the same value up to
    float32 rounding (<= 0.005 of a level here), which is then rounded to a whole level; where it lies on .5 (a
    shear by 0.3 puts a row on exact half-pixels) the two round apart. So: within 0.5 + 0.01 of torchvision's
    unrounded output everywhere, equal to its uint8 output on >= 97 % of the values, never more than 1 level off."""
    for photo in photos:
        chw = torch.from_numpy(photo.copy()).permute(2, 0, 1)
        for m in map(float, np.float32(MAGNITUDES[name])):  # the tables' float32 values, as torchvision's are
            ours = aa.OPS[name](tf.constant(photo, tf.float32), tf.constant(m, tf.float32)).numpy()
            reference = _torchvision(name, chw, m).permute(1, 2, 0).numpy().astype(np.float32)
            assert ours.shape == photo.shape and np.all(ours == np.round(ours)), (name, m)
            if name not in GEOMETRIC:
                np.testing.assert_array_equal(ours, reference, err_msg=f"{name} {m}")
                continue
            unrounded = _torchvision(name, chw.float(), m).permute(1, 2, 0).numpy()
            assert np.abs(ours - unrounded).max() <= 0.51, (name, m)
            assert np.abs(ours - reference).max() <= 1, (name, m)
            assert np.mean(ours != reference) <= 0.03, (name, m, np.mean(ours != reference))


@pytest.mark.parametrize("name", ["Color", "Contrast", "Equalize", "AutoContrast", "Sharpness", "Rotate"])
def test_ops_on_grayscale_match_torchvision(photos, name):
    """One channel (--in-chans 1): torchvision leaves saturation alone and takes the contrast mean of the image."""
    gray = photos[0][..., :1]
    m = float(np.float32(MAGNITUDES[name][0]))
    ours = aa.OPS[name](tf.constant(gray, tf.float32), tf.constant(m, tf.float32)).numpy()
    reference = _torchvision(name, torch.from_numpy(gray.copy()).permute(2, 0, 1), m).permute(1, 2, 0).numpy()
    assert np.abs(ours - reference).max() <= (1 if name in GEOMETRIC else 0)


@pytest.mark.parametrize("policy, transform", [
    ("ta_wide", v2.TrivialAugmentWide()), ("ra", v2.RandAugment()), ("imagenet", v2.AutoAugment()),
])
def test_policy_tables_are_torchvisions(policy, transform):
    """The ops, their magnitude tables (at a 60 x 76 image: AutoAugment's and RandAugment's translations scale with
    it), their signs and AutoAugment's sub-policies, read from torchvision's transforms themselves."""
    height, width = 60, 76
    space = {"ta_wide": aa._TA_WIDE_SPACE, "ra": aa._RA_SPACE, "imagenet": aa._AA_SPACE}[policy]
    bins = 10 if policy == "imagenet" else transform.num_magnitude_bins
    assert list(space) == list(transform._AUGMENTATION_SPACE)
    ours = aa.magnitude_table(space, bins, height, width)
    for row, (name, (magnitudes, signed)) in zip(ours, transform._AUGMENTATION_SPACE.items(), strict=True):
        expected = magnitudes(bins, height, width)
        np.testing.assert_allclose(row, np.zeros(bins) if expected is None else expected.numpy(), rtol=1e-6,
                                   err_msg=name)
        assert space[name][1] == signed
    if policy == "imagenet":
        assert [tuple(sub) for sub in aa.IMAGENET_POLICY] == [tuple(sub) for sub in transform._policies]


@pytest.mark.parametrize("policy", aa.POLICIES)
def test_a_policy_is_a_function_of_its_seed(photos, policy):
    """Per-example stateless seeds: the same seed gives the same pixels, other seeds other ops."""
    apply = tf.function(aa.policy(policy, 60, 76, ra_magnitude=9))
    image = tf.constant(photos[1], tf.float32)
    seeds = [tf.constant([7, i], tf.int64) for i in range(12)]
    outputs = [apply(image, s).numpy() for s in seeds]
    np.testing.assert_array_equal(outputs[3], apply(image, seeds[3]).numpy())
    assert len({o.tobytes() for o in outputs}) >= 4
    assert all(o.shape == photos[1].shape and o.min() >= 0 and o.max() <= 255 for o in outputs)


def test_random_erasing_boxes_are_distributed_as_torchvisions():
    """RandomErasing.get_params with torchvision's defaults (its own draws) against erase_box on a 12 x 40 image,
    where tall boxes are often rejected and the attempts matter: the fraction found, and the found boxes' area
    fraction, aspect and position (two-sample Kolmogorov-Smirnov, p > 1e-3; 2000 draws each). A test that can
    fail: a scale of (0.02, 0.4) or (0.02, 0.3) instead of (0.02, 0.33) gives area p-values below 1e-3."""
    height, width, n = 12, 40, 2000
    torch.manual_seed(0)
    image, defaults = torch.zeros(1, height, width), RandomErasing()
    theirs = np.array([RandomErasing.get_params(image, scale=defaults.scale, ratio=defaults.ratio, value=[0])[:4]
                       for _ in range(n)], np.float64)
    theirs_found = theirs[theirs[:, 2] < height]  # torchvision's "none fits" is (0, 0, H, W, image)
    draw = tf.function(lambda seeds: tf.map_fn(lambda s: erasing.erase_box(height, width, s), seeds,
                                               fn_output_signature=tf.int32))
    ours = draw(tf.stack([tf.fill([n], 3), tf.range(n)], axis=1)).numpy().astype(np.float64)
    ours_found = ours[ours[:, 2] > 0]
    found = scipy.stats.fisher_exact([[len(theirs_found), n - len(theirs_found)],
                                      [len(ours_found), n - len(ours_found)]])
    assert found.pvalue > 1e-3
    features = lambda b: {"area": b[:, 2] * b[:, 3] / (height * width), "aspect": b[:, 2] / b[:, 3],  # noqa: E731
                          "top": b[:, 0] / (height - b[:, 2] + 1), "left": b[:, 1] / (width - b[:, 3] + 1)}
    for key in ("area", "aspect", "top", "left"):
        result = scipy.stats.ks_2samp(features(theirs_found)[key], features(ours_found)[key])
        assert result.pvalue > 1e-3, (key, result)


def test_random_erasing_applies_with_its_probability_and_sets_zero():
    image = tf.ones([16, 16, 3])
    erased = [float(tf.reduce_min(erasing.random_erase(image, tf.constant([1, i], tf.int64), 0.3)))
              for i in range(400)]
    share = np.mean(np.array(erased) == 0.0)
    assert scipy.stats.binomtest(int(share * 400), 400, 0.3 * 0.98).pvalue > 1e-3  # ~2 % of draws find no box
    assert set(erased) == {0.0, 1.0}


def test_policies_and_erasing_augment_training_only_and_resume_exactly(monkeypatch):
    """With a policy and random erasing: evaluation batches are those of a run without them, and a training epoch
    resumed at a step repeats the uninterrupted one. The crop and flip keep their seeds: with the policy replaced
    by the identity, a batch is the plain pipeline's, rounded to whole levels as torchvision's uint8 crop."""
    plain = DataConfig(image_size=16, batch_size=16, min_crop_scale=0.6, hflip=True)
    augmented = dataclasses.replace(plain, auto_augment="ta_wide", random_erase=0.5)
    assert policy_and_erasing(plain) is None  # the default pipeline is untouched
    plain_data, augmented_data = load_dataset(plain), load_dataset(augmented)
    for a, b in zip(plain_data.eval_batches(), augmented_data.eval_batches(), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    epoch = [b["image"] for _, b in zip(range(3), augmented_data.train_batches(2), strict=False)]
    np.testing.assert_array_equal(epoch[2], next(augmented_data.train_batches(2, start_step=2))["image"])
    assert not np.array_equal(epoch[0], next(plain_data.train_batches(2))["image"])

    monkeypatch.setattr(aa, "policy", lambda *args, **kwargs: lambda image, seed: image)
    identity = load_dataset(dataclasses.replace(augmented, random_erase=0.0))
    levels = lambda x: x * np.float32(plain.std) * 255 + np.float32(plain.mean) * 255  # noqa: E731
    rounded, crop = (levels(next(data.train_batches(2))["image"]) for data in (identity, plain_data))
    assert np.abs(rounded - np.round(rounded)).max() < 1e-3 and np.abs(rounded - crop).max() <= 0.5 + 1e-3
