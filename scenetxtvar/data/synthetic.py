"""Synthetic scene-text images: the project's embedded default dataset (demo, tests, smoke runs).

Each sample has 1-3 words from the built-in word list on a generated background (gradient, noise
texture, random shapes, or a crop of a user photo), each word in its own font, size, colour (chosen
for contrast, on a plate when the background is busy), with a small rotation and mild perspective;
words never overlap. The glyph control is the exact coverage of the drawn text (same canvas, same
warp, same polygon clip), so it coincides with the text in the image pixel for pixel; pass
``glyph_font`` to render it instead with one control font from the recorded polygons.

Sample ``i`` depends only on ``(seed, i)``: shards are byte-identical whatever the number of workers.

CLI: ``python -m scenetxtvar.data.synthetic --out DIR --num N --size 256 --seed S [--workers W]``
``[--shard-size K] [--min-words 1 --max-words 3] [--conditions glyph canny] [--backgrounds DIR]``
``[--background-kinds gradient noise shapes]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from scenetxtvar.data.glyph import (
    FontSpec,
    canny_control,
    find_font_file,
    font_px_for,
    polygon_mask,
    render_glyph_control,
    render_word_canvas,
    warp_canvas_to_quad,
)
from scenetxtvar.data.shards import ShardSetWriter, encode_sample
from scenetxtvar.data.words import sample_word

log = logging.getLogger(__name__)

SOURCE = "synthetic"
SUPPORTED_CONDITIONS = ("glyph", "canny")
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Scene fonts, when installed (Debian fonts-dejavu / fonts-liberation); Pillow's built-in font is always added.
SCENE_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono-Bold.ttf",
    "LiberationSans-Regular.ttf",
    "LiberationSans-Bold.ttf",
    "LiberationSerif-Regular.ttf",
)
BACKGROUND_KINDS = ("gradient", "noise", "shapes")
_BG_WORDS = {"gradient": "gradient", "noise": "textured", "shapes": "colorful abstract", "photo": "photographic"}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a street sign that says {words}",
    "a sign reading {words}",
    "a poster with the text {words}",
    "scene text {words} on a {bg} background",
    "a photo of a sign with {words} written on it",
    "a label that reads {words}",
    "an advertisement showing {words}",
    "a shop banner with the lettering {words}",
    "text that reads {words}, {bg} background",
    "a billboard that says {words}",
    "a {bg} wall with {words} painted on it",
    "a storefront sign reading {words}",
)
MIN_TEXT_PX = 12  # no word is drawn with ink shorter than this
LAYOUT_ATTEMPTS = 8  # fresh layouts tried before a scene that cannot hold min_words raises


def parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """``256`` -> (256, 256); ``"64x128"`` -> (H=64, W=128); an (H, W) pair passes through."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must be N or HxW (e.g. 256 or 64x128), got {size!r}")
        hw = (int(parts[0]), int(parts[-1]))
    elif isinstance(size, int):
        hw = (size, size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be N, 'HxW' or (H, W), got {size!r}")
        hw = (int(size[0]), int(size[1]))
    if min(hw) < 32:
        raise ValueError(f"image sides must be >= 32 pixels, got {hw}")
    return hw


def scene_fonts() -> list[FontSpec]:
    """Fonts the generator draws with: installed DejaVu/Liberation faces plus Pillow's built-in font."""
    found = [FontSpec(p) for p in (find_font_file(n) for n in SCENE_FONT_FILES) if p]
    return [*found, FontSpec(None)]


def list_photos(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive, sorted) for photo backgrounds."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"background folder not found: {root}")
    photos = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in PHOTO_EXTS)
    if not photos:
        raise FileNotFoundError(f"no images ({', '.join(PHOTO_EXTS)}) under {root}")
    return photos


# ---------------------------------------------------------------------------------------------- colour


def luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of sRGB values in [0, 1] (last axis = RGB)."""
    c = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


def contrast_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """WCAG contrast ratio (1..21) between two sRGB colours in [0, 1]."""
    la, lb = float(luminance(np.asarray(a))), float(luminance(np.asarray(b)))
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def contrasting_color(rng: np.random.Generator, bg: np.ndarray, min_ratio: float = 4.5) -> np.ndarray:
    """A random colour pushed towards black or white until its contrast with ``bg`` reaches ``min_ratio``."""
    color = rng.random(3)
    target = np.zeros(3) if float(luminance(bg)) > 0.18 else np.ones(3)
    for t in np.linspace(0.0, 1.0, 21):
        mixed = (1 - t) * color + t * target
        if contrast_ratio(mixed, bg) >= min_ratio:
            return mixed
    return target


# ---------------------------------------------------------------------------------------------- backgrounds


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = _random_color(rng), _random_color(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.7:
        ang = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(ang) + yy * np.sin(ang)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.hypot(xx - cx, yy - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (1 - t)[..., None] * c1 + t[..., None] * c2


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cells = int(rng.integers(3, 12))
    base = _random_color(rng)
    coarse = base + rng.normal(0, rng.uniform(0.08, 0.3), (cells, cells, 3))
    img = cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, rng.uniform(0.0, 0.06), (h, w, 3)).astype(np.float32)
    return img


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = (_random_color(rng) * 255).astype(np.uint8)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img, "RGBA")
    s = max(h, w)
    for _ in range(int(rng.integers(4, 14))):
        color = (*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(80, 256)))
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * s, y0 + rng.uniform(0.1, 0.6) * s
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == 2:
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, max(2, s // 24))))
        else:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=color)
    return np.asarray(img, np.float32) / 255.0


def _photo(rng: np.random.Generator, h: int, w: int, path: str) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
    pw, ph = im.size
    scale = max(w / pw, h / ph) * rng.uniform(1.0, 1.6)
    im = im.resize((max(w, round(pw * scale)), max(h, round(ph * scale))), Image.BILINEAR)
    x = int(rng.integers(0, im.size[0] - w + 1))
    y = int(rng.integers(0, im.size[1] - h + 1))
    return np.asarray(im.crop((x, y, x + w, y + h)), np.float32) / 255.0


def check_background_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    """The generated background kinds to draw from (all of ``BACKGROUND_KINDS`` for None); bad names raise."""
    if kinds is None:
        return BACKGROUND_KINDS
    kinds = tuple(str(k) for k in kinds)
    bad = [k for k in kinds if k not in BACKGROUND_KINDS]
    if bad or not kinds:
        raise ValueError(f"background kinds must be a non-empty subset of {BACKGROUND_KINDS}, got {list(kinds)}")
    return kinds


def make_background(
    rng: np.random.Generator,
    size: tuple[int, int],
    photos: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """A float32 (H, W, 3) background in [0, 1] and its kind (gradient / noise / shapes / photo).

    ``kinds`` restricts the generated kinds (default: all); photos, when given, are one more kind.
    """
    h, w = size
    generated = list(check_background_kinds(kinds))
    kinds = [*generated, "photo"] if photos else generated
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "photo":
        path = photos[int(rng.integers(len(photos)))]
        try:
            return np.clip(_photo(rng, h, w, path), 0, 1), kind
        except Exception as e:  # an unreadable photo falls back to a gradient, loudly
            log.warning("background photo %s unreadable (%s): using a gradient", path, e)
            kind = "gradient"
    img = {"gradient": _gradient, "noise": _noise, "shapes": _shapes}[kind](rng, h, w)
    return np.clip(img, 0, 1).astype(np.float32), kind


# ---------------------------------------------------------------------------------------------- layout


def _quad_from_canvas(matrix: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    pts = np.c_[rect, np.ones(4)] @ matrix.T
    return pts[:, :2] / pts[:, 2:]


def _place_word(
    rng: np.random.Generator,
    canvas: np.ndarray,
    text_h: float,
    size: tuple[int, int],
    occupied: np.ndarray,
    tries: int = 30,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Find a quad for a word canvas: (quad, plate quad) in image pixels, not touching ``occupied``; None if no room."""
    h, w = size
    ch, cw = canvas.shape
    aspect = cw / ch
    margin = 2.0
    for attempt in range(tries):
        th = text_h * (0.88 ** (attempt // 6))
        tw = th * aspect
        if tw > 0.94 * w - 2 * margin:
            tw = 0.94 * w - 2 * margin
            th = tw / aspect
        if th < MIN_TEXT_PX:
            return None
        ang = np.deg2rad(rng.uniform(-12, 12) if rng.random() < 0.5 else rng.uniform(-3, 3))
        persp = rng.uniform(0.0, 0.12) * th
        rect = np.array([[-tw / 2, -th / 2], [tw / 2, -th / 2], [tw / 2, th / 2], [-tw / 2, th / 2]])
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        quad = rect @ rot.T + rng.uniform(-persp, persp, (4, 2))
        lo, hi = quad.min(axis=0), quad.max(axis=0)
        ext = hi - lo
        if ext[0] > w - 2 * margin or ext[1] > h - 2 * margin:
            continue
        offset = np.array(
            [rng.uniform(margin - lo[0], w - margin - hi[0]), rng.uniform(margin - lo[1], h - margin - hi[1])]
        )
        quad = quad + offset
        # Plate / keep-out zone: the canvas rectangle grown by a fraction of the text height, same perspective.
        src = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32)
        matrix = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
        pad = 0.28 * ch
        plate = _quad_from_canvas(matrix, -pad * 1.2, -pad, cw + pad * 1.2, ch + pad)
        plate = np.clip(plate, 0, [w, h])
        if (polygon_mask(plate, size) & occupied).any():
            continue
        return quad, plate
    return None


def _layout(
    rng: np.random.Generator,
    size: tuple[int, int],
    fonts: Sequence[FontSpec],
    n_words: int,
    lo_px: float,
    hi_px: float,
) -> list[dict[str, Any]]:
    """Draw words, fonts, sizes and non-overlapping quads; shorter words are tried after each misfit."""
    occupied = np.zeros(size, np.uint8)
    placed: list[dict[str, Any]] = []
    max_len = 12
    for _ in range(6 * n_words):  # word draws; a word that finds no room is replaced by a shorter one
        if len(placed) == n_words:
            break
        word = sample_word(rng, max_len=max_len)
        font = fonts[int(rng.integers(len(fonts)))]
        text_h = rng.uniform(lo_px, hi_px)
        canvas = render_word_canvas(word, font.load(font_px_for(text_h)))
        spot = None if canvas is None else _place_word(rng, canvas, text_h, size, occupied)
        if spot is None:
            max_len = max(2, min(max_len, len(word)) - 2)
            continue
        quad, plate = spot
        occupied |= polygon_mask(plate, size)
        placed.append({"word": word, "font": font, "canvas": canvas, "quad": quad, "plate": plate})
    return placed


def _caption(rng: np.random.Generator, words: Sequence[str], bg: str) -> str:
    quoted = [f'"{w}"' for w in words]
    joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(words=joined, bg=_BG_WORDS[bg])


def make_scene(
    rng_seed: int,
    index: int,
    size: int | str | Sequence[int] = 256,
    min_words: int = 1,
    max_words: int = 3,
    conditions: Sequence[str] = ("glyph",),
    fonts: Sequence[FontSpec] | None = None,
    photos: Sequence[str] | None = None,
    glyph_font: str | os.PathLike | FontSpec | None = None,
    background_kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Scene ``index`` of seed ``rng_seed``: ``dict(image=PIL RGB, glyph=PIL L, caption=str, meta=dict, ...)``.

    Extra conditions (``canny``) are added under their names; ``background_kinds`` restricts the generated
    backgrounds (e.g. ``["gradient"]``). Deterministic in (rng_seed, index, args).
    """
    h, w = parse_size(size)
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    bad = [c for c in conditions if c not in SUPPORTED_CONDITIONS]
    if bad:
        raise ValueError(f"synthetic scenes support conditions {SUPPORTED_CONDITIONS}, got {bad}")
    if rng_seed < 0 or index < 0:
        raise ValueError(f"rng_seed and index must be >= 0, got {rng_seed}, {index}")
    fonts = list(fonts) if fonts else scene_fonts()
    rng = np.random.default_rng([rng_seed, index])

    img, bg_kind = make_background(rng, (h, w), photos, background_kinds)
    n_words = int(rng.integers(min_words, max_words + 1))
    short = min(h, w)
    lo_px = max(MIN_TEXT_PX + 2, 0.075 * short)
    hi_px = max(lo_px + 2, min(0.45, 0.55 / n_words) * short)

    for _attempt in range(LAYOUT_ATTEMPTS):  # the RNG stream goes on, so retries stay deterministic
        placed = _layout(rng, (h, w), fonts, n_words, lo_px, hi_px)
        if len(placed) >= min_words:
            break
    else:
        raise RuntimeError(
            f"scene {rng_seed}/{index}: could not place {min_words} words in {h}x{w} "
            f"after {LAYOUT_ATTEMPTS} layouts; use a larger size or fewer --min-words"
        )

    glyph = np.zeros((h, w), np.float32)
    colors = []
    for p in placed:
        region = polygon_mask(p["plate"], (h, w)).astype(bool)
        pixels = img[region]
        mean = pixels.mean(axis=0)
        lum = luminance(pixels)
        lo_lum, hi_lum = np.percentile(lum, [5, 95])
        busy = float(lum.std()) > 0.07 or (hi_lum + 0.05) / (lo_lum + 0.05) > 2.5
        if busy or rng.random() < 0.2:  # a sign plate behind the word
            plate_color = _random_color(rng)
            plate_mask = polygon_mask(p["plate"], (h, w)).astype(np.float32)
            img = img * (1 - plate_mask[..., None]) + plate_mask[..., None] * plate_color
            mean = plate_color
        color = contrasting_color(rng, mean)
        alpha = warp_canvas_to_quad(p["canvas"], p["quad"], (h, w)) * polygon_mask(p["quad"], (h, w))
        img = img * (1 - alpha[..., None]) + alpha[..., None] * color
        np.maximum(glyph, alpha, out=glyph)
        colors.append([int(round(c * 255)) for c in color])

    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.7))
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.004, 0.015), img.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8), "RGB")

    words = [p["word"] for p in placed]
    polygons = [[[round(float(x), 3), round(float(y), 3)] for x, y in p["quad"]] for p in placed]
    meta = {
        "words": words,
        "polygons": polygons,
        "language": "en",
        "h_div_w": h / w,
        "source": SOURCE,
        "width": w,
        "height": h,
        "fonts": [p["font"].name for p in placed],
        "colors": colors,
        "background": bg_kind,
        "seed": int(rng_seed),
        "index": int(index),
    }
    out: dict[str, Any] = {"image": image, "caption": _caption(rng, words, bg_kind), "meta": meta}
    if glyph_font is None:
        out["glyph"] = Image.fromarray(np.clip(np.round(glyph * 255), 0, 255).astype(np.uint8), "L")
    else:
        out["glyph"] = render_glyph_control(words, polygons, (h, w), font=glyph_font)
    if "canny" in conditions:
        out["canny"] = canny_control(image)
    return out


def sample_key(index: int, source: str = SOURCE) -> str:
    """Webdataset key of sample ``index``: ``{source}_{index:08d}``."""
    return f"{source}_{index:08d}"


def _encode_chunk(task: tuple[int, int, dict[str, Any]]) -> list[dict[str, Any]]:
    start, stop, params = task
    conditions = params["conditions"]
    out = []
    for i in range(start, stop):
        scene = make_scene(
            params["seed"],
            i,
            params["size"],
            params["min_words"],
            params["max_words"],
            conditions,
            params["fonts"],
            params["photos"],
            params["glyph_font"],
            params["background_kinds"],
        )
        scene["__key__"] = sample_key(i)
        out.append(encode_sample(scene, conditions, params["image_ext"]))
    return out


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV threads would only oversubscribe


def generate_synthetic_shards(
    out_dir: str | os.PathLike,
    num: int,
    size: int | str | Sequence[int] = 256,
    seed: int = 0,
    workers: int = 0,
    shard_size: int = 1000,
    min_words: int = 1,
    max_words: int = 3,
    conditions: Sequence[str] = ("glyph",),
    image_ext: str = "png",
    backgrounds: str | os.PathLike | None = None,
    glyph_font: str | None = None,
    chunk_size: int = 8,
    background_kinds: Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate ``num`` synthetic scenes into webdataset shards + manifest in ``out_dir``; returns the manifest.

    ``workers=0`` generates in-process; ``workers>0`` uses a spawn process pool over chunks of
    ``chunk_size`` indices, written in index order (same bytes for any ``workers``).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    hw = parse_size(size)
    conditions = list(conditions)
    if "glyph" not in conditions:
        conditions.insert(0, "glyph")
    bad = [c for c in conditions if c not in SUPPORTED_CONDITIONS]
    if bad:
        raise ValueError(f"synthetic scenes support conditions {SUPPORTED_CONDITIONS}, got {bad}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    kinds = list(check_background_kinds(background_kinds))
    fonts = scene_fonts()
    photos = list_photos(backgrounds) if backgrounds else None
    params = {
        "seed": int(seed),
        "size": hw,
        "min_words": int(min_words),
        "max_words": int(max_words),
        "conditions": conditions,
        "fonts": fonts,
        "photos": photos,
        "glyph_font": glyph_font,
        "image_ext": image_ext,
        "background_kinds": kinds,
    }
    generator = {
        "name": "scenetxtvar.data.synthetic",
        "num": int(num),
        "size": list(hw),
        "seed": int(seed),
        "min_words": int(min_words),
        "max_words": int(max_words),
        "fonts": [f.name for f in fonts],
        "backgrounds": os.fspath(backgrounds) if backgrounds else None,
        "num_photos": len(photos) if photos else 0,
        "background_kinds": kinds,
        "glyph_font": glyph_font,
        "glyph": "exact text coverage" if glyph_font is None else "rendered from polygons",
    }
    tasks = [(s, min(s + chunk_size, num), params) for s in range(0, num, chunk_size)]
    with (
        ShardSetWriter(
            out_dir,
            conditions=conditions,
            image_ext=image_ext,
            prefix=SOURCE,
            maxcount=shard_size,
            source=SOURCE,
            generator=generator,
            overwrite=overwrite,
        ) as writer,
        tqdm(total=num, desc="synthetic", unit="img", disable=not progress) as bar,
    ):
        if workers == 0:
            results = map(_encode_chunk, tasks)
            pool = None
        else:
            # Workers unpickle functions by module name: use the importable module even under `python -m`.
            from scenetxtvar.data import synthetic as module

            pool = mp.get_context("spawn").Pool(workers, initializer=module._init_worker)
            results = pool.imap(module._encode_chunk, tasks)
        try:
            for chunk in results:
                for sample in chunk:
                    writer.add(sample)
                bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    assert writer.manifest is not None
    return writer.manifest


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate synthetic shards; exit 0 on success, 2 on bad arguments."""
    ap = argparse.ArgumentParser(prog="python -m scenetxtvar.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--num", type=int, required=True, help="number of samples")
    ap.add_argument("--size", default="256", help="N (square) or HxW, e.g. 64x128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = in-process)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--min-words", type=int, default=1)
    ap.add_argument("--max-words", type=int, default=3)
    ap.add_argument("--conditions", nargs="+", default=["glyph"], choices=SUPPORTED_CONDITIONS)
    ap.add_argument("--image-ext", default="png", choices=("png", "jpg", "webp"))
    ap.add_argument("--backgrounds", default=None, help="folder of photos to use as backgrounds too")
    ap.add_argument(
        "--background-kinds", nargs="+", default=None, choices=BACKGROUND_KINDS, help="generated backgrounds to use"
    )
    ap.add_argument("--glyph-font", default=None, help="render glyph controls with this font instead of exact coverage")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = generate_synthetic_shards(
            args.out,
            args.num,
            args.size,
            args.seed,
            args.workers,
            args.shard_size,
            args.min_words,
            args.max_words,
            args.conditions,
            args.image_ext,
            args.backgrounds,
            args.glyph_font,
            args.chunk_size,
            background_kinds=args.background_kinds,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    shards, templates = len(manifest["shards"]), manifest["templates"]
    log.info("%d samples, %d shards, templates %s", manifest["num_samples"], shards, templates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
