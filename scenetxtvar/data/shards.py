"""Webdataset shard sets: atomic shard writing, a manifest, and shard listing.

A shard set is one directory holding ``{prefix}-{index:06d}.tar`` shards and ``manifest.json``.
Each sample in a shard has these members (webdataset splits the key at the first dot):

- ``{key}.{png|jpg|webp}``: the RGB image;
- ``{key}.{cond}.png`` per condition: ``glyph`` is a single-channel L mask (white text on black),
  every other condition (``normal``, ``canny``, ...) is RGB, all at the image's size;
- ``{key}.txt``: the caption (UTF-8);
- ``{key}.json``: ``{"words", "polygons", "language", "h_div_w", "source", "width", "height", ...}``
  with polygons in pixel coordinates of the stored image (see :mod:`scenetxtvar.data.glyph`).

Shards are written under ``{name}.partial`` and renamed when complete (after fsync), and the
manifest is written last (temp + fsync + rename), so a directory with a manifest is complete and
an interrupted write leaves no ``.tar`` that looks whole.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from scenetxtvar.scales import nearest_template

log = logging.getLogger(__name__)

SHARD_FORMAT = "scenetxtvar-shards/1"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = ("png", "jpg", "webp")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",), "webp": (b"RIFF",)}
MASK_CONDITIONS = frozenset({"glyph"})  # stored single-channel (L); all other conditions RGB
META_KEYS = ("words", "polygons", "language", "h_div_w", "source", "width", "height")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 encodes ~2.5x faster than 6 for ~15% larger files


def template_key(h_div_w: float) -> str:
    """Manifest key of the official h/w template nearest ``h_div_w`` (``"%.3f"``, e.g. ``"0.500"``)."""
    return f"{nearest_template(h_div_w):.3f}"


def sanitize_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (safe in keys and file names)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def encode_image(img: Image.Image, ext: str, mode: str = "RGB", quality: int = 95) -> bytes:
    """Encode a PIL image as ``ext`` (png/jpg/webp) in ``mode``; PNG output is byte-deterministic."""
    if ext not in _PIL_FORMATS:
        raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
    if img.mode != mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        img.save(buf, _PIL_FORMATS[ext], quality=quality)
    return buf.getvalue()


def _check_meta(meta: Any, key: str) -> dict:
    if not isinstance(meta, Mapping):
        raise ValueError(f"sample {key}: meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: meta lacks {missing} (required: {list(META_KEYS)})")
    words, polys = meta["words"], meta["polygons"]
    if len(words) != len(polys):
        raise ValueError(f"sample {key}: {len(words)} words but {len(polys)} polygons")
    for i, p in enumerate(polys):
        if len(p) < 4 or any(len(pt) != 2 for pt in p):
            raise ValueError(f"sample {key}: polygons[{i}] must have >= 4 [x, y] points, got {p!r}")
    w, h = int(meta["width"]), int(meta["height"])
    if abs(float(meta["h_div_w"]) - h / w) > 1e-6:
        raise ValueError(f"sample {key}: h_div_w {meta['h_div_w']} != height/width = {h}/{w}")
    return dict(meta)


def _image_size(data: Image.Image | bytes, what: str, key: str) -> tuple[int, int]:
    if isinstance(data, Image.Image):
        return data.size
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as e:
        raise ValueError(f"sample {key}: {what} bytes are not a readable image: {e}") from e


def encode_sample(sample: Mapping[str, Any], conditions: list[str], image_ext: str = "png") -> dict[str, Any]:
    """Validate a sample and encode it into webdataset members (``meta`` stays a dict under ``json``).

    ``sample``: ``{"__key__": str, "image": PIL | bytes, "caption": str, "meta": dict, <cond>: PIL | bytes}``
    with one entry per name in ``conditions``; bytes are stored as given (image bytes must already be
    ``image_ext``, condition bytes PNG). A sample that is already encoded (has ``image_ext``) passes through.
    """
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"__key__ must be a non-empty str without '.' or '/', got {key!r}")
    if image_ext in sample and "image" not in sample:  # already encoded by encode_sample (e.g. in a worker)
        return dict(sample)
    for field in ("image", "caption", "meta"):
        if field not in sample:
            raise ValueError(f"sample {key}: missing {field!r}")
    meta = _check_meta(sample["meta"], key)
    size = (int(meta["width"]), int(meta["height"]))
    out: dict[str, Any] = {"__key__": key}
    image = sample["image"]
    if _image_size(image, "image", key) != size:
        raise ValueError(f"sample {key}: image size {_image_size(image, 'image', key)} != meta (W, H) {size}")
    if isinstance(image, Image.Image):
        out[image_ext] = encode_image(image, image_ext, "RGB")
    else:
        if not bytes(image[:12]).startswith(_MAGIC[image_ext]):
            raise ValueError(f"sample {key}: image bytes are not {image_ext}")
        out[image_ext] = bytes(image)
    for cond in conditions:
        if cond not in sample:
            raise ValueError(f"sample {key}: missing condition {cond!r} (shard set conditions: {conditions})")
        value = sample[cond]
        if _image_size(value, cond, key) != size:
            raise ValueError(f"sample {key}: condition {cond!r} size {_image_size(value, cond, key)} != image {size}")
        if isinstance(value, Image.Image):
            mode = "L" if cond in MASK_CONDITIONS else "RGB"
            if cond in MASK_CONDITIONS and value.mode not in ("L", "1"):
                raise ValueError(f"sample {key}: {cond} must be a single-channel L image, got mode {value.mode}")
            out[f"{cond}.png"] = encode_image(value, "png", mode)
        else:
            if not bytes(value[:8]).startswith(_MAGIC["png"]):
                raise ValueError(f"sample {key}: condition {cond!r} bytes are not PNG")
            out[f"{cond}.png"] = bytes(value)
    caption = sample["caption"]
    if not isinstance(caption, str):
        raise ValueError(f"sample {key}: caption must be a str, got {type(caption).__name__}")
    out["txt"] = caption
    out["json"] = meta
    return out


def _json_default(obj: Any) -> Any:
    # numpy scalars / arrays in meta (polygons computed with numpy) become plain JSON numbers and lists.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON serializable")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class ShardSetWriter:
    """Write samples into ``{prefix}-{index:06d}.tar`` shards (``maxcount`` each) and a manifest on close.

    Use as a context manager. On an exception inside the ``with`` block the shard in progress is
    deleted and no manifest is written (completed shards stay; a later run needs ``overwrite=True``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        conditions: list[str] | tuple[str, ...] = ("glyph",),
        image_ext: str = "png",
        prefix: str = "shard",
        maxcount: int = 1000,
        source: str = "unknown",
        generator: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        mtime: int = 0,
    ) -> None:
        """Prepare ``out_dir`` (refuses existing shards/manifest unless ``overwrite``); ``mtime`` fixes tar times."""
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        if not _NAME_RE.match(prefix):
            raise ValueError(f"prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
        conditions = list(conditions)
        for c in conditions:
            if not _NAME_RE.match(c) or c in ("image", "caption", "meta", *IMAGE_EXTS, "txt", "json"):
                raise ValueError(f"invalid condition name {c!r}")
        if len(set(conditions)) != len(conditions):
            raise ValueError(f"conditions must be unique, got {conditions}")
        self.out_dir = Path(out_dir)
        self.conditions, self.image_ext, self.prefix = conditions, image_ext, prefix
        # A whole-second mtime: a float one gives every member its own PAX header block (tarfile's default format;
        # webdataset's TarWriter does not pass on its `format`), which doubles the headers a reader parses.
        self.maxcount, self.source, self.mtime = int(maxcount), source, int(mtime)
        self.generator = dict(generator or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_dir(overwrite)
        self.shards: list[dict[str, Any]] = []
        self.templates: dict[str, int] = {}
        self.num_samples = 0
        self.manifest: dict[str, Any] | None = None
        self._keys: set[str] = set()
        self._tar = None
        self._tmp: Path | None = None
        self._count = 0
        self._closed = False

    def _prepare_dir(self, overwrite: bool) -> None:
        manifest = self.out_dir / MANIFEST_NAME
        old = sorted(self.out_dir.glob(f"{self.prefix}-*.tar"))
        if (old or manifest.exists()) and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds a shard set ({len(old)} {self.prefix}-*.tar, "
                f"manifest: {manifest.exists()}); pass overwrite=True (--overwrite) or use another folder"
            )
        if manifest.exists():  # first, so the folder never claims to be complete while we rewrite it
            manifest.unlink()
        for p in [*old, *self.out_dir.glob(f"{self.prefix}-*.tar.partial")]:
            p.unlink()

    def shard_name(self, index: int) -> str:
        """File name of shard ``index``."""
        return f"{self.prefix}-{index:06d}.tar"

    def _open_shard(self) -> None:
        from webdataset import TarWriter  # imported lazily: webdataset pulls in torch

        name = self.shard_name(len(self.shards))
        self._tmp = self.out_dir / f"{name}.partial"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 -- stays open across add() calls until the shard is full
        self._tar = TarWriter(self._file, encoder=False, mtime=self.mtime)
        self._count = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.shard_name(len(self.shards))
        os.replace(self._tmp, self.out_dir / name)
        _fsync_dir(self.out_dir)
        self.shards.append({"name": name, "num_samples": self._count})
        log.debug("wrote shard %s (%d samples)", name, self._count)
        self._tar, self._tmp = None, None

    def add(self, sample: Mapping[str, Any]) -> str:
        """Validate, encode and write one sample (see :func:`encode_sample`); returns its key."""
        if self._closed:
            raise RuntimeError("ShardSetWriter is closed")
        enc = encode_sample(sample, self.conditions, self.image_ext)
        key = enc["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        expected = {"__key__", self.image_ext, "txt", "json", *(f"{c}.png" for c in self.conditions)}
        if set(enc) != expected:
            raise ValueError(f"sample {key}: members {sorted(enc)} != expected {sorted(expected)}")
        meta = enc["json"]
        members = {k: v for k, v in enc.items() if k != "json"}
        members["txt"] = enc["txt"].encode("utf-8")
        members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=_json_default).encode("utf-8")
        if self._tar is None:
            self._open_shard()
        self._tar.write(members)
        self._keys.add(key)
        self._count += 1
        self.num_samples += 1
        tk = template_key(float(meta["h_div_w"]))
        self.templates[tk] = self.templates.get(tk, 0) + 1
        if self._count >= self.maxcount:
            self._finish_shard()
        return key

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write ``manifest.json`` atomically; returns the manifest."""
        if self._closed:
            assert self.manifest is not None
            return self.manifest
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        self.manifest = {
            "format": SHARD_FORMAT,
            "shards": self.shards,
            "num_samples": self.num_samples,
            "conditions": self.conditions,
            "templates": dict(sorted(self.templates.items())),
            "image_ext": self.image_ext,
            "source": self.source,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "generator": self.generator,
        }
        atomic_write_text(self.out_dir / MANIFEST_NAME, json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")
        log.info("wrote %d samples in %d shards to %s", self.num_samples, len(self.shards), self.out_dir)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress and write no manifest."""
        self._closed = True
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                if self._tmp is not None and self._tmp.exists():
                    self._tmp.unlink()
                self._tar, self._tmp = None, None
        log.warning("writing %s aborted after %d samples: no manifest written", self.out_dir, self.num_samples)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """Load and validate a shard directory's ``manifest.json`` (or that file); clear errors if missing/corrupt."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {file.parent}: not a complete scenetxtvar shard set "
            "(an interrupted write leaves no manifest; regenerate or convert the data)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file}: format must be {SHARD_FORMAT!r}, got {got!r}")
    for k in ("shards", "num_samples", "conditions", "templates", "image_ext"):
        if k not in manifest:
            raise ValueError(f"{file}: manifest lacks {k!r}")
    shards = manifest["shards"]
    need = {"name", "num_samples"}
    entries_ok = isinstance(shards, list) and all(isinstance(s, dict) and need <= s.keys() for s in shards)
    if not entries_ok:
        raise ValueError(f"{file}: 'shards' must be a list of {{'name', 'num_samples'}}")
    total = sum(int(s["num_samples"]) for s in shards)
    if total != manifest["num_samples"]:
        raise ValueError(f"{file}: shards hold {total} samples but num_samples is {manifest['num_samples']}")
    if check_files:
        absent = [s["name"] for s in shards if not (file.parent / s["name"]).is_file()]
        if absent:
            raise FileNotFoundError(f"{file}: shard files missing: {absent}")
    return manifest


def list_shards(spec: str | os.PathLike) -> list[str]:
    """Shard paths of a shard directory (manifest order; sorted ``*.tar`` if it has none), a glob, or one file."""
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return [str(path / s["name"]) for s in read_manifest(path)["shards"]]
        found = sorted(str(p) for p in path.glob("*.tar"))
        if found:
            log.warning("%s has no %s: using %d *.tar files found there", path, MANIFEST_NAME, len(found))
    elif path.is_file():
        found = [str(path)]
    else:
        found = sorted(glob.glob(os.fspath(spec)))
    if not found:
        raise FileNotFoundError(f"no shards found for {os.fspath(spec)!r}")
    return found
