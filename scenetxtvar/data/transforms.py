"""Resize-to-cover, centre crop and normalisation shared by an image and its control maps.

Every map of a sample is resampled through the *same* crop box (expressed in that map's own
pixels), so a control pixel lands exactly where the image pixel it describes lands. Images use
Lanczos, masks an area filter followed by a threshold (they stay binary), other controls bilinear.
Arrays stay ``uint8``/``bool`` until a batch is collated: that is 4x less memory in the
per-template buckets and in the worker -> main process queue than float tensors.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# (left, top, right, bottom) in source pixels, floats: PIL resamples sub-pixel boxes exactly.
CropBox = tuple[float, float, float, float]


def decode_image(data: bytes, mode: str) -> Image.Image:
    """Decode encoded image bytes fully (errors surface here, not later) and convert to ``mode``."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == mode else img.convert(mode)


def cover_crop_box(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> CropBox:
    """The centred source box that, scaled to ``out_hw``, covers the output (resize-to-cover + centre crop)."""
    src_h, src_w = src_hw
    out_h, out_w = out_hw
    if min(src_h, src_w, out_h, out_w) <= 0:
        raise ValueError(f"sizes must be positive, got src {src_hw} and out {out_hw}")
    scale = max(out_h / src_h, out_w / src_w)
    box_w, box_h = out_w / scale, out_h / scale
    left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def rescale_box(box: CropBox, src_hw: tuple[int, int], map_hw: tuple[int, int]) -> CropBox:
    """The same box in the pixels of a map stored at another resolution (same aspect ratio)."""
    sy, sx = map_hw[0] / src_hw[0], map_hw[1] / src_hw[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def resize_rgb(img: Image.Image, box: CropBox, out_hw: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Crop ``box`` and resize to ``out_hw``: Lanczos (``smooth``) or bilinear; returns (H, W, 3) uint8."""
    resample = Image.Resampling.LANCZOS if smooth else Image.Resampling.BILINEAR
    # PIL widens the filter support when downscaling, so both filters are antialiased.
    out = img.resize((out_hw[1], out_hw[0]), resample=resample, box=box)
    return np.asarray(out if out.mode == "RGB" else out.convert("RGB"))


def resize_mask(img: Image.Image, box: CropBox, out_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Area-resample a mask and re-threshold it (coverage > ``threshold``); returns (H, W) bool."""
    gray = img if img.mode == "L" else img.convert("L")
    # BOX = exact area coverage when downscaling; the threshold keeps masks binary instead of grey.
    out = gray.resize((out_hw[1], out_hw[0]), resample=Image.Resampling.BOX, box=box)
    return np.asarray(out) > threshold * 255.0


def transform_polygons(
    polygons: Sequence[Sequence[Sequence[float]]], box: CropBox, out_hw: tuple[int, int]
) -> list[list[list[float]]]:
    """Map polygons from source pixels into the cropped, resized frame (not clipped: text may leave the crop)."""
    sx = out_hw[1] / (box[2] - box[0])
    sy = out_hw[0] / (box[3] - box[1])
    return [[[(float(x) - box[0]) * sx, (float(y) - box[1]) * sy] for x, y in poly] for poly in polygons]


def polygon_boxes(polygons: Sequence[Sequence[Sequence[float]]], out_hw: tuple[int, int]) -> list[list[float]]:
    """Axis-aligned [x0, y0, x1, y1] of each polygon, clipped to the image (empty boxes where text left it)."""
    h, w = out_hw
    boxes = []
    for poly in polygons:
        xs = [p[0] for p in poly] or [0.0]
        ys = [p[1] for p in poly] or [0.0]
        x0, x1 = min(max(min(xs), 0.0), w), min(max(max(xs), 0.0), w)
        y0, y1 = min(max(min(ys), 0.0), h), min(max(max(ys), 0.0), h)
        boxes.append([x0, y0, x1, y1])
    return boxes


def all_finite(polygons: Sequence[Sequence[Sequence[float]]]) -> bool:
    """True when every polygon coordinate is a finite number."""
    return all(math.isfinite(float(v)) for poly in polygons for pt in poly for v in pt)


# Normalisation runs in numpy: single-threaded and predictable, where torch's OpenMP element-wise
# kernels were 100x slower in the main process of a busy 2-core machine (num_workers=0).
# A uint8 ``out`` receives raw values (masks as 0/255) for normalisation on the device later.


def rgb_into(out: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
    """Write (H, W, 3) uint8 arrays into ``out`` (B, 3, H, W): float -> values in [-1, 1], uint8 -> raw."""
    if out.dtype == np.uint8:
        for o, a in zip(out, arrays):
            o[:] = a.transpose(2, 0, 1)
        return
    for o, a in zip(out, arrays):
        np.divide(a.transpose(2, 0, 1), 127.5, out=o, casting="unsafe")  # 255 / 127.5 == 2.0 exactly
    out -= 1.0


def mask_into(out: np.ndarray, masks: Sequence[np.ndarray]) -> None:
    """Write (H, W) bool masks into ``out`` (B, 3, H, W), channels replicated: float -> -1/1, uint8 -> 0/255."""
    raw = out.dtype == np.uint8
    for o, m in zip(out, masks):
        np.copyto(o[0], m, casting="unsafe")  # in-place ops: ~10x faster than np.where + broadcast
        if raw:
            o[0] *= 255
        else:
            o[0] *= 2.0
            o[0] -= 1.0
        o[1] = o[0]
        o[2] = o[0]


def normalize_uint8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> ``dtype`` [-1, 1] (0/255 masks -> exactly -1/1), on whatever device ``x`` lives."""
    return x.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)


def rgb_to_tensor(arrays: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack (H, W, 3) uint8 arrays into a (B, 3, H, W) tensor in [-1, 1]."""
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), 3, h, w), np.float32)
    rgb_into(out, arrays)
    return torch.from_numpy(out).to(dtype)


def mask_to_tensor(masks: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack (H, W) bool masks into a (B, 3, H, W) tensor with values exactly -1 or 1 (replicated channels)."""
    h, w = masks[0].shape
    out = np.empty((len(masks), 3, h, w), np.float32)
    mask_into(out, masks)
    return torch.from_numpy(out).to(dtype)
