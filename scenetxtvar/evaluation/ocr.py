"""OCR accuracy of the text a model drew where the layout asked for it (AnyText's Sen.ACC and NED).

Protocol (AnyText-benchmark, ``../shared/reference/scenetext.md`` §1.2, with an offline recogniser):

1. For every ground-truth text line (word + polygon) cut a crop from the image with the polygon's
   *minimum-area rectangle*, rectified by a perspective warp and oriented along the polygon's
   reading direction (point 0 -> point 1 of a TL, TR, BR, BL quad); a crop taller than 1.2x its
   width is rotated 90 degrees (vertical text), as AnyText does.
2. Recognise the crop with RapidOCR's recogniser alone (``use_det=False, use_cls=False``;
   PP-OCRv6-small, bundled with the ``rapidocr`` wheel: no download).
3. Compare the prediction ``p`` with the intended line ``g``:

   - **Sen.ACC**: the share of lines with ``p == g`` exactly;
   - **NED** (a similarity, higher is better): the mean over lines of ``1 - lev(p, g) / max(|p|, |g|)``
     (1 when both are empty), ``lev`` the Levenshtein distance over characters.

   Both come case-sensitive (AnyText's definition) and case-insensitive (``*_ci``). Before
   comparing, whitespace is removed from both strings by default (RapidOCR's spacing is not
   reliable, §3.3), and, like AnyText's character-id comparison, characters outside the
   recogniser's dictionary all map to one "unknown" symbol.

Label results "Sen.ACC / NED (RapidOCR PP-OCRv6-small, GT crops)": they are not comparable with
paper numbers, which use DuGuang OCR.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

UNKNOWN_CHAR = "\ufffd"  # what characters outside the recogniser's dictionary become before comparing
ROTATE_RATIO = 1.2  # AnyText rotates a crop whose height exceeds 1.2x its width
OCR_LABEL = "RapidOCR PP-OCRv6-small (rec only), GT-polygon crops"


# ---------------------------------------------------------------------------------------------- strings


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalized_edit_similarity(pred: str, gt: str) -> float:
    """AnyText's NED of one line: ``1 - lev(pred, gt) / max(len(pred), len(gt))``; 1.0 when both are empty."""
    longest = max(len(pred), len(gt))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, gt) / longest


def normalize_text(
    text: str, case_sensitive: bool = True, strip_spaces: bool = True, charset: frozenset[str] | None = None
) -> str:
    """The string compared: whitespace removed (``strip_spaces``), lower-cased unless ``case_sensitive``,
    characters outside ``charset`` replaced by one unknown symbol."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if strip_spaces:
        text = "".join(text.split())
    if not case_sensitive:
        text = text.lower()
    if charset is not None:
        text = "".join(c if c in charset else UNKNOWN_CHAR for c in text)
    return text


@dataclass
class LineScores:
    """Running Sen.ACC / NED over text lines, case-sensitive and case-insensitive."""

    strip_spaces: bool = True
    charset: frozenset[str] | None = None
    exact: list[float] = field(default_factory=list)
    ned: list[float] = field(default_factory=list)
    exact_ci: list[float] = field(default_factory=list)
    ned_ci: list[float] = field(default_factory=list)

    def add(self, pred: str, gt: str) -> None:
        """Score one recognised line against its intended text."""
        for case_sensitive, exact, ned in ((True, self.exact, self.ned), (False, self.exact_ci, self.ned_ci)):
            p = normalize_text(pred, case_sensitive, self.strip_spaces, self.charset)
            g = normalize_text(gt, case_sensitive, self.strip_spaces, self.charset)
            exact.append(float(p == g))
            ned.append(normalized_edit_similarity(p, g))

    def __len__(self) -> int:
        return len(self.exact)

    def summary(self, prefix: str = "") -> dict[str, float | int | None]:
        """``{prefix}sen_acc``, ``ned``, ``sen_acc_ci``, ``ned_ci`` (None without lines) and ``num_lines``."""

        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        return {
            f"{prefix}sen_acc": mean(self.exact),
            f"{prefix}ned": mean(self.ned),
            f"{prefix}sen_acc_ci": mean(self.exact_ci),
            f"{prefix}ned_ci": mean(self.ned_ci),
            f"{prefix}num_lines": len(self.exact),
        }


def line_metrics(
    preds: Sequence[str], gts: Sequence[str], strip_spaces: bool = True, charset: frozenset[str] | None = None
) -> dict[str, float | int | None]:
    """Sen.ACC / NED (and ``_ci``) of recognised lines against their intended texts."""
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts must have the same length, got {len(preds)} and {len(gts)}")
    scores = LineScores(strip_spaces=strip_spaces, charset=charset)
    for p, g in zip(preds, gts):
        scores.add(p, g)
    return scores.summary()


# ---------------------------------------------------------------------------------------------- crops


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image or an (H, W[, C]) uint8 array."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    return arr[..., :3]


def _clockwise(pts: np.ndarray) -> np.ndarray:
    x, y = pts[:, 0], pts[:, 1]
    area = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    return pts if area >= 0 else np.concatenate([pts[:1], pts[:0:-1]])  # y down: positive = clockwise


def reading_rect(polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """The polygon's minimum-area rectangle as a (4, 2) TL, TR, BR, BL array along its reading direction."""
    pts = np.asarray(polygon, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise ValueError(f"polygon must be >= 3 finite [x, y] points, got {np.asarray(polygon).tolist()}")
    # Reading direction: point 0 -> 1 of a quad, else towards the middle of the top chain (Total-Text style).
    direction = pts[1] - pts[0] if len(pts) == 4 else pts[max(len(pts) // 2 - 1, 1)] - pts[0]
    if np.hypot(*direction) < 1e-9:
        direction = np.array([1.0, 0.0])
    box = _clockwise(cv2.boxPoints(cv2.minAreaRect(pts.astype(np.float32))).astype(np.float64))

    def cosine(k: int) -> float:
        edge = box[(k + 1) % 4] - box[k]
        return float(np.dot(edge, direction) / (np.hypot(*edge) * np.hypot(*direction) + 1e-12))

    return np.roll(box, -max(range(4), key=cosine), axis=0)


def crop_polygon(
    image: Image.Image | np.ndarray, polygon: Sequence[Sequence[float]], rotate_ratio: float = ROTATE_RATIO
) -> np.ndarray | None:
    """The rectified min-area-rect crop of ``polygon`` (H, W, 3) uint8; tall crops rotated; None if it is empty
    or lies entirely outside the image."""
    arr = _as_rgb_array(image)
    h_img, w_img = arr.shape[:2]
    rect = reading_rect(polygon)
    lo, hi = rect.min(axis=0), rect.max(axis=0)
    if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= w_img or lo[1] >= h_img:
        return None
    width = int(round(0.5 * (np.hypot(*(rect[1] - rect[0])) + np.hypot(*(rect[2] - rect[3])))))
    height = int(round(0.5 * (np.hypot(*(rect[3] - rect[0])) + np.hypot(*(rect[2] - rect[1])))))
    if width < 2 or height < 2:
        return None
    # Polygons use continuous coordinates (pixel centres at +0.5); OpenCV puts centres on integers.
    src = (rect - 0.5).astype(np.float32)
    dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32) - 0.5
    matrix = cv2.getPerspectiveTransform(src, dst)
    crop = cv2.warpPerspective(arr, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    if height > rotate_ratio * width:
        crop = np.ascontiguousarray(np.rot90(crop))  # counter-clockwise: top-to-bottom text reads left to right
    return crop


# ---------------------------------------------------------------------------------------------- recogniser


class TextRecognizer:
    """RapidOCR's recogniser, loaded once, with its logging silenced: ``recognize(crop) -> str``.

    ``params`` are RapidOCR config overrides (e.g. ``{"EngineConfig.onnxruntime.intra_op_num_threads": 2}``).
    Only the bundled default models are offline: params that select other models make RapidOCR download them.
    """

    def __init__(self, params: dict[str, Any] | None = None, log_level: str = "error") -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError as e:  # pragma: no cover - the eval extra is part of the dev setup
            raise ImportError("OCR metrics need rapidocr and onnxruntime: pip install -e '.[eval]'") from e
        params = dict(params or {})
        logging.getLogger("RapidOCR").setLevel(log_level.upper())
        self.engine = RapidOCR(params={"Global.log_level": log_level, **params})
        self._lock = threading.Lock()
        self._charset: frozenset[str] | None = None

    @property
    def charset(self) -> frozenset[str]:
        """The characters the recogniser's dictionary holds (space included)."""
        if self._charset is None:
            rec = self.engine._load_rec_model()  # the dictionary lives in the loaded recogniser only
            self._charset = frozenset(c for c in rec.postprocess_op.character if c != "blank")
        return self._charset

    def recognize(self, crop: np.ndarray | Image.Image | None) -> str:
        """The text of one line crop ('' for None or nothing read)."""
        if crop is None:
            return ""
        arr = np.ascontiguousarray(_as_rgb_array(crop))
        with self._lock:
            # The use_* flags are sticky in rapidocr 3.x: pass all three on every call.
            out = self.engine(arr, use_det=False, use_cls=False, use_rec=True)
        txts = getattr(out, "txts", None) or ("",)
        return str(txts[0])

    def recognize_many(self, crops: Iterable[np.ndarray | Image.Image | None]) -> list[str]:
        """:meth:`recognize` over several crops."""
        return [self.recognize(c) for c in crops]


_RECOGNIZERS: dict[tuple, TextRecognizer] = {}


def get_recognizer(params: dict[str, Any] | None = None) -> TextRecognizer:
    """A process-wide :class:`TextRecognizer` per ``params`` (loading one takes about a second)."""
    key = tuple(sorted((params or {}).items()))
    if key not in _RECOGNIZERS:
        _RECOGNIZERS[key] = TextRecognizer(params)
    return _RECOGNIZERS[key]


# ---------------------------------------------------------------------------------------------- metric


def valid_line(word: Any) -> bool:
    """Lines that count: non-empty strings that are not the ``###`` don't-care label of ICDAR-style sets."""
    return isinstance(word, str) and bool(word.strip()) and word.strip() != "###"


class OCRAccuracy:
    """Sen.ACC / NED of images against their intended lines (words + polygons), accumulated over calls."""

    def __init__(
        self,
        recognizer: TextRecognizer | None = None,
        strip_spaces: bool = True,
        map_unknown: bool = True,
        keep_predictions: bool = True,
    ) -> None:
        self.recognizer = recognizer or get_recognizer()
        self.scores = LineScores(strip_spaces=strip_spaces, charset=self.recognizer.charset if map_unknown else None)
        self.skipped = 0  # lines outside the image, or empty / don't-care words
        self.keep_predictions = keep_predictions
        self.predictions: list[dict[str, Any]] = []

    def update(
        self, image: Image.Image | np.ndarray, words: Sequence[str], polygons: Sequence[Sequence[Sequence[float]]]
    ) -> list[str]:
        """Crop, recognise and score every line of one image; returns the predictions ('' for skipped lines)."""
        if len(words) != len(polygons):
            raise ValueError(f"words and polygons must have the same length, got {len(words)} and {len(polygons)}")
        preds = []
        for word, poly in zip(words, polygons):
            crop = crop_polygon(image, poly) if valid_line(word) else None
            if crop is None:
                self.skipped += 1
                preds.append("")
                continue
            pred = self.recognizer.recognize(crop)
            self.scores.add(pred, word)
            preds.append(pred)
            if self.keep_predictions:
                self.predictions.append({"gt": word, "pred": pred})
        return preds

    def compute(self, prefix: str = "") -> dict[str, float | int | None]:
        """The summary (see :meth:`LineScores.summary`) plus ``{prefix}skipped_lines``."""
        return {**self.scores.summary(prefix), f"{prefix}skipped_lines": self.skipped}
