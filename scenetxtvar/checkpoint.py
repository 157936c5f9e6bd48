"""Reading, checking, converting and writing checkpoints.

Every read is ``weights_only`` (or safetensors); every load is strict and a mismatch raises an
error that names the keys; every write is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
Source = str | os.PathLike | Mapping[str, Any]


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a model: lists the missing, unexpected and mis-shaped keys."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], mis_shaped: list[str]) -> None:
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        parts = [f"{what} does not match the model:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        super().__init__("\n  ".join(parts))


# --------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------


def read_checkpoint(source: Source) -> Mapping[str, Any]:
    """Load a checkpoint object: a mapping, a ``.pth``/``.pt``/``.ckpt`` file (``weights_only``),
    a ``.safetensors`` file, or a directory of sharded safetensors with an index json."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            return _read_safetensors_dir(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, CheckpointMismatchError):
        raise
    except Exception as exc:  # pickle, zip and safetensors errors all mean the same to a user
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _read_safetensors_dir(path: Path) -> StateDict:
    from safetensors.torch import load_file

    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} is a directory without safetensors shards or an index json")
    sd: StateDict = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def save_state_dict(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a state dict atomically (temp file, fsync, rename); safetensors for ``.safetensors``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                fh.write(save(tensors, metadata=dict(metadata or {})))
            else:
                torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Strict matching
# --------------------------------------------------------------------------------------------


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str = "the checkpoint",
    allow_missing: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match exactly.

    ``allow_missing`` names key prefixes that may be absent (e.g. ``car_`` for a base-only file).
    """
    expected = model.state_dict()
    allowed = tuple(allow_missing)
    missing = (
        [k for k in expected if k not in state_dict and not k.startswith(allowed)]
        if allowed
        else [k for k in expected if k not in state_dict]
    )
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(what, missing, unexpected, mis_shaped)


def load_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str = "the checkpoint",
    allow_missing: Iterable[str] = (),
    assign: bool = False,
) -> nn.Module:
    """Check, then load; only keys under ``allow_missing`` prefixes may be absent."""
    check_state_dict(model, state_dict, what, allow_missing)
    result = model.load_state_dict(state_dict, strict=not tuple(allow_missing), assign=assign)
    if result.unexpected_keys:  # check_state_dict already rejects these; keep the invariant explicit
        raise CheckpointMismatchError(what, [], list(result.unexpected_keys), [])
    return model


# --------------------------------------------------------------------------------------------
# Infinity: block layout, architecture detection, loading
# --------------------------------------------------------------------------------------------

_CHUNK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_INFINITY_KEYS = (
    "pos_start",
    "cfg_uncond",
    "text_norm.weight",
    "word_embed.weight",
    "head.weight",
    "lvl_embed.weight",
)


def unwrap_infinity_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """Find the transformer weights in the file layouts people have: plain, training, Lightning."""
    if "trainer" in obj and isinstance(obj["trainer"], Mapping):  # official training checkpoint
        for key in ("gpt_fsdp", "gpt_wo_ddp"):
            if key in obj["trainer"]:
                return dict(obj["trainer"][key])
    for key in ("state_dict", "model", "module"):
        if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], Tensor):
            return unwrap_infinity_state_dict(obj[key])
    return {k: v for k, v in obj.items()}


def block_layout(state_dict: Mapping[str, Tensor]) -> tuple[int, int]:
    """(depth, block_chunks) from the block keys; block_chunks 1 means plain ``blocks.{k}`` keys."""
    chunked = [(int(m[1]), int(m[2])) for m in map(_CHUNK_RE.match, state_dict) if m]
    if chunked:
        chunks = max(i for i, _ in chunked) + 1
        per_chunk = max(j for _, j in chunked) + 1
        if len(set(chunked)) != chunks * per_chunk:
            raise ValueError(f"block_chunks keys are ragged: {chunks} chunks but not {per_chunk} blocks in each")
        return chunks * per_chunk, chunks
    plain = {int(m[1]) for m in map(_BLOCK_RE.match, state_dict) if m}
    if not plain:
        raise ValueError("the state dict has no transformer blocks (no 'block_chunks.*' or 'blocks.*' keys)")
    return max(plain) + 1, 1


def convert_block_keys(state_dict: Mapping[str, Tensor], block_chunks: int, prefix: str = "") -> StateDict:
    """Rename block keys to the layout of a model with ``block_chunks`` chunks (1 = ``blocks.{k}``).

    The source chunk size is derived from the keys, never assumed. ``prefix`` restricts the
    renaming to keys under it (e.g. ``""`` for Infinity's own blocks).
    """
    depth, src_chunks = block_layout(state_dict)
    if depth % block_chunks:
        raise ValueError(f"cannot split {depth} blocks into {block_chunks} chunks")
    src_n, dst_n = depth // src_chunks, depth // block_chunks
    out: StateDict = {}
    for key, value in state_dict.items():
        m = _CHUNK_RE.match(key) if src_chunks > 1 else _BLOCK_RE.match(key)
        if m is None:
            out[key] = value
            continue
        k = int(m[1]) * src_n + int(m[2]) if src_chunks > 1 else int(m[1])
        rest = m[m.lastindex]
        new = f"block_chunks.{k // dst_n}.module.{k % dst_n}.{rest}" if block_chunks > 1 else f"blocks.{k}.{rest}"
        out[prefix + new] = value
    return out


def detect_infinity_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor kwargs of :class:`~scenetxtvar.models.infinity.Infinity` from keys and shapes."""
    absent = [k for k in _INFINITY_KEYS if k not in state_dict]
    if absent:
        raise ValueError(f"not an Infinity transformer state dict: missing {absent}")
    depth, chunks = block_layout(state_dict)
    first = "block_chunks.0.module.0." if chunks > 1 else "blocks.0."
    embed_dim = state_dict["pos_start"].shape[-1]
    d = state_dict["word_embed.weight"].shape[1]
    v = state_dict["head.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        depth=depth,
        block_chunks=chunks,
        embed_dim=embed_dim,
        num_heads=state_dict[first + "sa.scale_mul_1H11"].numel(),
        ffn_hidden=state_dict[first + "ffn.fc1.weight"].shape[0],
        text_channels=state_dict["text_norm.weight"].shape[0],
        text_maxlen=state_dict["cfg_uncond"].shape[0],
        num_scale_embeddings=state_dict["lvl_embed.weight"].shape[0],
        shared_aln="shared_ada_lin.1.weight" in state_dict,
    )
    if v == 2 * d:
        # The only released patchified model is the 8B: 14-bit VAE, 2x2 patchify, d = 56.
        patchify = d == 56
        cfg.update(codebook_dim=d // 4 if patchify else d, apply_spatial_patchify=patchify, vocab_size=0)
    else:
        cfg.update(codebook_dim=d, apply_spatial_patchify=False, vocab_size=v)
    return cfg


def _normalise_infinity_keys(state_dict: StateDict, num_heads: int) -> StateDict:
    # The private flash kernel stores the per-head scale as (1, 1, H, 1); ours is (1, H, 1, 1).
    return {
        k: v.reshape(1, num_heads, 1, 1) if k.endswith("sa.scale_mul_1H11") and v.numel() == num_heads else v
        for k, v in state_dict.items()
    }


def load_infinity(
    source: Source,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """Build the Infinity that ``source`` holds and load it strictly (eval mode).

    ``source``: a plain ``.pth`` state dict, an official training checkpoint, ``.safetensors``,
    a directory of sharded safetensors with an index json (the 8B format), or a state dict.
    Architecture comes from the keys; ``overrides`` change non-weight settings (e.g.
    ``block_chunks=1`` converts the keys, ``apply_spatial_patchify``, ``drop_path_rate``).
    """
    from .models.infinity import Infinity

    what = f"Infinity checkpoint {source}" if not isinstance(source, Mapping) else "the Infinity state dict"
    sd = unwrap_infinity_state_dict(read_checkpoint(source))
    cfg = {**detect_infinity_config(sd), "drop_path_rate": 0.0, **overrides}
    sd = _normalise_infinity_keys(sd, cfg["num_heads"])
    if block_layout(sd)[1] != cfg["block_chunks"]:
        sd = convert_block_keys(sd, cfg["block_chunks"])
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        model = Infinity(**cfg)
    load_strict(model, sd, what, assign=True)
    logger.info(
        "loaded %s: depth %d, C %d, %d parameters",
        what,
        cfg["depth"],
        cfg["embed_dim"],
        sum(p.numel() for p in model.parameters()),
    )
    return model.to(device).eval()
