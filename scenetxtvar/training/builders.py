"""Build the frozen parts and the model from plain config values, with errors that say which
file is missing and which override sets it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_car_weights
from ..models.pilot import InfinityPilot
from ..models.registry import build_pilot_preset
from ..text import CachedTextEncoder, TextEncoder, TinyTextEncoder

logger = logging.getLogger(__name__)

# Condition types the project knows how to make or read; others need shards that carry them.
KNOWN_CONDITIONS = ("glyph", "canny", "normal", "depth", "seg")


def require_file(path: str | os.PathLike, override: str, what: str) -> Path:
    """``path`` if it exists, else a FileNotFoundError naming the file and the override that sets it."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}\n  set it with the override {override}=/path/to/file")
    return p


def build_pilot(
    preset: str, base_weights: str | None = None, car_weights: str | None = None, seed: int = 0, **overrides: Any
) -> InfinityPilot:
    """An InfinityPilot: a preset with a seeded random base, or the base weights file's architecture."""
    if base_weights:
        base = require_file(base_weights, "model.build.base_weights", "Infinity base weights")
        model = build_pilot_preset(preset, infinity_base_model=str(base), **overrides)
    else:
        logger.warning("model.build.base_weights is not set: the base Infinity has random weights (demo/test mode)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_pilot_preset(preset, **overrides)
    if car_weights:
        load_car_weights(model, require_file(car_weights, "model.build.car_weights", "CAR weights"))
    return model


# InfinityPilot-only settings of a model config: a plain Infinity (the base stage) takes none of them.
PILOT_ONLY_KEYS = (
    "car_depth",
    "fusion",
    "car_init",
    "control_channels",
    "control_unshuffle",
    "token_conv_kernel",
    "conditioning_channels",
    "condition_names",
    "init_car_modules",
    "freeze_infinity",
)


def build_infinity(preset: str, seed: int = 0, **overrides: Any):
    """A seeded random Infinity of a model config (``infinity_pilot_*`` presets map to their base)."""
    from ..models.registry import build_preset

    for key in (*PILOT_ONLY_KEYS, "base_weights", "car_weights"):
        overrides.pop(key, None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_preset(preset.replace("infinity_pilot_", "infinity_", 1), **overrides)


def check_code_dim(vae: nn.Module, model_code_dim: int, vae_path: str | None) -> None:
    """A tokenizer whose bits per position differ from the model's head: a readable error naming both settings."""
    got = getattr(vae, "code_dim", model_code_dim)
    if got != model_code_dim:
        source = f"the tokenizer at vae.build.path={vae_path}" if vae_path else "the tokenizer (vae.build)"
        raise ValueError(
            f"{source} has codebook_dim={got}, the transformer expects {model_code_dim} bits per token: "
            "set vae.build.model_overrides.codebook_dim (and the base weights) to match, or use a tokenizer "
            f"with codebook_dim={model_code_dim}"
        )


def build_tokenizer(kind: str = "bsq", path: str | None = None, seed: int = 0, **config: Any) -> nn.Module:
    """The frozen VAE: the official file at ``path``, or a seeded random one built from ``config``."""
    from ..tokenizers import BSQVAE, VQVAE, BSQVAEConfig, load_vq_vae

    if kind not in ("bsq", "vq"):
        raise ValueError(f"vae.kind must be 'bsq' or 'vq', got {kind!r}")
    if path:
        p = require_file(path, "vae.build.path", f"{kind.upper()} tokenizer weights")
        vae = _load_bsq_checked(p, config) if kind == "bsq" else load_vq_vae(p, **config)
    else:
        logger.warning("vae.build.path is not set: the %s tokenizer has random weights (demo/test mode)", kind)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if kind == "bsq":
                cfg = dict(config)
                for key in ("ch_mult", "decoder_ch_mult"):
                    if cfg.get(key) is not None:
                        cfg[key] = tuple(cfg[key])
                vae = BSQVAE(BSQVAEConfig(**cfg))
            else:
                vae = VQVAE(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return vae.eval().requires_grad_(False)


def _load_bsq_checked(path: Path, config: dict[str, Any]) -> nn.Module:
    """The BSQ-VAE file's own architecture; ``vae.build`` fields that contradict it are a readable error.

    Every BSQVAEConfig field shapes the weights, so a differing field could never load: say which.
    """
    import dataclasses

    from ..tokenizers import load_bsq_vae

    vae = load_bsq_vae(path)
    wanted = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    try:
        target = dataclasses.replace(vae.config, **wanted)
    except TypeError as e:
        raise ValueError(f"unknown BSQ-VAE setting in vae.build: {sorted(wanted)}: {e}") from e
    diffs = [f.name for f in dataclasses.fields(target) if getattr(target, f.name) != getattr(vae.config, f.name)]
    if diffs:
        has = ", ".join(f"{k}={getattr(vae.config, k)}" for k in diffs)
        says = ", ".join(f"{k}={getattr(target, k)}" for k in diffs)
        raise ValueError(
            f"the tokenizer at vae.build.path={path} has {has}, but vae.build sets {says}: "
            "use a tokenizer trained with these settings, or change (or remove) the vae.build fields"
        )
    return vae


def build_text_encoder(
    kind: str = "tiny", path: str | None = None, cache_prompts: int = 0, **kwargs: Any
) -> TextEncoder:
    """The frozen text encoder: Flan-T5 from a local directory, or the tiny offline one.

    ``cache_prompts > 0`` remembers the features of that many prompts (:class:`~scenetxtvar.text.CachedTextEncoder`).
    """
    if kind == "tiny":
        encoder = TinyTextEncoder(**kwargs)
    elif kind == "t5":
        from ..text import T5TextEncoder

        if not path:
            raise FileNotFoundError("text.path is not set: point it at a local copy of google/flan-t5-xl")
        encoder = T5TextEncoder(require_file(path, "text.path", "Flan-T5 directory"), **kwargs)
    else:
        raise ValueError(f"text.kind must be 'tiny' or 't5', got {kind!r}")
    return CachedTextEncoder(encoder, cache_prompts) if cache_prompts else encoder
