"""Text conditioning in Infinity's packed ("compact") format.

The transformer takes ``label_B_or_BLT = (kv_compact, lens, cu_seqlens_k, max_seqlen_k)``:
the valid rows of every prompt concatenated, their lengths, the cumulative lengths and the
longest length -- exactly what the official code passes around.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .lru import LRU


class PackedText(NamedTuple):
    """Variable-length prompt features packed along one axis (official layout)."""

    kv_compact: Tensor  # (sum(lens), Dt)
    lens: Tensor  # (B,) int64
    cu_seqlens_k: Tensor  # (B+1,) int32, [0, cumsum(lens)]
    max_seqlen_k: int

    @property
    def batch_size(self) -> int:
        """Number of prompts."""
        return int(self.lens.numel())

    def to(self, device: torch.device | str) -> PackedText:
        """The same text on another device."""
        return PackedText(
            self.kv_compact.to(device), self.lens.to(device), self.cu_seqlens_k.to(device), self.max_seqlen_k
        )


def as_packed_text(label_B_or_BLT: PackedText | Sequence) -> PackedText:
    """Normalise the official 4-tuple (lens may be a list) into a validated :class:`PackedText`."""
    if len(label_B_or_BLT) != 4:
        raise ValueError(
            "label_B_or_BLT must be (kv_compact, lens, cu_seqlens_k, max_seqlen_k), "
            f"got a sequence of {len(label_B_or_BLT)} items"
        )
    kv, lens, cu, max_len = label_B_or_BLT
    if not isinstance(kv, Tensor) or kv.dim() != 2:
        got = getattr(kv, "shape", type(kv))
        raise ValueError(f"kv_compact must be a 2-D tensor (sum(lens), Dt), got {got}")
    lens = torch.as_tensor(lens, dtype=torch.long, device=kv.device).reshape(-1)
    if lens.numel() == 0 or bool((lens < 1).any()):
        raise ValueError(f"every prompt needs at least one token, got lens={lens.tolist()}")
    total = int(lens.sum())
    if total != kv.shape[0]:
        raise ValueError(f"kv_compact has {kv.shape[0]} rows but lens sum to {total}")
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return PackedText(kv, lens, cu, int(lens.max()))


def pack_text(features: Tensor, attention_mask: Tensor) -> PackedText:
    """Pack padded encoder features (B, L, Dt) with a (B, L) mask of leading valid tokens."""
    if features.dim() != 3 or attention_mask.shape != features.shape[:2]:
        raise ValueError(
            f"features must be (B, L, Dt) and attention_mask (B, L); got {tuple(features.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    lens = attention_mask.sum(dim=1).long()
    keep = torch.arange(features.shape[1], device=features.device)[None, :] < lens[:, None]
    return as_packed_text((features[keep], lens, None, None))


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

OFFICIAL_T5 = "google/flan-t5-xl"  # what official Infinity conditions on (d_model 2048, max length 512)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns a batch of prompts into :class:`PackedText` of width ``dim``."""

    dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> PackedText:
        """Encode prompts into fp32 packed features (valid tokens, EOS included)."""
        ...

    def __call__(self, prompts: Sequence[str]) -> PackedText:
        """Same as :meth:`encode`."""
        ...


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    """Validate a prompt batch and return it as a list."""
    # A bare str is itself a Sequence[str]; encoding it character by character is never intended.
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got a single str {prompts[:40]!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty sequence of strings, got an empty sequence")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must all be str, got items of type {sorted(set(bad))}")
    return prompts


def _check_max_length(max_length: int) -> int:
    """Validate ``max_length`` (room for at least the EOS token)."""
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
    return int(max_length)


def _freeze(module: nn.Module) -> None:
    """Put ``module`` in eval mode with no trainable parameters."""
    module.eval()
    module.requires_grad_(False)


def _run_encoder(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> PackedText:
    """Run a T5 encoder and pack the fp32 ``last_hidden_state`` of valid tokens."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and these
    # features feed trainable cross-attention projections.
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return pack_text(hidden.float(), attention_mask)


class T5TextEncoder(nn.Module):
    """Frozen Flan-T5 encoder loaded from a local directory (official Infinity text conditioning)."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 512,
        dtype: str = "fp16",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel  # heavy import, only when used

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.max_length = _check_max_length(max_length)
        self.path = _check_t5_dir(path)
        hint = f"text.path={str(path)!r} must be a local copy of {OFFICIAL_T5} (set the config key text.path)"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, legacy=True, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"could not load a tokenizer: {hint}; cause: {e}") from e
        self.model = T5EncoderModel.from_pretrained(
            self.path, local_files_only=True, **{_dtype_kwarg(): _DTYPES[dtype]}
        ).to(device)
        _freeze(self.model)
        self.dim = int(self.model.config.d_model)
        logger.info("loaded T5 text encoder from %s (dim=%d, dtype=%s)", self.path, self.dim, dtype)

    def train(self, mode: bool = True) -> T5TextEncoder:
        """Keep the frozen encoder in eval mode even when a parent module calls ``.train()``."""
        # A parent LightningModule's .train() would otherwise switch dropout on in the text encoder.
        return super().train(False)

    def encode(self, prompts: Sequence[str]) -> PackedText:
        """Tokenise (pad to longest, truncate to ``max_length``) and encode into packed fp32 features."""
        prompts = _check_prompts(prompts)
        # Padding to the longest prompt instead of max_length (as official does) gives the same packed
        # rows up to float rounding -- padded keys are masked out and only valid rows are kept -- at a
        # fraction of the cost.
        tokens = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return _run_encoder(self.model, tokens["input_ids"], tokens["attention_mask"])

    def forward(self, prompts: Sequence[str]) -> PackedText:
        """Same as :meth:`encode`."""
        return self.encode(prompts)


def _check_t5_dir(path: str | os.PathLike) -> str:
    """Return ``path`` as a str if it is a directory with a config and weights, else raise."""
    hint = f"it must be a local copy of {OFFICIAL_T5} (set the config key text.path)"
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"text.path={str(path)!r} is not a directory; {hint}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"text.path={str(path)!r} has no config.json; {hint}")
    if not any(any(p.glob(g)) for g in _WEIGHT_GLOBS):
        raise FileNotFoundError(f"text.path={str(path)!r} has no model weights ({' or '.join(_WEIGHT_GLOBS)}); {hint}")
    return str(p)


def _dtype_kwarg() -> str:
    """Name of from_pretrained's dtype argument (``torch_dtype`` was renamed ``dtype`` in 4.56)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ByteTokenizer:
    """File-free ByT5-style tokenizer: UTF-8 bytes + 3, pad=0, eos=1, unk=2."""

    pad_id, eos_id, unk_id, offset = 0, 1, 2, 3
    vocab_size = 256 + offset

    def __init__(self, max_length: int) -> None:
        self.max_length = _check_max_length(max_length)

    def ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt, truncated so that EOS always fits within ``max_length``."""
        body = [b + self.offset for b in prompt.encode("utf-8")][: self.max_length - 1]
        return [*body, self.eos_id]

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded ``(input_ids, attention_mask)``, both (B, longest) int64."""
        rows = [self.ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        return input_ids, attention_mask


class TinyTextEncoder(nn.Module):
    """Small seeded random T5 encoder with a byte tokenizer: offline stand-in for tests and CPU demos."""

    def __init__(
        self, dim: int = 256, num_layers: int = 2, num_heads: int = 4, max_length: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim must be a positive multiple of num_heads={num_heads}, got dim={dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.dim, self.max_length, self.seed = int(dim), _check_max_length(max_length), int(seed)
        self.tokenizer = ByteTokenizer(self.max_length)
        config = T5Config(
            vocab_size=384,  # ByT5's vocab size; the byte tokenizer uses the first 259 ids
            d_model=dim,
            d_kv=dim // num_heads,
            d_ff=2 * dim,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",  # as Flan-T5
            dropout_rate=0.0,
            use_cache=False,
        )
        # fork_rng keeps whatever transformers' own init draws off the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            self.model = T5EncoderModel(config)
        _init_t5_weights(self.model, seed)
        _freeze(self.model)

    def train(self, mode: bool = True) -> TinyTextEncoder:
        """Keep the frozen encoder in eval mode even when a parent module calls ``.train()``."""
        return super().train(False)

    def encode(self, prompts: Sequence[str]) -> PackedText:
        """Byte-tokenise (truncate to ``max_length`` incl. EOS) and encode into packed fp32 features."""
        input_ids, attention_mask = self.tokenizer(_check_prompts(prompts))
        return _run_encoder(self.model, input_ids, attention_mask)

    def forward(self, prompts: Sequence[str]) -> PackedText:
        """Same as :meth:`encode`."""
        return self.encode(prompts)


@torch.no_grad()
def _init_t5_weights(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter from a local generator seeded with ``seed`` (T5-like scales)."""
    # Explicit init (not transformers' _init_weights, which changes between releases) in a fixed
    # parameter order from a private generator: same seed -> same weights, global RNG untouched.
    g = torch.Generator().manual_seed(seed)
    d_model = model.config.d_model
    for name, p in model.named_parameters():  # tied embeddings are listed once
        if name.endswith("layer_norm.weight"):
            p.fill_(1.0)
            continue
        if name.endswith("relative_attention_bias.weight"):
            std = d_model**-0.5
        elif p.dim() == 2 and "shared" not in name and "embed_tokens" not in name:
            std = p.shape[1] ** -0.5  # fan-in scaling keeps activations O(1)
        else:
            std = 1.0  # token embeddings, as T5
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


class CachedTextEncoder(nn.Module):
    """A frozen text encoder that remembers the features of the last ``max_prompts`` prompts (LRU).

    The encoder is frozen and deterministic, so a prompt seen before (every epoch after the first, the
    null prompt of every guided batch) needs no forward: its packed rows are looked up, and the new ones
    are encoded together in one batch. Padded beside other prompts, a prompt's features can differ in the
    last float bits with the batch it came in, so a run resumed with an empty cache repeats an
    uninterrupted one only to within that rounding (exactly with the cache off). Each entry costs
    ``tokens x dim`` fp32 (about 40 KB for a demo caption at dim 256, 0.5 MB for a 64-token Flan-T5-XL
    one). Moving the encoder to another device or dtype empties the cache; ``.to()`` where it already is
    keeps it.
    """

    def __init__(self, encoder: nn.Module, max_prompts: int) -> None:
        super().__init__()
        self._rows = LRU(max_prompts, "max_prompts")
        self.encoder = encoder
        self.dim, self.max_length = encoder.dim, encoder.max_length
        self.max_prompts = self._rows.max_items
        self.hits = self.misses = 0

    def train(self, mode: bool = True) -> CachedTextEncoder:
        """The wrapped encoder stays in eval mode."""
        return super().train(False)

    def _placement(self) -> tuple[Any, Any]:
        p = next(self.parameters(), None)
        return (p.device, p.dtype) if p is not None else (None, None)

    def _apply(self, fn: Any, recurse: bool = True) -> CachedTextEncoder:
        before = self._placement()
        super()._apply(fn, recurse)
        if self._placement() != before:  # the cached rows came from the old device / dtype
            self._rows.clear()
        return self

    def encode(self, prompts: Sequence[str]) -> PackedText:
        """Packed features of ``prompts``; only prompts not in the cache go through the encoder."""
        prompts = _check_prompts(prompts)
        rows = {p: self._rows.get(p) for p in prompts if p in self._rows}
        new = [p for p in dict.fromkeys(prompts) if p not in rows]
        self.hits, self.misses = self.hits + len(prompts) - len(new), self.misses + len(new)
        if new:
            packed = self.encoder.encode(new)
            rows.update(zip(new, (r.clone() for r in packed.kv_compact.split(packed.lens.tolist()))))
        for p in dict.fromkeys(prompts):
            self._rows.put(p, rows[p])
        batch = [rows[p] for p in prompts]
        return as_packed_text((torch.cat(batch), [r.shape[0] for r in batch], None, None))

    def forward(self, prompts: Sequence[str]) -> PackedText:
        """Same as :meth:`encode`."""
        return self.encode(prompts)
