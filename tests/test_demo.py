"""`make demo` end to end at reduced size: every artefact exists and is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from scenetxtvar.demo import main


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    summary = main(
        [
            "--out",
            str(tmp_path),
            f"paths.cache_dir={tmp_path}/cache",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "data.num_train=16",
            "data.num_val=4",
            "data.val_samples=4",
            "data.epoch_samples=8",
            "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.drift.every_n_steps=1",
            "callbacks.drift.fusion_every_n_steps=2",
            "callbacks.panels.every_n_steps=2",
        ]
    )
    run_dir = Path(summary["run_dir"])
    assert summary["steps"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (Path(summary["car_export"]) / "car_weights.safetensors").exists()
    pngs = [
        *Path(summary["samples (control | ground truth | with control | without control)"]).glob("*.png"),
        *Path(summary["training_panels"]).glob("*.png"),
        Path(summary["drift_plot"]),
    ]
    assert len(pngs) >= 3
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for key in ("sen_acc", "ned", "glyph_iou", "gt_sen_acc", "gt_ned", "nocontrol_sen_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["gt_sen_acc"] >= 0.9  # the synthetic ground truth is legible
    assert (run_dir / "eval" / "metrics.md").read_text().strip()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert json.loads((run_dir / "demo_summary.json").read_text())["steps"] == 4
