"""Tokenizer *training* step time (stage=tokenizer): memory layout x precision, the demo's tokenizer.

One step is ``TokenizerModule.compute_loss`` (encode, multi-scale residual BSQ, decode, L1 + glyph L1 +
commitment) + backward + AdamW, on random 64x128 images at the demo's patch-8 5-scale schedule, with
``vae=bsq_demo``'s architecture. Variants: NCHW or channels-last, fp32 or bf16 autocast (what
``trainer.precision=auto-bf16`` turns on where the CPU runs bf16 natively). Prints JSON; not a test.

    python benchmarks/bench_tokenizer_train.py --batch 8 --steps 15
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from report import emit  # benchmarks/report.py (scripts run from this folder)

from scenetxtvar.training.tokenizer_stage import TokenizerModule

# vae=bsq_demo's architecture, read from the config so the benchmark follows it.
_BUILD = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "vae" / "bsq_demo.yaml").build
DEMO_VAE = {k: v for k, v in OmegaConf.to_container(_BUILD).items() if k not in ("path", "seed", "model_overrides")}
DEMO_SCHEDULE = [(1, 1), (1, 2), (2, 4), (4, 8), (8, 16)]


def step_seconds(channels_last: bool, bf16: bool, batch: int, steps: int, device: str) -> float:
    """Mean seconds of one training step after two warm-up steps."""
    module = TokenizerModule(DEMO_VAE, schedule=DEMO_SCHEDULE, channels_last=channels_last).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batch_data = {
        "images": (torch.rand(batch, 3, 64, 128, generator=g) * 2 - 1).to(device),
        "controls": (torch.rand(batch, 3, 64, 128, generator=g) > 0.9).float().to(device),
        "captions": ["word"] * batch,
    }

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_loss(batch_data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for channels_last in (False, True):
        for bf16 in (False, True):
            s = step_seconds(channels_last, bf16, args.batch, args.steps, args.device)
            results.append(dict(channels_last=channels_last, bf16=bf16, step_s=round(s, 4)))
    base = results[0]["step_s"]
    for row in results:
        row["speedup"] = round(base / row["step_s"], 2)
    emit(
        dict(
            benchmark="bench_tokenizer_train", batch=args.batch, steps=args.steps, device=args.device, results=results
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
