"""Data: glyph control rendering, synthetic scene-text shards, shard sets and converters.

- :mod:`.glyph`: ``render_glyph_control`` / ``GlyphRenderer`` (words warped into polygons, missing
  glyphs reported), ``canny_control``, ``load_condition``.
- :mod:`.synthetic`: ``make_scene`` and ``generate_synthetic_shards`` (the embedded default dataset).
- :mod:`.shards`: ``ShardSetWriter`` (atomic webdataset shards + ``manifest.json``), ``read_manifest``,
  ``list_shards``; the shard format is documented there.
- :mod:`.convert`: InfinityPilot jsonl buckets, AnyWord-3M JSON and plain folders -> shard sets.

Names are re-exported lazily (PEP 562), so ``python -m scenetxtvar.data.synthetic`` and the
generator's spawned workers import only what they use (no torch / Lightning).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "FontSpec": "glyph",
    "GlyphRenderer": "glyph",
    "canny_control": "glyph",
    "load_condition": "glyph",
    "render_glyph_control": "glyph",
    "MANIFEST_NAME": "shards",
    "SHARD_FORMAT": "shards",
    "ShardSetWriter": "shards",
    "encode_sample": "shards",
    "list_shards": "shards",
    "read_manifest": "shards",
    "generate_synthetic_shards": "synthetic",
    "make_scene": "synthetic",
    "parse_size": "synthetic",
    "ConvertReport": "convert",
    "convert_anyword": "convert",
    "convert_folder": "convert",
    "convert_infinitypilot": "convert",
    "SceneTextDataModule": "datamodule",
}

if TYPE_CHECKING:
    from scenetxtvar.data.convert import ConvertReport, convert_anyword, convert_folder, convert_infinitypilot
    from scenetxtvar.data.datamodule import SceneTextDataModule
    from scenetxtvar.data.glyph import FontSpec, GlyphRenderer, canny_control, load_condition, render_glyph_control
    from scenetxtvar.data.shards import (
        MANIFEST_NAME,
        SHARD_FORMAT,
        ShardSetWriter,
        encode_sample,
        list_shards,
        read_manifest,
    )
    from scenetxtvar.data.synthetic import generate_synthetic_shards, make_scene, parse_size


def __getattr__(name: str) -> Any:
    """Import a re-exported name from its submodule on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "MANIFEST_NAME",
    "SHARD_FORMAT",
    "ConvertReport",
    "FontSpec",
    "GlyphRenderer",
    "ShardSetWriter",
    "canny_control",
    "convert_anyword",
    "convert_folder",
    "convert_infinitypilot",
    "encode_sample",
    "generate_synthetic_shards",
    "list_shards",
    "load_condition",
    "make_scene",
    "parse_size",
    "SceneTextDataModule",
    "read_manifest",
    "render_glyph_control",
]
