"""Class activation maps against pytorch-grad-cam itself, and the pictures that show them.

Oracle: pytorch-grad-cam's own classes on the torchvision model (random weights, randomized BatchNorm statistics:
``torch_oracle.oracle_model``) whose state dict jaxnets' converter turns into the JAX model's variables. Input:
scikit-learn's two sample photos through the eval transform (``pil_eval.load``) at 96 px (VGG-16: 64 px).

Tolerance: max |ours - pytorch-grad-cam| <= ``TOL`` on the [0, 1] maps, pytorch-grad-cam's min-max normalisation
and cv2 resize included. Measured on these cases: at most 4.5e-6 (float32 sums in other orders); the bound leaves
20x for other CPUs. Both sides are float32, so a tap deep in the backward pass would need more: at ResNet-50's stem
``relu`` torch's own float32 gradient is 2e-3 (relative) away from its float64 one and ours 1e-6, so the cases
compare gradients at the deeper levels, and the stem only through ScoreCAM, which takes no gradient. ScoreCAM runs
the model once per channel per image: it is compared at a 64-channel level of each model, on one 64 px image.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_grad_cam
import torch
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.datasets import load_sample_images
from torch_oracle import jax_options, nchw, oracle_model, state_dict_numpy

import jaxnets
from jaxnets import parallel
from jaxnets.data import pil_eval
from jaxnets.eval_transform import EvalTransform
from jaxnets.explain import cam, confidence_extremes, contact_sheet, overlay
from jaxnets.explain.cam import METHODS, align_corners_matrix, cv2_linear_matrix, find_tap, tapped_apply
from jaxnets.explain.pictures import caption, crop_box, to_original

pytestmark = pytest.mark.xdist_group("explain")  # one worker: the cases share models and compilations

TOL = 1e-4
SIZE = 96
ORACLE = {
    "gradcam": pytorch_grad_cam.GradCAM, "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
    "hirescam": pytorch_grad_cam.HiResCAM, "xgradcam": pytorch_grad_cam.XGradCAM,
    "layercam": pytorch_grad_cam.LayerCAM, "eigencam": pytorch_grad_cam.EigenCAM,
    "scorecam": pytorch_grad_cam.ScoreCAM,
}
WITH_GRADIENTS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
ONE_PASS = (*WITH_GRADIENTS, "eigencam")  # every method but ScoreCAM: one forward (and backward) pass
PREDICTED, SECOND = "predicted", "second"  # targets: None, or each image's second-highest logit


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """The oracle on one thread. torch's two OpenMP threads spin at every operation's barrier: on a 2-core machine
    busy with other work, each pass of GoogLeNet took 4-7 s of CPU instead of 0.1 s (OMP_WAIT_POLICY=PASSIVE,
    which must be set before torch starts, cures it too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_method_has_an_oracle():
    assert set(ORACLE) == set(METHODS)


@functools.cache
def photos(size: int = SIZE) -> np.ndarray:
    """scikit-learn's sample photos (a temple, a flower), eval-transformed to ``size``: normalized NHWC."""
    transform = EvalTransform().at_crop(size)
    return np.stack([pil_eval.load(np.asarray(image), transform) for image in load_sample_images().images])


@functools.lru_cache(maxsize=1)  # the cases come grouped by model: one model in memory at a time
def oracle(name: str):
    torch_model = oracle_model(name)
    variables = jaxnets.from_torch_state_dict(name, state_dict_numpy(torch_model))
    return torch_model, jaxnets.create_model(name, **jax_options(name)), variables


def grad_cam(torch_model, methods: tuple[str, ...], node: str, images: np.ndarray, targets,
             **smoothing) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's maps for ``methods`` at the torchvision module ``node``: the first method's class runs
    as its ``__call__`` does. The others (one-pass methods, without ``aug_smooth``) reuse that pass, whose
    forward and backward are the same for each of them and most of this test's time: each one's class turns the
    same activations and gradients into its map with its own ``compute_cam_per_layer`` and
    ``aggregate_multi_layers``, which is what its ``forward`` does after the pass."""
    x = nchw(images)
    torch_targets = None if targets is None else [ClassifierOutputTarget(int(k)) for k in targets]
    first, *others = methods
    assert not (others and (smoothing.get("aug_smooth") or set(methods) & {"scorecam"}))
    explainers = []  # kept until the end: deleting one releases the activations they share
    with ORACLE[first](torch_model, [torch_model.get_submodule(node)]) as runner:
        maps = {first: runner(x, torch_targets, **smoothing)}
        for method in others:
            explainers.append(object.__new__(ORACLE[method]))
            explainers[-1].__dict__.update(runner.__dict__)  # the same model, layer, activations, gradients
            layers = explainers[-1].compute_cam_per_layer(x, torch_targets, smoothing.get("eigen_smooth", False))
            maps[method] = explainers[-1].aggregate_multi_layers(layers)
    return maps


@functools.cache
def second_choice(name: str, count: int = 2, size: int = SIZE) -> np.ndarray:
    """Each photo's second-highest class: a given target whose map is not empty (a random class's often is)."""
    with torch.no_grad():
        return oracle(name)[0](nchw(photos(size)[:count])).argsort(dim=-1, descending=True)[:, 1].numpy()


def assert_equal_maps(ours: np.ndarray, theirs: np.ndarray, what: str, peak: float = 0.99) -> None:
    """Within ``TOL``; and no map is empty (an empty map compares nothing): each reaches ``peak`` (1 after the
    normalisation, less for a mean of maps)."""
    assert ours.shape == theirs.shape and ours.dtype == np.float32, what
    assert theirs.reshape(len(theirs), -1).max(axis=1).min() > peak, f"{what}: an empty map"
    assert np.abs(ours - theirs).max() <= TOL, f"{what}: max |diff| {np.abs(ours - theirs).max():.2e}"


SCORECAM = (1, 64)  # ScoreCAM runs the model once per channel: one image, smaller
VGG = (2, 64)  # VGG-16's convolutions at full resolution are the heaviest: 64 px (maps of 8 x 8 and 4 x 4)
# (model, node, targets, methods, (images, size)): two levels per model for the one-pass methods, a 64-channel
# level for ScoreCAM.
CASES = [
    ("resnet50", "layer4", PREDICTED, ONE_PASS, (2, SIZE)), ("resnet50", "layer3", SECOND, ONE_PASS, (2, SIZE)),
    ("resnet50", "relu", PREDICTED, ("scorecam",), SCORECAM),
    ("vgg16_bn", "features.42", SECOND, ONE_PASS, VGG), ("vgg16_bn", "features.32", PREDICTED, ONE_PASS, VGG),
    ("vgg16_bn", "features.5", SECOND, ("scorecam",), SCORECAM),
    ("googlenet", "inception5b", PREDICTED, ONE_PASS, (2, SIZE)),
    ("googlenet", "inception4e", SECOND, ONE_PASS, (2, SIZE)),
    ("googlenet", "conv1", SECOND, ("scorecam",), SCORECAM),
]


@pytest.mark.parametrize("name, node, targets, methods, images", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}-{case[3][0]}") for case in CASES])
def test_maps_equal_pytorch_grad_cam(name, node, targets, methods, images):
    """Each method at a torchvision node (a module's output: ResNet's layers, GoogLeNet's blocks; or a ReLU
    after one: VGG's ``features.<i>``, ResNet's ``relu``), for the predicted or given classes."""
    torch_model, model, variables = oracle(name)
    count, size = images
    images = photos(size)[:count]
    given = second_choice(name, count, size) if targets == SECOND else None
    theirs = grad_cam(torch_model, methods, node, images, given)
    for method in methods:
        ours = cam(model, variables, images, method, node, given)
        assert_equal_maps(ours, theirs[method], f"{name} {node} {method}")


@pytest.mark.parametrize("methods, targets, smoothing", [
    pytest.param(("gradcam",), PREDICTED, {"aug_smooth": True}, id="aug"),
    pytest.param(("layercam",), SECOND, {"aug_smooth": True, "eigen_smooth": True}, id="aug-eigen"),
    pytest.param(WITH_GRADIENTS, SECOND, {"eigen_smooth": True}, id="eigen")])
def test_smoothing_equals_pytorch_grad_cam(methods, targets, smoothing):
    """``aug_smooth`` (ttach's flip and brightness factors; a predicted class is predicted on each augmented
    image) and ``eigen_smooth`` (the weighted activations' first principal component), on GoogLeNet (the
    compilation of its ``inception5b`` case serves)."""
    torch_model, model, variables = oracle("googlenet")
    images = photos()
    given = second_choice("googlenet") if targets == SECOND else None
    theirs = grad_cam(torch_model, methods, "inception5b", images, given, **smoothing)
    for method in methods:
        ours = cam(model, variables, images, method, "inception5b", given, **smoothing)
        peak = 0.5 if smoothing.get("aug_smooth") else 0.99  # a mean of six maps peaks where they agree
        assert_equal_maps(ours, theirs[method], f"{method} {smoothing}", peak)


@pytest.mark.parametrize("source, size", [((3, 3), (96, 96)), ((7, 5), (224, 100)), ((13, 10), (100, 7)),
                                          ((6, 6), (6, 6))])
def test_the_resizes_are_cv2s_and_torchs(source, size):
    """The two resizes at ratios the model cases do not reach (fractional, downscaling, none): the maps' (cv2's
    INTER_LINEAR, half-pixel centres) and ScoreCAM's masks' (torch's bilinear with align_corners)."""
    maps = np.random.default_rng(0).random(source, np.float32)
    ours = cv2_linear_matrix(source[0], size[0]) @ maps @ cv2_linear_matrix(source[1], size[1]).T
    np.testing.assert_allclose(ours, cv2.resize(maps, size[::-1], interpolation=cv2.INTER_LINEAR), atol=1e-6)
    upsampled = torch.nn.UpsamplingBilinear2d(size=size)(torch.from_numpy(maps)[None, None])[0, 0].numpy()
    ours = align_corners_matrix(source[0], size[0]) @ maps @ align_corners_matrix(source[1], size[1]).T
    np.testing.assert_allclose(ours, upsampled, atol=1e-6)


@functools.cache
def fine_tuned():
    """A ResNet-18 as a fine-tuned one looks: 5 classes, 2 input channels (its stem's filters cut to them); three
    images, given classes, and pytorch-grad-cam's GradCAM maps at ``layer3``."""
    torch_model = oracle_model("resnet18", num_classes=5)
    stem = torch.nn.Conv2d(2, 64, 7, 2, 3, bias=False)
    with torch.no_grad():
        stem.weight.copy_(1.5 * torch_model.conv1.weight[:, :2])
    torch_model.conv1 = stem
    variables = jaxnets.from_torch_state_dict("resnet18", state_dict_numpy(torch_model))
    images = np.concatenate([photos(64), photos(64)[:1, :, ::-1]])[..., :2].copy()
    targets = [4, 0, 2]
    return variables, images, targets, grad_cam(torch_model.eval(), ("gradcam",), "layer3", images, targets)["gradcam"]


def test_fine_tuned_head_other_channels_split_over_a_mesh():
    """5 classes and 2 channels; 3 images in batches of 2 (the last one padded) split over the device mesh; the
    given classes are logits a multi-label head would score on their own."""
    variables, images, targets, theirs = fine_tuned()
    model = jaxnets.create_model("resnet18", num_classes=5, in_chans=2)
    ours = cam(model, variables, images, "gradcam", "layer3", targets, batch_size=2, mesh=parallel.make_mesh())
    assert_equal_maps(ours, theirs, "fine-tuned")


def test_bfloat16_maps_stay_close_to_float32():
    """bfloat16 compute: the float32 maps seen through an 8-bit mantissa (measured: mean |diff| 0.02, each image's
    correlation >= 0.98; the bounds leave twice that), float32 maps in [0, 1] all the same."""
    variables, images, targets, theirs = fine_tuned()
    model = jaxnets.create_model("resnet18", num_classes=5, in_chans=2, dtype=jnp.bfloat16)
    ours = cam(model, variables, images, "gradcam", "layer3", targets)
    assert ours.dtype == np.float32 and ours.min() >= 0 and ours.reshape(3, -1).max(axis=1).min() > 0.99
    assert np.abs(ours - theirs).mean() <= 0.05
    assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs, strict=True)) >= 0.95


def random_variables(model, x: jax.Array, seed: int = 0):
    """Variables of ``model`` drawn by numpy (normal, std 0.05): ``init``'s initializers take seconds on AlexNet's
    57 M parameters, and a tap's test needs only weights that mix signs."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: 0.05 * rng.standard_normal(s.shape, np.float32), shapes)


def test_every_level_of_alexnet_is_tapped_where_its_feature_map_is():
    """The family no oracle case covers: at each feature level, the tapped activations equal the
    ``features_only`` map, and the zero shift (with its lifted ReLU input) leaves the logits as they were."""
    model = jaxnets.create_model("alexnet", num_classes=3)
    x = jnp.asarray(photos(64))
    variables = random_variables(model, x)
    logits = model.apply(variables, x)
    for info in jaxnets.feature_info("alexnet"):
        tap = find_tap(model, variables, x, info.node)
        expected = model.clone(features_only=True, out_indices=(info.index,)).apply(variables, x)[0]
        shifted, activation = tapped_apply(model, tap, variables, x, jnp.zeros(expected.shape))
        assert tap.relu and tap.path == ("features", str(int(info.node.split(".")[1]) - 1)), tap
        np.testing.assert_array_equal(activation, expected)
        np.testing.assert_array_equal(shifted, logits)


@pytest.mark.parametrize("call, message", [
    ({"method": "gradcamm"}, "method 'gradcamm' is not a CAM method; did you mean gradcam"),
    ({"method": "gradcamm"}, "choose one of gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam"),
    ({"target_layer": "layer5"}, "target_layer 'layer5' is not a feature node of ResNet"),
    ({"target_layer": "fc"}, "choose one of relu, layer1, layer2, layer3, layer4"),
    ({"targets": [1]}, "targets: expected None (the predicted classes) or one class index per image (3)"),
    ({"targets": [0, 1, 5]}, "targets: class 5 does not exist; the model has 5 outputs (0..4)"),
    ({"features_only": True}, "features_only model has no classifier"),
    ({"images": np.zeros((3, 64, 64))}, "images: expected normalized float images (N, H, W, channels)"),
])
def test_bad_input_names_the_argument_and_the_choices(call, message):
    variables, images, _, _ = fine_tuned()
    model = jaxnets.create_model("resnet18", num_classes=5, in_chans=2, features_only=call.pop("features_only", False))
    with pytest.raises(jaxnets.UserError) as error:
        cam(model, variables, call.pop("images", images), **call)
    assert message in str(error.value)


# --- pictures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, resize, crop", [
    (160, 100, 80, 64), (90, 150, 72, 64), (50, 40, 48, 64)])  # landscape, portrait, smaller than the crop
def test_to_original_undoes_the_eval_resize_and_crop(width, height, resize, crop):
    """Pictures whose pixels hold their own coordinates (x, then y, of their centres), put through the eval
    transform's own resize and crop and taken back: each value lands where it came from, and the crop covers
    exactly the pixels whose centres ``crop_box`` encloses."""
    transform = EvalTransform(resize_size=resize, crop_size=crop)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    left, top, right, bottom = crop_box((width, height), transform)
    within = (x >= left) & (x < right) & (y >= top) & (y < bottom)
    # Away from the image's edges (where the resize's filter is cut) and from the crop's (where a map is held):
    interior = ((x > max(left, 0) + 1.5) & (x < min(right, width) - 1.5) & (y > max(top, 0) + 1.5)
                & (y < min(bottom, height) - 1.5) & (x > 4) & (x < width - 4) & (y > 4) & (y < height - 4))
    for coordinate in (x, y):
        seen = pil_eval.resize_and_crop(Image.fromarray(coordinate), transform)
        back, inside = to_original(seen, (width, height), transform)
        np.testing.assert_array_equal(inside, within)
        assert interior.sum() > 0.4 * inside.sum()
        assert np.abs(back - coordinate)[interior].max() <= 0.05  # pixels, in the original


def gray_photo(width: int = 200, height: int = 120) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def hot_corner(crop: int = 64) -> np.ndarray:
    """A map that is 1 in the crop's top-left quarter and 0 elsewhere."""
    cam_map = np.zeros((crop, crop), np.float32)
    cam_map[: crop // 2, : crop // 2] = 1
    return cam_map


def test_overlay_is_the_original_size_with_heat_where_the_map_is():
    transform = EvalTransform(resize_size=80, crop_size=64)
    picture = np.asarray(overlay(gray_photo(), hot_corner(), transform=transform), np.int32)
    assert picture.shape == (120, 200, 3)
    left, top, right, bottom = (round(v) for v in crop_box((200, 120), transform))
    hot = picture[top + 10: (top + bottom) // 2 - 10, left + 10: (left + right) // 2 - 10]
    cold = picture[(top + bottom) // 2 + 10: bottom - 10, (left + right) // 2 + 10: right - 10]
    outside = np.concatenate([picture[:, : left - 1], picture[:, right + 1:]], axis=1)
    assert (hot[..., 0] - hot[..., 2] > 50).all()  # jet's red end blended in
    assert (cold[..., 2] - cold[..., 0] > 50).all()  # jet's blue end
    assert (outside == round(128 * 0.4)).all()  # dimmed, and no colour: the model never saw it


def test_overlay_title_is_drawn_across_the_top():
    photo = gray_photo()
    plain = np.asarray(overlay(photo, hot_corner(), transform=EvalTransform(80, 64)), np.int32)
    titled = np.asarray(overlay(photo, hot_corner(), caption("tabby cat", 0.873), transform=EvalTransform(80, 64)),
                        np.int32)
    assert titled.shape == plain.shape
    band = 14  # title_band((200, 120))
    text = titled[:band].min(axis=-1) > 200  # white letters
    assert text.sum() > 50 and not (plain[:band].min(axis=-1) > 200).any()
    np.testing.assert_array_equal(titled[band:], plain[band:])
    assert caption("tabby cat", 0.873) == "tabby cat 87.3%"
    assert caption("tabby cat", 0.5, truth="tiger cat") == "tabby cat 50.0% (true: tiger cat)"


def test_contact_sheet_lays_out_each_picture_under_its_title():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    pictures = [Image.new("RGB", (100, 50), colour) for colour in colours]
    sheet = np.asarray(contact_sheet(pictures, columns=2, cell=64, gap=4), np.int32)
    assert sheet.shape == (2 * 32 + 3 * 4, 2 * 64 + 3 * 4, 3)  # thumbnails 64 x 32, two rows of two
    for index, colour in enumerate(colours):
        row, column = divmod(index, 2)
        y, x = 4 + row * 36 + 16, 4 + column * 68 + 32
        assert tuple(sheet[y, x]) == colour
    titled = np.asarray(contact_sheet(pictures, "most confident mistakes", columns=2, cell=64, gap=4), np.int32)
    band = titled.shape[0] - sheet.shape[0]
    assert band >= 28 and (titled[band:] == sheet).all()
    assert (titled[:band].min(axis=-1) > 200).sum() > 50  # the title's letters


def test_overlay_takes_gray_pixels():
    gray = np.full((120, 200), 128, np.uint8)
    for image in (gray, gray[..., None]):
        picture = overlay(image, hot_corner(), transform=EvalTransform(80, 64))
        assert picture.size == (200, 120) and picture.mode == "RGB"
        np.testing.assert_array_equal(picture, overlay(gray_photo(), hot_corner(), transform=EvalTransform(80, 64)))


def test_confidence_extremes_are_the_surest_mistakes_and_the_shakiest_hits():
    labels = np.array([0, 1, 2, 3, 4, 5, 6])
    predicted = np.array([0, 2, 2, 0, 4, 1, 6])
    confidence = np.array([0.9, 0.6, 0.3, 0.95, 0.5, 0.6, 0.3])
    mistakes, hits = confidence_extremes(labels, predicted, confidence, 2)
    assert mistakes.tolist() == [3, 1] and hits.tolist() == [2, 6]  # ties (0.6, 0.3) in the examples' order
    mistakes, hits = confidence_extremes(labels, predicted, confidence, 10)
    assert mistakes.tolist() == [3, 1, 5] and hits.tolist() == [2, 6, 4, 0]


def test_picture_errors_name_the_argument():
    with pytest.raises(jaxnets.UserError, match=r"cam_map: expected the model input's size \(64, 64\)"):
        overlay(gray_photo(), np.zeros((32, 32)), transform=EvalTransform(80, 64))
    with pytest.raises(jaxnets.UserError, match="no pictures"):
        contact_sheet([])
    with pytest.raises(jaxnets.UserError, match="columns must be an integer >= 1"):
        contact_sheet([gray_photo()], columns=0)
    with pytest.raises(jaxnets.UserError, match=r"image: expected a PIL image or uint8 pixels .* got \(9, 9, 2\)"):
        overlay(np.zeros((9, 9, 2), np.uint8), hot_corner(), transform=EvalTransform(80, 64))
    with pytest.raises(jaxnets.UserError, match="count must be an integer >= 1"):
        confidence_extremes([0], [0], [1.0], 0)
