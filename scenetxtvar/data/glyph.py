"""Glyph control images: each word drawn white-on-black to fill its polygon, plus derived conditions.

Geometry conventions (shared with the shards and the synthetic generator):

- Polygons are lists of ``[x, y]`` points in continuous pixel coordinates of the image: pixel
  ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``, so ``(0, 0)`` is the image's top-left corner.
- A 4-point convex polygon is a quadrilateral read as top-left, top-right, bottom-right, bottom-left
  (the reading direction runs from point 0 to point 1); counter-clockwise input is reordered.
  Any other polygon (more points, or a non-convex / self-intersecting quad) is replaced by its
  minimum-area rectangle, oriented along the polygon's reading direction (point 0 towards the middle
  of the point list, i.e. along the top chain of Total-Text / CTW1500 style polygons).
- A word is rendered tight on its own canvas, perspective-warped onto the quad and clipped with the
  polygon mask, so no ink ever leaves its polygon. A quad whose reading edge is much shorter than
  its side edge gets the characters stacked vertically (vertical CJK signs).
"""

from __future__ import annotations

import colorsys
import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

Polygon = Sequence[Sequence[float]]

FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
# Environment overrides: a font file for glyph controls, extra font folders (os.pathsep-separated).
ENV_GLYPH_FONT = "SCENETXTVAR_GLYPH_FONT"
ENV_FONT_DIRS = "SCENETXTVAR_FONT_DIRS"

LATIN_FONT_FILES: tuple[str, ...] = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")
# (file name, face index in a .ttc collection): Noto Sans CJK index 2 is Simplified Chinese.
CJK_FONT_FILES: tuple[tuple[str, int], ...] = (
    ("NotoSansCJK-Regular.ttc", 2),
    ("NotoSansCJKsc-Regular.otf", 0),
    ("NotoSansSC-Regular.otf", 0),
    ("NotoSansSC-Regular.ttf", 0),
    ("SourceHanSansSC-Regular.otf", 0),
    ("NotoSansCJKtc-Regular.otf", 0),
    ("wqy-zenhei.ttc", 0),
    ("wqy-microhei.ttc", 0),
    ("DroidSansFallbackFull.ttf", 0),
    ("Arial Unicode.ttf", 0),
    ("arialuni.ttf", 0),
)
BUILTIN = "builtin"  # the name that selects Pillow's embedded scalable font (ASCII only)
_NOTDEF_PROBE = "\uffff"  # a noncharacter: no font maps it, so it renders as .notdef
_CHECK_SIZE = 24


@dataclass(frozen=True)
class FontSpec:
    """A font face: a file path (``None`` = Pillow's built-in scalable font) and a .ttc face index."""

    path: str | None = None
    index: int = 0

    @property
    def name(self) -> str:
        """Short name for logs and manifests."""
        if self.path is None:
            return "pillow-builtin"
        base = os.path.basename(self.path)
        return f"{base}#{self.index}" if self.index else base

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at ``size`` pixels (cached)."""
        return _load_font(self.path, self.index, int(size))


@lru_cache(maxsize=256)
def _load_font(path: str | None, index: int, size: int) -> ImageFont.FreeTypeFont:
    if path is None:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow was built without FreeType: its built-in font cannot scale; pass a font file")
        return font
    return ImageFont.truetype(path, size=size, index=index)


def _font_dirs() -> list[Path]:
    extra = [d for d in os.environ.get(ENV_FONT_DIRS, "").split(os.pathsep) if d]
    return [Path(d).expanduser() for d in (*extra, *FONT_DIRS)]


@lru_cache(maxsize=1)
def _font_index() -> dict[str, str]:
    """Lower-cased font file name -> first path found in the font folders (walked once per process)."""
    index: dict[str, str] = {}
    for root in _font_dirs():
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in sorted(os.walk(root)):
            for f in sorted(files):
                if f.lower().endswith((".ttf", ".otf", ".ttc")):
                    index.setdefault(f.lower(), os.path.join(dirpath, f))
    return index


def find_font_file(name: str) -> str | None:
    """Path of a font file called ``name`` (case-insensitive) in the usual font folders, or None."""
    return _font_index().get(name.lower())


def default_font() -> FontSpec:
    """The glyph-control font: $SCENETXTVAR_GLYPH_FONT, else DejaVu Sans / Liberation Sans, else Pillow's built-in."""
    env = os.environ.get(ENV_GLYPH_FONT)
    if env:
        return resolve_font(env)
    for name in LATIN_FONT_FILES:
        path = find_font_file(name)
        if path:
            return FontSpec(path)
    return FontSpec(None)


def find_cjk_font() -> FontSpec | None:
    """A CJK-capable font from the usual font folders (Noto Sans CJK SC first), or None."""
    for name, idx in CJK_FONT_FILES:
        path = find_font_file(name)
        if path:
            return FontSpec(path, idx)
    return None


def resolve_font(font: str | os.PathLike | FontSpec | None) -> FontSpec:
    """A FontSpec from ``None`` (default font), ``"builtin"``, a path (``"file.ttc#2"`` picks a face) or a FontSpec."""
    if font is None:
        return default_font()
    if isinstance(font, FontSpec):
        return font
    text = os.fspath(font)
    if text == BUILTIN:
        return FontSpec(None)
    index = 0
    if "#" in text and not os.path.exists(text):
        text, _, idx = text.rpartition("#")
        if not idx.isdigit():
            raise ValueError(f"font face index must be an integer, got {font!r}")
        index = int(idx)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"font file not found: {text!r} (pass a .ttf/.otf/.ttc path or {BUILTIN!r})")
    try:
        _load_font(text, index, _CHECK_SIZE)
    except OSError as e:
        raise ValueError(f"cannot load font {text!r} face {index}: {e}") from e
    return FontSpec(text, index)


_GLYPH_CACHE: dict[tuple[FontSpec, str], bool] = {}


def has_glyph(font: FontSpec, ch: str) -> bool:
    """Whether ``font`` draws ``ch`` with its own glyph (not .notdef); whitespace and format chars count as drawn."""
    key = (font, ch)
    hit = _GLYPH_CACHE.get(key)
    if hit is not None:
        return hit
    if ch.isspace() or unicodedata.category(ch)[0] in "ZC":
        ok = True
    else:
        face = font.load(_CHECK_SIZE)
        mask, notdef = face.getmask(ch), face.getmask(_NOTDEF_PROBE)
        same_as_notdef = mask.size == notdef.size and bytes(mask) == bytes(notdef)
        # An empty bitmap for a visible character means the face has nothing for it either.
        ok = not same_as_notdef and (mask.size[0] * mask.size[1] > 0 and any(bytes(mask)))
    _GLYPH_CACHE[key] = ok
    return ok


def missing_chars(font: FontSpec, text: str) -> list[str]:
    """Characters of ``text`` that ``font`` cannot draw, unique, in order of appearance."""
    out: list[str] = []
    for ch in text:
        if ch not in out and not has_glyph(font, ch):
            out.append(ch)
    return out


# ---------------------------------------------------------------------------------------------- geometry


def as_polygon(polygon: Polygon, name: str = "polygon") -> np.ndarray:
    """Validate a polygon and return it as a float64 (N, 2) array (N >= 3)."""
    arr = np.asarray(polygon, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
        raise ValueError(f"{name} must be a list of >= 3 [x, y] points, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite coordinates: {arr.tolist()}")
    return arr


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _clockwise(pts: np.ndarray) -> np.ndarray:
    # Positive shoelace area with y pointing down = visually clockwise (TL, TR, BR, BL).
    return pts if _signed_area(pts) >= 0 else np.concatenate([pts[:1], pts[:0:-1]])


def text_quad(polygon: Polygon) -> np.ndarray:
    """The (4, 2) quad a word is warped onto, ordered TL, TR, BR, BL in reading direction."""
    pts = as_polygon(polygon)
    if len(pts) == 4:
        quad = _clockwise(pts)
        if cv2.isContourConvex(quad.astype(np.float32).reshape(-1, 1, 2)) and abs(_signed_area(quad)) > 1e-6:
            return quad
    direction = pts[max(len(pts) // 2 - 1, 1)] - pts[0]
    if np.hypot(*direction) < 1e-6:
        direction = np.array([1.0, 0.0])
    box = _clockwise(cv2.boxPoints(cv2.minAreaRect(pts.astype(np.float32))).astype(np.float64))
    # Start the box at the corner whose outgoing edge best follows the reading direction.
    best = max(range(4), key=lambda k: _cosine(box[(k + 1) % 4] - box[k], direction))
    return np.roll(box, -best, axis=0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.hypot(*a) * np.hypot(*b) + 1e-12))


def polygon_mask(polygon: Polygon, size: tuple[int, int]) -> np.ndarray:
    """Filled polygon as a uint8 {0, 1} array of ``size = (H, W)`` (pixel centres at +0.5)."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    pts = np.round((as_polygon(polygon) - 0.5) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def render_word_canvas(word: str, font: ImageFont.FreeTypeFont, vertical: bool = False) -> np.ndarray | None:
    """The word's ink, tight-cropped with a 1-pixel black border, as uint8 (h, w); None when nothing is drawn."""
    if vertical:
        chars = [c for c in word if not c.isspace()]
        tiles = [t for t in (render_word_canvas(c, font) for c in chars) if t is not None]
        if not tiles:
            return None
        gap = max(1, int(round(font.size * 0.08)))
        width = max(t.shape[1] for t in tiles)
        height = sum(t.shape[0] for t in tiles) + gap * (len(tiles) - 1)
        canvas = np.zeros((height, width), np.uint8)
        y = 0
        for t in tiles:
            x = (width - t.shape[1]) // 2
            canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
            y += t.shape[0] + gap
        return canvas
    left, top, right, bottom = font.getbbox(word)
    pad = 2
    img = Image.new("L", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), word, font=font, fill=255)
    arr = np.asarray(img)
    rows, cols = np.nonzero(arr.max(axis=1))[0], np.nonzero(arr.max(axis=0))[0]
    if rows.size == 0:
        return None
    crop = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.pad(crop, 1)


def warp_canvas_to_quad(canvas: np.ndarray, quad: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Perspective-warp a canvas (its full rectangle) onto ``quad`` in an (H, W) float32 image in [0, 1]."""
    h, w = size
    ch, cw = canvas.shape[:2]
    # Work only inside the quad's bounding box (cv2 puts pixel centres on integers: shift by 0.5).
    x0, y0 = np.floor(quad.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    src = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32) - 0.5
    dst = (quad - 0.5 - [x0, y0]).astype(np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    patch = cv2.warpPerspective(
        canvas.astype(np.float32) / 255.0,
        matrix,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    out[y0:y1, x0:x1] = patch
    return out


def quad_edges(quad: np.ndarray) -> tuple[float, float]:
    """(reading-edge length, side-edge length) of a TL, TR, BR, BL quad, each averaged over both sides."""
    along = 0.5 * (np.hypot(*(quad[1] - quad[0])) + np.hypot(*(quad[2] - quad[3])))
    across = 0.5 * (np.hypot(*(quad[3] - quad[0])) + np.hypot(*(quad[2] - quad[1])))
    return float(along), float(across)


def font_px_for(extent: float, supersample: float = 2.0) -> int:
    """Canvas font size for a word whose ink should span ``extent`` pixels across (rendered larger, warped down)."""
    return int(np.clip(round(extent * 1.3 * supersample), 12, 192))


def word_alpha(
    word: str, polygon: Polygon, size: tuple[int, int], font: FontSpec, vertical_ratio: float = 1.5
) -> np.ndarray:
    """Float32 (H, W) coverage of ``word`` filling ``polygon``, clipped to the polygon mask."""
    quad = text_quad(polygon)
    along, across = quad_edges(quad)
    vertical = len(word.strip()) > 1 and across > vertical_ratio * along
    face = font.load(font_px_for(along if vertical else across))
    canvas = render_word_canvas(word, face, vertical=vertical)
    if canvas is None:
        return np.zeros(size, np.float32)
    return warp_canvas_to_quad(canvas, quad, size) * polygon_mask(polygon, size)


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated RGB colours (golden-ratio hue steps), deterministic."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85 if i % 2 == 0 else 1.0, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


# ---------------------------------------------------------------------------------------------- renderer


class GlyphRenderer:
    """Renders glyph controls with one font (plus fallbacks) and records the characters it could not draw."""

    def __init__(
        self,
        font: str | os.PathLike | FontSpec | None = None,
        fallback_fonts: Sequence[str | os.PathLike | FontSpec] | str | None = "auto",
        vertical_ratio: float = 1.5,
    ) -> None:
        """``fallback_fonts="auto"`` adds a system CJK font when one is installed; None or [] disables fallbacks."""
        self.font = resolve_font(font)
        if fallback_fonts == "auto":
            cjk = find_cjk_font()
            self.fallbacks = [cjk] if cjk is not None and cjk != self.font else []
        elif isinstance(fallback_fonts, str):
            raise ValueError(f"fallback_fonts must be 'auto', a list of fonts or None, got {fallback_fonts!r}")
        else:
            self.fallbacks = [resolve_font(f) for f in (fallback_fonts or [])]
        self.vertical_ratio = float(vertical_ratio)
        self.missing_chars: set[str] = set()  # everything this renderer could not draw, across calls

    def pick_font(self, word: str) -> tuple[FontSpec, list[str]]:
        """The first font (primary, then fallbacks) that draws every character, else the one missing fewest."""
        best, best_missing = self.font, missing_chars(self.font, word)
        for fb in self.fallbacks:
            if not best_missing:
                break
            miss = missing_chars(fb, word)
            if len(miss) < len(best_missing):
                best, best_missing = fb, miss
        return best, best_missing

    def render_with_missing(
        self, words: Sequence[str], polygons: Sequence[Polygon], size: tuple[int, int], colored: bool = False
    ) -> tuple[Image.Image, list[str]]:
        """The glyph control image and the characters no available font could draw (drawn as .notdef)."""
        h, w = _check_size(size)
        if len(words) != len(polygons):
            raise ValueError(f"words and polygons must have the same length, got {len(words)} and {len(polygons)}")
        missing: list[str] = []
        if colored:
            out = np.zeros((h, w, 3), np.float32)
            best = np.zeros((h, w), np.float32)
            colors = np.asarray(instance_colors(len(words)), np.float32)
        else:
            out = np.zeros((h, w), np.float32)
        for i, (word, poly) in enumerate(zip(words, polygons)):
            if not isinstance(word, str):
                raise ValueError(f"words[{i}] must be a str, got {type(word).__name__}")
            as_polygon(poly, f"polygons[{i}]")
            font, miss = self.pick_font(word)
            if miss:
                log.warning("glyph font %s cannot draw %r in word %r: drawn as .notdef boxes", font.name, miss, word)
                missing.extend(c for c in miss if c not in missing)
            alpha = word_alpha(word, poly, (h, w), font, self.vertical_ratio)
            if colored:
                sel = alpha > best
                best = np.where(sel, alpha, best)
                out[sel] = alpha[sel, None] * colors[i]
            else:
                np.maximum(out, alpha, out=out)
        self.missing_chars.update(missing)
        if colored:
            return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB"), missing
        return Image.fromarray(np.clip(np.round(out * 255), 0, 255).astype(np.uint8), "L"), missing

    def render(
        self, words: Sequence[str], polygons: Sequence[Polygon], size: tuple[int, int], colored: bool = False
    ) -> Image.Image:
        """The glyph control image (L, or RGB with one colour per instance when ``colored``)."""
        return self.render_with_missing(words, polygons, size, colored)[0]


@lru_cache(maxsize=16)
def _renderer(font: FontSpec) -> GlyphRenderer:
    return GlyphRenderer(font)


def render_glyph_control(
    words: Sequence[str],
    polygons: Sequence[Polygon],
    size: tuple[int, int],
    font: str | os.PathLike | FontSpec | None = None,
    colored: bool = False,
) -> Image.Image:
    """Draw each word white-on-black filling its polygon in an (H, W) image; missing glyphs are logged."""
    return _renderer(resolve_font(font)).render(words, polygons, size, colored)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise ValueError(f"size must be (H, W) with positive sides, got {size!r}")
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------------------------------------- other maps


def canny_control(image: Image.Image | np.ndarray, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of an RGB/L image as an L image (OpenCV, thresholds ``low``/``high``)."""
    arr = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    return Image.fromarray(cv2.Canny(arr, low, high), "L")


def load_condition(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Read a user condition map (normal, depth, segmentation, mask) fully into memory, as stored or as ``mode``."""
    with Image.open(path) as img:
        img.load()
        return img.convert(mode) if mode and img.mode != mode else img.copy()
