"""`make demo`: three stages then evaluate, at smoke size; the profiles; the tokenizer reconstruction check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scenetxtvar.demo import load_profile, main, merge_overrides


def test_profiles_compose_and_full_inherits_quick() -> None:
    quick, full = load_profile("quick"), load_profile("full")
    assert "stage=car" not in quick.common and "model=demo" in quick.common

    # full replaces the budgets it names and keeps the rest of quick.
    def steps(overrides: list[str]) -> list[int]:
        return [int(o.split("=", 1)[1]) for o in overrides if o.startswith("trainer.max_steps=")]

    assert len(steps(full.tokenizer)) == 1 and steps(full.tokenizer)[0] > steps(quick.tokenizer)[0]
    full_tok = [o for o in full.tokenizer if o.startswith("tokenizer_stage.")]
    quick_tok = [o for o in quick.tokenizer if o.startswith("tokenizer_stage.")]
    # The glyph weight full names replaces quick's in place (one entry per key); the rest is inherited.
    assert "tokenizer_stage.loss.glyph_weight=0.5" in full_tok and "tokenizer_stage.loss.glyph_weight=1.0" in quick_tok
    assert [o.split("=")[0] for o in full_tok] == [o.split("=")[0] for o in quick_tok]
    assert [o for o in full_tok if "glyph_weight" not in o] == [o for o in quick_tok if "glyph_weight" not in o]
    assert "model=demo" in full.common and "data.num_train=8000" in full.common
    assert not any(o.startswith("data.num_train=4000") for o in full.common)
    with pytest.raises(ValueError, match="unknown demo profile"):
        load_profile("huge")


def test_evaluation_gets_the_architecture_overrides_of_the_command_line() -> None:
    """evaluate.py has no training keys: only model/vae/schedule/data/paths overrides reach it."""
    from scenetxtvar.demo import _top_key

    assert [_top_key(o) for o in ("+vae.build.x=1", "~model.build.y", "schedule=demo64x128", "optim.lr=1")] == [
        "vae",
        "model",
        "schedule",
        "optim",
    ]


def test_merge_overrides_keeps_the_last_value_per_key() -> None:
    merged = merge_overrides(["a.b=1", "model=demo", "+x=1"], ["a.b=2"], ["x=3"])
    assert merged == ["a.b=2", "model=demo", "x=3"]


class _PerfectTokenizer(torch.nn.Module):
    """Reconstructs every image exactly: the reconstruction scores must equal the originals'."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, images, schedule):
        return images, []

    def decode(self, z):
        return z


def _batch(n: int) -> dict:
    from scenetxtvar.data.synthetic import make_scene

    scenes = [make_scene(3, i, size=(64, 128), min_words=1, max_words=1) for i in range(n)]
    images = torch.stack(
        [torch.from_numpy(np.asarray(s["image"].convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes]
    )
    return {
        "images": images,
        "valid": torch.ones(n, dtype=torch.bool),
        "captions": [s["caption"] for s in scenes],
        "meta": [s["meta"] for s in scenes],
    }


def test_reconstruction_check_scores_reconstructions_like_the_originals(tmp_path: Path) -> None:
    from scenetxtvar.evaluation.reconstruction import evaluate_reconstructions

    sched = [(1, 1), (8, 16)]
    batches = [_batch(4), _batch(4)]
    perfect = evaluate_reconstructions(_PerfectTokenizer(), batches, sched, num_images=6, out_dir=tmp_path)
    assert perfect["recon_images"] == 6 and perfect["recon_l1"] == 0.0
    assert perfect["recon_sen_acc"] == perfect["gt_sen_acc"] >= 0.8
    assert perfect["recon_num_lines"] == 6
    with Image.open(tmp_path / "reconstructions.png") as im:
        assert im.width > 2 * 128
    assert json.loads((tmp_path / "reconstruction_metrics.json").read_text())["recon_images"] == 6

    from scenetxtvar.tokenizers import BSQVAE, BSQVAEConfig

    torch.manual_seed(0)
    cfg = BSQVAEConfig(base_ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, patch_size=8, codebook_dim=16, norm_groups=1)
    random = evaluate_reconstructions(BSQVAE(cfg).eval(), batches[:1], sched)
    assert random["recon_sen_acc"] == 0.0 and random["recon_l1"] > 0.1 and random["gt_sen_acc"] >= 0.75


# Smoke-size overrides for every stage of a demo run.
SMOKE = [
    "trainer.max_steps=2",
    "data.num_workers=0",  # the profiles read in a loader worker; spawning one per stage only slows a smoke run
    "data.num_train=16",
    "data.num_val=8",
    "data.val_samples=8",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.drift.every_n_steps=1",
    "callbacks.panels.every_n_steps=2",
]


@pytest.mark.slow
def test_demo_runs_the_three_stages_then_evaluates(tmp_path: Path) -> None:
    summary = main(
        [
            "--out",
            str(tmp_path),
            f"paths.cache_dir={tmp_path}/cache",
            *SMOKE,
        ]
    )
    assert summary["steps"] == {"tokenizer": 2, "base": 2, "car": 2}
    runs = {k: Path(v) for k, v in summary["run_dirs"].items()}
    assert (runs["tokenizer"] / "export" / "tokenizer.safetensors").exists()
    assert (runs["base"] / "export" / "base.safetensors").exists()
    assert (runs["car"] / "export" / "car_weights.safetensors").exists()
    for png in (
        summary["grid (control | ground truth | with control | without control)"],
        summary["tokenizer_reconstructions"],
    ):
        with Image.open(png) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    metrics = json.loads((runs["eval"] / "metrics.json").read_text())
    for key in ("sen_acc", "ned", "glyph_iou", "gt_sen_acc", "nocontrol_sen_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["gt_sen_acc"] >= 0.75 and metrics["num_images"] == 8
    assert Path(summary["metrics_table"]).read_text().strip()
    assert summary["metrics"]["gt_sen_acc"] == metrics["gt_sen_acc"]
    assert summary["metrics"]["sen_acc_gtprefix5"] == metrics["gtprefix5_sen_acc"]  # eval.gt_prefix_scales=[4,5]
    assert list((runs["car"] / "wandb").glob("offline-run-*/run-*.wandb"))
    written = json.loads((Path(summary["out"]) / "demo_summary.json").read_text())
    assert written["steps"] == summary["steps"] and set(written["minutes"]) >= {"tokenizer", "base", "car", "total"}

    def reusing(out: str, *stages: str) -> dict:
        """The demo again in ``tmp_path / out``, reusing the first run's exports of ``stages``."""
        files = {"tokenizer": "tokenizer.safetensors", "base": "base.safetensors", "car": "car_weights.safetensors"}
        flags = [a for name in stages for a in (f"--{name}", str(runs[name] / "export" / files[name]))]
        return main(["--out", str(tmp_path / out), *flags, f"paths.cache_dir={tmp_path}/cache", *SMOKE])

    # --tokenizer/--base reuse the first run's exports: only the CAR stage trains, the evaluation reruns.
    reused = reusing("again", "tokenizer", "base")
    assert reused["steps"] == {"tokenizer": None, "base": None, "car": 2}
    assert reused["run_dirs"]["base"] == str(runs["base"]) and "tokenizer" not in reused["minutes"]
    assert Path(reused["run_dirs"]["car"]).parent == Path(reused["out"])
    assert json.loads((Path(reused["run_dirs"]["eval"]) / "metrics.json").read_text())["num_images"] == 8

    # --car as well: nothing trains; the first run's CAR branch is evaluated again, with the same result.
    evaluated = reusing("eval_only", "tokenizer", "base", "car")
    assert evaluated["steps"] == {"tokenizer": None, "base": None, "car": None}
    assert evaluated["run_dirs"]["car"] == str(runs["car"]) and set(evaluated["minutes"]) == {
        "tokenizer_check",
        "evaluate",
        "total",
    }
    again = json.loads((Path(evaluated["run_dirs"]["eval"]) / "metrics.json").read_text())
    assert again["sen_acc"] == metrics["sen_acc"] and again["glyph_iou"] == pytest.approx(metrics["glyph_iou"])


def test_demo_tokenizer_only_stops_after_the_reconstruction_check(tmp_path: Path) -> None:
    """--tokenizer-only: the tokenizer trains and its reconstructions are read; no base, CAR or evaluation."""
    summary = main(
        ["--out", str(tmp_path), "--tokenizer-only", "--recon-images", "4", f"paths.cache_dir={tmp_path}/cache", *SMOKE]
    )
    assert summary["steps"] == {"tokenizer": 2} and set(summary["run_dirs"]) == {"tokenizer"}
    assert summary["metrics"]["tokenizer_recon_images"] == 4
    assert 0.0 <= summary["metrics"]["tokenizer_recon_sen_acc"] <= 1.0
    assert set(summary["minutes"]) == {"tokenizer", "tokenizer_check", "total"}
    assert sorted(p.name for p in Path(summary["out"]).iterdir()) == ["demo_summary.json", "tokenizer"]


@pytest.mark.slow
@pytest.mark.dist
def test_demo_trains_a_stage_in_spawned_processes(tmp_path: Path) -> None:
    """The launch the demo's refusal suggests: two spawned CPU ranks train, and the demo still sees their steps."""
    spawn = ["strategy=ddp", "+strategy.start_method=spawn", "trainer.devices=2", "trainer.accelerator=cpu"]
    summary = main(
        ["--out", str(tmp_path), "--tokenizer-only", "--recon-images", "4", f"paths.cache_dir={tmp_path}/cache"]
        + SMOKE
        + spawn
    )
    assert summary["steps"] == {"tokenizer": 2}  # the workers' step count, not the idle main process's 0
    run_dir = Path(summary["run_dirs"]["tokenizer"])
    assert 0.0 <= summary["metrics"]["tokenizer_recon_sen_acc"] <= 1.0
    # The main process exports after the workers are gone: the file must hold rank 0's trained weights (those of
    # its step-2 checkpoint), not the main process's untrained copy.
    from safetensors.torch import load_file

    exported = load_file(run_dir / "export" / "tokenizer.safetensors")
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert exported and all(torch.equal(v, trained[f"vae.{k}"]) for k, v in exported.items())


def test_demo_refuses_reuse_it_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--base", str(tmp_path / "base.safetensors")])
    assert "--base needs the --tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--car", str(tmp_path / "car_weights.safetensors")])
    assert "--car needs the --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--tokenizer", str(tmp_path / "missing.safetensors")])
    assert "no such file" in capsys.readouterr().err


def test_demo_refuses_devices_its_stages_cannot_share(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Several devices under Lightning's default launcher would re-run the whole demo per process."""
    from omegaconf import OmegaConf

    from scenetxtvar.training.run import num_processes

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "strategy=ddp", "trainer.devices=2"])
    assert "asks for 2 processes" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was made
    counts = {"1": 1, "2": 2, "0,1": 2, "auto": 1}  # auto: 1 on a CPU
    for devices, n in counts.items():
        trainer = OmegaConf.create({"devices": devices, "num_nodes": 1, "accelerator": "cpu"})
        assert num_processes(trainer) == n
    assert num_processes(OmegaConf.create({"devices": [0, 1], "num_nodes": 2})) == 4
