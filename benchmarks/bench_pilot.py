"""CAR training step vs full fine-tuning, and sampling with vs without control.

Random weights, 256x256 (0.06M, 1:1) schedule, CPU by default. Each training configuration
runs in a fresh process so its peak RSS is its own. Prints one JSON document (--out writes it).
Not a test: numbers depend on the machine.
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

PRESETS = {"tiny": "infinity_pilot_tiny", "layer12": "infinity_pilot_layer12"}


def _build(preset: str):
    import scenetxtvar.models.registry  # noqa: F401
    from scenetxtvar.models.registry import build_pilot_preset
    from scenetxtvar.scales import get_schedule

    torch.manual_seed(0)
    model = build_pilot_preset(PRESETS[preset], cond_drop_rate=0.0, drop_path_rate=0.0)
    schedule = get_schedule(1.0, "0.06M")
    return model, schedule


def _batch(model, schedule, batch: int):
    from scenetxtvar.models.pilot import build_control_pyramid

    _, h, w = schedule[-1]
    feats = torch.randn(batch, model.codebook_dim, h, w)
    targets = model.code_space().targets(feats, schedule, noise_strength=0.3, noise_layers=len(schedule))
    lens = [12] * batch
    text = (torch.randn(sum(lens), model.text_channels), lens, None, None)
    controls = build_control_pyramid(torch.rand(batch, 3, 16 * h, 16 * w) * 2 - 1, schedule)
    return targets, text, controls


def _train_step_worker(preset: str, mode: str, batch: int, steps: int, queue) -> None:
    """mode: car (frozen base + control), full_base (base only, all trainable), full_pilot (everything)."""
    torch.set_num_threads(torch.get_num_threads())
    model, schedule = _build(preset)
    targets, text, controls = _batch(model, schedule, batch)
    if mode == "car":
        model.freeze_infinity_parameters()
    else:
        model.unfreeze_infinity_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "full_base":
        params = model.infinity_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        ctrl = None if mode == "full_base" else controls
        logits = model(text, targets.x_BLC_wo_prefix, schedule, control_tensors=ctrl)
        loss = model.code_space().loss_per_token(logits, targets.labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        dict(
            preset=preset,
            mode=mode,
            batch=batch,
            s_per_step=sum(times[1:]) / steps,
            peak_rss_mb=peak / 1024,
            rss_before_training_mb=rss0 / 1024,
            trainable_params=sum(p.numel() for p in params),
        )
    )


def _sampling(preset: str, batch: int, repeats: int) -> dict:
    model, schedule = _build(preset)
    model.eval()
    _, text, controls = _batch(model, schedule, batch)
    kw = dict(scale_schedule=schedule, label_B_or_BLT=text, B=batch, top_k=1, cfg_list=3.0)

    def timed(**extra) -> float:
        model.autoregressive_infer_cfg(**kw, **extra)
        start = time.perf_counter()
        for _ in range(repeats):
            model.autoregressive_infer_cfg(**kw, **extra)
        return (time.perf_counter() - start) / repeats / batch

    return dict(
        preset=preset,
        batch=batch,
        s_per_image_no_control=timed(),
        s_per_image_control=timed(control_tensors=controls),
        s_per_image_control_two_axis=timed(control_tensors=controls, control_cfg=2.0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "layer12"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    training, sampling = [], []
    for preset in args.presets:
        for mode in ("car", "full_base", "full_pilot"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_train_step_worker, args=(preset, mode, args.batch, args.steps, queue))
            proc.start()
            training.append(queue.get())
            proc.join()
            print(json.dumps(training[-1]), flush=True)
        by_mode = {r["mode"]: r for r in training if r["preset"] == preset}
        training.append(
            dict(
                preset=preset,
                summary=True,
                car_step_vs_full_base_time=by_mode["car"]["s_per_step"] / by_mode["full_base"]["s_per_step"],
                car_peak_vs_full_pilot_peak=by_mode["car"]["peak_rss_mb"] / by_mode["full_pilot"]["peak_rss_mb"],
            )
        )
        print(json.dumps(training[-1]), flush=True)
        sampling.append(_sampling(preset, args.batch, args.repeats))
        print(json.dumps(sampling[-1]), flush=True)
    report = dict(
        benchmark="bench_pilot",
        schedule="256x256 (0.06M, 1:1)",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        date=time.strftime("%Y-%m-%d"),
        note="peak RSS of the whole process (model + optimizer + activations)",
        training=training,
        sampling=sampling,
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
