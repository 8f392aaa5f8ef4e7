"""Class activation maps: pytorch-grad-cam's methods on jaxnets models, map for map.

One base (``cam``) does what pytorch-grad-cam's ``BaseCAM`` does: it runs the model once, keeps the activations
``A`` of the target layer and the gradients ``G`` of each image's target logit with respect to them, lets the
method turn them into channel-weighted activations, sums the channels (or, with ``eigen_smooth``, projects them on
their first principal component), and then clips at 0, min-max normalises each image's map, resizes it to the input
size as ``cv2.resize`` does (bilinear, half-pixel centres, no antialias) and normalises it again. Each method is
one rule in ``METHODS``, pytorch-grad-cam's ``get_cam_weights`` / ``get_cam_image`` written on NHWC arrays; a new
method is one more rule.

The target layer is a torchvision node (what ``feature_info`` names: ``layer4``, ``features.42``,
``inception5b``). It is tapped where the model computes it: at the output of the Flax module of that name, or,
for a parameter-free torch ReLU (ResNet's stem ``relu``, VGG's and AlexNet's ``features.<i>``), after the ReLU
that follows the last module before the node (found by tracing the ``features_only`` model that stops there).
The gradient is that of a zero shift added at the tap, so it is d(logit)/d(A) at every position, as torch's
tensor hook gives it.

The model's forward and backward pass are jitted once per model, node and batch shape (for every method, EigenCAM
and ScoreCAM included, though they use no gradient), and split over a device mesh as evaluation is
(``jaxnets.evaluation``); the rules, the normalisation and the resize are a second, small compilation with the
method as an argument, so trying several methods recompiles no model. EigenCAM's projection is numpy's SVD on the
host, as pytorch-grad-cam's is (the sign of a singular vector is the SVD's choice, and it decides the map).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxnets import evaluation, kernels, parallel
from jaxnets.errors import UserError, did_you_mean

PyTree = Any
SPATIAL = (1, 2)  # the spatial axes of NHWC maps
HIGHEST = jax.lax.Precision.HIGHEST  # the resizes in full float32 (GPUs would otherwise use TF32)
# pytorch-grad-cam's constants: ``scale_cam_image``'s 1e-7, GradCAM++'s 1e-6, XGradCAM's 1e-7, ScoreCAM's 1e-8.
NORMALIZE_EPS = 1e-7
# ttach's transforms in pytorch-grad-cam's ``aug_smooth`` (``HorizontalFlip()``, ``Multiply([0.9, 1, 1.1])``),
# in ``ttach.Compose``'s order: every combination, the flip varying slowest.
AUG_FLIPS = (False, True)
AUG_FACTORS = (0.9, 1.0, 1.1)
PREDICTED = -1  # a target row that asks for the predicted class


# --- the rules: pytorch-grad-cam's methods, as channel-weighted activations (N, h, w, C) -------------------------


def _gradcam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """GradCAM: each channel weighted by its mean gradient."""
    return jnp.mean(g, SPATIAL, keepdims=True) * a


def _gradcam_plus_plus(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """GradCAM++ (Chattopadhyay et al., eq. 19), with pytorch-grad-cam's 1e-6 and its zeroed alphas."""
    g2 = g * g
    g3 = g2 * g
    sum_a = jnp.sum(a, SPATIAL, keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = jnp.where(g != 0, alpha, 0)
    return jnp.sum(jnp.maximum(g, 0) * alpha, SPATIAL, keepdims=True) * a


def _hirescam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """HiResCAM: activations times gradients, position by position."""
    return g * a


def _xgradcam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """XGradCAM: gradients weighted by the activations' share of their channel's sum."""
    sum_a = jnp.sum(a, SPATIAL, keepdims=True)
    return jnp.sum(g * a / (sum_a + 1e-7), SPATIAL, keepdims=True) * a


def _layercam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """LayerCAM: activations times the positive part of the gradients, position by position."""
    return jnp.maximum(g, 0) * a


def _eigencam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """EigenCAM: the activations themselves (always projected on their first principal component)."""
    return a


def _scorecam(a: jax.Array, g: jax.Array, scores: jax.Array) -> jax.Array:
    """ScoreCAM: each channel weighted by the softmax over channels of the target logit the model gives the
    image masked by that channel (``_masked_scores``)."""
    return jax.nn.softmax(scores, axis=-1)[:, None, None, :] * a


class Method(NamedTuple):
    """A method's rule, ``(activations, gradients, scores) -> weighted activations``, and what else it needs:
    ``scores`` (ScoreCAM's masked forward passes), ``always_projected`` (EigenCAM projects whatever
    ``eigen_smooth`` says)."""

    rule: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    scores: bool = False
    always_projected: bool = False


METHODS: dict[str, Method] = {
    "gradcam": Method(_gradcam),
    "gradcam++": Method(_gradcam_plus_plus),
    "hirescam": Method(_hirescam),
    "xgradcam": Method(_xgradcam),
    "layercam": Method(_layercam),
    "eigencam": Method(_eigencam, always_projected=True),
    "scorecam": Method(_scorecam, scores=True),
}


# --- the tap: where the target node's activations are -----------------------------------------------------------


class Tap(NamedTuple):
    """The Flax module whose ``__call__`` output is tapped, by path; ``relu``: the node is the ReLU applied to
    that output (a torch ReLU module has no parameters, so no Flax module of its own)."""

    path: tuple[str, ...]
    relu: bool


def target_nodes(model: nn.Module) -> list[str]:
    """The nodes ``cam`` takes as ``target_layer``: the model's feature levels (``feature_info``), shallowest
    first; the last is the default."""
    levels = getattr(model, "feature_levels", None)
    if levels is None:
        raise UserError(f"model: {type(model).__name__} is not a jaxnets model (it has no feature levels); "
                        f"build it with jaxnets.create_model")
    return [level.node for level in levels()]


def find_tap(model: nn.Module, variables: PyTree, images: Any, node: str) -> Tap:
    """Where ``node`` is computed: traced (shapes only) through the ``features_only`` model that stops at it,
    recording which modules ran. A node that is a module's path is that module's output; any other is the ReLU
    after the last module its parent ran before the model stopped (``conv1 -> bn1 -> relu``,
    ``features.41 -> features.42``)."""
    index = target_nodes(model).index(node)
    extractor = model.clone(features_only=True, out_indices=(index,), remat=False)
    ran: list[tuple[str, ...]] = []

    def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            ran.append(tuple(context.module.path))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: extractor.apply(v, x), variables, images)
    path = tuple(node.split("."))
    if path in ran:
        return Tap(path, relu=False)
    siblings = [p for p in ran if len(p) == len(path) and p[:-1] == path[:-1]]
    if not siblings:
        raise RuntimeError(f"{node}: no module ran before it in {type(model).__name__}")
    return Tap(siblings[-1], relu=True)


def tapped_apply(model: nn.Module, tap: Tap, variables: PyTree, images: jax.Array,
                 shift: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Eval-mode float32 logits and the node's activations, with ``shift`` (zeros, the node's shape) added at
    the node so that its gradient is the logits' gradient with respect to the activations."""
    captured: list[jax.Array] = []

    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or tuple(context.module.path) != tap.path:
            return out
        captured.append(nn.relu(out) if tap.relu else out)
        if shift is None:
            return out
        if tap.relu:
            # The model applies the ReLU next. Its gradient is 0 where its input is not positive, so the input
            # is lifted to the smallest positive normal number there: the ReLU passes every position's gradient,
            # and its output differs from the activations by 1e-38 at most (nothing a float32 sum can see).
            out = jnp.maximum(out, jnp.finfo(out.dtype).tiny)
        return out + shift.astype(out.dtype)

    with nn.intercept_methods(intercept):
        logits = model.apply(variables, images, train=False)
    if len(captured) != 1:
        raise RuntimeError(f"{'.'.join(tap.path)} ran {len(captured)} times in one forward pass")
    return logits.astype(jnp.float32), captured[0]


def _resolve_targets(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Each row's target class: the given one, or the highest logit for ``PREDICTED`` (the first on ties, as
    pytorch-grad-cam's ``np.argmax``)."""
    return jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets)


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


@functools.lru_cache(maxsize=16)
def _capture_fn(model: nn.Module, tap: Tap, mesh: Any, choice: kernels.KernelChoice) -> Callable:
    """Jitted ``(variables, {image, target}) -> {activation, gradient, target}``: float32 activations at the
    tap, the gradients of the summed target logits with respect to them (pytorch-grad-cam's ``loss.backward``),
    and the targets resolved. EigenCAM and ScoreCAM use no gradient, but one compiled pass serves every method
    (trying another method compiles no model again); the backward pass costs about twice the forward."""

    def capture(variables: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = batch["image"]
        shape = jax.eval_shape(lambda: tapped_apply(model, tap, variables, images, None)[1])

        def score(shift: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            logits, a = tapped_apply(model, tap, variables, images, shift)
            targets = _resolve_targets(jax.lax.stop_gradient(logits), batch["target"])
            return jnp.sum(_target_logits(logits, targets)), (a, targets)

        g, (a, targets) = jax.grad(score, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
        return {"activation": a.astype(jnp.float32), "gradient": g.astype(jnp.float32), "target": targets}

    with kernels.using(choice):
        return evaluation.jit_over_mesh(capture, mesh)


# --- ScoreCAM's masked forward passes -----------------------------------------------------------------------------


def align_corners_matrix(source: int, size: int) -> np.ndarray:
    """(size, source) weights of torch's bilinear upsampling with ``align_corners=True``
    (``nn.UpsamplingBilinear2d``, ScoreCAM's): output i samples the input at i * (source - 1) / (size - 1)."""
    scale = np.float32((source - 1) / (size - 1)) if size > 1 else np.float32(0)
    matrix = np.zeros((size, source), np.float32)
    for i in range(size):
        position = scale * np.float32(i)
        low = int(position)
        frac = position - np.float32(low)
        high = low + 1 if low < source - 1 else low
        matrix[i, low] += np.float32(1) - frac
        matrix[i, high] += frac
    return matrix


@functools.lru_cache(maxsize=8)
def _scores_fn(model: nn.Module, chunk: int, mesh: Any, choice: kernels.KernelChoice) -> Callable:
    """Jitted ``(variables, {image, activation, target}) -> (N, C)`` ScoreCAM scores: for each channel, its map
    upsampled to the image (align_corners, as ``nn.UpsamplingBilinear2d``), min-max normalised (+1e-8), times the
    image, and the target logit the model gives that; ``chunk`` channels of every image per forward pass."""

    def scores(variables: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
        images, a, targets = batch["image"], batch["activation"], batch["target"]
        n, height, width = images.shape[:3]
        channels = a.shape[-1]
        rows = jnp.asarray(align_corners_matrix(a.shape[1], height))
        cols = jnp.asarray(align_corners_matrix(a.shape[2], width))
        groups = -(-channels // chunk)
        a = jnp.pad(a, [(0, 0)] * 3 + [(0, groups * chunk - channels)])
        a = jnp.moveaxis(a.reshape(*a.shape[:3], groups, chunk), 3, 0)  # (groups, N, h, w, chunk)

        def group(maps: jax.Array) -> jax.Array:
            up = jnp.einsum("Hh,nhwc,Ww->ncHW", rows, maps, cols, precision=HIGHEST)
            low = up.min(axis=(2, 3), keepdims=True)
            high = up.max(axis=(2, 3), keepdims=True)
            masks = (up - low) / (high - low + 1e-8)
            masked = images[:, None] * masks[..., None].astype(images.dtype)  # (N, chunk, H, W, C)
            logits = model.apply(variables, masked.reshape(n * chunk, *images.shape[1:]), train=False)
            logits = logits.astype(jnp.float32).reshape(n, chunk, -1)
            return jnp.take_along_axis(logits, targets[:, None, None], axis=2)[..., 0]

        per_group = jax.lax.map(group, a)  # (groups, N, chunk)
        return jnp.moveaxis(per_group, 0, 1).reshape(n, groups * chunk)[:, :channels]

    with kernels.using(choice):
        return evaluation.jit_over_mesh(scores, mesh)


# --- the map: sum or projection, clip, normalise, resize -------------------------------------------------------


def cv2_linear_matrix(source: int, size: int) -> np.ndarray:
    """(size, source) weights of ``cv2.resize`` with ``INTER_LINEAR`` on float32 maps: output i samples the
    input at (i + 0.5) * source / size - 0.5, clamped to the edge pixels, with float32 coefficients."""
    scale = source / size
    matrix = np.zeros((size, source), np.float32)
    for i in range(size):
        position = np.float32((i + 0.5) * scale - 0.5)
        low = int(np.floor(position))
        frac = np.float32(position - low)
        if low < 0:
            low, frac = 0, np.float32(0)
        if low >= source - 1:
            low, frac = source - 1, np.float32(0)
        matrix[i, low] += np.float32(1) - frac
        if frac:
            matrix[i, low + 1] += frac
    return matrix


def _normalize(maps: jax.Array) -> jax.Array:
    """pytorch-grad-cam's ``scale_cam_image`` per map: minus its minimum, over (1e-7 + the new maximum)."""
    maps = maps - maps.min(axis=SPATIAL, keepdims=True)
    return maps / (NORMALIZE_EPS + maps.max(axis=SPATIAL, keepdims=True))


def _finish(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w) maps -> (N, H, W) in [0, 1]: clipped at 0, normalised, resized as cv2 resizes, clipped and
    normalised again (``compute_cam_per_layer`` then ``aggregate_multi_layers`` for one layer)."""
    rows = jnp.asarray(cv2_linear_matrix(maps.shape[1], size[0]))
    cols = jnp.asarray(cv2_linear_matrix(maps.shape[2], size[1]))
    maps = _normalize(jnp.maximum(maps, 0))
    maps = jnp.einsum("nhw,Ww->nhW", maps, cols, precision=HIGHEST)  # cv2's order: along rows, then columns
    maps = jnp.einsum("Hh,nhW->nHW", rows, maps, precision=HIGHEST)
    return _normalize(jnp.maximum(maps, 0))


RULES = tuple(method.rule for method in METHODS.values())


@functools.partial(jax.jit, static_argnames=("summed", "size"))
def _weighted(index: jax.Array, a: jax.Array, g: jax.Array, scores: jax.Array | None, *, summed: bool,
              size: tuple[int, int]) -> jax.Array:
    """Method number ``index``'s weighted activations, summed over channels and finished (``summed``), or as they
    are, to be projected on the host (``project``) and then finished. The method is an argument, not a constant:
    one compilation serves them all (ScoreCAM's ``scores`` aside)."""
    if scores is None:
        scores = jnp.zeros((a.shape[0], a.shape[-1]), jnp.float32)
    weighted = jax.lax.switch(index, RULES, a, g, scores)
    return _finish(jnp.sum(weighted, axis=-1), size) if summed else weighted


_finish_jit = jax.jit(_finish, static_argnames=("size",))


def project(weighted: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``get_2d_projection`` on (N, h, w, C): each image's activations, centred per channel,
    projected on their first right singular vector, by numpy's SVD in float32 as it does it, so that the sign
    (which an SVD leaves free, and which decides what the map shows) is the one it gets."""
    weighted = np.array(weighted, np.float32)
    weighted[np.isnan(weighted)] = 0
    projections = []
    for activations in weighted:
        channels_first = np.ascontiguousarray(np.moveaxis(activations, -1, 0))
        flat = channels_first.reshape(channels_first.shape[0], -1).transpose()
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)  # its first row is full_matrices=True's
        projections.append((flat @ vt[0, :]).reshape(activations.shape[:2]))
    return np.float32(projections)


# --- the public function ---------------------------------------------------------------------------------------


def check_method(method: Any) -> str:
    """``method`` if it is one of ``METHODS``, else a ``UserError`` listing them."""
    if not isinstance(method, str) or method not in METHODS:
        hint = did_you_mean(str(method), METHODS) if isinstance(method, str) else ""
        raise UserError(f"method {method!r} is not a CAM method{hint}; choose one of {', '.join(METHODS)}")
    return method


def _check_layer(model: nn.Module, target_layer: Any) -> str:
    nodes = target_nodes(model)
    if target_layer is None:
        return nodes[-1]
    if not isinstance(target_layer, str) or target_layer not in nodes:
        hint = did_you_mean(str(target_layer), nodes) if isinstance(target_layer, str) else ""
        raise UserError(f"target_layer {target_layer!r} is not a feature node of {type(model).__name__}{hint}; "
                        f"choose one of {', '.join(nodes)} (jaxnets.feature_info)")
    return target_layer


def _check_targets(targets: Any, count: int, num_classes: int) -> np.ndarray:
    if targets is None:
        return np.full(count, PREDICTED, np.int32)
    values = np.asarray(targets)
    if values.shape != (count,) or not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"targets: expected None (the predicted classes) or one class index per image ({count}), "
                        f"got {np.shape(targets)} {values.dtype}")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise UserError(f"targets: class {int(bad[0])} does not exist; the model has {num_classes} outputs "
                        f"(0..{num_classes - 1})")
    return values.astype(np.int32)


def _check_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or not images.shape[0] or not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"images: expected normalized float images (N, H, W, channels), got {images.shape} "
                        f"{images.dtype}")
    return images.astype(np.float32)


def cam(model: nn.Module, variables: PyTree, images: Any, method: str = "gradcam", target_layer: str | None = None,
        targets: Sequence[int] | np.ndarray | None = None, *, aug_smooth: bool = False, eigen_smooth: bool = False,
        batch_size: int = 32, mesh: Any | None = None, score_batch: int = 16) -> np.ndarray:
    """Class activation maps of normalized NHWC ``images``: float32 (N, H, W) in [0, 1] at the input size, each
    equal to what pytorch-grad-cam's ``method`` gives on the same torchvision model.

    ``model``: a jaxnets Linen model with its ``variables``, or a ``jaxnets.nnx.Model`` with ``variables=None``.
    ``target_layer``: a torchvision node of the model (``target_nodes``; default its last feature level).
    ``targets``: one class per image, whose logit the map explains (for a multi-label head too), or None for
    each image's highest logit. ``aug_smooth``: the mean map over pytorch-grad-cam's six test-time augmentations
    (flip x brightness 0.9/1/1.1; ``targets=None`` predicts on each). ``eigen_smooth``: the weighted activations
    projected on their first principal component instead of summed. Images go ``batch_size`` at a time (the last
    batch padded, one compilation), split over ``mesh`` when given (the batch rounded up to its devices; every
    process passes the same images and gets every map); ScoreCAM masks ``score_batch`` channels per image per
    forward pass.
    """
    if not isinstance(model, nn.Module):  # a jaxnets.nnx.Model: its Linen module and current variables
        from jaxnets import nnx as jaxnets_nnx

        model, variables = jaxnets_nnx.linen_of(model, variables, "cam")
    method = check_method(method)
    if getattr(model, "features_only", False):
        raise UserError("model: a features_only model has no classifier; CAMs explain a class's logit")
    node = _check_layer(model, target_layer)
    images = _check_images(images)
    wanted = _check_targets(targets, len(images), model.num_classes)
    for name, value in (("batch_size", batch_size), ("score_batch", score_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    model = model.clone(remat=False)
    devices = 1 if mesh is None else mesh.devices.size
    batch = -(-min(batch_size, len(images)) // devices) * devices
    tap = find_tap(model, variables, images[:batch], node)
    spec = METHODS[method]
    index = list(METHODS).index(method)
    choice = kernels.current()
    capture = _capture_fn(model, tap, mesh, choice)
    scorer = _scores_fn(model, score_batch, mesh, choice) if spec.scores else None
    projected = eigen_smooth or spec.always_projected
    size = images.shape[1:3]
    variables = jax.device_put(variables) if mesh is None else jax.device_put(variables, parallel.replicated(mesh))

    def rows(values: np.ndarray) -> Any:
        """A batch's rows padded to ``batch``, split over the mesh (every process passes the same rows)."""
        values = evaluation.pad_rows(values, batch)
        if mesh is None:
            return values
        return jax.make_array_from_callback(values.shape, parallel.batch_sharding(mesh), lambda at: values[at])

    def run(pixels: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = capture(variables, {"image": rows(pixels), "target": rows(targets)})
        a = out["activation"]
        scores = None if scorer is None else scorer(variables, {"image": rows(pixels), "activation": a,
                                                                "target": out["target"]})
        weighted = _weighted(index, a, out["gradient"], scores, summed=not projected, size=size)
        if projected:
            weighted = _finish_jit(jnp.asarray(project(parallel.to_host(weighted))), size)
        return parallel.to_host(weighted)[:len(pixels)]

    def all_images(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([run(pixels[i:i + batch], wanted[i:i + batch]) for i in range(0, len(pixels), batch)])

    if not aug_smooth:
        return all_images(images)
    maps = []
    for flip in AUG_FLIPS:
        for factor in AUG_FACTORS:
            pixels = images[:, :, ::-1] if flip else images
            pixels = pixels * np.float32(factor) if factor != 1 else pixels
            result = all_images(np.ascontiguousarray(pixels))
            maps.append(result[:, :, ::-1] if flip else result)
    return np.mean(np.float32(maps), axis=0)
