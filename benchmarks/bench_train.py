"""Training throughput of the whole step (text + VAE encode + targets + forward + backward + AdamW).

Frozen-base CAR training vs full fine-tuning, tiny and layer12-width (random weights), 256x256,
CPU by default; each configuration in a fresh process for its own peak RSS. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time

import torch
from report import emit  # benchmarks/report.py (scripts run from this folder)

MODELS = {
    "tiny": dict(model={"preset": "infinity_pilot_tiny", "car_depth": 2}, text={"kind": "tiny", "dim": 256}),
    # layer12 width with a small text width: the text encoder is not what is being measured.
    "layer12": dict(
        model={"preset": "infinity_pilot_layer12", "car_depth": 6, "text_channels": 256},
        text={"kind": "tiny", "dim": 256},
    ),
}
VAE = {
    "kind": "bsq",
    "base_ch": 32,
    "ch_mult": [1, 1, 1, 1, 1],
    "num_res_blocks": 1,
    "patch_size": 16,
    "codebook_dim": 32,
}


def _worker(name: str, mode: str, batch: int, steps: int, queue) -> None:
    from scenetxtvar.scales import get_schedule
    from scenetxtvar.training.module import PilotModule

    torch.manual_seed(0)
    module = PilotModule(model=MODELS[name]["model"], vae=VAE, text=MODELS[name]["text"], conditions=["glyph"])
    if mode == "full":
        module.model.unfreeze_infinity_parameters()
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    module.model.train()
    schedule = get_schedule(1.0, "0.06M")
    b = {
        "images": torch.rand(batch, 3, 256, 256) * 2 - 1,
        "controls": (torch.rand(batch, 3, 256, 256) > 0.9) * 2.0 - 1,
        "captions": ['a sign that says "OPEN"'] * batch,
        "schedule": schedule,
        "valid": torch.ones(batch, dtype=torch.bool),
    }
    times, tokens = [], 0
    for i in range(steps + 1):
        start = time.perf_counter()
        stats = module.compute_loss(b, noise=True, drop_control=True)
        opt.zero_grad(set_to_none=True)
        stats["loss"].backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
            tokens += int(stats["tokens"])
    total = sum(times)
    queue.put(
        dict(
            model=name,
            mode=mode,
            batch=batch,
            steps_per_s=steps / total,
            tokens_per_s=tokens / total,
            images_per_s=steps * batch / total,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            trainable_params=sum(p.numel() for p in params),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny", "layer12"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for name in args.models:
        for mode in ("car", "full"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(name, mode, args.batch, args.steps, queue))
            proc.start()
            results.append(queue.get())
            proc.join()
            print(json.dumps(results[-1]), flush=True)
    report = dict(
        benchmark="bench_train",
        image="256x256 (0.06M, 1:1)",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        date=time.strftime("%Y-%m-%d"),
        results=results,
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
