"""Converters (InfinityPilot jsonl, AnyWord JSON, plain folder): shards written, bad items skipped and reported."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scenetxtvar.data.convert import REPORT_NAME, convert_folder, main
from scenetxtvar.data.glyph import find_cjk_font, polygon_mask, render_glyph_control
from scenetxtvar.data.shards import list_shards, read_manifest

H, W = 48, 128
HELLO_POLYS = [[[4, 8], [56, 8], [56, 36], [4, 36]], [[70, 10], [124, 10], [124, 38], [70, 38]]]


def _photo(seed: int, size=(W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _read(out) -> list[dict]:
    return list(wds.WebDataset(list_shards(out), shardshuffle=False, empty_check=False))


def _report(out) -> dict:
    return json.loads((out / REPORT_NAME).read_text())


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _infinitypilot_input(root, with_bad: bool = True):
    for d in ("images", "masks", "normals"):
        (root / d).mkdir(parents=True)
    _photo(0).save(root / "images" / "a.jpg", quality=95)
    glyph = render_glyph_control(["Hello", "World"], HELLO_POLYS, (H, W))
    colored = Image.merge("RGB", (glyph, glyph.point(lambda v: v // 2), Image.new("L", glyph.size)))
    colored.save(root / "masks" / "a.png")  # normal-coloured text mask: glyph pixels coloured, background black
    _photo(1).save(root / "normals" / "a.png")
    lines = [
        {
            "image_path": "images/a.jpg",
            "h_div_w": H / W,
            "long_caption": 'a sign that says "Hello World"',
            "normal_path": "masks/a.png",
            "normal_map_path": "normals/a.png",
            "text": "Hello World",
        }
    ]
    if with_bad:
        (root / "images" / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
        lines.append({**lines[0], "image_path": "images/b.jpg"})  # corrupt image
        lines.append({**lines[0], "image_path": "images/missing.jpg"})  # missing file
        lines.append({**lines[0], "normal_map_path": "normals/none.png"})  # missing condition
    text = "\n".join(json.dumps(x) for x in lines)
    if with_bad:
        text += "\n{broken json"
    (root / f"0.375_{len(lines) + with_bad:07d}.jsonl").write_text(text + "\n")


def test_infinitypilot(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    _infinitypilot_input(src)
    argv = ["infinitypilot", "--input", str(src), "--out", str(out), "--conditions", "glyph", "normal", "--no-progress"]
    assert main(argv) == 3
    report = _report(out)
    assert report["num_items"] == 5 and report["num_written"] == 1 and report["num_skipped"] == 4
    assert report["skipped_by_kind"] == {
        "bad record": 1,
        "missing condition": 1,
        "missing image": 1,
        "unreadable image": 1,
    }
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 1 and manifest["conditions"] == ["glyph", "normal"]
    assert manifest["image_ext"] == "jpg" and manifest["templates"] == {"0.400": 1}
    (s,) = _read(out)
    assert s["__key__"] == "infinitypilot_00000000"
    assert s["jpg"] == (src / "images" / "a.jpg").read_bytes()  # an RGB JPEG is stored unchanged
    glyph, normal = _decode(s["glyph.png"]), _decode(s["normal.png"])
    assert glyph.mode == "L" and normal.mode == "RGB" and glyph.size == normal.size == (W, H)
    assert np.array_equal(np.asarray(normal), np.asarray(_photo(1)))
    meta = json.loads(s["json"])
    assert meta["words"] == ["Hello", "World"] and len(meta["polygons"]) == 2
    assert meta["h_div_w"] == H / W and meta["width"] == W and meta["height"] == H
    for poly, ref in zip(meta["polygons"], HELLO_POLYS):  # recovered boxes lie on the words
        assert abs(np.mean(poly, axis=0) - np.mean(ref, axis=0)).max() < 6
    assert s["txt"].decode() == 'a sign that says "Hello World"'

    clean_src, clean_out = tmp_path / "clean", tmp_path / "clean_out"
    _infinitypilot_input(clean_src, with_bad=False)
    assert main(["infinitypilot", "--input", str(clean_src), "--out", str(clean_out), "--no-progress"]) == 0
    assert _report(clean_out)["num_skipped"] == 0 and read_manifest(clean_out)["conditions"] == ["glyph"]


def test_anyword(tmp_path):
    (tmp_path / "imgs").mkdir()
    _photo(2, (256, 256)).save(tmp_path / "imgs" / "good.png")
    _photo(3, (256, 256)).save(tmp_path / "imgs" / "cjk.jpg")
    (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"garbage")
    quad512 = [[40, 60], [300, 60], [300, 140], [40, 140]]
    hexa512 = [[40, 300], [200, 280], [360, 300], [360, 400], [200, 380], [40, 400]]
    data = {
        "data_root": "imgs",
        "data_list": [
            {
                "img_name": "good.png",
                "caption": "a *poster* with text",
                "annotations": [
                    {"polygon": quad512, "text": "OPEN", "language": "Latin", "valid": True},
                    {"polygon": hexa512, "text": "late", "language": "Latin"},
                    {"polygon": quad512, "text": "###", "language": "Latin", "valid": False},
                    {"polygon": [], "text": "empty", "language": "Latin"},
                ],
            },
            {"img_name": "corrupt.jpg", "caption": "x", "annotations": []},
            {"img_name": "missing.jpg", "caption": "x", "annotations": []},
            {
                "img_name": "cjk.jpg",
                "caption": "中文",
                "annotations": [{"polygon": quad512, "text": "欢迎", "language": "Chinese", "valid": True}],
            },
        ],
    }
    (tmp_path / "data.json").write_text(json.dumps(data, ensure_ascii=False))
    out = tmp_path / "out"
    argv = ["anyword", "--input", str(tmp_path / "data.json"), "--out", str(out), "--polygon-space", "512"]
    assert main([*argv, "--conditions", "glyph", "canny", "--image-ext", "png", "--no-progress"]) == 3
    report = _report(out)
    assert report["num_written"] == 2
    assert report["skipped_by_kind"] == {"missing image": 1, "unreadable image": 1}
    expected_warnings = [] if find_cjk_font() else ["cjk.jpg"]  # no CJK font installed: 欢迎 is reported
    assert [w["item"] for w in report["warnings"]] == expected_warnings
    samples = {json.loads(s["json"])["orig_image"]: s for s in _read(out)}
    assert set(samples) == {"good.png", "cjk.jpg"}
    good = samples["good.png"]
    meta = json.loads(good["json"])
    assert meta["words"] == ["OPEN", "late"] and meta["language"] == "en" and meta["dropped_annotations"] == 2
    assert meta["polygons"][0] == [[20.0, 30.0], [150.0, 30.0], [150.0, 70.0], [20.0, 70.0]]  # 512 -> 256 frame
    assert good["txt"].decode() == "a  poster  with text"
    glyph = np.asarray(_decode(good["glyph.png"]))
    union = np.logical_or.reduce([polygon_mask(p, (256, 256)).astype(bool) for p in meta["polygons"]])
    assert glyph[union].max() == 255 and not glyph[~union].any()
    assert _decode(good["canny.png"]).mode == "RGB"
    assert json.loads(samples["cjk.jpg"]["json"])["language"] == "zh"

    # Usage errors exit 2 and leave the existing output alone.
    assert main([*argv, "--conditions", "normal", "--overwrite", "--no-progress"]) == 2
    assert main(["anyword", "--input", str(tmp_path / "nope.json"), "--out", str(out), "--no-progress"]) == 2
    assert main([*argv, "--no-progress"]) == 2  # out already holds a shard set
    assert read_manifest(out)["num_samples"] == 2


def test_anyword_missing_glyphs_are_warned(tmp_path):
    (tmp_path / "imgs").mkdir()
    _photo(3, (64, 64)).save(tmp_path / "imgs" / "a.png")
    data = {
        "data_root": "imgs",
        "data_list": [
            {"img_name": "a.png", "caption": "c", "annotations": [{"polygon": HELLO_POLYS[0], "text": "中"}]}
        ],
    }
    (tmp_path / "d.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = ["anyword", "--input", str(tmp_path / "d.json"), "--out", str(out), "--font", "builtin", "--no-progress"]
    assert main(argv) == 0  # written (drawn as .notdef), but reported
    report = _report(out)
    assert report["num_written"] == 1 and "中" in report["warnings"][0]["warning"]


def test_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _photo(4).save(src / "a.png")
    (src / "a.txt").write_text("caption a")
    render_glyph_control(["Hi"], HELLO_POLYS[:1], (H, W)).save(src / "a.glyph.png")
    _photo(5).save(src / "b.jpg", quality=90)
    (src / "b.txt").write_text("caption b\n")
    (src / "b.json").write_text(json.dumps({"words": ["Hello", "World"], "polygons": HELLO_POLYS}))
    _photo(6).save(src / "c.png")  # no caption
    (src / "d.jpg").write_bytes(b"\x00corrupt")
    (src / "d.txt").write_text("caption d")
    _photo(7).save(src / "e.png")  # no glyph map and no polygons
    (src / "e.txt").write_text("caption e")
    (src / "notes.md").write_text("ignored")

    report = convert_folder(src, out, conditions=("glyph", "canny"), progress=False)
    assert report.exit_code == 3 and report.num_items == 5 and report.num_written == 2
    kinds = {s["item"]: s["kind"] for s in report.skipped}
    assert kinds == {"c.png": "missing caption", "d.jpg": "unreadable image", "e.png": "missing condition"}
    assert _report(out)["num_skipped"] == 3
    samples = {json.loads(s["json"])["orig_image"]: s for s in _read(out)}
    a, b = samples["a.png"], samples["b.jpg"]
    assert np.array_equal(np.asarray(_decode(a["glyph.png"])), np.asarray(Image.open(src / "a.glyph.png")))
    assert b["jpg"] == (src / "b.jpg").read_bytes()
    assert json.loads(b["json"])["words"] == ["Hello", "World"]
    assert (np.asarray(_decode(b["glyph.png"])) > 0).any()  # rendered from b.json
    assert a["txt"].decode() == "caption a" and b["txt"].decode() == "caption b"
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME, "folder-000000.tar", "manifest.json"]


def test_folder_usage_errors(tmp_path):
    assert main(["folder", "--input", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["nosuchformat", "--input", "x", "--out", "y"])
    assert exc.value.code == 2
