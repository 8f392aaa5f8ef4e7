"""Pictures of class activation maps, for people who would rather look than read: a map laid over the image it
explains, at the image's own size (``overlay``), and a grid of such pictures (``contact_sheet``).

A map is computed on what the model saw, the eval transform's center crop of the resized image
(``jaxnets.data.pil_eval.resize_and_crop``). ``to_original`` undoes that transform: it places the map back on the
original image, bilinearly resampled at each original pixel's centre; what the crop left out has no map, and an
overlay dims it. Everything is drawn with PIL (no display needed); matplotlib gives the colour map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxnets.data import pil_eval
from jaxnets.data.pil_eval import IMAGENET_EVAL
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform

COLORMAP = "jet"  # pytorch-grad-cam's show_cam_on_image (cv2.COLORMAP_JET)
ALPHA = 0.5  # the heatmap's weight in an overlay (show_cam_on_image's image_weight = 0.5)
OUTSIDE = 0.4  # the brightness left to what the center crop cut off (the model never saw it)
TITLE_BAND = 0.06  # a title's band height, as a fraction of the picture's longer side (at least MIN_BAND pixels)
MIN_BAND = 14


def crop_box(size: tuple[int, int], transform: EvalTransform = IMAGENET_EVAL) -> tuple[float, ...]:
    """Where the model's input lies in an image of ``size`` (width, height): the center crop's (left, top, right,
    bottom) in original pixel coordinates, by ``pil_eval``'s own arithmetic (``resized_size``, ``crop_offset``)."""
    width, height = size
    new_width, new_height = pil_eval.resized_size(size, transform)
    crop = transform.crop_size
    left, top = pil_eval.crop_offset(new_width, crop), pil_eval.crop_offset(new_height, crop)
    scale_x, scale_y = new_width / width, new_height / height
    return left / scale_x, top / scale_y, (left + crop) / scale_x, (top + crop) / scale_y


def _sampling(count: int, start: float, stop: float, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, source) bilinear weights sampling a ``source``-pixel axis spread over [start, stop) at each of
    ``count`` original pixel centres (edge pixels held), and which centres fall inside."""
    position = (np.arange(count) + 0.5 - start) * (source / (stop - start)) - 0.5
    inside = (position >= -0.5) & (position < source - 0.5)
    position = np.clip(position, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = position - low
    weights = np.zeros((count, source), np.float32)
    weights[np.arange(count), low] += 1 - frac
    weights[np.arange(count), high] += frac
    return weights, inside


def to_original(cam_map: np.ndarray, size: tuple[int, int],
                transform: EvalTransform = IMAGENET_EVAL) -> tuple[np.ndarray, np.ndarray]:
    """A map of the model's input (crop x crop) on an image of ``size`` (width, height): the (height, width)
    float32 map, and the boolean mask of the pixels the crop covers (outside it the map is 0)."""
    cam_map = np.asarray(cam_map, np.float32)
    crop = transform.crop_size
    if cam_map.shape != (crop, crop):
        raise UserError(f"cam_map: expected the model input's size ({crop}, {crop}) of the eval transform, "
                        f"got {cam_map.shape}")
    left, top, right, bottom = crop_box(size, transform)
    cols, in_cols = _sampling(size[0], left, right, crop)
    rows, in_rows = _sampling(size[1], top, bottom, crop)
    inside = in_rows[:, None] & in_cols[None, :]
    return np.where(inside, rows @ cam_map @ cols.T, 0).astype(np.float32), inside


def heatmap_colors(values: np.ndarray, colormap: str = COLORMAP) -> np.ndarray:
    """float (H, W) values in [0, 1] -> uint8 RGB (H, W, 3) through a matplotlib colour map."""
    import matplotlib

    rgb = matplotlib.colormaps[colormap](np.clip(values, 0, 1))[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def title_band(size: tuple[int, int]) -> int:
    """The height of a title's band on a picture of ``size``: readable still when a contact sheet shrinks it."""
    return max(MIN_BAND, round(max(size) * TITLE_BAND))


def draw_title(picture: Image.Image, title: str, band: int | None = None) -> Image.Image:
    """``picture`` with ``title`` in white on a darkened band across its top, ``band`` pixels high (default
    ``title_band``): the picture keeps its size."""
    picture = picture.convert("RGB")
    band = min(picture.height, band or title_band(picture.size))
    pixels = np.array(picture)
    pixels[:band] = (pixels[:band] * 0.35).astype(np.uint8)
    picture = Image.fromarray(pixels)
    font = _font(max(8, round(band * 0.7)))
    draw = ImageDraw.Draw(picture)
    _, top, _, bottom = draw.textbbox((0, 0), title, font=font)
    draw.text((max(2, band // 4), (band - (bottom - top)) // 2 - top), title, fill=(255, 255, 255), font=font)
    return picture


def caption(label: str, probability: float, truth: str | None = None) -> str:
    """A title: the class and its probability in percent (and the true class, for a mistake)."""
    text = f"{label} {probability:.1%}"
    return f"{text} (true: {truth})" if truth is not None and truth != label else text


def as_picture(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image of ``image``: a PIL image of any mode, or uint8 pixels (H, W), (H, W, 1) (gray) or
    (H, W, 3)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise UserError(f"image: expected a PIL image or uint8 pixels (H, W), (H, W, 1) or (H, W, 3), got "
                        f"{pixels.shape} {pixels.dtype}")
    return Image.fromarray(pixels).convert("RGB")


def confidence_extremes(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                        count: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the ``count`` most confident mistakes (most confident first) and of the ``count`` least
    confident hits (least confident first): the examples worth a look. Ties keep the examples' order."""
    labels, predicted, confidence = (np.asarray(v) for v in (labels, predicted, confidence))
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"count must be an integer >= 1, got {count!r}")
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    mistakes = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    hits = right[np.argsort(confidence[right], kind="stable")][:count]
    return mistakes, hits


def overlay(image: Image.Image | np.ndarray, cam_map: np.ndarray, title: str | None = None, *,
            transform: EvalTransform = IMAGENET_EVAL, alpha: float = ALPHA, colormap: str = COLORMAP) -> Image.Image:
    """The map of the model's input laid over the ORIGINAL ``image`` (as read before the eval transform:
    ``as_picture`` takes it), at the image's size: the heatmap blended with weight ``alpha`` where the center
    crop was, the rest dimmed (the model never saw it), and ``title`` (e.g. ``caption(...)``) across the top."""
    if not 0 <= alpha <= 1:
        raise UserError(f"alpha must be within [0, 1], got {alpha!r}")
    picture = as_picture(image)
    heat, inside = to_original(cam_map, picture.size, transform)
    pixels = np.asarray(picture, np.float32)
    blended = (1 - alpha) * pixels + alpha * heatmap_colors(heat, colormap).astype(np.float32)
    pixels = np.where(inside[..., None], blended, OUTSIDE * pixels)
    result = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return draw_title(result, title) if title else result


def contact_sheet(pictures: Sequence[Image.Image], title: str | None = None, *, columns: int | None = None,
                  cell: int = 256, gap: int = 4, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``pictures`` (overlays) side by side in a grid, each scaled to ``cell`` pixels on its longer side (aspect
    kept, centred in its cell), ``columns`` per row (default: the most square grid), under ``title``: one PNG for
    a group of examples."""
    if not pictures:
        raise UserError("contact_sheet: no pictures to lay out")
    for name, value, low in (("columns", columns, 1), ("cell", cell, 8), ("gap", gap, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise UserError(f"contact_sheet: {name} must be an integer >= {low}, got {value!r}")
    thumbs = []
    for picture in pictures:
        scale = cell / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        thumbs.append(picture.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    width, height = max(t.width for t in thumbs), max(t.height for t in thumbs)
    columns = min(columns or math.ceil(math.sqrt(len(thumbs))), len(thumbs))
    rows = math.ceil(len(thumbs) / columns)
    band = max(2 * MIN_BAND, round(0.1 * cell)) if title else 0
    sheet = Image.new("RGB", (columns * width + (columns + 1) * gap, band + rows * height + (rows + 1) * gap),
                      background)
    for index, thumb in enumerate(thumbs):
        row, column = divmod(index, columns)
        sheet.paste(thumb, (gap + column * (width + gap) + (width - thumb.width) // 2,
                            band + gap + row * (height + gap) + (height - thumb.height) // 2))
    if title:
        sheet.paste(draw_title(Image.new("RGB", (sheet.width, band), background), title, band), (0, 0))
    return sheet
