"""DataModule throughput: samples/s of SceneTextDataModule's training loader at 256^2 and 512^2.

Generates synthetic shards (``scenetxtvar.data.synthetic`` when present, else a built-in writer of
noisy images with text-like boxes), then iterates one resampled training epoch per worker count
on rank 0 of a world of 1. Reports time to the first batch (worker start-up, shuffle-buffer fill)
and steady-state samples/s after it. Prints one JSON document (and writes it with --out).
Not a test: numbers depend on the machine (this one may have few cores).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from scenetxtvar.data.datamodule import SceneTextDataModule

log = logging.getLogger("bench_data")
PRESETS = {256: "0.06M", 512: "0.25M"}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_builtin_shards(out: Path, num: int, side: int, per_shard: int = 32, seed: int = 0) -> None:
    """Fallback generator: noisy RGB images (realistic PNG decode cost) + glyph masks + manifest."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(0, num, per_shard):
        name = f"bench-{s // per_shard:06d}.tar"
        n = min(per_shard, num - s)
        with wds.TarWriter(str(out / name), encoder=False) as tw:
            for i in range(n):
                arr = (rng.normal(128, 40, (side, side, 3)).clip(0, 255)).astype(np.uint8)
                image, mask = Image.fromarray(arr), Image.new("L", (side, side), 0)
                x0, y0 = int(rng.integers(0, side // 2)), int(rng.integers(0, side // 2))
                box = [x0, y0, x0 + side // 3, y0 + side // 8]
                ImageDraw.Draw(image).rectangle(box, fill=(250, 250, 250))
                ImageDraw.Draw(mask).rectangle(box, fill=255)
                poly = [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]
                meta = {"words": ["BENCH"], "polygons": [poly], "language": "en", "h_div_w": 1.0,
                        "source": "bench", "width": side, "height": side}  # fmt: skip
                tw.write({"__key__": f"{s + i:08d}", "png": _png(image), "glyph.png": _png(mask),
                          "txt": b"a sign reading BENCH", "json": json.dumps(meta).encode()})  # fmt: skip
        shards.append({"name": name, "num_samples": n})
    manifest = {"format": "scenetxtvar-shards/1", "shards": shards, "num_samples": num, "conditions": ["glyph"],
                "templates": {"1.000": num}, "image_ext": "png"}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))


def make_shards(out: Path, num: int, side: int, generator: str) -> str:
    """Write ``num`` samples of ``side``^2 into ``out``; returns the generator used."""
    if generator in ("auto", "synthetic"):
        try:
            from scenetxtvar.data.synthetic import generate_synthetic_shards
        except ImportError:
            if generator == "synthetic":
                raise
        else:
            generate_synthetic_shards(out, num, size=side, seed=0, shard_size=max(8, num // 4), progress=False)
            return "scenetxtvar.data.synthetic"
    write_builtin_shards(out, num, side, per_shard=max(8, num // 4))
    return "builtin"


def run_epoch(root: Path, side: int, workers: int, batch_size: int, samples: int, mode: str) -> dict:
    """Iterate one training epoch; returns timings. ``mode`` "raw" ships uint8 (normalize_on_device)."""
    dm = SceneTextDataModule(train_shards=str(root), conditions=["glyph"], pn=PRESETS[side], batch_size=batch_size,
                             num_workers=workers, epoch_samples=samples, shuffle_buffer=64, seed=0,
                             normalize_on_device=mode == "raw")  # fmt: skip
    loader = dm.train_dataloader()
    start = time.perf_counter()
    first, n = None, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        else:
            n += batch["images"].shape[0]
    end = time.perf_counter()
    steady = n / (end - first) if n and end > first else float("nan")
    total = len(loader) * batch_size
    return {
        "resolution": side,
        "pn": PRESETS[side],
        "workers": workers,
        "mode": mode,
        "batch_size": batch_size,
        "samples": total,
        "first_batch_s": round(first - start, 3),
        "samples_per_s": round(steady, 1),
        "samples_per_s_incl_startup": round(total / (end - start), 1),
        "bad": dm.bad_sample_counts.get("train", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512], choices=sorted(PRESETS))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--modes", nargs="+", default=["float", "raw"], choices=["float", "raw"],
        help="float: [-1, 1] float32 from the workers; raw: uint8 (normalize_on_device, finished on the GPU)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=192, help="samples per epoch (and shards written)")
    parser.add_argument("--generator", choices=["auto", "synthetic", "builtin"], default="auto")
    parser.add_argument("--data-dir", default=None, help="keep shards here (default: a temporary directory)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.data_dir or tmp)
        for side in args.resolutions:
            root = base / f"bench_{side}"
            generator = "existing"
            if not (root / "manifest.json").exists():
                t0 = time.perf_counter()
                generator = make_shards(root, args.samples, side, args.generator)
                log.warning("wrote %d samples at %d^2 in %.1f s (%s)", args.samples, side, time.perf_counter() - t0,
                            generator)  # fmt: skip
            for mode in args.modes:
                for workers in args.workers:
                    res = run_epoch(root, side, workers, args.batch_size, args.samples, mode)
                    results.append({**res, "data": generator})
    doc = {
        "benchmark": "bench_data",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
