"""Lightning DataModule streaming (image, control maps, caption) batches from webdataset shards.

Data flow inside each DataLoader worker: choose shards -> read tar members (webdataset) ->
shuffle raw samples -> decode + resize-to-cover + centre crop to the template of the sample's
aspect ratio -> per-template buckets -> one batch per full bucket (one aspect template per batch).

Split modes, and what each guarantees on every rank r of a world of size R with W workers each:

``"resampled"`` (training default)
    Every (rank, worker) draws shards with replacement (weighted by shard size, so samples are
    drawn uniformly) from its own RNG seeded by ``(seed, epoch, rank, worker)``. Every rank yields
    exactly ``epoch_samples // (R * batch_size)`` full batches per epoch, spread over its workers,
    so DDP ranks always step the same number of times (no hang). Streams of different ranks and
    workers are independent, never copies of each other; a sample can still appear twice in an
    epoch by chance (sampling with replacement), as in open_clip's ``--dataset-resampled``.
    Deterministic for a given (seed, epoch, R, W).

``"exact"`` (validation/test default)
    The samples (in shard order, counts from the manifest) are cut into R contiguous ranges of
    equal size (+-1), each rank's range into W worker ranges. Every sample is read exactly once
    per epoch by exactly one (rank, worker); partial batches are kept. Because aspect buckets make
    the number of batches data dependent, every rank yields exactly ``len(loader)`` batches: an
    upper bound computed from the counts alone, identical on all ranks, reached by appending
    *padding* batches (copies of the rank's last batch with ``batch["valid"]`` all False). Metrics
    must ignore samples whose ``valid`` flag is False. Needs per-shard sample counts (a manifest,
    or local tar files that are counted once).

Batches are dicts: ``images`` (B, 3, H, W) and ``controls`` (B, 3 * len(conditions), H, W) in
[-1, 1] (mask conditions exactly -1 or 1), ``captions`` list[str], ``meta`` list[dict], ``h_div_w``
(the template, float), ``schedule`` (list of (1, h, w)), ``valid`` (B,) bool.

Bad samples (undecodable or missing image/condition, control size mismatch, aspect ratio too far
from every template, non-finite metadata, unreadable tar members) are skipped, counted per worker
and per rank (``SceneTextDataModule.bad_sample_counts``), logged, and the run stops with a
``RuntimeError`` once more than ``max_bad_fraction`` of the samples seen are bad (after
``bad_warmup`` samples).

The rank and world size are handed to the dataset object explicitly (read from the trainer in
``setup()``), never looked up from the environment inside workers: spawned workers cannot see it
and would silently read duplicate data.
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import logging
import math
import multiprocessing
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from scenetxtvar.data import transforms as T
from scenetxtvar.lru import LRU
from scenetxtvar.scales import H_DIV_W_TEMPLATES, PN_NUM_SCALES, Schedule, get_schedule, pixel_size

log = logging.getLogger(__name__)
# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is exact by
# construction (fixed batches per worker, or padded), so the warning is noise in every run.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "scenetxtvar-shards/"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SplitMode = Literal["resampled", "exact"]
ShardSource = str | os.PathLike | Sequence[str | os.PathLike]
_SPLIT_TAG = {"train": 0, "val": 1, "test": 2}
_LOG_FIRST_BAD = 5  # per worker and epoch; the rest go to DEBUG so a bad shard cannot flood the log
_MAX_BAD_STREAK = 1000


# --------------------------------------------------------------------------------------------
# Shard discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs, their sample counts when known, and the manifests they came from."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None
    manifests: tuple[dict, ...] = ()

    @property
    def num_samples(self) -> int | None:
        """Total number of samples, or None when some shard's count is unknown."""
        return None if self.sizes is None else sum(self.sizes)


def read_manifest_file(path: str | os.PathLike) -> dict:
    """Read and validate a ``manifest.json`` (format ``scenetxtvar-shards/1``)."""
    with open(path) as f:
        manifest = json.load(f)
    fmt = manifest.get("format", "") if isinstance(manifest, dict) else ""
    if not str(fmt).startswith(MANIFEST_FORMAT):
        raise ValueError(f"{path}: format must start with {MANIFEST_FORMAT!r}, got {fmt!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{'name', 'num_samples'}} entries")
    for s in shards:
        if not isinstance(s.get("num_samples"), int) or s["num_samples"] < 0:
            raise ValueError(f"{path}: shard {s['name']!r} has invalid num_samples {s.get('num_samples')!r}")
    return manifest


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _from_manifest(path: str) -> ShardSet:
    manifest = read_manifest_file(path)
    root = os.path.dirname(os.path.abspath(path))
    urls = tuple(os.path.join(root, s["name"]) for s in manifest["shards"])
    return ShardSet(urls, tuple(s["num_samples"] for s in manifest["shards"]), (manifest,))


def _sizes_from_sibling_manifests(urls: Sequence[str]) -> tuple[tuple[int, ...] | None, tuple[dict, ...]]:
    """Counts for local shards from the manifest.json next to them, if every shard is listed."""
    by_dir: dict[str, dict] = {}
    sizes = []
    for url in urls:
        if _is_remote(url):
            return None, ()
        d = os.path.dirname(os.path.abspath(url))
        if d not in by_dir:
            mpath = os.path.join(d, MANIFEST_NAME)
            by_dir[d] = read_manifest_file(mpath) if os.path.isfile(mpath) else {}
        counts = {s["name"]: s["num_samples"] for s in by_dir[d].get("shards", [])}
        if os.path.basename(url) not in counts:
            return None, ()
        sizes.append(counts[os.path.basename(url)])
    return tuple(sizes), tuple(m for m in by_dir.values() if m)


def resolve_shards(spec: ShardSource) -> ShardSet:
    """Resolve a shard spec: a directory with manifest.json, a manifest path, a glob, a brace pattern,
    ``::``-joined sources, ``pipe:``/URL patterns, or a list of any of these."""
    if isinstance(spec, str | os.PathLike):
        spec = os.fspath(spec)
    else:
        parts = [resolve_shards(s) for s in spec]
        if not parts:
            raise ValueError("shard list is empty")
        urls = tuple(u for p in parts for u in p.urls)
        sizes = None if any(p.sizes is None for p in parts) else tuple(n for p in parts for n in p.sizes)
        return ShardSet(urls, sizes, tuple(m for p in parts for m in p.manifests))
    if os.path.isdir(spec):
        mpath = os.path.join(spec, MANIFEST_NAME)
        if os.path.isfile(mpath):
            return _from_manifest(mpath)
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise FileNotFoundError(f"{spec}: no {MANIFEST_NAME} and no *.tar shards")
        return ShardSet(tuple(urls), None)
    if spec.endswith(".json") and os.path.isfile(spec):
        return _from_manifest(spec)
    urls: list[str] = []
    for url in expand_urls(spec):
        if not _is_remote(url) and glob.has_magic(url):
            matches = sorted(glob.glob(url))
            if not matches:
                raise FileNotFoundError(f"shard glob {url!r} matches no file")
            urls.extend(matches)
        else:
            urls.append(url)
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"shard files not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    sizes, manifests = _sizes_from_sibling_manifests(urls)
    return ShardSet(tuple(urls), sizes, manifests)


def count_tar_samples(url: str) -> int:
    """Number of samples (distinct keys) in a local tar shard, reading headers only."""
    keys = set()
    with tarfile.open(url) as tar:  # random-access mode seeks over the payloads
        for member in tar:
            prefix, _ = base_plus_ext(member.name) if member.isreg() else (None, None)
            if prefix is not None:
                keys.add(prefix)
    return len(keys)


# --------------------------------------------------------------------------------------------
# Exact split plan
# --------------------------------------------------------------------------------------------

# (shard index, start, stop): the samples at positions start <= i < stop of that shard.
WorkItem = tuple[int, int, int]


def _take_range(sizes: Sequence[int], offsets: Sequence[int], lo: int, hi: int) -> list[WorkItem]:
    items = []
    for s, (n, off) in enumerate(zip(sizes, offsets)):
        start, stop = max(lo, off) - off, min(hi, off + n) - off
        if stop > start:
            items.append((s, start, stop))
    return items


def plan_exact(
    sizes: Sequence[int], world_size: int, num_workers: int, limit: int | None = None
) -> list[list[list[WorkItem]]]:
    """Contiguous, balanced (+-1 sample) ranges of the sample sequence: ``plan[rank][worker] -> [WorkItem]``.

    Balanced even with fewer shards than ranks x workers. Contiguous ranges keep reads sequential: a shard
    is shared by at most the few units whose ranges meet inside it, and a unit starting mid-shard only
    reads past (never decodes) the samples before its range. ``limit`` keeps the first ``limit`` samples.
    """
    total = sum(sizes) if limit is None else min(sum(sizes), limit)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if sizes else []
    units = world_size * num_workers
    bounds = [total * u // units for u in range(units + 1)]
    return [
        [
            _take_range(sizes, offsets, bounds[r * num_workers + w], bounds[r * num_workers + w + 1])
            for w in range(num_workers)
        ]
        for r in range(world_size)
    ]


def max_batches(num_samples: int, batch_size: int, num_templates: int) -> int:
    """Most batches ``num_samples`` can form when full buckets and the final partial ones are emitted."""
    singles = min(num_templates, num_samples)  # one lone sample per template makes the most partial batches
    return singles + (num_samples - singles) // batch_size


# --------------------------------------------------------------------------------------------
# Per-sample processing
# --------------------------------------------------------------------------------------------


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is booked under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    """One aspect bucket: its h/w ratio, output pixel size and scale schedule."""

    h_div_w: float
    size: tuple[int, int]  # (H, W)
    schedule: Schedule | None


class Processed(NamedTuple):
    """A decoded, cropped sample waiting in its bucket (uint8/bool arrays until collation)."""

    template: int
    image: np.ndarray
    controls: tuple[np.ndarray, ...]
    caption: str
    meta: dict


@dataclass(frozen=True)
class SampleProcessor:
    """Decode one raw webdataset sample into a :class:`Processed` or raise :class:`BadSample`."""

    conditions: tuple[str, ...]
    mask_conditions: frozenset[str]
    templates: tuple[Template, ...]
    image_exts: tuple[str, ...] = IMAGE_EXTS
    caption_key: str = "txt"
    missing_caption: Literal["empty", "bad"] = "empty"
    mask_threshold: float = 0.5
    max_aspect_distortion: float | None = 1.0
    fixed_size: bool = False

    def nearest(self, h_div_w: float) -> int:
        """Index of the template nearest ``h_div_w`` (official |h/w - t| rule)."""
        if self.fixed_size:
            return 0
        return min(range(len(self.templates)), key=lambda i: abs(self.templates[i].h_div_w - h_div_w))

    def _find(self, sample: dict, name: str | None, exts: Sequence[str]) -> bytes | None:
        for ext in exts:
            key = ext if name is None else f"{name}.{ext}"
            if key in sample:
                return sample[key]
        return None

    def _caption(self, sample: dict, meta: dict) -> str:
        if self.caption_key.startswith("json:"):
            value = meta.get(self.caption_key[5:])
        else:
            raw = sample.get(self.caption_key)
            try:
                value = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as e:
                raise BadSample("caption", f"{self.caption_key} is not UTF-8 ({e})") from None
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.missing_caption == "bad":
                raise BadSample("missing_caption", f"no {self.caption_key!r}")
            return ""
        return str(value).strip()

    def __call__(self, sample: dict) -> Processed:
        """Decode, bucket, crop and resize one sample identically for the image and every control."""
        key = str(sample.get("__key__", "?"))
        data = self._find(sample, None, self.image_exts)
        if data is None:
            raise BadSample("missing_image", f"none of {self.image_exts}")
        try:
            image = T.decode_image(data, "RGB")
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise BadSample("decode", f"image: {type(e).__name__}: {e}") from None
        w, h = image.size
        meta_in: dict = {}
        if "json" in sample:
            try:
                meta_in = json.loads(sample["json"])
            except ValueError as e:
                raise BadSample("meta", f"json: {e}") from None
            if not isinstance(meta_in, dict):
                raise BadSample("meta", "json is not an object")
        declared = meta_in.get("h_div_w")
        if declared is not None and not (isinstance(declared, int | float) and math.isfinite(declared)):
            raise BadSample("nan", f"h_div_w={declared!r}")
        h_div_w = h / w
        t_idx = self.nearest(h_div_w)
        tpl = self.templates[t_idx]
        target = tpl.size[0] / tpl.size[1]
        if self.max_aspect_distortion is not None and max(h_div_w / target, target / h_div_w) > (
            1.0 + self.max_aspect_distortion
        ):
            raise BadSample("aspect", f"h/w {h_div_w:.3f} is too far from template {tpl.h_div_w}")
        box = T.cover_crop_box((h, w), tpl.size)
        controls = []
        for cond in self.conditions:
            cdata = self._find(sample, cond, ("png", *(e for e in IMAGE_EXTS if e != "png")))
            if cdata is None:
                raise BadSample("missing_condition", f"no {cond}.png")
            is_mask = cond in self.mask_conditions
            try:
                cimg = T.decode_image(cdata, "L" if is_mask else "RGB")
            except Exception as e:
                raise BadSample("condition_decode", f"{cond}: {type(e).__name__}: {e}") from None
            cw, ch = cimg.size
            # Controls may be stored at another resolution, but must show the same field of view.
            if abs((ch / cw) / h_div_w - 1.0) > 0.02:
                raise BadSample("size_mismatch", f"{cond} is {cw}x{ch}, image is {w}x{h}")
            cbox = box if (ch, cw) == (h, w) else T.rescale_box(box, (h, w), (ch, cw))
            if is_mask:
                controls.append(T.resize_mask(cimg, cbox, tpl.size, self.mask_threshold))
            else:
                controls.append(T.resize_rgb(cimg, cbox, tpl.size, smooth=False))
        polygons = meta_in.get("polygons") or []
        try:
            finite = T.all_finite(polygons)
            polygons = T.transform_polygons(polygons, box, tpl.size)
        except (TypeError, ValueError) as e:
            raise BadSample("meta", f"polygons: {e}") from None
        if not finite:
            raise BadSample("nan", "non-finite polygon coordinates")
        meta = {
            "key": key,
            "url": sample.get("__url__"),
            "template": tpl.h_div_w,
            "words": list(meta_in.get("words") or []),
            "polygons": polygons,
            "boxes": T.polygon_boxes(polygons, tpl.size),
            "language": meta_in.get("language"),
            "source": meta_in.get("source"),
            "orig_size": (h, w),
            "crop_box": box,
        }
        image_arr = T.resize_rgb(image, box, tpl.size, smooth=True)
        return Processed(t_idx, image_arr, tuple(controls), self._caption(sample, meta_in), meta)


def _empty(shape: tuple[int, ...], shared: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in shared memory inside DataLoader workers, as torch's default collate
    does, so that sending it to the main process costs no extra copy of ~10-300 MB per batch."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate(
    items: Sequence[Processed],
    template: Template,
    dtype: torch.dtype = torch.float32,
    shared: bool = False,
    raw: bool = False,
) -> dict[str, Any]:
    """Stack bucketed samples of one template into a batch dict: tensors in [-1, 1], or uint8 when ``raw``."""
    h, w = template.size
    n, n_ctrl = len(items), 3 * len(items[0].controls)
    buf_dtype = torch.uint8 if raw else torch.float32
    images, controls = _empty((n, 3, h, w), shared, buf_dtype), _empty((n, n_ctrl, h, w), shared, buf_dtype)
    T.rgb_into(images.numpy(), [it.image for it in items])
    for c in range(len(items[0].controls)):
        arrays = [it.controls[c] for it in items]
        (T.mask_into if arrays[0].ndim == 2 else T.rgb_into)(controls.numpy()[:, 3 * c : 3 * c + 3], arrays)
    return {
        "images": images if raw else images.to(dtype),
        "controls": controls if raw else controls.to(dtype),
        "captions": [it.caption for it in items],
        "meta": [it.meta for it in items],
        "h_div_w": template.h_div_w,
        "schedule": list(template.schedule) if template.schedule is not None else None,
        "valid": torch.ones(n, dtype=torch.bool),
    }


def normalize_batch(batch: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Turn a raw (uint8) batch into the [-1, 1] contract in place, on the batch's device; no-op otherwise."""
    for key in ("images", "controls"):
        if batch[key].dtype == torch.uint8:
            batch[key] = T.normalize_uint8(batch[key], dtype)
    return batch


# --------------------------------------------------------------------------------------------
# Streaming dataset (runs inside each DataLoader worker)
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    """Per-(rank, worker) counters for one epoch; shipped to the main process with every batch."""

    rank: int
    worker: int
    seen: int = 0
    bad: Counter = field(default_factory=Counter)

    @property
    def num_bad(self) -> int:
        """Total bad samples."""
        return sum(self.bad.values())

    def snapshot(self) -> dict[str, Any]:
        """A plain, picklable copy."""
        return {"rank": self.rank, "worker": self.worker, "seen": self.seen, "bad": dict(self.bad)}


def check_bad_fraction(seen: int, bad: dict[str, int], limit: float, warmup: int, where: str) -> None:
    """Raise RuntimeError once more than ``limit`` of ``seen`` samples (after ``warmup``) were bad."""
    n_bad = sum(bad.values())
    if seen >= warmup and seen > 0 and n_bad / seen > limit:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        raise RuntimeError(
            f"{where}: {n_bad} of {seen} samples were bad ({n_bad / seen:.1%} > max_bad_fraction "
            f"{limit:.1%}); reasons: {reasons}. Fix or drop the offending shards, or raise max_bad_fraction."
        )


def _iter_tar(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Samples of one tar shard (webdataset's expander + key grouping), closing the stream afterwards."""
    stream = gopen(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
    finally:
        stream.close()


def _shuffled(src: Iterable[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    """Buffered shuffle: yields from a quarter-full buffer on, reading two items per item yielded until full."""
    if bufsize <= 1:
        yield from src
        return
    initial = max(1, bufsize // 4)
    it = iter(src)
    buf: list[Any] = []
    for item in it:
        buf.append(item)
        if len(buf) < bufsize:
            extra = next(it, None)  # fill faster than we drain, so the buffer reaches full mixing
            if extra is not None:
                buf.append(extra)
        if len(buf) >= initial:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class SceneTextStream(IterableDataset):
    """Batches of one split, produced inside each DataLoader worker (see the module docstring for modes)."""

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int] | None,
        processor: SampleProcessor,
        *,
        mode: SplitMode,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int = 0,
        split: str = "train",
        worker_batches: Sequence[int] | None = None,
        plan: Sequence[Sequence[Sequence[WorkItem]]] | None = None,
        shuffle_buffer: int = 0,
        max_bad_fraction: float = 0.01,
        bad_warmup: int = 50,
        dtype: torch.dtype = torch.float32,
        raw: bool = False,
        cache_decoded: int = 0,
    ) -> None:
        super().__init__()
        if int(cache_decoded) < 0:
            raise ValueError(f"cache_decoded must be >= 0, got {cache_decoded}")
        if mode == "resampled" and (worker_batches is None or len(worker_batches) != max(1, num_workers)):
            raise ValueError("resampled mode needs worker_batches with one entry per worker")
        if mode == "exact" and plan is None:
            raise ValueError("exact mode needs a plan (see plan_exact)")
        self.urls, self.sizes, self.processor = list(urls), (list(sizes) if sizes else None), processor
        self.mode, self.batch_size, self.split = mode, batch_size, split
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.worker_batches, self.plan = seed, worker_batches, plan
        self.shuffle_buffer, self.max_bad_fraction, self.bad_warmup = shuffle_buffer, max_bad_fraction, bad_warmup
        self.dtype, self.raw = dtype, raw
        # Decoded samples by (shard URL, key), least recently used evicted; lives in the process that iterates
        # (a persistent worker, or the main process with num_workers=0), so it survives epochs there.
        self.cache_decoded = int(cache_decoded)
        self._decoded = LRU(self.cache_decoded, "cache_decoded") if self.cache_decoded else None
        self.epoch = 0
        self.shared_epoch: Any = None  # multiprocessing Value, set by the loader for persistent workers

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (seeds the shard draws and shuffles); reaches persistent workers too."""
        self.epoch = int(epoch)
        if self.shared_epoch is not None:
            self.shared_epoch.value = int(epoch)

    def _worker(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != max(1, self.num_workers):
            # The split plan is per worker: a loader with another worker count would drop or repeat data.
            raise RuntimeError(f"dataset planned for {self.num_workers} workers runs under {info.num_workers}")
        return info.id

    def _process(self, sample: dict) -> Processed:
        """``processor(sample)``, or the same sample decoded before (``cache_decoded``): decoding is a pure
        function of the sample's bytes, and on 2 CPU cores it is the loader's main cost (PNG decode + resize)."""
        key, url = sample.get("__key__"), sample.get("__url__")
        if self._decoded is None or key is None:
            return self.processor(sample)
        name = (str(url), str(key))
        item = self._decoded.get(name)
        if item is None:
            item = self.processor(sample)  # a BadSample raises here and is never cached
            self._decoded.put(name, item)
        return item._replace(meta=copy.deepcopy(item.meta))  # batches own their metadata

    def _rng(self, epoch: int, worker: int) -> np.random.Generator:
        tag = _SPLIT_TAG.get(self.split, 3)
        return np.random.default_rng([self.seed % 2**63, epoch, self.rank, worker, tag])

    def _resampled_source(self, rng: np.random.Generator, handler: Callable) -> Iterator[dict]:
        weights = None
        if self.sizes is not None and sum(self.sizes) > 0:
            weights = np.asarray(self.sizes, dtype=np.float64) / sum(self.sizes)
        empty_streak = 0
        while True:
            url = self.urls[int(rng.choice(len(self.urls), p=weights))]
            got = False
            for sample in _iter_tar(url, handler):
                got = True
                yield sample
            empty_streak = 0 if got else empty_streak + 1
            if empty_streak > max(16, 2 * len(self.urls)):
                raise RuntimeError(f"{self.split}: {empty_streak} shard draws in a row gave no sample (last: {url})")

    def _exact_source(self, items: Sequence[WorkItem], rng: np.random.Generator, handler: Callable) -> Iterator[dict]:
        order = list(items)
        if self.shuffle_buffer > 1:
            rng.shuffle(order)
        for s, start, stop in order:
            n = -1
            for n, sample in enumerate(_iter_tar(self.urls[s], handler)):
                if n >= stop:
                    if self.sizes is not None and stop == self.sizes[s]:
                        # Samples past the manifest's count are never planned: they would be lost silently.
                        msg = "%s: shard %s has more samples than the %d its count says"
                        log.warning(msg, self.split, self.urls[s], stop)
                    break
                if n >= start:
                    yield sample
            else:
                if n + 1 < stop:
                    log.warning(
                        "%s: shard %s has %d samples, expected at least %d", self.split, self.urls[s], n + 1, stop
                    )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield batches, then one ``{"_stats": ..., "_sentinel": True}`` item with the final counters."""
        worker = self._worker()
        epoch = int(self.shared_epoch.value) if self.shared_epoch is not None else self.epoch
        rng = self._rng(epoch, worker)
        stats = WorkerStats(self.rank, worker)
        where = f"{self.split} rank {self.rank} worker {worker}"

        def handler(exn: Exception) -> bool:
            # webdataset hook for tar-level errors (truncated member, bad header): count, log, go on.
            stats.seen += 1
            stats.bad["read"] += 1
            log.warning("%s: unreadable tar data skipped: %s", where, exn)
            check_bad_fraction(stats.seen, stats.bad, self.max_bad_fraction, self.bad_warmup, where)
            return True

        if self.mode == "resampled":
            target = self.worker_batches[worker]
            source = self._resampled_source(rng, handler)
        else:
            target = None
            source = self._exact_source(self.plan[self.rank][worker], rng, handler)
        templates = self.processor.templates
        shared = get_worker_info() is not None
        buckets: dict[int, list[Processed]] = {}
        emitted = bad_streak = 0
        stream = _shuffled(source, self.shuffle_buffer, rng)
        for sample in stream if target != 0 else ():
            stats.seen += 1
            try:
                item = self._process(sample)
            except BadSample as e:
                stats.bad[e.reason] += 1
                bad_streak += 1
                if bad_streak >= _MAX_BAD_STREAK:
                    # Even with max_bad_fraction=1 an all-bad (resampled, endless) stream must not spin forever.
                    raise RuntimeError(f"{where}: {bad_streak} bad samples in a row (last: {e}); no usable data") from e
                level = logging.WARNING if stats.num_bad <= _LOG_FIRST_BAD else logging.DEBUG
                log.log(
                    level, "%s: skipped bad sample %s (%s): %s", where, sample.get("__key__"), sample.get("__url__"), e
                )
                check_bad_fraction(stats.seen, stats.bad, self.max_bad_fraction, self.bad_warmup, where)
                continue
            bad_streak = 0
            if stats.seen == self.bad_warmup:
                check_bad_fraction(stats.seen, stats.bad, self.max_bad_fraction, self.bad_warmup, where)
            bucket = buckets.setdefault(item.template, [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                batch = collate(bucket, templates[item.template], self.dtype, shared, self.raw)
                buckets[item.template] = []
                emitted += 1
                batch["_stats"] = stats.snapshot()
                yield batch
                if target is not None and emitted >= target:
                    break
        stream.close()  # stop reading the current shard now, not at garbage collection
        source.close()
        if self.mode == "exact":
            for t in sorted(buckets):
                if buckets[t]:
                    batch = collate(buckets[t], templates[t], self.dtype, shared, self.raw)
                    batch["_stats"] = stats.snapshot()
                    yield batch
        yield {"_stats": stats.snapshot(), "_sentinel": True}


# --------------------------------------------------------------------------------------------
# Loader (main process): epochs, stats, padding, exact length
# --------------------------------------------------------------------------------------------


class StatsBook:
    """Sample counters of this rank per split: finished epochs plus the epochs being iterated.

    Each loader iteration is a *run* with its own per-worker snapshots, so an abandoned iterator
    that is garbage-collected late cannot mix its counts with the next epoch's.
    """

    def __init__(self) -> None:
        self.done_seen: Counter = Counter()
        self.done_bad: dict[str, Counter] = {}
        self.runs: dict[int, tuple[str, dict[tuple[int, int], dict]]] = {}
        self._next_run = 0

    def begin(self, split: str) -> int:
        """Start a run (one epoch of one loader); returns its id."""
        self._next_run += 1
        self.runs[self._next_run] = (split, {})
        return self._next_run

    def update(self, run: int, snap: dict) -> None:
        """Record a worker's cumulative counters for the run."""
        self.runs[run][1][(snap["rank"], snap["worker"])] = snap

    def run_totals(self, run: int) -> tuple[int, Counter]:
        """(seen, bad by reason) of a run, summed over workers."""
        seen, bad = 0, Counter()
        for snap in self.runs[run][1].values() if run in self.runs else ():
            seen += snap["seen"]
            bad.update(snap["bad"])
        return seen, bad

    def end(self, run: int) -> None:
        """Fold a run into the totals (idempotent)."""
        if run not in self.runs:
            return
        seen, bad = self.run_totals(run)
        split = self.runs.pop(run)[0]
        self.done_seen[split] += seen
        self.done_bad.setdefault(split, Counter()).update(bad)

    def totals(self, split: str) -> tuple[int, Counter]:
        """(seen, bad by reason) over all epochs so far, including runs in progress."""
        seen, bad = self.done_seen[split], Counter(self.done_bad.get(split, {}))
        for run, (s, _) in self.runs.items():
            if s == split:
                rs, rb = self.run_totals(run)
                seen, bad = seen + rs, bad + rb
        return seen, bad


def _identity(item: Any) -> Any:
    return item


def _zero() -> int:
    return 0


class SceneTextLoader(DataLoader):
    """DataLoader (``batch_size=None``) over a :class:`SceneTextStream` with an exact per-rank length.

    Sets the epoch before workers start, strips worker counters off the batches into a
    :class:`StatsBook`, checks the bad-sample fraction of the whole rank, and in exact mode pads
    with invalid copies of the last batch up to ``len(self)``.
    """

    def __init__(
        self,
        dataset: SceneTextStream,
        *,
        length: int,
        pad: bool,
        stats: StatsBook,
        epoch_fn: Callable[[], int | None] | None = None,
        position_fn: Callable[[], int | None] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        # Identity collation: torch's default_convert would turn the schedule's tuples into lists.
        # Our own generator: a new iterator draws its worker base seed from it, not from the global RNG,
        # so starting an epoch (or resuming one) leaves the training step's random stream alone. The
        # batches do not depend on it: the stream seeds itself from (seed, epoch, rank, worker).
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(
            dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity, **kwargs
        )
        self.length, self.pad, self.stats, self.epoch_fn = length, pad, stats, epoch_fn
        self._iterations = 0
        self.position_fn = position_fn
        if self.persistent_workers and num_workers > 0:
            ctx = self.multiprocessing_context or multiprocessing.get_context()
            dataset.shared_epoch = ctx.Value("q", 0, lock=False)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate one epoch (the rest of it, after a mid-epoch resume)."""
        skip = 0
        position = self.position_fn() if self.position_fn is not None else None
        if position is not None:
            # Training: the stream is a pure function of (seed, epoch, rank, worker), so the batches
            # already trained on (from the restored step count) give the epoch and how many of its
            # batches to replay and drop; a resumed run continues exactly where it stopped.
            epoch, skip = divmod(position, self.length)
        else:
            epoch = self.epoch_fn() if self.epoch_fn is not None else None
            epoch = self._iterations if epoch is None else epoch
        self._iterations += 1
        self.dataset.set_epoch(epoch)
        batches = self._run(super().__iter__(), epoch)
        return itertools.islice(batches, skip, None) if skip else batches

    def _run(self, base: Iterator[dict[str, Any]], epoch: int) -> Iterator[dict[str, Any]]:
        ds: SceneTextStream = self.dataset
        where = f"{ds.split} rank {ds.rank}"
        run = self.stats.begin(ds.split)
        produced, last = 0, None
        try:
            real = self._real_batches(base, run, where)
            for batch in real:
                produced += 1
                if produced == self.length:
                    # Book the counters before handing out the final batch: the consumer (Lightning stops
                    # at len(loader)) may never resume this generator.
                    self._finish(run, epoch, where, rest=real)
                last = batch
                yield batch
            if not self.pad and produced != self.length:
                raise RuntimeError(f"{where}: produced {produced} batches, expected {self.length}")
            while produced < self.length:
                produced += 1
                if produced == self.length:
                    self._finish(run, epoch, where)
                yield self._padding(last)
        finally:
            self._finish(run, epoch, where)

    def _real_batches(self, base: Iterator[dict[str, Any]], run: int, where: str) -> Iterator[dict[str, Any]]:
        """Batches from the workers, with their counters booked; one batch of lookahead, so that the
        counters of every worker are in (and checked) before the last batch leaves."""
        ds: SceneTextStream = self.dataset
        pending = None
        for item in base:
            snap = item.pop("_stats", None)
            if snap is not None:
                self.stats.update(run, snap)
                seen, bad = self.stats.run_totals(run)
                check_bad_fraction(seen, bad, ds.max_bad_fraction, ds.bad_warmup, where)
            if item.pop("_sentinel", False):
                continue
            if pending is not None:
                yield pending
            pending = item
        if pending is not None:
            yield pending

    def _finish(self, run: int, epoch: int, where: str, rest: Iterator | None = None) -> None:
        if rest is not None and next(rest, None) is not None:
            # The lookahead already saw the end of the workers' streams unless they made too many batches.
            hint = "; the manifest's template counts do not match the images" if self.pad else ""
            raise RuntimeError(f"{where}: produced more than the planned {self.length} batches{hint}")
        if run not in self.stats.runs:
            return
        seen, bad = self.stats.run_totals(run)
        self.stats.end(run)
        if bad:
            log.warning("%s epoch %d: %d of %d samples bad (%s)", where, epoch, sum(bad.values()), seen, dict(bad))
        else:
            log.debug("%s epoch %d: %d samples, none bad", where, epoch, seen)

    def _padding(self, last: dict[str, Any] | None) -> dict[str, Any]:
        """An all-invalid batch, so that this rank steps as often as the others."""
        if last is None:
            # This rank read no usable sample at all: a single blank sample of the first template.
            tpl = self.dataset.processor.templates[0]
            n_ctrl = 3 * len(self.dataset.processor.conditions)
            dtype = torch.uint8 if self.dataset.raw else self.dataset.dtype
            return {
                "images": torch.zeros(1, 3, *tpl.size, dtype=dtype),
                "controls": torch.zeros(1, n_ctrl, *tpl.size, dtype=dtype),
                "captions": [""],
                "meta": [{"key": None, "template": tpl.h_div_w, "padding": True}],
                "h_div_w": tpl.h_div_w,
                "schedule": list(tpl.schedule) if tpl.schedule is not None else None,
                "valid": torch.zeros(1, dtype=torch.bool),
            }
        out = dict(last)
        out["valid"] = torch.zeros_like(last["valid"])
        return out


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


def _to_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


class SceneTextDataModule(L.LightningDataModule):
    """Image + control-map batches from webdataset shards for single- and multi-GPU training.

    Args:
        train_shards, val_shards, test_shards: shard directory (with manifest.json), manifest path, glob,
            brace pattern, ``pipe:``/URL pattern, or a list of these; None disables the split.
        conditions: condition names in channel order (``{cond}.png`` in the shards).
        pn: pixel-count preset ("0.06M", "0.25M", "0.60M", "1M") selecting the template sizes.
        image_size: explicit (H, W) or side; overrides the per-template sizes (one bucket).
        h_div_w_templates: the aspect buckets (default: all 15 official templates).
        batch_size: per-rank batch size; ``val_batch_size`` defaults to it.
        num_workers: DataLoader workers per rank; ``val_num_workers`` defaults to it.
        seed: seeds shard draws and shuffles (with epoch, rank and worker).
        epoch_samples: samples per training epoch for the whole job, all ranks together (default: the
            manifests' total); in exact mode, the first ``epoch_samples`` samples.
        val_samples: samples per validation/test epoch (default: all).
        train_split, val_split: "resampled" or "exact" (see the module docstring).
        shuffle_buffer: raw samples in each worker's shuffle buffer (training only).
        mask_conditions: conditions resized as binary masks (area filter + threshold).
        mask_threshold: coverage above which a resized mask pixel is on.
        caption_key: sample field with the prompt ("txt"), or "json:<field>" to read it from the metadata.
        missing_caption: "empty" uses "" for a missing caption; "bad" skips and counts the sample.
        max_bad_fraction: abort past this fraction of bad samples (after ``bad_warmup`` samples).
        max_aspect_distortion: bad when h/w differs from its template by more than this factor minus one
            (1.0: more than 2x); None accepts any ratio.
        rank, world_size: override the values read from the trainer / torch.distributed.
        pin_memory: default True when CUDA is available.
        persistent_workers, prefetch_factor, multiprocessing_context: passed to the DataLoader.
        dtype: dtype of ``images`` and ``controls``.
        cache_decoded: keep up to this many decoded training samples per worker (by shard URL and key) and
            skip their decoding in later epochs; the cache lives as long as the worker, so it pays with
            ``persistent_workers`` or ``num_workers=0``. Each entry costs its uint8 image and control maps
            (32 KB at 64x128 with one mask). 0: off.
        normalize_on_device: workers ship uint8 tensors (4x less inter-process and host-to-device traffic)
            and :meth:`on_after_batch_transfer` maps them to [-1, 1] on the device; outside a Trainer call
            :func:`normalize_batch` yourself.
    """

    def __init__(
        self,
        train_shards: ShardSource | None = None,
        val_shards: ShardSource | None = None,
        test_shards: ShardSource | None = None,
        conditions: Sequence[str] = ("glyph",),
        pn: str | None = "0.06M",
        image_size: int | Sequence[int] | None = None,
        h_div_w_templates: Sequence[float] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        val_num_workers: int | None = None,
        seed: int = 0,
        epoch_samples: int | None = None,
        val_samples: int | None = None,
        train_split: SplitMode = "resampled",
        val_split: SplitMode = "exact",
        shuffle_buffer: int = 256,
        mask_conditions: Sequence[str] = ("glyph",),
        mask_threshold: float = 0.5,
        caption_key: str = "txt",
        missing_caption: Literal["empty", "bad"] = "empty",
        max_bad_fraction: float = 0.01,
        bad_warmup: int = 50,
        max_aspect_distortion: float | None = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        normalize_on_device: bool = False,
        cache_decoded: int = 0,
    ) -> None:
        super().__init__()
        self.conditions = tuple(str(c) for c in _to_list(conditions))
        if not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"conditions must be a non-empty list of distinct names, got {list(self.conditions)}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("num_workers", num_workers), ("val_num_workers", val_num_workers)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("train_split", train_split), ("val_split", val_split)):
            if value not in ("resampled", "exact"):
                raise ValueError(f"{name} must be 'resampled' or 'exact', got {value!r}")
        if not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if missing_caption not in ("empty", "bad"):
            raise ValueError(f"missing_caption must be 'empty' or 'bad', got {missing_caption!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together (or neither)")
        if world_size is not None and not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.shards = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.templates = self._build_templates(pn, image_size, h_div_w_templates)
        self.pn = pn
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.val_num_workers = int(val_num_workers) if val_num_workers is not None else self.num_workers
        self.seed = int(seed)
        self.epoch_samples = None if epoch_samples is None else int(epoch_samples)
        self.val_samples = None if val_samples is None else int(val_samples)
        self.splits: dict[str, SplitMode] = {"train": train_split, "val": val_split, "test": val_split}
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_warmup = int(bad_warmup)
        self.processor = SampleProcessor(
            conditions=self.conditions,
            mask_conditions=frozenset(str(c) for c in _to_list(mask_conditions)),
            templates=self.templates,
            caption_key=caption_key,
            missing_caption=missing_caption,
            mask_threshold=float(mask_threshold),
            max_aspect_distortion=None if max_aspect_distortion is None else float(max_aspect_distortion),
            fixed_size=image_size is not None,
        )
        self._explicit_dist = None if rank is None else (int(rank), int(world_size))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.normalize_on_device = bool(normalize_on_device)
        if int(cache_decoded) < 0:
            raise ValueError(f"cache_decoded must be >= 0, got {cache_decoded}")
        self.cache_decoded = int(cache_decoded)
        self.stats = StatsBook()
        self._resolved: dict[str, ShardSet] = {}

    # ---- configuration helpers -----------------------------------------------------------

    @staticmethod
    def _build_templates(
        pn: str | None, image_size: int | Sequence[int] | None, h_div_w_templates: Sequence[float] | None
    ) -> tuple[Template, ...]:
        if pn is not None and pn not in PN_NUM_SCALES:
            raise ValueError(f"pn must be one of {sorted(PN_NUM_SCALES)}, got {pn!r}")
        if image_size is not None:
            size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(map(int, image_size))
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"image_size must be a positive int or (H, W), got {image_size}")
            schedule = None
            if pn is not None and pixel_size(get_schedule(size[0] / size[1], pn)) == size:
                schedule = get_schedule(size[0] / size[1], pn)
            return (Template(size[0] / size[1], size, schedule),)
        if pn is None:
            raise ValueError("give pn or image_size")
        wanted = list(H_DIV_W_TEMPLATES) if h_div_w_templates is None else [float(t) for t in h_div_w_templates]
        if not wanted:
            raise ValueError("h_div_w_templates is empty")
        out = []
        for t in wanted:
            official = min(H_DIV_W_TEMPLATES, key=lambda o: abs(o - t))
            if abs(official - t) > 1e-3:
                raise ValueError(f"h_div_w_templates: {t} is not an official template ({H_DIV_W_TEMPLATES})")
            schedule = get_schedule(official, pn)
            out.append(Template(official, pixel_size(schedule), schedule))
        return tuple(out)

    def _dist_info(self) -> tuple[int, int]:
        if self._explicit_dist is not None:
            return self._explicit_dist
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _shardset(self, split: str) -> ShardSet:
        if split not in self._resolved:
            spec = self.shards[split]
            if spec is None:
                raise ValueError(f"no {split}_shards configured")
            spec = os.fspath(spec) if isinstance(spec, str | os.PathLike) else [os.fspath(s) for s in spec]
            shards = resolve_shards(spec)
            for manifest in shards.manifests:
                have = manifest.get("conditions")
                missing = [c for c in self.conditions if have is not None and c not in have]
                if missing:
                    raise ValueError(f"{split}_shards: conditions {missing} are not in the manifest ({have})")
            self._resolved[split] = shards
        return self._resolved[split]

    def _num_templates(self, shards: ShardSet) -> int:
        """How many buckets can occur (bounds the partial batches of exact mode)."""
        if len(self.templates) == 1:
            return 1
        official = len(self.templates) == len(H_DIV_W_TEMPLATES)
        counts = [m.get("templates") for m in shards.manifests]
        if not official or not counts or any(not isinstance(c, dict) for c in counts):
            return len(self.templates)  # a subset remaps ratios near cell borders: stay conservative
        present = {self.processor.nearest(float(k)) for c in counts for k, n in c.items() if n}
        return max(1, len(present))

    def _epoch_fn(self) -> int | None:
        return int(self.trainer.current_epoch) if self.trainer is not None else None

    def _position_fn(self) -> int | None:
        """Training batches consumed so far (restored with the step count when a run resumes)."""
        if self.trainer is None:
            return None
        return int(self.trainer.global_step) * int(self.trainer.accumulate_grad_batches)

    # ---- Lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read rank/world size from the trainer and resolve the shard lists of the stage."""
        rank, world = self._dist_info()
        log.debug("SceneTextDataModule.setup(%s): rank %d of %d", stage, rank, world)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val"))
        for split in wanted:
            if self.shards[split] is not None:
                self._shardset(split)

    def train_dataloader(self) -> SceneTextLoader:
        """Training batches (default: resampled, fixed length)."""
        return self._loader("train")

    def val_dataloader(self) -> SceneTextLoader:
        """Validation batches (default: exact, every sample once, padded)."""
        return self._loader("val")

    def test_dataloader(self) -> SceneTextLoader:
        """Test batches (same settings as validation)."""
        return self._loader("test")

    def _loader(self, split: str) -> SceneTextLoader:
        shards = self._shardset(split)
        rank, world = self._dist_info()
        train = split == "train"
        batch_size = self.batch_size if train else self.val_batch_size
        num_workers = self.num_workers if train else self.val_num_workers
        units = max(1, num_workers)
        mode = self.splits[split]
        limit = self.epoch_samples if train else self.val_samples
        common = dict(
            processor=self.processor,
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            num_workers=num_workers,
            seed=self.seed,
            split=split,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            max_bad_fraction=self.max_bad_fraction,
            bad_warmup=self.bad_warmup,
            dtype=self.dtype,
            raw=self.normalize_on_device,
            cache_decoded=self.cache_decoded if train else 0,
        )
        if mode == "resampled":
            total = limit if limit is not None else shards.num_samples
            if total is None:
                raise ValueError(
                    f"{split}: shard sample counts are unknown (no manifest.json); set "
                    f"{'epoch_samples' if train else 'val_samples'}"
                )
            per_rank = total // (world * batch_size)
            if per_rank < 1:
                raise ValueError(
                    f"{split}: {total} samples per epoch give no full batch of {batch_size} on each of {world} ranks"
                )
            per_worker = [per_rank // units + (w < per_rank % units) for w in range(units)]
            dataset = SceneTextStream(shards.urls, shards.sizes, mode="resampled", worker_batches=per_worker, **common)
            length, pad = per_rank, False
        else:
            sizes = shards.sizes
            if sizes is None:
                remote = [u for u in shards.urls if _is_remote(u)]
                if remote:
                    raise ValueError(f"{split}: exact split needs per-shard sample counts: add a {MANIFEST_NAME}")
                sizes = tuple(count_tar_samples(u) for u in shards.urls)
                shards = ShardSet(shards.urls, sizes, shards.manifests)
                self._resolved[split] = shards
            plan = plan_exact(sizes, world, units, limit)
            n_tpl = self._num_templates(shards)
            per_rank = [
                sum(max_batches(sum(stop - start for _, start, stop in items), batch_size, n_tpl) for items in ranks)
                for ranks in plan
            ]
            dataset = SceneTextStream(shards.urls, sizes, mode="exact", plan=plan, **common)
            length, pad = max(per_rank), True
        kwargs: dict[str, Any] = dict(pin_memory=self.pin_memory)
        if num_workers > 0:
            kwargs.update(
                persistent_workers=self.persistent_workers, multiprocessing_context=self.multiprocessing_context
            )
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        log.info("%s loader: %s split, rank %d/%d, %d workers, %d batches per epoch", split, mode, rank, world,
                 num_workers, length)  # fmt: skip
        return SceneTextLoader(
            dataset,
            length=length,
            pad=pad,
            stats=self.stats,
            # Validation always reads epoch 0's draw: comparable metrics from one validation to the next.
            epoch_fn=self._epoch_fn if train else _zero,
            position_fn=self._position_fn if train else None,
            num_workers=num_workers,
            **kwargs,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise raw uint8 batches on the device, then run the LightningModule's own hook if it has one.

        Lightning calls only the DataModule's hook when both override it, so the module's is chained here.
        """
        if isinstance(batch, dict) and "images" in batch and "controls" in batch:
            batch = normalize_batch(batch, self.dtype)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and is_overridden("on_after_batch_transfer", module):
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch

    # ---- statistics ----------------------------------------------------------------------

    @property
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """Bad samples of this rank by split and reason, over all epochs so far."""
        return {s: dict(self.stats.totals(s)[1]) for s in ("train", "val", "test") if self.stats.totals(s)[0]}

    @property
    def seen_sample_counts(self) -> dict[str, int]:
        """Samples read (good and bad) on this rank by split, over all epochs so far."""
        return {s: self.stats.totals(s)[0] for s in ("train", "val", "test") if self.stats.totals(s)[0]}

    def data_stats(self) -> dict[str, float]:
        """Flat counters for a logger/callback: ``data/{split}_seen``, ``_bad``, ``_bad_fraction``."""
        out: dict[str, float] = {}
        for split, seen in self.seen_sample_counts.items():
            bad = sum(self.bad_sample_counts.get(split, {}).values())
            out.update({f"data/{split}_seen": seen, f"data/{split}_bad": bad, f"data/{split}_bad_fraction": bad / seen})
        return out

    def batches_per_epoch(self, split: str = "train") -> int:
        """Batches each rank yields per epoch of ``split`` (builds the loader plan, starts no worker)."""
        return len(self._loader(split))
