"""``make demo`` / ``make demo-full``: the product learning scene text from nothing, on CPU.

No weights can be downloaded on a fresh machine, so the demo trains everything the control branch
stands on, with the product's own stages (one Hydra app, ``stage=tokenizer|base|car``):

1. ``stage=tokenizer``: a small BSQ-VAE on single-word 64x128 synthetic scenes;
   then OCR of its reconstructions on held-out words (the ceiling of everything drawn through it);
2. ``stage=base``: a 1.1 M-parameter Infinity over that tokenizer (text-conditioned, no control);
3. ``stage=car``: the InfinityPilot control branch on the frozen base (the product's main job);
4. ``evaluate.py`` on held-out words (a seed no stage trained on): Sen.ACC with and without the
   glyph control, glyph IoU, and a grid (control | ground truth | with control | without control).

Budgets and settings are the profile's (``conf/demo/<profile>.yaml``); extra arguments are Hydra
overrides applied to every stage (e.g. ``trainer.max_steps=4`` for a smoke run). ``--tokenizer-only``
stops after step 1 (tokenizer A/Bs: ``--profile quick --tokenizer-only --recon-images 128 <overrides>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
logger = logging.getLogger("scenetxtvar.demo")


STAGE_KEYS = ("common", "tokenizer", "base", "car", "evaluate")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Hydra overrides of several lists, one per key: a later list's entry replaces an earlier one's."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for item in overrides:
            merged[item.split("=", 1)[0].lstrip("+~")] = item
    return list(merged.values())


def _top_key(override: str) -> str:
    """The config group or top-level key an override sets: ``+vae.build.x=1`` -> ``vae``."""
    return override.split("=", 1)[0].lstrip("+~").split(".")[0]


def profiles() -> list[str]:
    """The profile names: ``conf/demo/<name>.yaml`` (``quick`` and ``full`` ship; add your own beside them)."""
    return sorted(p.stem for p in (CONF / "demo").glob("*.yaml"))


def load_profile(name: str) -> DictConfig:
    """``conf/demo/<name>.yaml``: override lists per stage; ``inherit: other`` starts from another profile."""
    path = CONF / "demo" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown demo profile {name!r}: choose from {profiles()} (conf/demo/*.yaml)")
    profile = OmegaConf.load(path)
    parent = profile.pop("inherit", None)
    if parent is None:
        return profile
    base = load_profile(str(parent))
    merged = OmegaConf.merge(base, {k: v for k, v in profile.items() if k not in STAGE_KEYS})
    for key in STAGE_KEYS:
        merged[key] = merge_overrides(_list(base, key), _list(profile, key))
    return merged


def compose_app(app: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<app>.yaml`` with ``overrides`` (Hydra's compose API, as train.py would)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=overrides)


def _list(profile: DictConfig, key: str) -> list[str]:
    return [str(v) for v in (profile.get(key) or [])]


def train_stage(stage: str, profile: DictConfig, run_dir: Path, inputs: list[str], extra: list[str]) -> dict[str, Any]:
    """Run one training stage into ``run_dir``; returns run()'s result."""
    from .training.run import run

    overrides = merge_overrides(
        [f"stage={stage}", f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}"],
        _list(profile, "common"),
        _list(profile, stage),
        inputs,
        extra,
    )
    return run(compose_app("train", overrides))


def multi_process_problem(cfg: DictConfig) -> str | None:
    """Why ``cfg`` cannot train inside the demo, or None.

    The demo calls ``trainer.fit`` once per stage in one script. With several devices, Lightning's default
    launcher starts this whole script again in every other process, each with its own output folder, and
    they part ways after the first stage. Spawned workers run only the fit.
    """
    from .training.run import num_processes

    n = num_processes(cfg.trainer)
    if n == 1 or OmegaConf.select(cfg, "strategy.start_method") in ("spawn", "forkserver"):
        return None
    return (
        f"the demo trains its stages one after another in one script, and trainer.devices x trainer.num_nodes "
        f"asks for {n} processes: Lightning's launcher would start the whole demo again in each. Add "
        "+strategy.start_method=spawn (strategy=ddp), or run the stages with train.py (stage=tokenizer|base|car)."
    )


def check_tokenizer(tokenizer_path: Path, cfg: DictConfig, eval_seed: int, num_images: int, out_dir: Path) -> dict:
    """OCR of the trained tokenizer's reconstructions of held-out words (and of the originals)."""
    from .evaluation.reconstruction import evaluate_reconstructions
    from .evaluation.runner import eval_datamodule
    from .tokenizers import load_bsq_vae

    vae = load_bsq_vae(tokenizer_path)
    data_cfg = OmegaConf.merge(cfg, {"seed": eval_seed, "data": {"seed": eval_seed}})
    dm = eval_datamodule(data_cfg, batch_size=16, num_images=num_images)
    dm.setup("validate")
    schedule = OmegaConf.to_container(cfg.schedule.scales, resolve=True)
    return evaluate_reconstructions(vae, dm.val_dataloader(), schedule, num_images=num_images, out_dir=out_dir)


def reused(weights: str) -> dict[str, Any]:
    """A stage result standing for an earlier run's export (``--tokenizer`` / ``--base`` / ``--car``)."""
    export_dir = Path(weights).resolve().parent
    return {"export_dir": str(export_dir), "run_dir": str(export_dir.parent), "global_step": None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns (and writes) the summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for conf/train.yaml, applied to every stage")
    parser.add_argument("--profile", default="quick", help=f"budgets: conf/demo/<profile>.yaml, one of {profiles()}")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    parser.add_argument("--tokenizer", help="reuse this trained tokenizer.safetensors (skips stage=tokenizer)")
    parser.add_argument("--base", help="reuse this trained base.safetensors (skips stage=base; needs --tokenizer)")
    parser.add_argument("--car", help="reuse this trained car_weights.safetensors (skips stage=car; needs --base)")
    parser.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="stop after the tokenizer and the OCR of its reconstructions (for tokenizer A/Bs)",
    )
    parser.add_argument(
        "--recon-images", type=int, help="held-out words for the reconstruction check (default: the profile's)"
    )
    args = parser.parse_args(argv)
    if args.base and not args.tokenizer:
        parser.error("--base needs the --tokenizer it was trained over")
    if args.car and not args.base:
        parser.error("--car needs the --base it was trained on")
    for given in (args.tokenizer, args.base, args.car):
        if given and not Path(given).is_file():
            parser.error(f"no such file: {given}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    profile = load_profile(args.profile)
    for name in ("tokenizer", "base", "car"):
        problem = multi_process_problem(
            compose_app("train", merge_overrides(_list(profile, "common"), _list(profile, name), args.overrides))
        )
        if problem:
            parser.error(f"stage={name}: {problem}")
    out = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    eval_seed = int(profile.get("eval_seed", 777))
    extra = list(args.overrides)
    times: dict[str, float] = {}

    def timed(name: str, fn, *a):
        start = time.time()
        result = fn(*a)
        times[name] = round((time.time() - start) / 60, 2)
        return result

    def stage(name: str, step: str, what: str, reuse: str | None, inputs: list[str], weights: str):
        """Train stage ``name`` into ``out/name`` -- or reuse ``reuse`` -> (stage result, weights path)."""
        if reuse:
            logger.info("%s stage=%s: reusing %s", step, name, reuse)
            return reused(reuse), Path(reuse).resolve()
        logger.info("%s stage=%s: %s (%s)", step, name, what, out / name)
        result = timed(name, train_stage, name, profile, out / name, inputs, extra)
        return result, Path(result["export_dir"]) / weights

    from .training.base_stage import BASE_EXPORT
    from .training.tokenizer_stage import TOKENIZER_WEIGHTS

    tok, tokenizer_path = stage(
        "tokenizer", "1/4", "a BSQ-VAE on single-word 64x128 scenes", args.tokenizer, [], TOKENIZER_WEIGHTS
    )
    base_inputs = [f"vae.build.path={tokenizer_path}"]
    eval_cfg = compose_app("train", merge_overrides(_list(profile, "common"), extra))
    recon = timed(
        "tokenizer_check",
        check_tokenizer,
        tokenizer_path,
        eval_cfg,
        eval_seed,
        int(args.recon_images or profile.get("num_recon_images", 48)),
        out / "tokenizer" / "reconstructions",
    )
    recon_metrics = {
        "tokenizer_recon_sen_acc": recon.get("recon_sen_acc"),
        "tokenizer_recon_psnr": recon.get("recon_psnr"),
        "tokenizer_recon_images": recon.get("recon_images"),
    }
    if args.tokenizer_only:
        return write_summary(
            out,
            {
                "profile": args.profile,
                "minutes": {**times, "total": round(sum(times.values()), 2)},
                "steps": {"tokenizer": tok["global_step"]},
                "tokenizer_reconstructions": str(out / "tokenizer" / "reconstructions" / "reconstructions.png"),
                "run_dirs": {"tokenizer": tok["run_dir"]},
                "metrics": recon_metrics,
            },
        )

    base, base_path = stage("base", "2/4", "Infinity over the trained tokenizer", args.base, base_inputs, BASE_EXPORT)
    car_inputs = [*base_inputs, f"model.build.base_weights={base_path}"]

    if args.car:
        logger.info("3/4 stage=car: reusing %s", args.car)
        car = reused(args.car)
    else:
        logger.info("3/4 stage=car: the glyph control branch on the frozen base (%s)", out / "car")
        car = timed("car", train_stage, "car", profile, out / "car", car_inputs, extra)

    logger.info("4/4 evaluate.py on held-out words (seed %d), with and without the control", eval_seed)
    from .evaluation.report import GT_PREFIX
    from .evaluation.runner import run_evaluation

    eval_dir = out / "eval"
    # evaluate.py's config has no training keys: only the architecture, data and paths overrides carry over.
    common_eval = [o for o in _list(profile, "common") if _top_key(o) in ("model", "vae", "schedule", "data")]
    metrics = timed(
        "evaluate",
        run_evaluation,
        compose_app(
            "evaluate",
            merge_overrides(
                [f"ckpt={car['export_dir']}", f"paths.run_dir={eval_dir}", f"paths.root_dir={ROOT}"],
                common_eval,
                car_inputs,
                [f"data.seed={eval_seed}"],
                _list(profile, "evaluate"),
                [o for o in extra if _top_key(o) in ("model", "vae", "schedule", "data", "paths")],
            ),
        ),
    )
    grid = out / "demo_grid.png"
    shutil.copyfile(eval_dir / "examples" / "panel.png", grid)
    summary = {
        "profile": args.profile,
        "minutes": {**times, "total": round(sum(times.values()), 2)},
        "steps": {"tokenizer": tok["global_step"], "base": base["global_step"], "car": car["global_step"]},
        "grid (control | ground truth | with control | without control)": str(grid),
        "metrics_table": str(eval_dir / "metrics.md"),
        "tokenizer_reconstructions": str(out / "tokenizer" / "reconstructions" / "reconstructions.png"),
        "run_dirs": {
            "tokenizer": tok["run_dir"],
            "base": base["run_dir"],
            "car": car["run_dir"],
            "eval": str(eval_dir),
        },
        "metrics": {
            "sen_acc_with_control": metrics.get("sen_acc"),
            "sen_acc_without_control": metrics.get("nocontrol_sen_acc"),
            "ned_with_control": metrics.get("ned"),
            "glyph_iou": metrics.get("glyph_iou"),
            "gt_sen_acc": metrics.get("gt_sen_acc"),
            **recon_metrics,
            "eval_images": metrics.get("num_images"),
            # eval.gt_prefix_scales rows: the same words with the first k scales taken from the ground truth.
            **{
                f"sen_acc_{k.removesuffix('_sen_acc')}": v
                for k, v in metrics.items()
                if k.startswith(GT_PREFIX) and k.endswith("_sen_acc")
            },
        },
    }
    return write_summary(out, summary)


def write_summary(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``<out>/demo_summary.json``, log it, and return it with ``out`` added."""
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("demo finished; everything it made:\n%s", json.dumps(summary, indent=1))
    return {**summary, "out": str(out)}


if __name__ == "__main__":
    main()
