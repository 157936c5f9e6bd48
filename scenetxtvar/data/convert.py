"""Converters from user dataset formats into scenetxtvar shard sets (format: :mod:`scenetxtvar.data.shards`).

``python -m scenetxtvar.data.convert FORMAT --input PATH --out DIR [--conditions glyph ...]`` with FORMAT:

- ``infinitypilot``: a folder of ``{h_div_w}_{count}.jsonl`` buckets (or one .jsonl file), one JSON
  object per line with ``image_path``, ``long_caption``, ``normal_path`` (the *text mask*, stored as
  ``glyph.png`` after a channel-max to L), ``normal_map_path`` (stored as ``normal.png``), optional
  ``text`` (words) and ``h_div_w`` (ignored: the stored image's H/W is used). Other conditions come
  from ``{cond}_path`` fields. Relative paths are resolved against the jsonl's folder. Word polygons
  are recovered from the mask's connected components when their count matches the words; otherwise
  ``words``/``polygons`` are empty and the words are kept under ``meta["text"]``.
- ``anyword``: an AnyWord-3M style JSON (``{"data_root", "data_list": [{"img_name", "caption",
  "annotations": [{"polygon", "text", "language", "valid"}]}]}``); images under ``--image-root``
  (default: ``data_root``, relative to the JSON's folder). Annotations with ``valid: false``, no text
  or fewer than 4 points are dropped; the glyph control is rendered from the rest.
  ``--polygon-space 512`` rescales polygons from AnyText's 512x512 frame to the image.
- ``folder``: images ``NAME.{jpg,jpeg,png,webp}`` (NAME without dots) with ``NAME.txt`` captions and
  same-stem conditions ``NAME.{cond}.png`` beside them; ``glyph`` falls back to a render from
  ``NAME.json`` (``{"words": [...], "polygons": [...]}``, pixel coordinates) when there is no
  ``NAME.glyph.png``; that JSON, when present, also fills ``words``/``polygons``.

``canny`` is computed from the image for every format. Items that are missing, corrupt or
unreadable are skipped and listed with their reason in ``convert_report.json`` in the output folder.
Exit status: 0 all items converted, 3 some skipped, 2 usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from scenetxtvar.data.glyph import GlyphRenderer, canny_control
from scenetxtvar.data.shards import IMAGE_EXTS, MASK_CONDITIONS, ShardSetWriter, atomic_write_text, sanitize_name

log = logging.getLogger(__name__)

REPORT_NAME = "convert_report.json"
EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
FORMATS = ("infinitypilot", "anyword", "folder")
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_LANGS = {"latin": "en", "english": "en", "chinese": "zh", "japanese": "ja", "korean": "ko"}


class Skip(Exception):
    """An input item that cannot be converted: ``kind`` (a short category) and a detail."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class ConvertReport:
    """Counts and per-item reasons of one conversion (written as ``convert_report.json``)."""

    format: str
    input: str
    out: str
    num_items: int = 0
    num_written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def skip(self, item: str, err: Skip) -> None:
        """Record a skipped item."""
        self.skipped.append({"item": item, "kind": err.kind, "reason": str(err)})
        log.warning("skipped %s: %s", item, err)

    def warn(self, item: str, message: str) -> None:
        """Record a non-fatal problem with an item that was still written."""
        self.warnings.append({"item": item, "warning": message})

    @property
    def exit_code(self) -> int:
        """0 when every item was written, 3 when any was skipped."""
        return EXIT_SKIPPED if self.skipped else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: counts, skips by kind, the skipped items and warnings."""
        by_kind: dict[str, int] = {}
        for s in self.skipped:
            by_kind[s["kind"]] = by_kind.get(s["kind"], 0) + 1
        return {
            "format": self.format,
            "input": self.input,
            "out": self.out,
            "num_items": self.num_items,
            "num_written": self.num_written,
            "num_skipped": len(self.skipped),
            "skipped_by_kind": dict(sorted(by_kind.items())),
            "skipped": self.skipped,
            "num_warnings": len(self.warnings),
            "warnings": self.warnings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


# An item: (id for the report, builder returning the sample without its key; raises Skip).
Item = tuple[str, Callable[[], dict[str, Any]]]


# ---------------------------------------------------------------------------------------------- loading helpers


def load_image(path: str | os.PathLike, image_ext: str) -> tuple[Image.Image, bytes | None]:
    """The RGB image and, when the file is already an RGB ``image_ext``, its bytes to store unchanged."""
    path = Path(path)
    if not path.is_file():
        raise Skip("missing image", str(path))
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode = img.format, img.mode
            rgb = img.convert("RGB") if mode != "RGB" else img.copy()
    except Exception as e:
        raise Skip("unreadable image", f"{path}: {e}") from e
    if min(rgb.size) < 1:
        raise Skip("unreadable image", f"{path}: empty image")
    keep = data if _PIL_EXT.get(fmt or "") == image_ext and mode == "RGB" else None
    return rgb, keep


def load_condition_map(path: str | os.PathLike | None, name: str, size: tuple[int, int]) -> Image.Image:
    """Condition ``name`` from ``path`` at image ``size`` (W, H): masks to L by channel max, others RGB."""
    if path is None:
        raise Skip("missing condition", f"no {name} map for this item")
    path = Path(path)
    if not path.is_file():
        raise Skip("missing condition", f"{name}: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if name in MASK_CONDITIONS:
                arr = np.asarray(img.convert("RGB")).max(axis=2) if img.mode not in ("L", "1") else None
                out = Image.fromarray(arr, "L") if arr is not None else img.convert("L")
            else:
                out = img.convert("RGB")
    except Exception as e:
        raise Skip("unreadable condition", f"{name}: {path}: {e}") from e
    if out.size != size:
        (cw, ch), (w, h) = out.size, size
        if abs(ch / cw - h / w) > 0.01 * (h / w):
            raise Skip("condition size mismatch", f"{name} {out.size} vs image {size}: different aspect ratio")
        out = out.resize(size, Image.BILINEAR)
    return out


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's stripped content, or Skip."""
    if not path.is_file():
        raise Skip(f"missing {what}", str(path))
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"unreadable {what}", f"{path}: {e}") from e


def _meta(words: list[str], polygons: list, size: tuple[int, int], source: str, language: str, **extra) -> dict:
    w, h = size
    meta = {
        "words": words,
        "polygons": polygons,
        "language": language,
        "h_div_w": h / w,
        "source": source,
        "width": w,
        "height": h,
    }
    meta.update(extra)
    return meta


def _check_words_polygons(words: Any, polygons: Any) -> tuple[list[str], list[list[list[float]]]]:
    if not isinstance(words, list) or not isinstance(polygons, list) or len(words) != len(polygons):
        raise Skip("bad record", "words and polygons must be lists of the same length")
    out = []
    for w, p in zip(words, polygons):
        arr = np.asarray(p, dtype=np.float64) if isinstance(p, list) else None
        if not isinstance(w, str) or arr is None or arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 4:
            raise Skip("bad record", f"word {w!r} needs a str and >= 4 [x, y] points, got {p!r}")
        out.append(arr.tolist())
    return list(words), out


def polygons_from_mask(mask: Image.Image, num_words: int) -> list[list[list[float]]] | None:
    """One min-area quad per word blob of a text mask, in reading order; None unless there are ``num_words``."""
    arr = (np.asarray(mask) > 127).astype(np.uint8)
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(arr, connectivity=8)
    if n <= 1 or num_words < 1:
        return None
    heights = stats[1:, cv2.CC_STAT_HEIGHT]
    k = max(1, int(round(0.35 * float(np.median(heights)))))  # merge letters of a word, not separate words
    merged = cv2.dilate(arr, np.ones((max(1, k // 2), k), np.uint8))
    contours, _ = cv2.findContours(merged, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if cv2.contourArea(c) >= 4]
    if len(contours) != num_words:
        return None
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append((y + h / 2, x, h, [[float(px), float(py)] for px, py in _ordered_box(c)]))
    line_h = float(np.median([b[2] for b in boxes]))
    boxes.sort(key=lambda b: (round(b[0] / max(line_h, 1.0)), b[1]))
    return [b[3] for b in boxes]


def _ordered_box(contour: np.ndarray) -> np.ndarray:
    box = cv2.boxPoints(cv2.minAreaRect(contour))
    # TL, TR, BR, BL for roughly horizontal text: start at the top-left-most corner, clockwise.
    centre = box.mean(axis=0)
    angles = np.arctan2(box[:, 1] - centre[1], box[:, 0] - centre[0])
    box = box[np.argsort(angles)]  # clockwise on screen (y down), starting near -pi (left)
    start = int(np.argmin(box[:, 0] + box[:, 1]))
    return np.roll(box, -start, axis=0)


# ---------------------------------------------------------------------------------------------- formats


def infinitypilot_items(
    input_path: Path, conditions: Sequence[str], image_ext: str, report: ConvertReport, source: str
) -> Iterator[Item]:
    """Items of InfinityPilot jsonl buckets (``input_path``: a folder of them or one file)."""
    for jf in _jsonl_files(input_path):
        try:
            lines = jf.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            report.num_items += 1
            report.skip(jf.name, Skip("unreadable file", str(e)))
            continue
        lines = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
        declared = jf.stem.rsplit("_", 1)[-1]
        if declared.isdigit() and int(declared) != len(lines):
            report.warn(jf.name, f"bucket name says {int(declared)} samples, file has {len(lines)}")
        for lineno, line in lines:
            yield f"{jf.name}:{lineno}", _infinitypilot_builder(jf.parent, line, conditions, image_ext, source)


def _jsonl_files(input_path: Path) -> list[Path]:
    files = [input_path] if input_path.is_file() else sorted(input_path.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {input_path}")
    return files


def _infinitypilot_builder(
    root: Path, line: str, conditions: Sequence[str], image_ext: str, source: str
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Skip("bad record", f"invalid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise Skip("bad record", "line is not a JSON object")
        for k in ("image_path", "long_caption"):
            if not isinstance(rec.get(k), str) or not rec[k]:
                raise Skip("bad record", f"missing field {k!r}")

        def resolve(p: Any) -> Path | None:
            return None if not isinstance(p, str) or not p else (root / p if not os.path.isabs(p) else Path(p))

        image, raw = load_image(resolve(rec["image_path"]), image_ext)
        sample: dict[str, Any] = {"image": raw if raw is not None else image, "caption": rec["long_caption"]}
        fields = {"glyph": "normal_path", "normal": "normal_map_path"}
        for cond in conditions:
            if cond == "canny":
                sample[cond] = canny_control(image)
            else:
                sample[cond] = load_condition_map(resolve(rec.get(fields.get(cond, f"{cond}_path"))), cond, image.size)
        text = rec.get("text")
        words = text if isinstance(text, list) else (str(text).split() if text else [])
        words = [str(w) for w in words]
        polys = polygons_from_mask(sample["glyph"], len(words)) if "glyph" in sample and words else None
        extra = {"orig_image": rec["image_path"]}
        if polys is None and words:
            extra["text"] = words
        sample["meta"] = _meta(words if polys else [], polys or [], image.size, source, "en", **extra)
        return sample

    return build


def load_anyword_json(json_path: Path) -> dict[str, Any]:
    """The parsed AnyWord JSON; ValueError when it is unreadable or lacks ``data_list``."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read AnyWord JSON {json_path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
        raise ValueError(f"{json_path}: expected {{'data_root': ..., 'data_list': [...]}}")
    return data


def anyword_items(
    json_path: Path,
    data: dict[str, Any],
    image_root: Path | None,
    conditions: Sequence[str],
    image_ext: str,
    report: ConvertReport,
    source: str,
    polygon_space: str,
    renderer: GlyphRenderer,
) -> Iterator[Item]:
    """Items of an AnyWord-3M style annotation JSON (already parsed as ``data``)."""
    if image_root is None:
        root = data.get("data_root") or "."
        image_root = Path(root) if os.path.isabs(root) else json_path.parent / root
    for i, rec in enumerate(data["data_list"]):
        name = rec.get("img_name") if isinstance(rec, dict) else None
        item = f"{i}:{name}" if name else str(i)
        yield item, _anyword_builder(rec, image_root, conditions, image_ext, source, polygon_space, renderer, report)


def _language(langs: list[str]) -> str:
    codes = sorted({_LANGS.get(str(lg).lower(), str(lg).lower()) for lg in langs})
    return codes[0] if len(codes) == 1 else ("none" if not codes else "mixed")


def _anyword_builder(
    rec: Any,
    image_root: Path,
    conditions: Sequence[str],
    image_ext: str,
    source: str,
    polygon_space: str,
    renderer: GlyphRenderer,
    report: ConvertReport,
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if not isinstance(rec, dict) or not isinstance(rec.get("img_name"), str):
            raise Skip("bad record", "entry without 'img_name'")
        anns = rec.get("annotations", [])
        if not isinstance(anns, list):
            raise Skip("bad record", "'annotations' is not a list")
        image, raw = load_image(image_root / rec["img_name"], image_ext)
        w, h = image.size
        scale = np.array([w / 512.0, h / 512.0]) if polygon_space == "512" else np.ones(2)
        words, polys, langs, dropped = [], [], [], 0
        for ann in anns:
            poly = ann.get("polygon") if isinstance(ann, dict) else None
            text = ann.get("text") if isinstance(ann, dict) else None
            try:
                arr = np.asarray(poly, dtype=np.float64)
            except (TypeError, ValueError):
                arr = np.zeros((0, 2))
            if not ann.get("valid", True) or not isinstance(text, str) or not text.strip() or arr.ndim != 2:
                dropped += 1
                continue
            if arr.shape[1] != 2 or len(arr) < 4 or not np.isfinite(arr).all():
                dropped += 1
                continue
            arr = np.clip(arr * scale, 0, [w, h])
            words.append(text)
            polys.append(arr.round(2).tolist())
            langs.append(ann.get("language", "unknown"))
        sample: dict[str, Any] = {
            "image": raw if raw is not None else image,
            "caption": str(rec.get("caption", "")).replace("*", " ").strip(),
        }
        for cond in conditions:
            if cond == "glyph":
                glyph, missing = renderer.render_with_missing(words, polys, (h, w))
                if missing:
                    report.warn(rec["img_name"], f"glyph font cannot draw {''.join(missing)!r}")
                sample["glyph"] = glyph
            elif cond == "canny":
                sample["canny"] = canny_control(image)
        extra = {"orig_image": rec["img_name"], "dropped_annotations": dropped}
        if "wm_score" in rec:
            extra["wm_score"] = rec["wm_score"]
        sample["meta"] = _meta(words, polys, image.size, source, _language(langs), **extra)
        return sample

    return build


def folder_items(
    input_dir: Path, conditions: Sequence[str], image_ext: str, source: str, renderer: GlyphRenderer
) -> Iterator[Item]:
    """Items of a plain folder: ``NAME.ext`` + ``NAME.txt`` + ``NAME.{cond}.png`` (+ optional ``NAME.json``)."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    images = sorted(
        p for p in input_dir.iterdir() if p.suffix.lower() in FOLDER_IMAGE_EXTS and "." not in p.stem and p.is_file()
    )
    for img_path in images:
        yield img_path.name, _folder_builder(img_path, conditions, image_ext, source, renderer)


def _folder_builder(
    img_path: Path, conditions: Sequence[str], image_ext: str, source: str, renderer: GlyphRenderer
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        stem, folder = img_path.stem, img_path.parent
        caption = read_text(folder / f"{stem}.txt", "caption")
        image, raw = load_image(img_path, image_ext)
        words: list[str] = []
        polys: list = []
        meta_file = folder / f"{stem}.json"
        if meta_file.is_file():
            try:
                rec = json.loads(meta_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Skip("bad record", f"{meta_file}: {e}") from e
            if not isinstance(rec, dict):
                raise Skip("bad record", f"{meta_file}: not a JSON object")
            words, polys = _check_words_polygons(rec.get("words", []), rec.get("polygons", []))
        sample: dict[str, Any] = {"image": raw if raw is not None else image, "caption": caption}
        for cond in conditions:
            cond_file = folder / f"{stem}.{cond}.png"
            if cond == "canny" and not cond_file.exists():
                sample[cond] = canny_control(image)
            elif cond == "glyph" and not cond_file.exists() and meta_file.is_file():
                sample[cond] = renderer.render(words, polys, (image.size[1], image.size[0]))
            else:
                sample[cond] = load_condition_map(cond_file, cond, image.size)
        sample["meta"] = _meta(words, polys, image.size, source, "en", orig_image=img_path.name)
        return sample

    return build


# ---------------------------------------------------------------------------------------------- driver


def write_items(
    items: Iterator[Item],
    out_dir: str | os.PathLike,
    report: ConvertReport,
    conditions: Sequence[str],
    image_ext: str,
    source: str,
    generator: dict[str, Any],
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Build every item into a shard set (skips recorded in ``report``), then write the report atomically."""
    out = Path(out_dir)
    with (
        ShardSetWriter(
            out,
            conditions=list(conditions),
            image_ext=image_ext,
            prefix=source,
            maxcount=shard_size,
            source=source,
            generator=generator,
            overwrite=overwrite,
        ) as writer,
        tqdm(desc=f"convert {report.format}", unit="item", disable=not progress) as bar,
    ):
        for item_id, build in items:
            ordinal = report.num_items
            report.num_items += 1
            bar.update(1)
            try:
                sample = build()
            except Skip as e:
                report.skip(item_id, e)
                continue
            sample["__key__"] = f"{source}_{ordinal:08d}"
            try:
                writer.add(sample)
            except ValueError as e:  # a sample the shard format rejects is bad data, not a usage error
                report.skip(item_id, Skip("invalid sample", str(e)))
                continue
            report.num_written += 1
    atomic_write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    log.info(
        "%s: %d of %d items written, %d skipped (report: %s)",
        report.format,
        report.num_written,
        report.num_items,
        len(report.skipped),
        out / REPORT_NAME,
    )
    return report


def _check_common(conditions: Sequence[str], image_ext: str, allowed: Sequence[str] | None = None) -> list[str]:
    conditions = list(conditions)
    if not conditions:
        raise ValueError("at least one condition is required")
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    if allowed is not None:
        bad = [c for c in conditions if c not in allowed]
        if bad:
            raise ValueError(f"conditions {bad} are not available for this format (available: {list(allowed)})")
    return conditions


def convert_infinitypilot(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    conditions: Sequence[str] = ("glyph",),
    image_ext: str = "jpg",
    source: str = "infinitypilot",
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert InfinityPilot jsonl buckets (a folder or one file) into a shard set."""
    conditions = _check_common(conditions, image_ext)
    source = sanitize_name(source)
    inp = Path(input_path)
    if not inp.exists():
        raise FileNotFoundError(f"input not found: {inp}")
    report = ConvertReport("infinitypilot", str(inp), str(out_dir))
    gen = {"name": "scenetxtvar.data.convert", "format": "infinitypilot", "input": str(inp)}
    _jsonl_files(inp)  # fail before the output folder is touched
    items = infinitypilot_items(inp, conditions, image_ext, report, source)
    return write_items(items, out_dir, report, conditions, image_ext, source, gen, shard_size, overwrite, progress)


def convert_anyword(
    json_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    conditions: Sequence[str] = ("glyph",),
    image_ext: str = "jpg",
    source: str = "anyword",
    polygon_space: str = "image",
    font: str | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert an AnyWord-3M style JSON + image root into a shard set with rendered glyph controls."""
    conditions = _check_common(conditions, image_ext, ("glyph", "canny"))
    if polygon_space not in ("image", "512"):
        raise ValueError(f"polygon_space must be 'image' or '512', got {polygon_space!r}")
    source = sanitize_name(source)
    jp = Path(json_path)
    if not jp.is_file():
        raise FileNotFoundError(f"AnyWord JSON not found: {jp}")
    renderer = GlyphRenderer(font)
    report = ConvertReport("anyword", str(jp), str(out_dir))
    gen = {
        "name": "scenetxtvar.data.convert",
        "format": "anyword",
        "input": str(jp),
        "image_root": str(image_root) if image_root else None,
        "polygon_space": polygon_space,
        "glyph_font": renderer.font.name,
    }
    root = Path(image_root) if image_root else None
    data = load_anyword_json(jp)
    items = anyword_items(jp, data, root, conditions, image_ext, report, source, polygon_space, renderer)
    return write_items(items, out_dir, report, conditions, image_ext, source, gen, shard_size, overwrite, progress)


def convert_folder(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    conditions: Sequence[str] = ("glyph",),
    image_ext: str = "jpg",
    source: str = "folder",
    font: str | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert a folder of ``NAME.ext`` images with ``NAME.txt`` captions and ``NAME.{cond}.png`` maps."""
    conditions = _check_common(conditions, image_ext)
    source = sanitize_name(source)
    inp = Path(input_dir)
    if not inp.is_dir():
        raise FileNotFoundError(f"input folder not found: {inp}")
    renderer = GlyphRenderer(font)
    report = ConvertReport("folder", str(inp), str(out_dir))
    gen = {"name": "scenetxtvar.data.convert", "format": "folder", "input": str(inp), "glyph_font": renderer.font.name}
    items = folder_items(inp, conditions, image_ext, source, renderer)
    return write_items(items, out_dir, report, conditions, image_ext, source, gen, shard_size, overwrite, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns 0 (all converted), 3 (some items skipped) or 2 (usage error)."""
    ap = argparse.ArgumentParser(
        prog="python -m scenetxtvar.data.convert",
        description="Convert a dataset into scenetxtvar webdataset shards.",
        epilog="exit status: 0 all items converted, 3 some skipped (see convert_report.json), 2 usage error",
    )
    ap.add_argument("format", choices=FORMATS)
    ap.add_argument("--input", required=True, help="jsonl folder/file, AnyWord JSON, or image folder")
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--conditions", nargs="+", default=["glyph"], help="condition maps to store (default: glyph)")
    ap.add_argument("--image-ext", default="jpg", choices=IMAGE_EXTS, help="stored image format")
    ap.add_argument("--image-root", default=None, help="anyword: image folder (default: the JSON's data_root)")
    ap.add_argument("--polygon-space", default="image", choices=("image", "512"), help="anyword polygon frame")
    ap.add_argument("--font", default=None, help="glyph font file for rendered glyphs (default: DejaVu Sans)")
    ap.add_argument("--source", default=None, help="source name in keys and meta (default: the format)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = {
        "conditions": args.conditions,
        "image_ext": args.image_ext,
        "source": args.source or args.format,
        "shard_size": args.shard_size,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
    try:
        if args.format == "infinitypilot":
            report = convert_infinitypilot(args.input, args.out, **common)
        elif args.format == "anyword":
            report = convert_anyword(
                args.input, args.out, args.image_root, polygon_space=args.polygon_space, font=args.font, **common
            )
        else:
            report = convert_folder(args.input, args.out, font=args.font, **common)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
