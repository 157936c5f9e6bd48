"""Glyph control rendering: ink stays inside its polygons, missing glyphs are reported, derived maps."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from scenetxtvar.data.glyph import (
    FontSpec,
    GlyphRenderer,
    canny_control,
    default_font,
    load_condition,
    missing_chars,
    render_glyph_control,
    resolve_font,
    text_quad,
)

SIZE = (160, 240)  # (H, W)


def _rotated_quad(cx: float, cy: float, w: float, h: float, deg: float) -> list[list[float]]:
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rect = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return (rect @ rot.T + [cx, cy]).tolist()


WORDS = ["Hello", "World42", "curve", "TILT"]
POLYGONS = [
    [[8, 8], [110, 8], [110, 40], [8, 40]],  # axis-aligned
    _rotated_quad(180, 40, 90, 28, 25),  # rotated
    [[10, 70], [60, 60], [110, 70], [110, 110], [60, 100], [10, 110]],  # 6-point polygon
    [[140, 95], [230, 105], [225, 150], [135, 135]],  # perspective quad
]


def _distance_to_polygons(size: tuple[int, int], polygons) -> np.ndarray:
    """Signed distance of each pixel centre to the nearest polygon (>0 inside), independent of the renderer."""
    h, w = size
    best = np.full((h, w), -np.inf)
    ys, xs = np.mgrid[0:h, 0:w]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)
    for poly in polygons:
        contour = np.asarray(poly, np.float32).reshape(-1, 1, 2)
        d = np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in centres]).reshape(h, w)
        best = np.maximum(best, d)
    return best


@pytest.mark.parametrize("font", [None, "builtin"])
def test_ink_inside_every_polygon_and_none_outside(font):
    img = render_glyph_control(WORDS, POLYGONS, SIZE, font=font)
    assert img.mode == "L" and img.size == (SIZE[1], SIZE[0])
    ink = np.asarray(img) > 0
    dist = _distance_to_polygons(SIZE, POLYGONS)
    assert not (ink & (dist < -1.0)).any(), "ink more than one pixel outside every polygon"
    for i, poly in enumerate(POLYGONS):
        inside = _distance_to_polygons(SIZE, [poly]) > 0
        frac = (np.asarray(img)[inside] > 127).mean()
        assert frac > 0.08, f"polygon {i} ({WORDS[i]}) holds almost no ink: {frac:.3f}"


def test_colored_instances_get_distinct_colors():
    img = render_glyph_control(WORDS, POLYGONS, SIZE, colored=True)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    colors = []
    for poly in POLYGONS:
        inside = _distance_to_polygons(SIZE, [poly]) > 0
        px = arr[inside]
        px = px[px.max(axis=1) > 200]  # fully covered pixels carry the pure instance colour
        colors.append(tuple(np.median(px, axis=0).astype(int) // 16))
    assert len(set(colors)) == len(POLYGONS)


def test_counter_clockwise_quad_renders_like_clockwise():
    cw = POLYGONS[1]
    ccw = [cw[0], cw[3], cw[2], cw[1]]
    a = np.asarray(render_glyph_control(["TILT"], [cw], SIZE))
    b = np.asarray(render_glyph_control(["TILT"], [ccw], SIZE))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(text_quad(ccw), np.asarray(cw))


def test_min_area_rect_follows_reading_direction():
    poly = POLYGONS[2]
    quad = text_quad(poly)
    assert quad[1][0] > quad[0][0] and quad[3][1] > quad[0][1]  # TL -> TR goes right, TL -> BL goes down


def test_missing_glyphs_are_reported_not_dropped(caplog):
    renderer = GlyphRenderer("builtin", fallback_fonts=None)
    with caplog.at_level(logging.WARNING, logger="scenetxtvar.data.glyph"):
        img, missing = renderer.render_with_missing(["中文ok"], [POLYGONS[0]], SIZE)
    assert missing == ["中", "文"]
    assert renderer.missing_chars == {"中", "文"}
    assert "cannot draw" in caplog.text
    assert (np.asarray(img) > 0).any()  # drawn (as .notdef boxes), not silently dropped
    assert missing_chars(FontSpec(None), "ok é") == ["é"]


def test_fallback_font_is_used_when_it_covers_the_word():
    primary = FontSpec(None)
    fallback = default_font()
    if fallback.path is None:
        pytest.skip("no system font with accents available")
    renderer = GlyphRenderer(primary, fallback_fonts=[fallback])
    font, missing = renderer.pick_font("Café")
    assert missing == [] and font == fallback


def test_bad_inputs_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        render_glyph_control(["a", "b"], [POLYGONS[0]], SIZE)
    with pytest.raises(ValueError, match="polygons\\[0\\]"):
        render_glyph_control(["a"], [[[0, 0], [1, 1]]], SIZE)
    with pytest.raises(ValueError, match="size"):
        render_glyph_control(["a"], [POLYGONS[0]], (0, 10))
    with pytest.raises(FileNotFoundError):
        resolve_font(tmp_path / "nope.ttf")


def test_user_font_file_by_path():
    font = default_font()
    if font.path is None:
        pytest.skip("no system font file installed")
    img = render_glyph_control(["Path"], [POLYGONS[0]], SIZE, font=font.path)
    assert (np.asarray(img) > 0).any()


def test_canny_and_load_condition(tmp_path):
    img = render_glyph_control(["Edge"], [POLYGONS[0]], SIZE).convert("RGB")
    edges = canny_control(img)
    assert edges.mode == "L" and edges.size == img.size and (np.asarray(edges) > 0).any()
    normal = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8), "RGB")
    normal.save(tmp_path / "n.png")
    depth = Image.fromarray(np.arange(96, dtype=np.uint8).reshape(8, 12), "L")
    depth.save(tmp_path / "d.png")
    loaded = load_condition(tmp_path / "n.png")
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(normal))
    assert load_condition(tmp_path / "d.png").mode == "L"
    assert load_condition(tmp_path / "d.png", mode="RGB").mode == "RGB"
