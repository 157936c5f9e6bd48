"""``make demo``: the embedded default end to end on CPU.

Synthetic scene-text shards -> a tiny InfinityPilot trained on them (wandb offline) -> samples of
held-out layouts with and without the control -> a grid and a summary of where everything is.
The base, the tokenizer and the text encoder are tiny and random (nothing can be downloaded), so
the samples show the plumbing working, not a trained text renderer; the ground-truth rows of the
metrics show what the evaluation measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("scenetxtvar.demo")


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
    logger.info("2/2 evaluating on the held-out synthetic layouts, with and without the control")
    eval_dir = run_dir / "eval"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        eval_cfg = compose(
            "evaluate",
            overrides=[
                f"ckpt={result['export_dir']}",
                f"paths.run_dir={eval_dir}",
                f"paths.root_dir={ROOT}",
                f"seed={cfg.seed}",
                f"data.num_train={cfg.data.num_train}",
                f"data.num_val={cfg.data.num_val}",
                f"data.val_samples={cfg.data.val_samples}",
                f"num_images={cfg.data.num_val}",
            ],
        )
    from .evaluation.runner import run_evaluation

    metrics = run_evaluation(eval_cfg)
    summary = {
        "run_dir": str(run_dir),
        "steps": result["global_step"],
        "minutes": round((time.time() - start) / 60, 2),
        "checkpoints": result["checkpoint_dir"],
        "car_export": result["export_dir"],
        "samples (control | ground truth | with control | without control)": str(eval_dir / "examples"),
        "training_panels": str(run_dir / "panels"),
        "drift_plot": str(run_dir / "drift" / "drift.png"),
        "wandb_offline_run": str(run_dir / "wandb"),
        "metrics_table": str(eval_dir / "metrics.md"),
        "metrics": {
            k: metrics[k]
            for k in ("sen_acc", "ned", "glyph_iou", "gt_sen_acc", "gt_ned", "nocontrol_sen_acc", "val_loss", "val_acc")
            if k in metrics
        },
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("demo finished; everything it made:\n%s", json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
