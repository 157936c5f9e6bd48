"""SceneTextDataModule on tiny shards written here: shapes, ranges, buckets, alignment, splits, bad samples."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from scenetxtvar.data.datamodule import (
    SampleProcessor,
    SceneTextDataModule,
    max_batches,
    plan_exact,
    resolve_shards,
)
from scenetxtvar.scales import get_schedule, pixel_size

# (height, width) of the test images: 1:1 (downscaled to 256x256) and 1:2 (upscaled to 352x176).
SQUARE, TALL = (320, 320), (128, 64)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_sample(key: str, hw: tuple[int, int], rng: np.random.Generator, rect: tuple[int, int, int, int] | None = None):
    """One sample dict (bytes values): dark image with white text-like strokes, matching glyph mask and normal map."""
    h, w = hw
    if rect is None:
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        rect = (x0, y0, x0 + max(4, w // 3), y0 + max(4, h // 6))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = rect
    step = max(3, (x1 - x0) // 5)
    for x in range(x0, x1, step):  # vertical "letter strokes", then a soft edge so the input mask has grey
        draw.rectangle([x, y0, min(x + step // 2, x1 - 1), y1 - 1], fill=255)
    soft = mask.filter(ImageFilter.GaussianBlur(0.8))
    bg = int(rng.integers(20, 80))
    image = Image.merge("RGB", [Image.eval(mask, lambda v, b=bg: b + (255 - b) * v // 255)] * 3)
    normal = Image.new("RGB", (w, h), (128, 128, 255))
    ImageDraw.Draw(normal).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(200, 60, 90))
    poly = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    meta = {"words": ["TEXT"], "polygons": [poly], "language": "en", "h_div_w": h / w, "source": "test",
            "width": w, "height": h}  # fmt: skip
    return {
        "__key__": key,
        "png": _png(image),
        "glyph.png": _png(soft),
        "normal.png": _png(normal),
        "txt": f"a sign reading TEXT ({key})".encode(),
        "json": json.dumps(meta).encode(),
    }


def write_shards(
    root: Path,
    n_shards: int = 3,
    per_shard: int = 8,
    sizes: tuple[tuple[int, int], ...] = (SQUARE, TALL),
    corrupt: tuple[str, ...] = (),
    missing_glyph: tuple[str, ...] = (),
    manifest: bool = True,
    seed: int = 0,
) -> list[str]:
    """Write ``n_shards`` tar shards (+ manifest.json) into ``root``; returns all keys in order."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, entries, templates = [], [], Counter()
    for s in range(n_shards):
        name = f"test-{s:06d}.tar"
        with wds.TarWriter(str(root / name), encoder=False) as tw:
            for i in range(per_shard):
                key = f"s{s:02d}_{i:03d}"
                hw = sizes[(s * per_shard + i) % len(sizes)]
                sample = make_sample(key, hw, rng)
                if key in corrupt:
                    sample["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
                if key in missing_glyph:
                    del sample["glyph.png"]
                tw.write(sample)
                keys.append(key)
                templates[f"{hw[0] / hw[1]:.3f}"] += 1
        entries.append({"name": name, "num_samples": per_shard})
    if manifest:
        doc = {"format": "scenetxtvar-shards/1", "shards": entries, "num_samples": len(keys),
               "conditions": ["glyph", "normal"], "templates": dict(templates), "image_ext": "png"}  # fmt: skip
        (root / "manifest.json").write_text(json.dumps(doc))
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    return root, write_shards(root)


def dm_for(path, **kw) -> SceneTextDataModule:
    args = dict(train_shards=path, val_shards=path, conditions=["glyph", "normal"], pn="0.06M", batch_size=4,
                num_workers=0, seed=0, shuffle_buffer=8)  # fmt: skip
    args.update(kw)
    return SceneTextDataModule(**args)


def keys_of(loader, valid_only: bool = True) -> list[str]:
    out = []
    for batch in loader:
        out += [m["key"] for m, v in zip(batch["meta"], batch["valid"].tolist()) if v or not valid_only]
    return out


def test_batch_contents(shards):
    root, keys = shards
    dm = dm_for(root, epoch_samples=24)
    loader = dm.train_dataloader()
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    seen_templates = set()
    for b in batches:
        img, ctrl = b["images"], b["controls"]
        h, w = pixel_size(get_schedule(b["h_div_w"], "0.06M"))
        assert img.shape == (4, 3, h, w) and img.dtype == torch.float32
        assert ctrl.shape == (4, 6, h, w) and ctrl.dtype == torch.float32
        assert img.min() >= -1 and img.max() <= 1 and ctrl.min() >= -1 and ctrl.max() <= 1
        assert set(torch.unique(ctrl[:, :3]).tolist()) == {-1.0, 1.0}  # glyph stays binary after resize
        assert torch.equal(ctrl[:, 0], ctrl[:, 1]) and torch.equal(ctrl[:, 0], ctrl[:, 2])
        assert len(torch.unique(ctrl[:, 3:])) > 2  # the normal map is resized smoothly
        assert b["schedule"] == get_schedule(b["h_div_w"], "0.06M")
        assert all(m["template"] == b["h_div_w"] for m in b["meta"])
        assert len(b["captions"]) == 4 and all(c.startswith("a sign reading TEXT") for c in b["captions"])
        assert b["valid"].all()
        seen_templates.add(b["h_div_w"])
        for m in b["meta"]:
            src_h, src_w = m["orig_size"]
            assert abs(src_h / src_w - b["h_div_w"]) < 1e-6  # one aspect bucket per batch
    assert seen_templates == {1.0, 2.0}
    assert {(b["images"].shape[2], b["images"].shape[3]) for b in batches} == {(256, 256), (352, 176)}


def test_controls_aligned_with_image(tmp_path):
    # 100 wide x 110 tall -> template 1.0, 256x256: scale 2.56, 5 source rows cropped off top and bottom.
    rng = np.random.default_rng(1)
    rect = (20, 30, 60, 50)
    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as tw:
        for i in range(2):
            tw.write(make_sample(f"k{i}", (110, 100), rng, rect=rect))
    dm = dm_for(str(tmp_path / "a.tar"), val_samples=None, batch_size=2, h_div_w_templates=[1.0, 0.5, 2.0])
    (batch,) = [b for b in dm.val_dataloader() if b["valid"].any()]
    assert batch["images"].shape[-2:] == (256, 256)
    glyph = batch["controls"][:, 0] > 0
    bright = batch["images"].mean(1) > 0.2
    normal_red = batch["controls"][:, 3] > 0.2
    expected = torch.zeros(256, 256, dtype=torch.bool)
    s = 2.56
    expected[round((30 - 5) * s) : round((50 - 5) * s), round(20 * s) : round(60 * s)] = True
    for g, br, nr in zip(glyph, bright, normal_red):
        # strokes live inside the rectangle, and image and mask agree pixel for pixel (up to edge pixels)
        assert (g & ~expected).sum() == 0
        assert (g ^ br).float().mean() < 0.01
        iou = (nr & expected).sum() / (nr | expected).sum()
        assert iou > 0.95
    poly = batch["meta"][0]["polygons"][0]
    assert np.allclose(poly[0], [20 * s, 25 * s]) and np.allclose(poly[2], [60 * s, 45 * s])


def test_deterministic_for_a_seed(shards):
    root, _ = shards
    a = list(dm_for(root, epoch_samples=24, seed=3).train_dataloader())
    b = list(dm_for(root, epoch_samples=24, seed=3).train_dataloader())
    c = list(dm_for(root, epoch_samples=24, seed=4).train_dataloader())
    assert [m["key"] for x in a for m in x["meta"]] == [m["key"] for x in b for m in x["meta"]]
    assert all(
        torch.equal(x["images"], y["images"]) and torch.equal(x["controls"], y["controls"]) for x, y in zip(a, b)
    )
    assert [m["key"] for x in a for m in x["meta"]] != [m["key"] for x in c for m in x["meta"]]


def test_epochs_differ_and_repeat(shards):
    root, _ = shards
    loader = dm_for(root, epoch_samples=24).train_dataloader()
    e0, e1 = keys_of(loader), keys_of(loader)
    assert e0 != e1 and len(e0) == len(e1) == 24
    again = dm_for(root, epoch_samples=24).train_dataloader()
    assert keys_of(again) == e0 and keys_of(again) == e1


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_length_and_rank_streams(shards, workers):
    root, _ = shards
    streams = []
    for rank in range(2):
        loader = dm_for(root, epoch_samples=40, num_workers=workers, rank=rank, world_size=2).train_dataloader()
        assert len(loader) == 40 // (2 * 4)
        batches = list(loader)
        assert len(batches) == 5 and all(b["images"].shape[0] == 4 for b in batches)
        streams.append([m["key"] for b in batches for m in b["meta"]])
    assert streams[0] != streams[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_split_reads_every_sample_once(shards, workers):
    root, keys = shards
    per_rank, lengths = [], []
    for rank in range(2):
        loader = dm_for(root, num_workers=workers, rank=rank, world_size=2).val_dataloader()
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        per_rank.append(keys_of(batches))
        for b in batches:
            assert len({m["template"] for m in b["meta"]}) == 1
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    # a second epoch reads the same set again
    loader = dm_for(root, num_workers=workers).val_dataloader()
    assert sorted(keys_of(loader)) == sorted(keys) == sorted(keys_of(loader))


def test_val_samples_limits_exact_split(shards):
    root, keys = shards
    got = keys_of(dm_for(root, val_samples=10).val_dataloader())
    assert sorted(got) == sorted(keys[:10])


def test_bad_samples_skipped_and_counted(tmp_path):
    keys = write_shards(tmp_path, corrupt=("s00_003",), missing_glyph=("s02_001",))
    dm = dm_for(tmp_path, max_bad_fraction=0.2, bad_warmup=5)
    got = keys_of(dm.val_dataloader())
    assert sorted(got) == sorted(set(keys) - {"s00_003", "s02_001"})
    assert dm.bad_sample_counts == {"val": {"decode": 1, "missing_condition": 1}}
    assert dm.seen_sample_counts == {"val": 24}
    assert dm.data_stats()["data/val_bad"] == 2


def test_too_many_bad_samples_raise(tmp_path):
    bad = tuple(f"s00_{i:03d}" for i in range(6))
    write_shards(tmp_path, corrupt=bad)
    dm = dm_for(tmp_path, max_bad_fraction=0.05, bad_warmup=10, epoch_samples=24, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        list(dm.train_dataloader())


def test_sources_without_manifest(tmp_path):
    write_shards(tmp_path, manifest=False)
    pattern = str(tmp_path / "test-{000000..000002}.tar")
    for spec in (
        pattern,
        str(tmp_path / "*.tar"),
        [str(tmp_path / "test-000000.tar"), str(tmp_path / "test-00000[12].tar")],
    ):
        assert len(resolve_shards(spec).urls) == 3 and resolve_shards(spec).sizes is None
    with pytest.raises(ValueError, match="epoch_samples"):
        dm_for(pattern).train_dataloader()
    assert len(list(dm_for(pattern, epoch_samples=8).train_dataloader())) == 2
    assert len(keys_of(dm_for(pattern).val_dataloader())) == 24  # exact mode counts local tars itself


def test_resolve_manifest_forms(shards):
    root, _ = shards
    for spec in (root, str(root / "manifest.json"), str(root / "test-00000{0,1,2}.tar")):
        got = resolve_shards(spec)
        assert len(got.urls) == 3 and got.sizes == (8, 8, 8) and got.num_samples == 24


def test_plan_exact_is_a_balanced_partition():
    sizes = [5, 0, 17, 3, 9]
    for world, workers in [(1, 1), (2, 3), (4, 2), (8, 4)]:
        plan = plan_exact(sizes, world, workers)
        taken = [(s, i) for ranks in plan for items in ranks for s, a, b in items for i in range(a, b)]
        assert sorted(taken) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
        per_rank = [sum(b - a for items in ranks for _, a, b in items) for ranks in plan]
        assert max(per_rank) - min(per_rank) <= 1
    assert max_batches(24, 4, 2) == 7 and max_batches(1, 4, 15) == 1 and max_batches(0, 4, 2) == 0


def test_rejects_bad_configuration(shards):
    root, _ = shards
    with pytest.raises(ValueError, match="pn"):
        dm_for(root, pn="2M")
    with pytest.raises(ValueError, match="official template"):
        dm_for(root, h_div_w_templates=[1.1])
    with pytest.raises(ValueError, match="not in the manifest"):
        dm_for(root, conditions=["glyph", "depth"]).train_dataloader()
    with pytest.raises(ValueError, match="no full batch"):
        dm_for(root, epoch_samples=6, rank=0, world_size=2).train_dataloader()


def test_explicit_image_size_and_persistent_workers(shards):
    root, _ = shards
    dm = dm_for(root, image_size=(128, 192), epoch_samples=16, num_workers=1, persistent_workers=True)
    loader = dm.train_dataloader()
    e0, e1 = keys_of(loader), keys_of(loader)
    assert e0 != e1  # persistent workers still see the new epoch
    b = next(iter(loader))
    assert b["images"].shape == (4, 3, 128, 192) and b["schedule"] is None
    assert os.environ.get("RANK") is None  # nothing here relied on the environment


def test_more_bad_sample_kinds(tmp_path):
    keys = write_shards(tmp_path / "ok", n_shards=2)
    rng = np.random.default_rng(5)
    odd = tmp_path / "odd"
    odd.mkdir()
    with wds.TarWriter(str(odd / "odd.tar"), encoder=False) as tw:
        tw.write(make_sample("wide", (32, 256), rng))  # h/w 1/8: more than 2x off the 1:3 template
        nan = make_sample("nan", SQUARE, rng)
        nan["json"] = nan["json"].replace(b'"h_div_w": 1.0', b'"h_div_w": NaN')
        tw.write(nan)
        mismatch = make_sample("mismatch", SQUARE, rng)
        mismatch["glyph.png"] = make_sample("x", TALL, rng)["glyph.png"]
        tw.write(mismatch)
        tw.write(make_sample("good", TALL, rng))
    raw = (tmp_path / "ok" / "test-000000.tar").read_bytes()
    (odd / "cut.tar").write_bytes(raw[: len(raw) * 6 // 10 + 700])  # truncated copy: a read error mid-shard
    dm = dm_for([tmp_path / "ok", odd / "odd.tar"], max_bad_fraction=0.5, bad_warmup=5)
    got = keys_of(dm.val_dataloader())
    assert sorted(got) == sorted([*keys, "good"])
    assert dm.bad_sample_counts["val"] == {"aspect": 1, "nan": 1, "size_mismatch": 1}
    dm = dm_for(str(odd / "cut.tar"), epoch_samples=4, batch_size=1, max_bad_fraction=0.9, bad_warmup=1)
    list(dm.train_dataloader())
    assert dm.bad_sample_counts["train"].get("read", 0) >= 1


def test_raw_batches_normalise_to_the_same_values(shards):
    root, _ = shards
    ref = list(dm_for(root, epoch_samples=8).train_dataloader())
    dm = dm_for(root, epoch_samples=8, normalize_on_device=True)
    raw = list(dm.train_dataloader())
    assert raw[0]["images"].dtype == raw[0]["controls"].dtype == torch.uint8
    for x, y in zip(ref, raw):
        y = dm.on_after_batch_transfer(y, 0)  # what the Trainer runs after moving the batch to the device
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["controls"], y["controls"])


def test_decoded_samples_are_cached_across_epochs_with_the_same_batches(shards, monkeypatch):
    """cache_decoded: a sample seen before is not decoded again, and every epoch's batches are the uncached ones."""
    root, _ = shards
    plain = dm_for(root, epoch_samples=24).train_dataloader()
    want = [list(plain), list(plain)]
    dm = dm_for(root, epoch_samples=24, cache_decoded=100)
    decoded: list[str] = []
    process = SampleProcessor.__call__
    monkeypatch.setattr(SampleProcessor, "__call__", lambda self, s: decoded.append(s["__key__"]) or process(self, s))
    loader = dm.train_dataloader()
    got = [list(loader), list(loader)]
    for a, b in zip(sum(want, []), sum(got, [])):
        assert [m["key"] for m in a["meta"]] == [m["key"] for m in b["meta"]]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["controls"], b["controls"])
    seen = [m["key"] for batch in sum(got, []) for m in batch["meta"]]
    assert len(decoded) == len(set(decoded)) < len(seen)  # each distinct sample decoded once
    got[1][0]["meta"][0]["words"].append("mutated")  # a batch's meta is its own, not the cache's
    assert all("mutated" not in m["words"] for batch in list(loader) for m in batch["meta"])
    with pytest.raises(ValueError, match="cache_decoded"):
        dm_for(root, cache_decoded=-1)
