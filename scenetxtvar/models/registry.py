"""Size presets as timm ``@register_model`` functions over the one :class:`Infinity` class.

``timm.create_model("infinity_2b", text_channels=2048)`` builds a preset; any constructor
argument may be overridden. Build on the meta device (``with torch.device("meta"):``) to count
parameters or to load weights without allocating twice.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from .infinity import Infinity
from .pilot import InfinityPilot

# The official presets: (depth, embed_dim, num_heads) + the released chunking and drop-path.
INFINITY_PRESETS: dict[str, dict[str, Any]] = {
    "infinity_tiny": dict(depth=4, embed_dim=128, num_heads=4, block_chunks=2, text_channels=256,
                          text_maxlen=64, drop_path_rate=0.0),
    "infinity_layer12": dict(depth=12, embed_dim=768, num_heads=8, block_chunks=4),
    "infinity_layer16": dict(depth=16, embed_dim=1152, num_heads=12, block_chunks=4),
    "infinity_layer24": dict(depth=24, embed_dim=1536, num_heads=16, block_chunks=4),
    "infinity_layer32": dict(depth=32, embed_dim=2080, num_heads=20, block_chunks=4),
    "infinity_layer40": dict(depth=40, embed_dim=2688, num_heads=24, block_chunks=4),
    "infinity_layer48": dict(depth=48, embed_dim=3360, num_heads=28, block_chunks=4),
    "infinity_2b": dict(depth=32, embed_dim=2048, num_heads=16, block_chunks=8),
    # 8B: 14-bit VAE with 2x2 spatial patchify -> d = 56 bits per token.
    "infinity_8b": dict(depth=40, embed_dim=3584, num_heads=28, block_chunks=8, codebook_dim=14,
                        apply_spatial_patchify=True),
    "infinity_20b": dict(depth=58, embed_dim=4608, num_heads=36, block_chunks=2, drop_path_rate=0.25),
}  # fmt: skip
_DEFAULTS: dict[str, Any] = dict(mlp_ratio=4.0, drop_path_rate=0.1, text_channels=2048, text_maxlen=512)
# timm passes these to every entry point; they mean nothing here.
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_preset(name: str, pretrained: bool = False, **overrides: Any) -> Infinity:
    """Build a named preset with overrides (no weights: use ``load_infinity`` for a checkpoint)."""
    if name not in INFINITY_PRESETS:
        raise ValueError(f"unknown Infinity preset {name!r}; choose from {sorted(INFINITY_PRESETS)}")
    if pretrained:
        raise ValueError(
            "weights are never downloaded: build the preset, then load a local file with "
            "scenetxtvar.checkpoint.load_infinity(path)"
        )
    for key in _TIMM_ARGS:
        overrides.pop(key, None)
    return Infinity(**{**_DEFAULTS, **INFINITY_PRESETS[name], **overrides})


def build_pilot_preset(name: str, pretrained: bool = False, **overrides: Any) -> InfinityPilot:
    """An ``infinity_pilot_*`` preset: the base preset plus a CAR branch of min(8, depth // 2) blocks."""
    base = name.replace("infinity_pilot_", "infinity_", 1)
    if base not in INFINITY_PRESETS:
        raise ValueError(f"unknown InfinityPilot preset {name!r}")
    if pretrained:
        raise ValueError("weights are never downloaded: pass infinity_base_model=<local path> instead")
    for key in _TIMM_ARGS:
        overrides.pop(key, None)
    cfg = {**_DEFAULTS, **INFINITY_PRESETS[base]}
    car = dict(car_depth=min(8, cfg["depth"] // 2))
    if base == "infinity_tiny":
        car["control_channels"] = (16, 32, 64, 128, 128)
    if "infinity_base_model" in overrides:  # the architecture then comes from the weights
        cfg = {}
    return InfinityPilot(**{**cfg, **car, **overrides})


def _register(name: str, builder) -> None:
    def entry(pretrained: bool = False, **kwargs: Any):
        return builder(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__doc__ = f"preset {name}"
    entry.__module__ = __name__
    register_model(entry)


PILOT_PRESETS = [n.replace("infinity_", "infinity_pilot_", 1) for n in INFINITY_PRESETS]
for _name in INFINITY_PRESETS:
    _register(_name, build_preset)
for _name in PILOT_PRESETS:
    _register(_name, build_pilot_preset)
