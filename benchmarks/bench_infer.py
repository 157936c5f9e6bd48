"""Sampling speed: KV-cached ``autoregressive_infer_cfg`` vs recomputing the whole prefix per scale.

Random weights, random text features, 256x256 (0.06M, 1:1) schedule, CPU by default.
Prints one JSON document (and writes it with --out). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from functools import partial

import torch
from report import emit  # benchmarks/report.py (scripts run from this folder)

import scenetxtvar.models.registry  # noqa: F401
from scenetxtvar.models.infinity import Infinity
from scenetxtvar.models.registry import build_preset
from scenetxtvar.scales import get_schedule, sequence_length


@torch.no_grad()
def recompute_sampler(model: Infinity, text, schedule, batch: int) -> torch.Tensor:
    """The no-cache baseline: at every scale run the teacher-forced forward over all tokens so far."""
    state = model.code_space().sampler(schedule, batch, "cpu")
    inputs = []
    for k, (_, h, w) in enumerate(schedule):
        x = torch.cat(inputs, 1) if inputs else torch.zeros(batch, 0, model.d)
        logits = model(text, x, schedule[: k + 1])[:, -h * w :]
        nxt = state.step(k, logits, top_k=1)
        if nxt is not None:
            inputs.append(nxt)
    return state.summed


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["infinity_tiny", "infinity_layer12"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pns", nargs="+", default=["0.06M"], help="pixel presets (0.06M = 256x256, 0.25M = 512x512)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for preset, pn in itertools.product(args.presets, args.pns):
        schedule = get_schedule(1.0, pn)
        model = build_preset(preset, cond_drop_rate=0.0, drop_path_rate=0.0).to(args.device).eval()
        for batch in args.batches:
            lens = [12] * batch
            text = (torch.randn(sum(lens), model.text_channels, device=args.device), lens, None, None)
            cached_fn = partial(
                model.autoregressive_infer_cfg, scale_schedule=schedule, label_B_or_BLT=text, B=batch, top_k=1
            )
            cached = timed(cached_fn, args.repeats)
            baseline = timed(partial(recompute_sampler, model, text, schedule, batch), args.repeats)
            results.append(
                dict(
                    preset=preset,
                    pn=pn,
                    tokens=sequence_length(schedule),
                    batch=batch,
                    s_per_image_cached=cached / batch,
                    s_per_image_recompute=baseline / batch,
                    speedup=baseline / cached,
                )
            )
            print(json.dumps(results[-1]), flush=True)
    report = dict(
        benchmark="bench_infer",
        schedule="1:1 template, no CFG, greedy",
        device=args.device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor(),
        date=time.strftime("%Y-%m-%d"),
        results=results,
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
