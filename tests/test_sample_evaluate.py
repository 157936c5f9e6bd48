"""sample.py / evaluate.py: layouts -> glyph controls, determinism, sidecars, checkpoint checks, the eval report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from scenetxtvar.data.glyph import polygon_mask, render_glyph_control
from scenetxtvar.inference import (
    Layout,
    SampleSettings,
    control_from_images,
    generate,
    load_model_and_vae,
    read_layouts,
    run_sample,
    schedule_for,
    sha256_file,
)
from scenetxtvar.scales import pixel_size
from scenetxtvar.training.export import export_car

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
BOXES = [[32, 40, 224, 104], [64, 150, 192, 214]]
LAYOUT = {"prompt": 'a sign that says "OPEN" and "24h"', "texts": [
    {"text": "OPEN", "box": BOXES[0]},
    {"text": "24h", "polygon": [[64, 150], [192, 150], [192, 214], [64, 214]]},
]}  # fmt: skip
FAST = ["sampling.cfg=1.0", "progress=false"]  # no CFG: half the sampling work


make_cfg = compose_config  # (name, run_dir, cache, *overrides)


def write_export(directory: Path, *overrides: str) -> Path:
    """A CAR export of the tiny demo pilot; the zero-initialised fusion is perturbed so the control matters."""
    from scenetxtvar.training.module import PilotModule

    cfg = make_cfg("sample", directory, directory, "ckpt=null", *overrides)
    module = PilotModule(
        model=OmegaConf.to_container(cfg.model.build, resolve=True),
        vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
        text=OmegaConf.to_container(cfg.text, resolve=True),
        conditions=list(cfg.condition.names),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in module.model.car_skip_linear:
            lin.weight.normal_(0.0, 0.05, generator=gen)
    export_car(module.model, directory / "export")
    return directory / "export"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def kit(export_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kit")
    return load_model_and_vae(make_cfg("sample", run_dir, run_dir, f"ckpt={export_dir}"))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- sample.py


def test_sample_writes_pngs_sidecars_and_grid_and_is_deterministic(export_dir, kit, tmp_path):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"images": [LAYOUT]}))
    cfg = make_cfg("sample", tmp_path / "a", tmp_path, f"ckpt={export_dir}", f"layout={layout}", "num_images=2", *FAST)
    first = run_sample(cfg)
    a = tmp_path / "a" / "samples"
    assert len(first["samples"]) == 2 and Path(first["grid"]).is_file()
    assert Image.open(first["grid"]).size[0] > 2 * 256
    # The layout is cycled: the second image has seed + 1, hence other pixels.
    assert not np.array_equal(_pixels(a / "00000.png"), _pixels(a / "00001.png"))
    side = json.loads((a / "00001.json").read_text())
    assert side["prompt"] == LAYOUT["prompt"] and side["seed"] == 1 and side["control"] == "layout"
    assert side["settings"] == SampleSettings.from_mapping(side["settings"]).as_dict()
    assert set(side["settings"]) == set(SampleSettings().as_dict()) and side["settings"]["cfg"] == 1.0
    assert side["checkpoint"]["sha256"] == sha256_file(export_dir / "car_weights.safetensors")
    assert side["checkpoint"]["kind"] == "export" and side["size"] == [256, 256]
    assert [t["text"] for t in side["layout"]["texts"]] == ["OPEN", "24h"]
    # Same seed -> same image: the sidecar alone (prompt, layout, seed, settings) reproduces it exactly.
    settings = SampleSettings.from_mapping(side["settings"], seed=side["seed"])
    redo = generate(kit.model, kit.vae, side["prompt"], layouts=[side["layout"]], text_encoder=kit.text_encoder,
                    settings=settings)  # fmt: skip
    assert np.array_equal(np.asarray(redo.images[0]), _pixels(a / "00001.png"))


def test_layout_is_honoured_and_the_control_steers_the_sample(kit):
    result = generate(kit.model, kit.vae, None, layouts=[LAYOUT], text_encoder=kit.text_encoder, cfg=1.0)
    control = result.controls[0]
    assert control.shape == (3, 256, 256) and set(control.unique().tolist()) == {-1.0, 1.0}
    lit = control[0].numpy() > 0
    inside = np.zeros((256, 256), bool)
    for x0, y0, x1, y1 in BOXES:
        box = polygon_mask([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], (256, 256)).astype(bool)
        assert lit[box].sum() > 0.05 * box.sum()  # every word is drawn ...
        inside |= box
    assert lit.sum() > 0 and not lit[~inside].any()  # ... and nothing outside the boxes
    record = result.records[0]
    assert record["prompt"] == LAYOUT["prompt"] and record["controlled"] and record["seed"] == 0
    base = generate(kit.model, kit.vae, None, layouts=[LAYOUT], text_encoder=kit.text_encoder, cfg=1.0,
                    use_control=False)  # fmt: skip
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(base.images[0]))
    assert result.images[0].size == (256, 256)


def test_layout_frames_aspects_and_control_images(kit, tmp_path):
    lay = Layout.from_dict({"size": [512, 512], "texts": [{"text": "Hi", "box": [64, 64, 448, 256]}]})
    scaled = lay.in_pixels((256, 256))
    assert scaled.polygons[0] == [[32, 32], [224, 32], [224, 128], [32, 128]]
    assert scaled.default_prompt() == 'a sign that says "Hi"'
    assert pixel_size(schedule_for(kit.model, kit.vae, 0.5, "0.06M")) == (176, 352)
    # A control image file (any size) is cover-resized to the template nearest its aspect, masks thresholded.
    path = tmp_path / "glyph.png"
    render_glyph_control(["SALE"], [[[100, 200], [900, 200], [900, 500], [100, 500]]], (1024, 1024)).save(path)
    control, sched = control_from_images(str(path), ["glyph"], ["glyph"], "0.06M", kit.model, kit.vae)
    assert control.shape == (3, 256, 256) and pixel_size(sched) == (256, 256)
    assert set(control.unique().tolist()) == {-1.0, 1.0}
    lit = control[0] > 0
    assert lit[50:125, 25:225].float().mean() > 0.1 and not lit[:40].any()
    with pytest.raises(ValueError, match="exactly the conditions"):
        control_from_images({"canny": str(path)}, ["glyph"], ["glyph"], "0.06M", kit.model, kit.vae)


@pytest.mark.parametrize(
    ("layout", "error", "match"),
    [
        ({"texts": [{"text": "EDGE", "box": [200, 10, 300, 60]}]}, ValueError, "outside the 256x256"),
        ({"texts": [{"text": "  ", "box": [20, 10, 100, 60]}]}, ValueError, "word is empty"),
        ({"font": "/no/such/font.ttf", "texts": [{"text": "A", "box": [20, 10, 100, 60]}]}, ValueError,
         "unknown font"),
        ({"texts": [{"text": "A", "polygon": [[10, 10], [50, 10], [90, 10]]}]}, ValueError, "degenerate"),
        ({"texts": [{"text": "A", "box": [50, 10, 20, 60]}]}, ValueError, "x1 > x0"),
        ({"txts": []}, ValueError, "unknown keys"),
        ({"words": ["A", "B"], "boxes": [[1, 1, 9, 9]]}, ValueError, "2 words but 1"),
        ({"texts": []}, ValueError, "no texts"),
        ({"texts": [{"text": "A", "box": [20, 10, 100, 60]}], "pn": "9M"}, ValueError, "pn must be one of"),
    ],
)  # fmt: skip
def test_bad_layouts_raise_clear_errors(kit, layout, error, match):
    with pytest.raises(error, match=match):
        generate(kit.model, kit.vae, None, layouts=[layout], text_encoder=kit.text_encoder)


def test_bad_inputs_raise_clear_errors(kit, tmp_path):
    with pytest.raises(FileNotFoundError, match="layout file not found"):
        read_layouts(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="2 prompts for 1"):
        generate(kit.model, kit.vae, ["a", "b"], layouts=[LAYOUT], text_encoder=kit.text_encoder)
    with pytest.raises(ValueError, match="not both"):
        generate(kit.model, kit.vae, ["a"], layouts=[LAYOUT], control_images=["x"], text_encoder=kit.text_encoder)
    with pytest.raises(ValueError, match=r"control tensor must be \(Cc=3"):
        generate(kit.model, kit.vae, ["a"], control_images=[torch.zeros(6, 256, 256)], text_encoder=kit.text_encoder)
    with pytest.raises(ValueError, match="unknown sampling settings"):
        generate(kit.model, kit.vae, ["a"], text_encoder=kit.text_encoder, guidance=2.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        SampleSettings(tau=0)


def test_checkpoint_that_does_not_match_the_model_is_refused(tmp_path, export_dir):
    shallow = write_export(tmp_path / "d1", "model.build.car_depth=1")
    cfg = make_cfg("sample", tmp_path, tmp_path, f"ckpt={shallow}")  # the configured model has car_depth 2
    with pytest.raises(ValueError, match=r"car_depth: checkpoint 1, configured 2 \(set model.build.car_depth\)"):
        load_model_and_vae(cfg)
    (shallow / "car_config.json").unlink()  # without the config, the strict key check still names the problem
    with pytest.raises(ValueError, match="the file has 1 CAR blocks, the model car_depth=2"):
        load_model_and_vae(cfg)
    with pytest.raises(ValueError, match="ckpt is required"):
        load_model_and_vae(make_cfg("sample", tmp_path, tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model_and_vae(make_cfg("sample", tmp_path, tmp_path, f"ckpt={tmp_path / 'nope'}"))
    with pytest.raises(ValueError, match="condition"):  # a glyph+canny model cannot load a glyph-only branch
        load_model_and_vae(make_cfg("sample", tmp_path, tmp_path, f"ckpt={export_dir}", "condition=glyph_canny"))


def test_ground_truth_prefix_scales_sample_the_rest_and_all_of_them_reconstruct(kit):
    """eval.gt_prefix_scales: with every scale forced the sampler returns the tokenizer's reconstruction."""
    from scenetxtvar.evaluation.reconstruction import reconstruct
    from scenetxtvar.evaluation.runner import ground_truth_labels
    from scenetxtvar.inference import sample_batch

    sched = schedule_for(kit.model, kit.vae, pn="0.06M", h_div_w=1.0)
    h, w = pixel_size(sched, kit.vae.downsample)
    gen = torch.Generator().manual_seed(1)
    batch = {"images": torch.rand(2, 3, h, w, generator=gen) * 2 - 1, "captions": ['a sign "A"', 'a sign "B"']}
    controls = (torch.rand(2, 3, h, w, generator=gen) > 0.8).float()
    text = kit.text_encoder.encode(batch["captions"])
    settings = SampleSettings.from_mapping({"cfg": 1.0, "top_k": 1}, use_control=True)
    labels = ground_truth_labels(kit.module, batch, sched, len(sched))
    forced = sample_batch(kit.model, kit.vae, text, sched, controls, 0, settings, gt_labels=labels)
    with torch.no_grad():
        recon = reconstruct(kit.vae, batch["images"], sched).clamp(-1, 1)
    assert torch.allclose(forced, recon, atol=1e-4)
    sampled = sample_batch(kit.model, kit.vae, text, sched, controls, 0, settings)
    one = sample_batch(kit.model, kit.vae, text, sched, controls, 0, settings, gt_labels=labels[:1])
    assert not torch.allclose(one, sampled) and not torch.allclose(one, forced)
    with pytest.raises(ValueError, match="gt_prefix_scales"):
        ground_truth_labels(kit.module, batch, sched, len(sched) + 1)


# ---------------------------------------------------------------------------------------------- end to end


def test_evaluate_runs_end_to_end_on_an_export(export_dir, tmp_path):
    """The quick tier: 2 held-out synthetic images, no base row; the slow tier runs a trained checkpoint."""
    from scenetxtvar.evaluation import run_evaluation

    cfg = make_cfg("evaluate", tmp_path / "eval", tmp_path / "cache", f"ckpt={export_dir}", "num_images=2",
                   "batch_size=2", "eval.nocontrol=false", "eval.num_examples=0", "eval.gt_prefix_scales=[2]",
                   *FAST)  # fmt: skip
    metrics = run_evaluation(cfg)
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert data["num_images"] == 2 and data["gt_sen_acc"] >= 0.9 and data["sen_acc"] is not None
    assert data["gtprefix2_sen_acc"] is not None and data["gtprefix2_glyph_iou"] is not None
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| first 2 scales from the ground truth, the rest sampled |" in md
    assert data["nocontrol_sen_acc"] is None and metrics["glyph_iou"] is not None
    assert any("no local Inception weights configured" in n for n in data["notices"])
    assert (tmp_path / "eval" / "metrics.md").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 3-step tiny training run: its Lightning checkpoint, export and synthetic cache."""
    from scenetxtvar.training.run import run

    run_dir, cache = tmp_path_factory.mktemp("train"), tmp_path_factory.mktemp("cache")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.run_dir={run_dir}", f"paths.cache_dir={cache}", "debug=fast",
                                          "callbacks=minimal", "logger=csv"])  # fmt: skip
    result = run(cfg)
    return {"ckpt": Path(result["checkpoint_dir"]) / "last.ckpt", "export": Path(result["export_dir"]), "cache": cache}


@pytest.mark.slow
def test_evaluate_end_to_end_writes_the_report(trained, tmp_path):
    from scenetxtvar.evaluation import run_evaluation

    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    cfg = make_cfg("evaluate", tmp_path / "eval", trained["cache"], f"ckpt={trained['ckpt']}", "num_images=3",
                   "batch_size=2", f"metrics.fid_weights={missing}", "logger=csv", "progress=false")  # fmt: skip
    metrics = run_evaluation(cfg)
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("sen_acc", "ned", "glyph_iou", "gt_sen_acc", "gt_ned", "nocontrol_sen_acc", "val_loss", "val_acc_s0"):
        assert data[key] is not None, key
    assert data["num_images"] == metrics["num_images"] == 3
    assert data["gt_sen_acc"] >= 0.9 and data["gt_glyph_iou"] > 0.9  # the upper-bound row reads the real text
    assert 0.0 <= data["sen_acc"] <= 1.0 and data["fid"] is None
    assert any("FID/KID skipped" in n and str(missing) in n for n in data["notices"])
    assert data["info"]["checkpoint"]["sha256"] == sha256_file(trained["ckpt"])
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "ground-truth images (upper bound)" in md and "FID/KID skipped" in md
    assert (tmp_path / "eval" / "examples" / "panel.png").is_file()
    assert list((tmp_path / "eval" / "csv").rglob("metrics.csv"))


@pytest.mark.slow
def test_lightning_checkpoint_of_another_base_is_refused(trained, tmp_path):
    cfg = make_cfg("sample", tmp_path, tmp_path, f"ckpt={trained['ckpt']}", "seed=1")  # seed 1: another random base
    with pytest.raises(ValueError, match="different base weights"):
        load_model_and_vae(cfg)
    kit = load_model_and_vae(str(trained["ckpt"]))  # a .ckpt alone carries its architecture
    assert kit.checkpoint.kind == "lightning" and kit.conditions == ["glyph"]


@pytest.mark.slow
def test_sample_and_evaluate_scripts(trained, tmp_path):
    layout = tmp_path / "layout.yaml"
    layout.write_text("- texts:\n    - {text: OPEN, box: [32, 40, 224, 104]}\n")
    env_cmd = [sys.executable]
    out = subprocess.run(
        [*env_cmd, "sample.py", f"ckpt={trained['export']}", f"layout={layout}", f"hydra.run.dir={tmp_path / 's'}",
         "sampling.cfg=1.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "s" / "samples" / "00000.png").is_file() and (tmp_path / "s" / "grid.png").is_file()
    out = subprocess.run(
        [*env_cmd, "evaluate.py", f"ckpt={trained['export']}", f"hydra.run.dir={tmp_path / 'e'}",
         f"paths.cache_dir={trained['cache']}", "num_images=2", "batch_size=2", "eval.nocontrol=false",
         "sampling.cfg=1.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert data["num_images"] == 2 and data["gt_sen_acc"] is not None and "nocontrol_sen_acc" in data


def test_a_custom_schedule_sets_the_image_size_through_the_tokenizer_patch(kit):
    """Explicit scales (schedule.scales) replace the pn template; the image is patch x the last grid."""
    scales = [[1, 1], [1, 2], [2, 4]]
    stride = kit.vae.downsample
    layout = {"texts": [{"text": "HI", "box": [2, 2, 4 * stride - 2, 2 * stride - 2]}], "prompt": "a sign"}
    result = generate(kit.model, kit.vae, None, layouts=[layout], text_encoder=kit.text_encoder, cfg=1.0, scales=scales)
    assert result.images[0].size == (4 * stride, 2 * stride)
    assert result.controls[0].shape == (3, 2 * stride, 4 * stride)
    assert result.records[0]["schedule"] == [[1, 1, 1], [1, 1, 2], [1, 2, 4]]
    assert SampleSettings.from_mapping({"scales": scales}).scales == scales
