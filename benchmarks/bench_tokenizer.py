"""Tokenizer throughput: images/s of encode and of per-scale targets at 256x256, random weights.

(a) the official-size BSQ-VAE d32 (patch 16, 32 bits) with bitwise targets on the 0.06M 1:1
schedule and bitwise self-correction (noise_strength 0.3 on the first 7 scales); (b) VAR's
VQ-VAE ch160 (V 4096) with index targets on its own patch numbers 1..16. Encode and targets are
timed separately (warm-up call, then the mean and the best of the timed repeats), under
``torch.no_grad``. No files are read. Prints one JSON document (and writes it with --out).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from report import emit  # benchmarks/report.py (scripts run from this folder)
from torch import nn

from scenetxtvar.bitwise import BitwiseCodes
from scenetxtvar.scales import get_schedule
from scenetxtvar.tokenizers.bsq import BSQVAE, BSQVAEConfig
from scenetxtvar.tokenizers.vq import VQVAE
from scenetxtvar.tokenizers.vq_codes import IndexCodes

IMAGE_SIZE = 256
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(mean, best) seconds per call after one warm-up call, and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times), min(times), out


def build(name: str) -> tuple[nn.Module, Callable[[torch.Tensor], Any], str]:
    """(model in eval mode, features -> targets, description of the targets)."""
    if name == "bsq_d32":
        vae = BSQVAE(
            BSQVAEConfig(base_ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, patch_size=16, codebook_dim=32)
        )
        codes, schedule = BitwiseCodes(32), get_schedule(1.0, "0.06M")
        gen = torch.Generator().manual_seed(0)

        def targets(features: torch.Tensor) -> Any:
            return codes.targets(features, schedule, noise_strength=0.3, noise_layers=7, generator=gen)

        return vae.eval(), targets, f"bitwise, schedule 0.06M 1:1 ({len(schedule)} scales), noise 0.3 on 7 scales"
    if name == "vq_ch160":
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=VAR_PATCH_NUMS)
        codes, schedule = IndexCodes(vae), [(1, p, p) for p in VAR_PATCH_NUMS]

        def targets(features: torch.Tensor) -> Any:
            return codes.targets(features, schedule)

        return vae.eval(), targets, f"indices, patch nums {list(VAR_PATCH_NUMS)}"
    raise ValueError(f"unknown tokenizer {name!r}")


@torch.no_grad()
def bench(name: str, batches: list[int], repeats: int, target_repeats: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    vae, targets, what = build(name)
    vae.to(device)
    params = sum(p.numel() for p in vae.parameters())
    rows = []
    for batch in batches:
        img = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device) * 2 - 1
        encode_mean, encode_best, features = timed(partial(vae.encode_for_raw_features, img), repeats)
        targets_mean, targets_best, _ = timed(partial(targets, features), target_repeats)
        rows.append(
            dict(
                tokenizer=name,
                params_M=round(params / 1e6, 2),
                targets=what,
                batch=batch,
                features=list(features.shape),
                encode_s=encode_mean,
                encode_best_s=encode_best,
                targets_s=targets_mean,
                targets_best_s=targets_best,
                images_per_s_encode=batch / encode_mean,
                images_per_s_targets=batch / targets_mean,
                images_per_s_total=batch / (encode_mean + targets_mean),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", nargs="+", default=["bsq_d32", "vq_ch160"], choices=["bsq_d32", "vq_ch160"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2, help="timed encode calls per batch size (after a warm-up)")
    parser.add_argument("--target-repeats", type=int, default=5, help="timed target calls per batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    results = []
    for name in args.tokenizers:
        results += bench(name, args.batches, args.repeats, args.target_repeats, args.device)
    report = dict(
        benchmark="bench_tokenizer",
        image_size=f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        weights="random",
        device=args.device,
        repeats=args.repeats,
        target_repeats=args.target_repeats,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor(),
        date=time.strftime("%Y-%m-%d"),
        wall_s=round(time.perf_counter() - start, 1),
        results=results,
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
