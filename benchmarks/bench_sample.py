"""Sampling throughput of InfinityPilot: images/s with text CFG on/off and the control on/off.

Random weights (the presets' widths, no weight files), random text features, a glyph control
rendered from a two-word layout, 256x256 (0.06M, 1:1). The sampler is timed alone (tokens, KV
cache, CFG, control branch); decoding with the tiny random BSQ-VAE is timed separately because a
real run decodes with the official VAE. CPU by default; on a GPU pass ``--device cuda --precision bf16
--presets infinity_pilot_layer12 infinity_pilot_layer16 infinity_pilot_2b``.
Prints one JSON document (and writes it with --out). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from report import emit  # benchmarks/report.py (scripts run from this folder)

from scenetxtvar.inference import Layout, autocast_for, layout_control
from scenetxtvar.models.pilot import build_control_pyramid
from scenetxtvar.models.registry import build_pilot_preset
from scenetxtvar.scales import get_schedule, pixel_size
from scenetxtvar.training.builders import build_tokenizer

LAYOUT = Layout(
    ["OPEN", "24h"], [[[32, 40], [224, 40], [224, 104], [32, 104]], [[64, 150], [192, 150], [192, 214], [64, 214]]]
)
TINY_VAE = dict(kind="bsq", base_ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, patch_size=16, codebook_dim=32)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def sample_once(model, text, schedule, batch: int, cfg: float, pyramid, device: torch.device, precision: str):
    """One sampling call (tokens only, no decode)."""
    kw = dict(scale_schedule=schedule, label_B_or_BLT=text, B=batch, g_seed=0, cfg_list=cfg, top_p=0.97)
    if pyramid is not None:
        kw["control_tensors"] = pyramid
    with autocast_for(device, precision):
        return model.autoregressive_infer_cfg(**kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["infinity_pilot_tiny", "infinity_pilot_layer12"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=3.0, help="text guidance scale of the 'cfg on' rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    schedule = get_schedule(1.0, "0.06M")
    size = pixel_size(schedule)
    control = layout_control(LAYOUT.in_pixels(size), size, ["glyph"], ["glyph"], None)
    controls = control[None].repeat(args.batch, 1, 1, 1).to(device)
    vae = build_tokenizer(**TINY_VAE).to(device)
    results = []
    for preset in args.presets:
        extra = {"control_channels": (16, 32, 64, 128, 128)} if preset.endswith("tiny") else {}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_pilot_preset(preset, drop_path_rate=0.0, codebook_dim=32, **extra).to(device).eval()
        lens = [16] * args.batch
        text = (torch.randn(sum(lens), model.text_channels, device=device), lens, None, None)
        pyramid = build_control_pyramid(controls, schedule, patch=model.control_patch)
        params = sum(p.numel() for p in model.parameters())
        for cfg in (1.0, args.cfg):
            for use_control in (False, True):
                fn = partial(sample_once, model, text, schedule, args.batch, cfg, pyramid if use_control else None,
                             device, args.precision)  # fmt: skip
                seconds = timed(fn, args.repeats, device)
                row = dict(
                    preset=preset,
                    params_m=round(params / 1e6, 1),
                    batch=args.batch,
                    text_cfg=cfg,
                    control=use_control,
                    s_per_batch=round(seconds, 4),
                    images_per_s=round(args.batch / seconds, 3),
                )
                results.append(row)
                print(json.dumps(row), flush=True)
    codes = torch.randn(args.batch, 32, *schedule[-1][1:], device=device)
    with torch.no_grad():
        decode = timed(lambda: vae.decode(codes), args.repeats, device)
    report = dict(
        benchmark="bench_sample",
        schedule="256x256 (0.06M, 1:1), top_p 0.97, tau 1",
        device=str(device),
        precision=args.precision,
        tiny_vae_decode_s_per_image=round(decode / args.batch, 4),
        results=results,
    )
    emit(report, args.out)  # adds the environment (torch, threads, machine, load average)


if __name__ == "__main__":
    main()
