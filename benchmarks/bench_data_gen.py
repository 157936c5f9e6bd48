"""Synthetic scene generator throughput: samples/s at 256x256 and 64x128 with 0, 1 and 2 workers.

Times ``generate_synthetic_shards`` end to end (scene generation, PNG encoding, shard + manifest
writing, and worker start-up for workers > 0) into a temporary folder. Prints one JSON document
(and writes it with --out). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from report import emit  # benchmarks/report.py (scripts run from this folder)

from scenetxtvar.data.synthetic import generate_synthetic_shards


def run(num: int, size: str, workers: int, conditions: list[str]) -> dict:
    """One timed generation run."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = generate_synthetic_shards(
            tmp, num, size, seed=0, workers=workers, conditions=conditions, progress=False, shard_size=max(1, num // 2)
        )
        dt = time.perf_counter() - t0
        nbytes = sum(os.path.getsize(os.path.join(tmp, s["name"])) for s in manifest["shards"])
    return {
        "size": size,
        "workers": workers,
        "num": num,
        "seconds": round(dt, 3),
        "samples_per_s": round(num / dt, 2),
        "kb_per_sample": round(nbytes / num / 1024, 1),
    }


def main() -> None:
    """Run the grid and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-256", type=int, default=96, help="samples per run at 256x256")
    ap.add_argument("--num-small", type=int, default=256, help="samples per run at 64x128")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=["glyph"])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    results = [
        run(num, size, w, args.conditions)
        for size, num in (("256", args.num_256), ("64x128", args.num_small))
        for w in args.workers
    ]
    doc = {
        "benchmark": "synthetic_generator_throughput",
        "conditions": args.conditions,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "note": "workers > 0 include process start-up (spawn); see the per-run sample counts",
        "results": results,
    }
    emit(doc, args.out)


if __name__ == "__main__":
    main()
