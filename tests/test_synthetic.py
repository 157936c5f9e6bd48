"""Synthetic scenes, the shard writer and the manifest: determinism, format, atomicity, legibility."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scenetxtvar.data.glyph import polygon_mask, text_quad
from scenetxtvar.data.shards import (
    MANIFEST_NAME,
    SHARD_FORMAT,
    ShardSetWriter,
    list_shards,
    read_manifest,
)
from scenetxtvar.data.synthetic import generate_synthetic_shards, main, make_scene, parse_size


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_parse_size():
    assert parse_size(256) == (256, 256)
    assert parse_size("64x128") == (64, 128)
    assert parse_size([32, 48]) == (32, 48)
    with pytest.raises(ValueError):
        parse_size("64by128")


def test_make_scene_is_deterministic_per_seed_and_index():
    for i in range(3):
        a, b = make_scene(5, i, 128), make_scene(5, i, 128)
        assert _png(a["image"]) == _png(b["image"]) and _png(a["glyph"]) == _png(b["glyph"])
        assert a["caption"] == b["caption"] and a["meta"] == b["meta"]
    assert _png(make_scene(5, 0, 128)["image"]) != _png(make_scene(5, 1, 128)["image"])
    assert _png(make_scene(5, 0, 128)["image"]) != _png(make_scene(6, 0, 128)["image"])


def test_scene_content_glyph_coincides_with_text():
    for i in range(6):
        s = make_scene(0, i, 256, conditions=("glyph", "canny"))
        meta, img, glyph = s["meta"], np.asarray(s["image"], np.float32), np.asarray(s["glyph"])
        assert s["image"].size == (256, 256) and s["glyph"].mode == "L" and s["canny"].mode == "L"
        assert meta["source"] == "synthetic" and meta["language"] == "en" and meta["h_div_w"] == 1.0
        assert 1 <= len(meta["words"]) <= 3 and len(meta["polygons"]) == len(meta["words"])
        assert all(f'"{w}"' in s["caption"] for w in meta["words"])
        masks = [polygon_mask(p, (256, 256)).astype(bool) for p in meta["polygons"]]
        for a in range(len(masks)):  # words never overlap
            for b in range(a + 1, len(masks)):
                assert not (masks[a] & masks[b]).any()
        union = np.logical_or.reduce(masks)
        assert not glyph[~union].any(), "glyph ink outside the word polygons"
        for mask, color, word in zip(masks, meta["colors"], meta["words"]):
            solid = mask & (glyph == 255)
            assert solid.sum() > 10, word
            # Where the glyph says "fully text", the image shows the text colour (up to blur/noise).
            err = np.abs(np.median(img[solid], axis=0) - np.asarray(color)).max()
            assert err < 24, (word, err)


def test_glyph_font_option_renders_from_polygons():
    exact = make_scene(0, 2, 128)
    rendered = make_scene(0, 2, 128, glyph_font="builtin")
    assert _png(exact["image"]) == _png(rendered["image"])  # the scene itself does not change
    union = np.logical_or.reduce([polygon_mask(p, (128, 128)).astype(bool) for p in rendered["meta"]["polygons"]])
    glyph = np.asarray(rendered["glyph"])
    assert rendered["glyph"].mode == "L" and glyph[union].max() == 255 and not glyph[~union].any()


def test_scene_sizes_and_word_counts():
    s = make_scene(1, 3, "64x128", min_words=1, max_words=1)
    assert s["image"].size == (128, 64) and s["glyph"].size == (128, 64)
    assert s["meta"]["width"] == 128 and s["meta"]["height"] == 64 and s["meta"]["h_div_w"] == 0.5
    assert len(s["meta"]["words"]) == 1
    counts = {len(make_scene(2, i, 256, min_words=2, max_words=3)["meta"]["words"]) for i in range(8)}
    assert counts <= {2, 3}
    with pytest.raises(ValueError, match="min_words"):
        make_scene(0, 0, 64, min_words=3, max_words=2)
    with pytest.raises(ValueError, match="conditions"):
        make_scene(0, 0, 64, conditions=("depth",))


def test_photo_backgrounds_and_unreadable_photos(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), "RGB").save(photos / "a.jpg")
    (photos / "b.png").write_bytes(b"not a png")
    paths = [str(photos / "a.jpg"), str(photos / "b.png")]
    with caplog.at_level(logging.WARNING, logger="scenetxtvar.data.synthetic"):
        kinds = [make_scene(0, i, "64x128", photos=paths)["meta"]["background"] for i in range(24)]
    assert "photo" in kinds  # a.jpg is used; b.png falls back to a gradient, with a warning
    assert "unreadable" in caplog.text
    manifest = generate_synthetic_shards(tmp_path / "out", 4, 64, backgrounds=photos, progress=False)
    assert manifest["generator"]["num_photos"] == 2
    with pytest.raises(FileNotFoundError):
        generate_synthetic_shards(tmp_path / "out2", 4, 64, backgrounds=tmp_path / "none", progress=False)


def test_background_kinds_option(tmp_path):
    """Restricting the generated backgrounds keeps scenes deterministic, reaches the manifest and the CLI."""
    kinds = {make_scene(0, i, "64x128", background_kinds=["gradient"])["meta"]["background"] for i in range(12)}
    assert kinds == {"gradient"}
    default = [make_scene(0, i, "64x128")["meta"]["background"] for i in range(12)]
    assert len(set(default)) > 1  # the default still draws every kind
    a = make_scene(0, 5, "64x128", background_kinds=["noise", "shapes"])
    b = make_scene(0, 5, "64x128", background_kinds=["noise", "shapes"])
    assert a["meta"]["background"] in {"noise", "shapes"} and a["meta"] == b["meta"]
    for bad in (["marble"], []):
        with pytest.raises(ValueError, match="background kinds"):
            make_scene(0, 0, "64x128", background_kinds=bad)
    manifest = generate_synthetic_shards(tmp_path / "g", 3, "64x128", background_kinds=["gradient"], progress=False)
    assert manifest["generator"]["background_kinds"] == ["gradient"]
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num", "2", "--size", "64x128", "--no-progress", "--background-kinds", "gradient"]
    assert main(argv) == 0
    assert read_manifest(out)["generator"]["background_kinds"] == ["gradient"]


def _read_all(shard_dir):
    ds = wds.WebDataset(list_shards(shard_dir), shardshuffle=False, empty_check=False).decode("pil")
    return list(ds)


def test_shards_identical_for_any_worker_count_and_readable(tmp_path):
    m0 = generate_synthetic_shards(
        tmp_path / "w0", 12, "64x128", seed=3, workers=0, shard_size=5, conditions=("glyph", "canny"), progress=False
    )
    m2 = generate_synthetic_shards(
        tmp_path / "w2", 12, "64x128", seed=3, workers=2, shard_size=5, conditions=("glyph", "canny"), progress=False
    )
    assert [s["name"] for s in m0["shards"]] == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    assert [s["num_samples"] for s in m0["shards"]] == [5, 5, 2]
    for s in m0["shards"]:
        assert (tmp_path / "w0" / s["name"]).read_bytes() == (tmp_path / "w2" / s["name"]).read_bytes()
        with tarfile.open(tmp_path / "w0" / s["name"]) as tar:  # one header block per member, no PAX extras
            assert not any(m.pax_headers for m in tar.getmembers())
    assert m0["num_samples"] == 12 and m0["conditions"] == ["glyph", "canny"] and m0["image_ext"] == "png"
    assert m0["templates"] == {"0.500": 12} and m0["format"] == SHARD_FORMAT and m0["source"] == "synthetic"
    assert m0["generator"]["seed"] == 3 and m2["generator"]["size"] == [64, 128]
    assert read_manifest(tmp_path / "w0") == json.loads((tmp_path / "w0" / MANIFEST_NAME).read_text())

    samples = _read_all(tmp_path / "w0")
    assert [s["__key__"] for s in samples] == [f"synthetic_{i:08d}" for i in range(12)]
    for s in samples:
        assert {"png", "glyph.png", "canny.png", "txt", "json"} <= set(s)
        meta = s["json"]
        assert s["png"].size == (128, 64) and s["glyph.png"].size == (128, 64)
        assert set(meta) >= {"words", "polygons", "language", "h_div_w", "source", "width", "height"}
        assert isinstance(s["txt"], str) and meta["words"][0] in s["txt"]
    # Raw members: glyph stored as single-channel L, canny as RGB, polygons with >= 4 points.
    raw = next(iter(wds.WebDataset(list_shards(tmp_path / "w0"), shardshuffle=False)))
    assert Image.open(io.BytesIO(raw["glyph.png"])).mode == "L"
    assert Image.open(io.BytesIO(raw["canny.png"])).mode == "RGB"
    assert Image.open(io.BytesIO(raw["png"])).mode == "RGB"
    assert all(len(p) >= 4 for p in json.loads(raw["json"])["polygons"])


def test_cli(tmp_path, caplog):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num", "3", "--size", "64x128", "--seed", "1", "--no-progress"]
    assert main([*argv, "--min-words", "1", "--max-words", "1"]) == 0
    assert read_manifest(out)["num_samples"] == 3
    assert main(argv) == 2  # the folder already holds a shard set
    assert main([*argv, "--overwrite", "--shard-size", "2"]) == 0
    assert [s["num_samples"] for s in read_manifest(out)["shards"]] == [2, 1]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "synthetic-000000.tar", "synthetic-000001.tar"]


def _sample(i: int, h: int = 16, w: int = 32) -> dict:
    img = Image.new("RGB", (w, h), (i, 0, 0))
    return {
        "__key__": f"t_{i:08d}",
        "image": img,
        "glyph": Image.new("L", (w, h)),
        "caption": f'sample "{i}"',
        "meta": {
            "words": ["ab"],
            "polygons": [[[1, 1], [9, 1], [9, 5], [1, 5]]],
            "language": "en",
            "h_div_w": h / w,
            "source": "t",
            "width": w,
            "height": h,
        },
    }


def test_interrupted_writer_leaves_no_complete_looking_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardSetWriter(tmp_path, maxcount=2, prefix="t") as writer:
        for i in range(3):
            writer.add(_sample(i))
        raise RuntimeError("boom")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["t-000000.tar"]  # the finished shard; the partial one and the manifest are absent
    assert len(list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False))) == 2
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path)
    with pytest.raises(FileExistsError):
        ShardSetWriter(tmp_path, prefix="t")
    with ShardSetWriter(tmp_path, prefix="t", overwrite=True) as writer:
        writer.add(_sample(0))
    assert read_manifest(tmp_path)["num_samples"] == 1


def test_writer_validates_samples(tmp_path):
    with ShardSetWriter(tmp_path, prefix="t") as writer:
        bad = _sample(0)
        bad["meta"] = {**bad["meta"], "polygons": [[[0, 0], [1, 1], [2, 2]]]}
        with pytest.raises(ValueError, match=">= 4"):
            writer.add(bad)
        with pytest.raises(ValueError, match="__key__"):
            writer.add({**_sample(0), "__key__": "a.b"})
        with pytest.raises(ValueError, match="single-channel"):
            writer.add({**_sample(0), "glyph": Image.new("RGB", (32, 16))})
        with pytest.raises(ValueError, match="size"):
            writer.add({**_sample(0), "glyph": Image.new("L", (8, 8))})
        with pytest.raises(ValueError, match="missing condition"):
            writer.add({k: v for k, v in _sample(0).items() if k != "glyph"})
        writer.add(_sample(0))
        with pytest.raises(ValueError, match="duplicate"):
            writer.add(_sample(0))
    assert read_manifest(tmp_path)["num_samples"] == 1


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(tmp_path)
    manifest = {
        "format": SHARD_FORMAT,
        "shards": [{"name": "x-000000.tar", "num_samples": 2}],
        "num_samples": 2,
        "conditions": ["glyph"],
        "templates": {"1.000": 2},
        "image_ext": "png",
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="x-000000.tar"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, check_files=False)["num_samples"] == 2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "num_samples": 3}))
    with pytest.raises(ValueError, match="3"):
        read_manifest(tmp_path, check_files=False)
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "nothing-*.tar")


def _rectified_crop(bgr: np.ndarray, polygon, out_h: int = 48, margin: float = 0.15) -> np.ndarray:
    quad = text_quad(polygon)
    ux = quad[1] - quad[0] + quad[2] - quad[3]
    uy = quad[3] - quad[0] + quad[2] - quad[1]
    along, across = np.linalg.norm(ux) / 2, np.linalg.norm(uy) / 2
    ux, uy = ux / np.linalg.norm(ux), uy / np.linalg.norm(uy)
    m = margin * across
    grown = quad + np.array([-ux - uy, ux - uy, ux + uy, -ux + uy]) * m
    out_w = max(8, int(round(out_h * (along + 2 * m) / (across + 2 * m))))
    dst = np.float32([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]])
    matrix = cv2.getPerspectiveTransform(grown.astype(np.float32), dst)
    return cv2.warpPerspective(bgr, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@pytest.mark.slow  # ~10 s on an idle 2-core CPU, well over 20 s under load
def test_generated_text_is_legible_to_ocr():
    """OCR legibility of 50 scenes at 256x256 (seed 0), with RapidOCR's bundled PP-OCRv6 recogniser.

    Each word's polygon, grown by 15% of the text height on every side, is perspective-rectified to
    a 48-pixel-high crop and recognised (recognition only). A word is *read* when the recognised
    text, whitespace removed, equals the word case-insensitively. A sample is *legible* when all of
    its words are read. Rate = legible samples / 50; it must be >= 0.9.
    """
    rapidocr = pytest.importorskip("rapidocr")
    logging.getLogger("RapidOCR").setLevel(logging.ERROR)
    engine = rapidocr.RapidOCR(params={"Global.log_level": "error"})
    legible, read, total, failures = 0, 0, 0, []
    for i in range(50):
        scene = make_scene(0, i, 256)
        bgr = np.ascontiguousarray(np.asarray(scene["image"])[:, :, ::-1])
        ok = True
        for word, poly in zip(scene["meta"]["words"], scene["meta"]["polygons"]):
            out = engine(_rectified_crop(bgr, poly), use_det=False, use_cls=False, use_rec=True)  # flags are sticky
            text = "".join(((out.txts or [""])[0]).split())
            hit = text.casefold() == word.casefold()
            read, total, ok = read + hit, total + 1, ok and hit
            if not hit:
                failures.append((i, word, text))
        legible += ok
    rate = legible / 50
    logging.getLogger(__name__).info("OCR legibility: %.2f of samples, %d/%d words", rate, read, total)
    assert rate >= 0.9, (rate, failures)


def test_package_reexports_resolve():
    import scenetxtvar.data as data

    assert sorted(data.__all__) == sorted(data._EXPORTS)
    assert all(getattr(data, name) is not None for name in data.__all__)


def test_synthetic_datamodule_caches_per_background_kinds(tmp_path):
    """The Hydra data target generates one cached shard set per background choice."""
    from scenetxtvar.training.run import synthetic_datamodule

    args = dict(cache_dir=str(tmp_path), num_train=2, num_val=0, size="64x128", seed=0, workers=0, conditions=["glyph"])
    synthetic_datamodule(**args)
    synthetic_datamodule(**args, background_kinds=["gradient"])
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["train-2-64x128-w1-3-s0-glyph", "train-2-64x128-w1-3-s0-glyph-bg_gradient"]
    assert read_manifest(tmp_path / dirs[1])["generator"]["background_kinds"] == ["gradient"]
    with pytest.raises(ValueError, match="num must be >= 1"):  # only the val split is optional
        synthetic_datamodule(**{**args, "num_train": 0})
