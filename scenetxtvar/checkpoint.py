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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
Source = str | os.PathLike | Mapping[str, Any]


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a model: lists the missing, unexpected and mis-shaped keys.

    ``what`` names the checkpoint (say, its kind and path), ``target`` the model it was checked against.
    """

    def __init__(
        self, what: str, missing: list[str], unexpected: list[str], mis_shaped: list[str], target: str = "the model"
    ) -> None:
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        parts = [f"{what} does not match {target}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        super().__init__("\n  ".join(parts))


# --------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------


def read_checkpoint(source: Source, what: str = "checkpoint") -> Mapping[str, Any]:
    """Load a checkpoint object: a mapping, a ``.pth``/``.pt``/``.ckpt`` file (``weights_only``),
    a ``.safetensors`` file, or a directory of sharded safetensors with an index json.

    ``what`` names the kind of checkpoint in errors (e.g. ``"BSQ-VAE checkpoint"``): a missing path
    raises FileNotFoundError, an unreadable file or one without a mapping raises ValueError; both
    messages name the path.
    """
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
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
        raise ValueError(f"{path} is not a readable {what} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict ({what} expected)")
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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(fh)`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_state_dict(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a state dict atomically; safetensors for ``.safetensors``, else ``torch.save``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        return atomic_write(path, lambda fh: fh.write(save(tensors, metadata=dict(metadata or {}))))
    return atomic_write(path, lambda fh: torch.save(tensors, fh))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header ({} for other files or none)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# --------------------------------------------------------------------------------------------
# Strict matching
# --------------------------------------------------------------------------------------------


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str = "the checkpoint",
    allow_missing: Iterable[str] = (),
    *,
    target: str = "the model",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match exactly.

    ``allow_missing`` names key prefixes that may be absent (e.g. ``car_`` for a base-only file).
    ``what`` and ``target`` name the checkpoint and the model in the message.
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
        raise CheckpointMismatchError(what, missing, unexpected, mis_shaped, target)


def load_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str = "the checkpoint",
    allow_missing: Iterable[str] = (),
    assign: bool = False,
    *,
    target: str = "the model",
) -> nn.Module:
    """Check, then load; only keys under ``allow_missing`` prefixes may be absent."""
    check_state_dict(model, state_dict, what, allow_missing, target=target)
    result = model.load_state_dict(state_dict, strict=not tuple(allow_missing), assign=assign)
    if result.unexpected_keys:  # check_state_dict already rejects these; keep the invariant explicit
        raise CheckpointMismatchError(what, [], list(result.unexpected_keys), [], target)
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


# --------------------------------------------------------------------------------------------
# InfinityPilot: separated base + CAR weights
# --------------------------------------------------------------------------------------------

BASE_WEIGHTS = "infinity_base_weights"
CAR_WEIGHTS = "car_weights"
CAR_CONFIG = "car_config.json"
# Prefixes that DDP, FSDP, torch.compile and Lightning put in front of parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.", "model.")


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Remove DDP/FSDP/compile/Lightning name prefixes wherever they occur in a key."""
    out: StateDict = {}
    for key, value in state_dict.items():
        parts = key
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if parts.startswith(prefix):
                    parts, changed = parts[len(prefix) :], True
            for infix in ("._fsdp_wrapped_module.", "._checkpoint_wrapped_module.", "._orig_mod."):
                if infix in parts:
                    parts, changed = parts.replace(infix, "."), True
        out[parts] = value
    return out


_CAR_CHUNK_RE = re.compile(r"^car_blocks\.(\d+)\.module\.(\d+)\.(.+)$")


def normalise_car_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """CAR keys in our flat layout: wrapper prefixes stripped, chunked ``car_blocks.X.module.Y`` flattened
    (the chunk size is derived from the keys)."""
    sd = strip_wrapper_prefixes(state_dict)
    chunked = [(int(m[1]), int(m[2])) for m in map(_CAR_CHUNK_RE.match, sd) if m]
    if not chunked:
        return sd
    per_chunk = max(j for _, j in chunked) + 1
    out: StateDict = {}
    for key, value in sd.items():
        m = _CAR_CHUNK_RE.match(key)
        out[f"car_blocks.{int(m[1]) * per_chunk + int(m[2])}.{m[3]}" if m else key] = value
    return out


def load_car_weights(model, source: Source) -> None:
    """Load the control branch strictly: every ``car_*``/``control_*`` key must exist and fit.

    Non-CAR keys in ``source`` (e.g. a full Lightning checkpoint) are ignored; the error for a
    mismatch names every offending key.
    """
    from .models.pilot import is_car_key

    model.init_car_modules_if_needed()
    what = f"CAR weights {source}" if not isinstance(source, Mapping) else "the CAR state dict"
    obj = read_checkpoint(source)
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # a Lightning checkpoint
        obj = obj["state_dict"]
    sd = {k: v for k, v in normalise_car_keys(obj).items() if is_car_key(k)}
    if not sd:
        raise ValueError(f"{what} holds no car_*/control_* keys")
    expected = {k: v for k, v in model.state_dict().items() if is_car_key(k)}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        file_depth = len({int(m[1]) for m in map(re.compile(r"^car_blocks\.(\d+)\.").match, sd) if m})
        raise CheckpointMismatchError(
            f"{what} (the file has {file_depth} CAR blocks, the model car_depth={model.car_depth})",
            missing,
            unexpected,
            mis_shaped,
        )
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in sd:
                tensor.copy_(sd[name])


def save_separated_weights(model, directory: str | os.PathLike, also_pth: bool = False) -> Path:
    """Write ``infinity_base_weights.safetensors``, ``car_weights.safetensors`` and ``car_config.json``."""
    from .models.pilot import is_car_key

    directory = Path(directory)
    sd = model.state_dict()
    base = {k: v for k, v in sd.items() if not is_car_key(k)}
    car = {k: v for k, v in sd.items() if is_car_key(k)}
    for name, part in ((BASE_WEIGHTS, base), (CAR_WEIGHTS, car)):
        save_state_dict(part, directory / f"{name}.safetensors")
        if also_pth:
            save_state_dict(part, directory / f"{name}.pth")
    write_car_config(model, directory)
    return directory


def write_car_config(model, directory: str | os.PathLike) -> Path:
    """``car_config.json``: the branch settings and the base architecture, written atomically."""
    from .models.pilot import is_car_key

    base = {k: v for k, v in model.state_dict().items() if not is_car_key(k)}  # shapes only are read
    path = Path(directory) / CAR_CONFIG
    tmp = path.with_name(f".{CAR_CONFIG}.tmp")
    tmp.write_text(json.dumps({**model.car_config(), "base": detect_infinity_config(base)}, indent=1))
    os.replace(tmp, path)
    return path


def _weights_file(directory: Path, name: str) -> Path:
    for suffix in (".safetensors", ".pth"):
        if (directory / f"{name}{suffix}").exists():
            return directory / f"{name}{suffix}"
    raise FileNotFoundError(f"{directory} has no {name}.safetensors or {name}.pth")


def load_separated_weights(
    directory: str | os.PathLike,
    *,
    base_weights: Source | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
):
    """Rebuild an InfinityPilot from a directory written by :func:`save_separated_weights`.

    ``base_weights`` may point elsewhere (e.g. the official release) instead of the copy here.
    """
    from .models.pilot import InfinityPilot

    directory = Path(directory)
    config_path = directory / CAR_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not a directory written by save_separated_weights")
    config = json.loads(config_path.read_text())
    config.pop("base", None)
    base = base_weights if base_weights is not None else _weights_file(directory, BASE_WEIGHTS)
    model = InfinityPilot(infinity_base_model=base, **{**config, **overrides})
    load_car_weights(model, _weights_file(directory, CAR_WEIGHTS))
    return model.to(device).eval()
