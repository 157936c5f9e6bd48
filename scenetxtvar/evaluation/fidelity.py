"""Control fidelity: how closely a generated image follows its control map (none of the anchors reports it).

- **glyph IoU**: a text mask is extracted from the generated image *inside a band around the
  glyphs*, then compared with the glyph mask (intersection over union, per image; the dataset value
  is the mean over images). Extraction, no model involved: the glyph mask is dilated by
  ``merge_frac`` of the image side to group the letters of a word; for each group, the text height
  is the short side of its ink's minimum-area rectangle, and the band is the ink dilated by
  ``band_frac`` of that height (0.15: inside the sign plate a word usually sits on). Otsu's
  threshold splits the band's luminance in two; the class that fills most of the band's *outer
  half* (the pixels farther than half the radius from the ink) is the background, the other class is
  text. A band with almost no contrast (luminance std below ``min_contrast``) holds no text. Pixels
  outside every band are never text, so the score measures strokes at the right place with the
  right shape, not the rest of the scene. On synthetic ground truth it scores about 0.99, on
  uniform noise about 0.25, on a flat image 0.
- **canny edge F1**: Canny edges of the generated image (the thresholds the canny control uses)
  against the control's edges, with a matching tolerance of ``tolerance`` pixels (each edge set is
  dilated before counting the other's hits): precision, recall and F1.
- **normal agreement**: mean cosine and mean angular error (degrees) between a normal map estimated
  from the generated image and the control normals, over pixels where the control has a normal.
  Estimating normals needs a model: evaluation only reports it when one is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

ArrayLike = np.ndarray | Image.Image | torch.Tensor


def to_uint8_rgb(image: ArrayLike) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, an (H, W[, 3]) uint8 array or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be (3, H, W) or (1, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(3, -1, -1)
        return x.permute(1, 2, 0).contiguous().numpy()
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"image array must be (H, W) or (H, W, 3), got shape {arr.shape}")
    return arr[..., :3]


def control_mask(control: ArrayLike, threshold: float = 0.0) -> np.ndarray:
    """A binary (H, W) mask from a control: a (C, H, W) tensor in [-1, 1] (first channel > ``threshold``),
    or an L/RGB image / uint8 array (first channel > 127)."""
    if isinstance(control, torch.Tensor):
        x = control.detach().float().cpu()
        if x.dim() == 3:
            x = x[0]
        if x.dim() != 2:
            raise ValueError(f"control tensor must be (C, H, W) or (H, W), got {tuple(control.shape)}")
        return (x > threshold).numpy()
    arr = np.asarray(control)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"control must be an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return arr > (127 if arr.dtype == np.uint8 else 0.5)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an (H, W, 3) uint8 image, as uint8."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


@dataclass(frozen=True)
class TextBand:
    """One word's band: the bounding slice, the band mask in it and the outer ring used for polarity."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    region: np.ndarray  # bool, the glyph ink dilated by the band radius
    ring: np.ndarray  # bool, the outer half of the band (background, if the text is where the glyph says)


def text_bands(glyph: np.ndarray, merge_frac: float = 0.02, band_frac: float = 0.15) -> list[TextBand]:
    """The bands around the words of a glyph mask (see the module docstring)."""
    if glyph.ndim != 2:
        raise ValueError(f"glyph mask must be (H, W), got shape {glyph.shape}")
    h, w = glyph.shape
    if not glyph.any():
        return []
    ink_u8 = glyph.astype(np.uint8)
    merge = max(1, int(round(merge_frac * min(h, w))))
    merged = cv2.dilate(ink_u8, _disk(merge))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    bands = []
    for i in range(1, count):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        ys, xs = np.nonzero((labels[y : y + bh, x : x + bw] == i) & glyph[y : y + bh, x : x + bw])
        if len(xs) == 0:
            continue
        # The text height is the short side of the ink's minimum-area rectangle (rotation-proof).
        (_, _), (rw, rh), _ = cv2.minAreaRect(np.stack([xs + x, ys + y], 1).astype(np.float32))
        radius = max(2, int(round(band_frac * max(1.0, min(rw, rh)))))
        x0, y0 = max(0, x - radius), max(0, y - radius)
        x1, y1 = min(w, x + bw + radius), min(h, y + bh + radius)
        ink = np.zeros((y1 - y0, x1 - x0), np.uint8)
        ink[ys + y - y0, xs + x - x0] = 1
        region = cv2.dilate(ink, _disk(radius)) > 0
        inner = cv2.dilate(ink, _disk(max(1, radius // 2))) > 0
        bands.append(TextBand((x0, y0, x1, y1), region, region & ~inner))
    return bands


def extract_text_mask(
    image: ArrayLike, glyph: np.ndarray, min_contrast: float = 6.0, merge_frac: float = 0.02, band_frac: float = 0.15
) -> np.ndarray:
    """The (H, W) bool text mask of ``image`` inside the bands of ``glyph`` (Otsu + outer-ring polarity)."""
    rgb = to_uint8_rgb(image)
    if rgb.shape[:2] != glyph.shape:
        raise ValueError(f"image {rgb.shape[:2]} and glyph mask {glyph.shape} must have the same size")
    gray = luminance(rgb)
    out = np.zeros(glyph.shape, bool)
    for band in text_bands(glyph, merge_frac, band_frac):
        x0, y0, x1, y1 = band.box
        values = gray[y0:y1, x0:x1][band.region]
        if values.size < 4 or float(values.std()) < min_contrast or not band.ring.any():
            continue
        threshold, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        bright = gray[y0:y1, x0:x1] > threshold
        # Background is the class that fills most of the outer ring; the other class is text.
        text = ~bright if bright[band.ring].mean() > 0.5 else bright
        out[y0:y1, x0:x1] |= text & band.region
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """Intersection over union of two bool masks; None when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return None
    return float(np.logical_and(a, b).sum()) / union


def glyph_iou(image: ArrayLike, glyph: ArrayLike, **kwargs) -> float | None:
    """IoU between the glyph mask and the text mask extracted from ``image``; None when the glyph is empty."""
    g = glyph if isinstance(glyph, np.ndarray) and glyph.dtype == bool else control_mask(glyph)
    if not g.any():
        return None
    return mask_iou(extract_text_mask(image, g, **kwargs), g)


def canny_edges(image: ArrayLike, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of an image as an (H, W) bool mask (the canny control's thresholds by default)."""
    return cv2.Canny(luminance(to_uint8_rgb(image)), low, high) > 0


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> dict[str, float | None]:
    """Precision, recall and F1 of edge map ``pred`` against ``target``, matching within ``tolerance`` pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"edge maps must have the same shape, got {pred.shape} and {target.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_target = cv2.dilate(target.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel) > 0
    n_pred, n_target = int(pred.sum()), int(target.sum())
    if n_target == 0 and n_pred == 0:
        return {"precision": None, "recall": None, "f1": None}
    precision = float((pred & near_target).sum()) / n_pred if n_pred else 0.0
    recall = float((target & near_pred).sum()) / n_target if n_target else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def canny_f1(image: ArrayLike, control: ArrayLike, tolerance: int = 1, low: int = 100, high: int = 200):
    """Edge F1 of the generated image's Canny edges against a canny control (see :func:`edge_f1`)."""
    return edge_f1(canny_edges(image, low, high), control_mask(control), tolerance)


def normal_agreement(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> dict[str, float | None]:
    """Mean cosine and mean angular error (degrees) between two (3, H, W) normal maps in [-1, 1], over the
    pixels where ``target`` has a normal (length > 0.5)."""
    p = torch.as_tensor(pred).float()
    t = torch.as_tensor(target).float()
    if p.shape != t.shape or p.dim() != 3 or p.shape[0] != 3:
        raise ValueError(f"normal maps must both be (3, H, W), got {tuple(p.shape)} and {tuple(t.shape)}")
    valid = t.norm(dim=0) > 0.5
    if not bool(valid.any()):
        return {"mean_cosine": None, "mean_angle_deg": None}
    cos = torch.nn.functional.cosine_similarity(p, t, dim=0, eps=1e-6)[valid].clamp(-1, 1)
    return {"mean_cosine": float(cos.mean()), "mean_angle_deg": float(torch.rad2deg(torch.acos(cos)).mean())}


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the non-None values, or None."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
