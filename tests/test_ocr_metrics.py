"""OCR metrics (AnyText Sen.ACC / NED with RapidOCR), control fidelity, image-metric notices, the report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from scenetxtvar.data.glyph import render_glyph_control
from scenetxtvar.data.synthetic import make_scene
from scenetxtvar.evaluation.fidelity import (
    canny_edges,
    control_mask,
    edge_f1,
    extract_text_mask,
    glyph_iou,
    mask_iou,
    normal_agreement,
)
from scenetxtvar.evaluation.image_metrics import ImageMetrics
from scenetxtvar.evaluation.ocr import (
    UNKNOWN_CHAR,
    OCRAccuracy,
    crop_polygon,
    levenshtein,
    line_metrics,
    normalize_text,
    normalized_edit_similarity,
    reading_rect,
)
from scenetxtvar.evaluation.report import write_report

pytest.importorskip("rapidocr")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(11, i, size=256) for i in range(10)]


@pytest.fixture(scope="module")
def ocr_engine():
    from scenetxtvar.evaluation.ocr import get_recognizer

    return get_recognizer()


# ---------------------------------------------------------------------------------------------- strings


@pytest.mark.parametrize(
    ("a", "b", "dist"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, dist):
    assert levenshtein(a, b) == dist == levenshtein(b, a)


def test_ned_matches_hand_computed_values():
    assert normalized_edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert normalized_edit_similarity("STOP", "STOP") == 1.0
    assert normalized_edit_similarity("", "OPEN") == 0.0  # nothing read: no similarity
    assert normalized_edit_similarity("", "") == 1.0
    assert normalized_edit_similarity("Hello", "hello") == pytest.approx(0.8)
    m = line_metrics(["Hello", "abd", "Cafe"], ["hello", "abc", "Cafe"])
    assert m["sen_acc"] == pytest.approx(1 / 3)  # case-sensitive: only "Cafe"
    assert m["ned"] == pytest.approx((0.8 + 2 / 3 + 1.0) / 3)
    assert m["sen_acc_ci"] == pytest.approx(2 / 3)  # case-insensitive: "Hello" counts too
    assert m["ned_ci"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert m["num_lines"] == 3
    with pytest.raises(ValueError, match="same length"):
        line_metrics(["a"], ["a", "b"])


def test_normalisation_spaces_case_and_unknown_characters():
    assert normalize_text(" OPEN 24 h ") == "OPEN24h"
    assert normalize_text("OPEN 24 h", strip_spaces=False) == "OPEN 24 h"
    assert normalize_text("Café", case_sensitive=False) == "café"
    charset = frozenset("abc")
    assert normalize_text("abX", charset=charset) == "ab" + UNKNOWN_CHAR
    # AnyText compares character ids with every unknown character mapped to one id.
    assert line_metrics(["abY"], ["abX"], charset=charset)["sen_acc"] == 1.0


# ---------------------------------------------------------------------------------------------- crops


def test_reading_rect_follows_the_polygon_direction_and_tall_crops_rotate():
    quad = [[10, 10], [90, 20], [88, 40], [8, 30]]
    rect = reading_rect(quad)
    assert rect[1][0] > rect[0][0]  # TL -> TR runs left to right like the quad
    image = np.zeros((100, 100, 3), np.uint8)
    wide = crop_polygon(image, quad)
    assert wide.shape[1] > wide.shape[0]
    tall = crop_polygon(image, [[40, 5], [60, 5], [60, 95], [40, 95]])  # vertical text: read top to bottom
    assert tall.shape[1] > tall.shape[0]
    assert crop_polygon(image, [[150, 150], [190, 150], [190, 170], [150, 170]]) is None  # outside
    with pytest.raises(ValueError, match="polygon"):
        reading_rect([[0, 0], [1, 1]])


def test_ocr_reads_rendered_glyph_controls(ocr_engine):
    """The noise floor: OCR of the control image itself (white on black, any rotation) is near perfect."""
    words = ["OPEN", "Coffee", "Station"]
    polygons = [
        [[20, 20], [140, 20], [140, 60], [20, 60]],
        [[30, 90], [220, 110], [216, 150], [26, 130]],  # rotated ~6 degrees
        [[40, 180], [230, 180], [230, 230], [40, 230]],
    ]
    glyph = render_glyph_control(words, polygons, (256, 256))
    metric = OCRAccuracy(ocr_engine)
    metric.update(glyph, words, polygons)
    assert metric.compute()["sen_acc"] == 1.0


def test_ocr_metric_on_synthetic_ground_truth_and_blank_images(scenes, ocr_engine):
    gt, blank = OCRAccuracy(ocr_engine), OCRAccuracy(ocr_engine)
    for scene in scenes:
        words, polygons = scene["meta"]["words"], scene["meta"]["polygons"]
        gt.update(scene["image"], words, polygons)
        color = 255 if len(words) % 2 else 0
        blank.update(np.full((256, 256, 3), color, np.uint8), words, polygons)
    g, z = gt.compute(), blank.compute()
    assert g["num_lines"] >= 15 and g["skipped_lines"] == 0
    assert g["sen_acc"] >= 0.9 and g["ned"] >= 0.95
    assert g["sen_acc_ci"] >= g["sen_acc"]
    assert z["sen_acc"] == 0.0 and z["ned"] == 0.0 and z["num_lines"] == g["num_lines"]
    assert gt.predictions[0]["gt"] == scenes[0]["meta"]["words"][0]


def test_ocr_skips_empty_and_dont_care_lines(ocr_engine):
    metric = OCRAccuracy(ocr_engine)
    image = np.zeros((64, 64, 3), np.uint8)
    box = [[4, 4], [60, 4], [60, 30], [4, 30]]
    preds = metric.update(image, ["", "###", "A"], [box, box, box])
    assert preds[:2] == ["", ""]
    assert metric.compute()["skipped_lines"] == 2 and metric.compute()["num_lines"] == 1
    with pytest.raises(ValueError, match="same length"):
        metric.update(image, ["A"], [])


# ---------------------------------------------------------------------------------------------- fidelity


def test_glyph_iou_high_on_ground_truth_zero_on_blank_low_on_noise(scenes):
    gt, noise, flat = [], [], []
    rng = np.random.default_rng(0)
    for scene in scenes:
        glyph = control_mask(scene["glyph"])
        gt.append(glyph_iou(scene["image"], glyph))
        noise.append(glyph_iou(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), glyph))
        flat.append(glyph_iou(np.full((256, 256, 3), 90, np.uint8), glyph))
    assert np.mean(gt) > 0.9 and min(gt) > 0.7
    assert np.mean(noise) < 0.4
    assert max(flat) == 0.0
    assert glyph_iou(scenes[0]["image"], np.zeros((256, 256), bool)) is None


def test_text_mask_polarity_dark_and_bright_text():
    glyph = np.zeros((64, 128), bool)
    glyph[20:40, 10:20] = glyph[20:40, 30:40] = glyph[20:40, 50:60] = True
    bright_on_dark = np.where(glyph[..., None], 230, 20).astype(np.uint8).repeat(3, 2)
    dark_on_bright = (255 - bright_on_dark).astype(np.uint8)
    for image in (bright_on_dark, dark_on_bright):
        assert mask_iou(extract_text_mask(image, glyph), glyph) == 1.0
    tensor = torch.from_numpy(np.where(glyph, 1.0, -1.0)).float()[None].repeat(3, 1, 1)
    assert (control_mask(tensor) == glyph).all()


def test_edge_f1_and_normal_agreement():
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    edges = canny_edges(img)
    assert edge_f1(edges, edges)["f1"] == 1.0
    shifted = np.roll(edges, 1, axis=1)
    assert edge_f1(shifted, edges, tolerance=1)["f1"] == 1.0
    assert edge_f1(shifted, edges, tolerance=0)["f1"] < 0.7
    empty = np.zeros_like(edges)
    assert edge_f1(empty, edges)["f1"] == 0.0 and edge_f1(empty, empty)["f1"] is None
    n = torch.nn.functional.normalize(torch.randn(3, 8, 8), dim=0)
    same = normal_agreement(n, n)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and same["mean_angle_deg"] < 0.5
    opposite = normal_agreement(-n, n)
    assert opposite["mean_cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert opposite["mean_angle_deg"] == pytest.approx(180.0, abs=0.5)
    with pytest.raises(ValueError, match="normal maps"):
        normal_agreement(n[:2], n[:2])


# ---------------------------------------------------------------------------------------------- image metrics


def test_fid_and_clip_are_skipped_with_a_notice_without_local_weights(tmp_path, caplog):
    caplog.set_level("WARNING")
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    metrics = ImageMetrics(fid_weights=missing, clip_model=None)
    assert "does not exist" in metrics.notices["fid"] and str(missing) in metrics.notices["fid"]
    assert "no local CLIP model" in metrics.notices["clip"]
    assert any("FID/KID skipped" in r.getMessage() for r in caplog.records)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    metrics.update(images, images, ["a", "b"])
    assert metrics.compute() == {"fid": None, "kid_mean": None, "kid_std": None, "clip_score": None}
    assert "no local Inception weights configured" in ImageMetrics().notices["fid"]


class _TinyFeatures(nn.Module):
    """A stand-in feature extractor: uint8 images -> 8 features (torchmetrics' custom-feature path)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean(dim=(2, 3))


def test_fid_kid_run_with_a_feature_extractor():
    with warnings.catch_warnings():  # KID's "keeps every feature in memory" warning
        warnings.simplefilter("ignore", UserWarning)
        metrics = ImageMetrics(feature_extractor=_TinyFeatures(), kid_subset_size=50)
    assert "fid" not in metrics.notices
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    fake = torch.rand(6, 3, 32, 32, generator=g) * 0.2  # a different distribution
    metrics.update(real, fake, None)
    out = metrics.compute()
    assert out["fid"] is not None and out["fid"] > 0 and out["kid_mean"] is not None
    assert metrics.kid.subset_size == 6  # shrunk to the number of images


# ---------------------------------------------------------------------------------------------- report


def test_report_writes_json_and_markdown(tmp_path):
    metrics = {"num_images": 2, "sen_acc": 0.5, "ned": 0.75, "glyph_iou": 0.4, "gt_sen_acc": 1.0, "gt_ned": 1.0}
    metrics |= {"nocontrol_sen_acc": 0.0, "val_loss": 0.69, "val_loss_s0": 0.7, "val_acc_s0": 0.5, "fid": None}
    paths = write_report(tmp_path, metrics, {"checkpoint": {"path": "x", "sha256": "ab" * 32}}, ["FID skipped: why"])
    data = json.loads(paths["json"].read_text())
    assert data["sen_acc"] == 0.5 and data["notices"] == ["FID skipped: why"] and "info" in data
    md = paths["markdown"].read_text()
    assert "| generated, with control | 0.5000 | 0.7500 |" in md
    assert "ground-truth images (upper bound)" in md and "scale 0" in md and "FID skipped: why" in md
    with pytest.raises(ValueError, match="reserved"):
        write_report(tmp_path, {"notices": 1}, {}, [])


def test_report_goes_to_csv_and_offline_wandb_loggers(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    from scenetxtvar.evaluation.report import log_to_loggers

    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = [
        CSVLogger(tmp_path, name="csv"),
        WandbLogger(save_dir=str(tmp_path), offline=True, project="scenetxtvar-test"),
    ]
    log_to_loggers(loggers, {"sen_acc": 0.5, "ned": None, "bad": float("nan"), "num_images": 2}, "# report")
    text = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "eval/sen_acc" in text and "eval/num_images" in text and "eval/ned" not in text
    assert list((tmp_path / "wandb").glob("offline-run-*"))
