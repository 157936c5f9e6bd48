"""``make demo``: the embedded default end to end on CPU.

Synthetic scene-text shards -> a tiny InfinityPilot trained on them (wandb offline) -> samples of
held-out layouts with and without the control -> a grid and a summary of where everything is.
The base, the tokenizer and the text encoder are tiny and random (nothing can be downloaded), so
the samples show the plumbing working, not a trained text renderer.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("scenetxtvar.demo")


def sample_grid(cfg, export_dir: Path, out_path: Path, num: int = 4, seed: int = 0) -> Path:
    """Samples for held-out prompts and layouts, with and without the trained control, as one PNG."""
    from .checkpoint import load_car_weights
    from .models.pilot import build_control_pyramid
    from .training.module import PilotModule
    from .training.panels import make_panel

    module = PilotModule(
        model=OmegaConf.to_container(cfg.model.build, resolve=True),
        vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
        text=OmegaConf.to_container(cfg.text, resolve=True),
        conditions=list(cfg.condition.names),
    )
    load_car_weights(module.model, export_dir / "car_weights.safetensors")
    module.eval()
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    n = min(num, batch["images"].shape[0])
    images, controls, captions = batch["images"][:n], batch["controls"][:n], list(batch["captions"][:n])
    sched = module.schedule_for(batch)
    text = module.text_encoder.encode(captions)
    kw = dict(vae=module.vae, scale_schedule=sched, label_B_or_BLT=text, B=n, g_seed=seed, cfg_list=3.0, top_p=0.97)
    with torch.no_grad():
        pyramid = build_control_pyramid(controls, sched, patch=module.model.control_patch)
        with_control = module.model.autoregressive_infer_cfg(control_tensors=pyramid, **kw).image
        without = module.model.autoregressive_infer_cfg(**kw).image
    panel = make_panel(controls[:, :3], images, with_control, without, captions)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(out_path)
    return out_path


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; extra arguments are Hydra overrides (e.g. trainer.max_steps=20)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for conf/train.yaml")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=demo", f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}", *args.overrides],
        )
    from .training.run import run

    start = time.time()
    logger.info("1/2 training a tiny pilot on synthetic scene-text shards (run dir %s)", run_dir)
    result = run(cfg)
    logger.info("2/2 sampling held-out layouts with and without the control")
    grid = sample_grid(cfg, Path(result["export_dir"]), run_dir / "demo_grid.png")
    summary = {
        "run_dir": str(run_dir),
        "steps": result["global_step"],
        "minutes": round((time.time() - start) / 60, 2),
        "checkpoints": result["checkpoint_dir"],
        "car_export": result["export_dir"],
        "sample_grid (control | ground truth | with control | without control)": str(grid),
        "panels": str(run_dir / "panels"),
        "drift_plot": str(run_dir / "drift" / "drift.png"),
        "wandb_offline_run": str(run_dir / "wandb"),
        "metrics": {k: round(v, 4) for k, v in result["metrics"].items() if k.startswith(("val/", "train/loss"))},
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))  # the demo's report to the person who ran it
    return summary


if __name__ == "__main__":
    main()
