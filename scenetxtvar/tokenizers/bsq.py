"""Infinity's BSQ-VAE tokenizer: a conv autoencoder with a multi-scale binary spherical quantiser.

State-dict compatible with the official ``infinity/models/bsq_vae`` checkpoints (``infinity_vae_d16/
d24/d32/d64.pth``, patch 16, and the 8B's ``infinity_vae_d56_f8_14_patchify.pth``, patch 8) and
numerically equal to the official code in fp32. The quantisation math (BSQ, area/trilinear resizes,
bits <-> codes) lives in :mod:`scenetxtvar.bitwise`; this module only wires it into the VAE.

Layouts (official):
- images ``(B, 3, H, W)`` in [-1, 1]; latents ``(B, dq, H/p, W/p)``;
- per-scale bits ``(B, 1, h, w, dq)`` (the 1 is the time axis), bit 1 = code component positive;
- per-scale codes from :meth:`BSQVAE.indices_to_codes` ``(B, dq, 1, h, w)``.

Schedules are given on the latent grid, as ``(h, w)`` or ``(1, h, w)`` entries, coarse to fine; the
last one must equal the latent grid. With the 8B's spatial patchify pass ``patchify=True`` and the
token schedule (the latent grid is then twice the token grid, as in :func:`bitwise.latent_grids`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bitwise import area_resize, bits_to_codes, bsq_quantize, latent_grids, trilinear_resize
from ..checkpoint import load_strict, read_checkpoint, read_safetensors_metadata
from ..scales import normalize_schedule

logger = logging.getLogger(__name__)

ScheduleLike = Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _num_groups(channels: int, groups: int | None = None) -> int:
    """GroupNorm groups: ``groups`` when given (0: no normalisation), else the official 32, else 24."""
    if groups == 0:
        return 0
    if groups is not None:
        if groups < 1 or channels % groups:
            raise ValueError(f"norm_groups={groups} must be >= 1 and divide every width, got width {channels}")
        return groups
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(
        f"GroupNorm needs a channel count divisible by 32 or 24, got {channels} (or set norm_groups to a divisor)"
    )


@dataclass(frozen=True)
class BSQVAEConfig:
    """Architecture of a BSQ-VAE; the defaults are the released d32 patch-16 tokenizer."""

    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16
    codebook_dim: int = 32
    # None = same as ch_mult (every released VAE); the official builder takes both separately.
    decoder_ch_mult: tuple[int, ...] | None = None
    # GroupNorm groups; None = the official 32 (or 24). Small tokenizers train far faster with fewer,
    # wider groups (one channel per group normalises away each channel's per-image level, its colour),
    # and faster still with none: 0 drops the norms (identity, no parameters), which also tolerates a
    # higher learning rate (64x128 demo, 1400 steps: recon Sen.ACC 0.31 vs 0.17 with 1 group).
    # A group count is not visible in a state dict: exports carry it in their metadata (``load_bsq_vae``).
    norm_groups: int | None = None
    # Space-to-depth factor r before the encoder (and depth-to-space after the decoder): the first
    # conv sees 3*r*r channels at 1/r resolution and the conv levels downsample patch_size / r more.
    # 1 in every released VAE. r = 2 takes the costly full-resolution level off a CPU-sized tokenizer.
    pixel_unshuffle: int = 1

    @property
    def num_downsamples(self) -> int:
        """Stride-2 levels of the encoder (and upsampling levels of the decoder): log2(patch_size / r)."""
        return int(math.log2(self.patch_size // self.pixel_unshuffle))

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.decoder_ch_mult is not None:
            dec = tuple(int(m) for m in self.decoder_ch_mult)
            object.__setattr__(self, "decoder_ch_mult", None if dec == self.ch_mult else dec)
        p, r = self.patch_size, self.pixel_unshuffle
        if p < 1 or p & (p - 1):
            raise ValueError(f"patch_size must be a power of two, got {p}")
        if r < 1 or r & (r - 1) or r > p:
            raise ValueError(f"pixel_unshuffle must be a power of two <= patch_size {p}, got {r}")
        n_down = self.num_downsamples
        for name, mult in (("ch_mult", self.ch_mult), ("decoder_ch_mult", self.dec_ch_mult)):
            # The decoder upsamples at levels 1..n_down, so it needs n_down + 1 levels to undo the
            # encoder's n_down downsamples.
            if len(mult) <= n_down:
                raise ValueError(
                    f"{name} needs more than log2(patch_size / pixel_unshuffle)={n_down} levels, got {mult}"
                )
            if min(mult) < 1:
                raise ValueError(f"{name} entries must be positive, got {mult}")
            for m in mult:
                _num_groups(self.base_ch * m, self.norm_groups)
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {self.codebook_dim}")

    @property
    def dec_ch_mult(self) -> tuple[int, ...]:
        """The decoder's level multipliers."""
        return self.ch_mult if self.decoder_ch_mult is None else self.decoder_ch_mult


# --------------------------------------------------------------------------------------------------
# Building blocks (module names mirror the official ones: they are the state-dict keys)
# --------------------------------------------------------------------------------------------------


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x) as torch's fused SiLU: one kernel each way (the demo tokenizer's CPU step 0.110 vs 0.120 s)."""
    return F.silu(x)


class Conv(nn.Module):
    """A 2-D conv behind a ``.conv`` attribute (official ``Conv`` wrapper -> keys ``X.conv.weight``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the conv."""
        return self.conv(x)


class Normalize(nn.Module):
    """GroupNorm (32 groups, or 24 when 32 does not divide, or ``groups``), eps 1e-6, behind ``.norm``.

    ``groups=0``: no normalisation (an identity without parameters).
    """

    def __init__(self, channels: int, groups: int | None = None) -> None:
        super().__init__()
        n = _num_groups(channels, groups)
        self.norm = nn.GroupNorm(n, channels, eps=1e-6, affine=True) if n else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the norm."""
        return self.norm(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int | None = None) -> None:
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout, groups)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x + residual branch."""
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (torch has no asymmetric conv padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Halve H and W."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double H and W."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int | None) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> raw features (B, dq, H/p, W/p)."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        ch, mult, n_down = cfg.base_ch, cfg.ch_mult, cfg.num_downsamples
        self.unshuffle = cfg.pixel_unshuffle
        self.conv_in = Conv(3 * self.unshuffle**2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m, cfg.norm_groups))
                cin = ch * m
            if i < n_down:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _mid(cin, cfg.norm_groups)
        self.norm_out = Normalize(cin, cfg.norm_groups)
        self.conv_out = Conv(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode."""
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, dq, h, w) -> image (B, 3, p*h, p*w), unclamped."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        ch, mult, n_up = cfg.base_ch, cfg.dec_ch_mult, cfg.num_downsamples
        self.shuffle = cfg.pixel_unshuffle
        cin = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = _mid(cin, cfg.norm_groups)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * mult[i], cfg.norm_groups))
                cin = ch * mult[i]
            # Offset by one against the encoder (level 0 never upsamples), as in FLUX's AE.
            if 1 <= i <= n_up:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(cin, cfg.norm_groups)
        self.conv_out = Conv(cin, 3 * self.shuffle**2, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode."""
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        out = self.conv_out(swish(self.norm_out(h)))
        return F.pixel_shuffle(out, self.shuffle) if self.shuffle > 1 else out


# --------------------------------------------------------------------------------------------------
# Quantiser
# --------------------------------------------------------------------------------------------------


def bit_mask(dim: int) -> Tensor:
    """The official ``lfq.mask`` buffer: ``2 ** arange(dim-1, ..., 0)`` in int64.

    Computed with torch's int64 power on purpose: for dim >= 64 it wraps exactly as the official
    buffer does, so regenerated masks equal the ones stored in checkpoints.
    """
    return torch.pow(2, torch.arange(dim - 1, -1, -1))


class BSQ(nn.Module):
    """Single-scale binary spherical quantiser (official ``lfq``); holds the ``mask`` buffer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Unused by the bit-label path, but persistent in every official checkpoint.
        self.register_buffer("mask", bit_mask(dim))

    def forward(self, x: Tensor, straight_through: bool = False) -> tuple[Tensor, Tensor]:
        """(B, dq, ...) features -> (codes +-1/sqrt(dq) (B, dq, ...), bits int32 (B, dq, ...))."""
        return bsq_quantize(x, straight_through=straight_through)

    def indices_to_codes(self, bits: Tensor) -> Tensor:
        """Bits (B, ..., dq) -> codes (B, dq, ...); (B, 1, h, w, dq) gives (B, dq, 1, h, w).

        The official code L2-normalises the codes afterwards; that is a no-op up to one ulp, so
        the exact +-1/sqrt(dq) values are returned.
        """
        if bits.dim() < 2 or bits.shape[-1] != self.dim:
            raise ValueError(f"bits must be (B, ..., {self.dim}) (bit label last), got {tuple(bits.shape)}")
        return bits_to_codes(bits, dim=-1).movedim(-1, 1)


class QuantizerOutput(NamedTuple):
    """Result of the multi-scale quantiser."""

    summed_codes: Tensor  # (B, dq, H, W) sum of the trilinear-upsampled per-scale codes
    scale_bits: list[Tensor]  # per scale (B, 1, h_k, w_k, dq) int32
    var_inputs: list[Tensor]  # legacy VAR inputs: area resize of the running sum to scale k+1, (B, dq, h, w)


class MultiScaleBSQ(nn.Module):
    """Residual multi-scale BSQ (official ``MultiScaleBSQ`` with ``new_quant``, no projections).

    Per scale: area-downsample the residual, quantise, trilinear-upsample the codes back to the
    latent grid, subtract them from the residual and add them to the output.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lfq = BSQ(dim)

    def forward(self, features: Tensor, grids: Sequence[tuple[int, int]]) -> QuantizerOutput:
        """Quantise (B, dq, H, W) features over per-scale latent ``grids`` (last = (H, W))."""
        full = tuple(features.shape[-2:])
        # Straight-through only when someone differentiates through the VAE; frozen inference gets
        # exact codes (the official always uses it, which moves values by at most one ulp).
        st = torch.is_grad_enabled() and features.requires_grad
        residual = features
        summed = torch.zeros_like(features)
        scale_bits, var_inputs = [], []
        for k, hw in enumerate(grids):
            codes, bits = self.lfq(area_resize(residual, hw), straight_through=st)
            if tuple(hw) != full:
                codes = trilinear_resize(codes, full)
            # The residual chain is detached in the official quantiser (remove_residual_detach=False).
            residual = residual - codes.detach()
            summed = summed + codes
            scale_bits.append(bits.permute(0, 2, 3, 1).unsqueeze(1))
            if k + 1 < len(grids):
                var_inputs.append(area_resize(summed, grids[k + 1]))
        return QuantizerOutput(summed, scale_bits, var_inputs)


# --------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------


class BSQVAE(nn.Module):
    """Infinity's BSQ-VAE: ``encoder``, ``decoder`` and the multi-scale quantiser.

    The quantiser is registered as ``quantizer`` and again as ``quantize`` (the official alias), so
    its ``lfq.mask`` buffer appears under both names in the state dict.
    """

    def __init__(self, config: BSQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else BSQVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantizer = MultiScaleBSQ(self.config.codebook_dim)
        self.quantize = self.quantizer

    @property
    def code_dim(self) -> int:
        """Bits per latent position (dq)."""
        return self.config.codebook_dim

    @property
    def patch_size(self) -> int:
        """Pixels per latent position along each axis."""
        return self.config.patch_size

    @property
    def downsample(self) -> int:
        """Alias of :attr:`patch_size` (the name the Infinity code uses)."""
        return self.config.patch_size

    def _param_dtype(self) -> torch.dtype:
        return self.encoder.conv_in.conv.weight.dtype

    def _check_image(self, img: Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image H and W must be divisible by the patch size {p}, got {h}x{w}")

    def _grids(self, schedule: ScheduleLike, latent_hw: tuple[int, int], patchify: bool) -> list[tuple[int, int]]:
        sched = normalize_schedule(schedule)
        if any(t != 1 for t, _, _ in sched):
            raise ValueError(f"the BSQ-VAE is an image tokenizer: every scale needs t = 1, got {sched}")
        grids = latent_grids(sched, patchify)
        if grids[-1] != tuple(latent_hw):
            raise ValueError(
                f"the schedule's last scale {grids[-1]} (latent grid) does not match the latent grid {tuple(latent_hw)}"
            )
        too_big = [g for g in grids if g[0] > latent_hw[0] or g[1] > latent_hw[1]]
        if too_big:
            raise ValueError(f"schedule scales {too_big} exceed the latent grid {tuple(latent_hw)}")
        return grids

    def encode_for_raw_features(self, img: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> raw fp32 encoder features (B, dq, H/p, W/p).

        The official method also returns detached intermediate activations (``hs``, ``hs_mid``);
        nothing in Infinity's inference or training reads them, so only the features are returned.
        """
        self._check_image(img)
        return self.encoder(img.to(self._param_dtype())).float()

    def quantize_features(self, features: Tensor, schedule: ScheduleLike, *, patchify: bool = False) -> QuantizerOutput:
        """Multi-scale BSQ of raw features (B, dq, H, W) -> summed codes, bits, var inputs."""
        if features.dim() != 4 or features.shape[1] != self.code_dim:
            raise ValueError(f"features must be (B, {self.code_dim}, H, W), got shape {tuple(features.shape)}")
        grids = self._grids(schedule, tuple(features.shape[-2:]), patchify)
        return self.quantizer(features.float(), grids)

    def encode(self, img: Tensor, schedule: ScheduleLike, *, patchify: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Image -> (summed codes (B, dq, h, w), per-scale bits [(B, 1, h_k, w_k, dq) int32])."""
        out = self.quantize_features(self.encode_for_raw_features(img), schedule, patchify=patchify)
        return out.summed_codes, out.scale_bits

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, dq, h, w) or official (B, dq, 1, h, w) -> image (B, 3, p*h, p*w) in [-1, 1]."""
        if z.dim() == 5 and z.shape[2] == 1:
            z = z.squeeze(2)
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"latent must be (B, {self.code_dim}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(z.to(self._param_dtype())).clamp(-1.0, 1.0)

    def indices_to_codes(self, bits: Tensor) -> Tensor:
        """Per-scale bits (B, 1, h, w, dq) -> codes +-1/sqrt(dq) in the official (B, dq, 1, h, w) layout."""
        return self.quantizer.lfq.indices_to_codes(bits)

    def bits_to_summed_codes(
        self, scale_bits: Sequence[Tensor], schedule: ScheduleLike, *, patchify: bool = False
    ) -> Tensor:
        """Sum of the trilinear-upsampled codes of the given scales -> (B, dq, h, w) on the last grid.

        ``scale_bits`` may cover only the first k scales of ``schedule`` (a progressive preview).
        """
        sched = normalize_schedule(schedule)
        last = latent_grids(sched, patchify)[-1]
        grids = self._grids(sched, last, patchify)
        if not 0 < len(scale_bits) <= len(grids):
            raise ValueError(f"expected 1..{len(grids)} per-scale bit tensors, got {len(scale_bits)}")
        summed: Tensor | None = None
        for k, bits in enumerate(scale_bits):
            want = (1, *grids[k], self.code_dim)
            if bits.dim() != 5 or tuple(bits.shape[1:]) != want:
                raise ValueError(f"bits of scale {k} must be (B, {', '.join(map(str, want))}), got {tuple(bits.shape)}")
            codes = trilinear_resize(self.indices_to_codes(bits).squeeze(2), last)
            summed = codes if summed is None else summed + codes
        return summed

    def decode_from_bits(
        self, scale_bits: Sequence[Tensor], schedule: ScheduleLike, *, patchify: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-scale bits -> (summed codes (B, dq, h, w), image clamped to [-1, 1]).

        Official ``decode_from_indices(..., 'bit_label')``; it returns the summed codes as
        (B, dq, 1, h, w), here they are (B, dq, h, w) like :meth:`encode`.
        """
        summed = self.bits_to_summed_codes(scale_bits, schedule, patchify=patchify)
        return summed, self.decode(summed)

    def forward(self, img: Tensor, schedule: ScheduleLike) -> Tensor:
        """Reconstruct an image through the multi-scale quantiser."""
        return self.decode(self.encode(img, schedule)[0])


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

_SIDE = r"(?:encoder|decoder)"
_BLOCK = rf"{_SIDE}\.(?:(?:down|up)\.\d+\.block\.\d+|mid\.block_[12])"
# Module paths of the official Conv / Normalize wrappers. A key "<wrapper>.weight" is the legacy
# (un-wrapped) spelling of "<wrapper>.conv.weight" / "<wrapper>.norm.weight". The patterns are
# anchored, so already-wrapped keys (e.g. "...downsample.conv.conv.weight") never match.
_CONV_WRAPPER = re.compile(
    rf"^(?:{_SIDE}\.conv_(?:in|out)|{_BLOCK}\.(?:conv1|conv2|nin_shortcut)"
    rf"|{_SIDE}\.(?:down|up)\.\d+\.(?:downsample|upsample)\.conv)\.(?:weight|bias)$"
)
_NORM_WRAPPER = re.compile(rf"^(?:{_SIDE}\.norm_out|{_BLOCK}\.norm[12])\.(?:weight|bias)$")
_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_WHAT = "BSQ-VAE checkpoint"
# safetensors metadata key holding the BSQVAEConfig fields a state dict cannot show (norm_groups).
CONFIG_METADATA_KEY = "scenetxtvar.bsq_config"


def convert_legacy_keys(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Rename legacy ``X.weight`` conv/norm keys to the wrapped ``X.conv.weight`` / ``X.norm.weight``.

    Returns (converted dict, number of renamed keys). Both spellings of the same tensor -> ValueError.
    """
    out: dict[str, Tensor] = {}
    renamed = 0
    for key, value in state_dict.items():
        new = key
        if _CONV_WRAPPER.match(key):
            new = key.rsplit(".", 1)[0] + ".conv." + key.rsplit(".", 1)[1]
        elif _NORM_WRAPPER.match(key):
            new = key.rsplit(".", 1)[0] + ".norm." + key.rsplit(".", 1)[1]
        if new in out:
            raise ValueError(f"state dict holds both the legacy and the wrapped name of {new!r}")
        renamed += new != key
        out[new] = value
    return out, renamed


def _level_widths(sd: Mapping[str, Tensor], side: str, group: str) -> dict[int, int]:
    pat = re.compile(rf"^{side}\.{group}\.(\d+)\.block\.0\.conv1\.conv\.weight$")
    return {int(m.group(1)): int(v.shape[0]) for k, v in sd.items() if (m := pat.match(k))}


def _mult(widths: dict[int, int], base: int, what: str) -> tuple[int, ...]:
    if not widths or sorted(widths) != list(range(len(widths))):
        raise ValueError(f"cannot find the {what} levels (levels found: {sorted(widths)})")
    mult = []
    for i in range(len(widths)):
        if widths[i] % base:
            raise ValueError(f"{what} level {i} width {widths[i]} is not a multiple of base_ch {base}")
        mult.append(widths[i] // base)
    return tuple(mult)


def detect_config(state_dict: Mapping[str, Tensor], norm_groups: int | None = None) -> BSQVAEConfig:
    """Infer the architecture from a (wrapped-name) state dict's shapes.

    ``norm_groups`` is not in the shapes: pass it (from metadata); a state dict without any norm weights
    is norm-free (0).
    """
    for key in ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight"):
        if key not in state_dict:
            raise ValueError(f"cannot detect the BSQ-VAE architecture: {key!r} is missing")
    conv_in = state_dict["encoder.conv_in.conv.weight"]
    if conv_in.dim() != 4:
        raise ValueError(f"encoder.conv_in.conv.weight must be a 2-D conv kernel, got shape {tuple(conv_in.shape)}")
    base = int(conv_in.shape[0])
    r = math.isqrt(int(conv_in.shape[1]) // 3)
    if 3 * r * r != int(conv_in.shape[1]):
        raise ValueError(f"encoder.conv_in takes {conv_in.shape[1]} channels: not 3 * r^2 (RGB, pixel-unshuffled)")
    enc_mult = _mult(_level_widths(state_dict, "encoder", "down"), base, "encoder")
    dec_mult = _mult(_level_widths(state_dict, "decoder", "up"), base, "decoder")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))}
    downs = sum(1 for k in state_dict if re.match(r"^encoder\.down\.\d+\.downsample\.conv\.conv\.weight$", k))
    if norm_groups is None and not any(re.search(r"\.norm(?:1|2|_out)\.norm\.", k) for k in state_dict):
        norm_groups = 0
    return BSQVAEConfig(
        base_ch=base,
        ch_mult=enc_mult,
        num_res_blocks=len(blocks),
        patch_size=2**downs * r,
        codebook_dim=int(state_dict["encoder.conv_out.conv.weight"].shape[0]),
        decoder_ch_mult=dec_mult,
        norm_groups=norm_groups,
        pixel_unshuffle=r,
    )


def _extract_state_dict(obj: Mapping[str, Any], origin: str) -> dict[str, Tensor]:
    # Official files are {"vae": state_dict, ...other training entries}; take "vae" only.
    sd = obj.get("vae", obj)
    if not isinstance(sd, Mapping) or not any(str(k).startswith("encoder.") for k in sd):
        top = sorted(map(str, obj))[:8]
        raise ValueError(
            f"{origin}: not a BSQ-VAE checkpoint: expected {{'vae': state_dict}} or a state dict with "
            f"'encoder.*' / 'decoder.*' keys; top-level keys: {top}{' ...' if len(obj) > 8 else ''}"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{origin}: state dict entries that are not tensors: {bad[:5]}")
    return dict(sd)


def _fill_masks(sd: dict[str, Tensor], dim: int) -> None:
    # The mask buffers are a deterministic function of dq (and unused by bit labels): a checkpoint
    # that lacks one (e.g. saved from a module without the `quantize` alias) gets it regenerated.
    for key in _MASK_KEYS:
        if key not in sd:
            other = [sd[k] for k in _MASK_KEYS if k in sd]
            sd[key] = other[0].clone() if other else bit_mask(dim)
            logger.info("BSQ-VAE checkpoint lacks %s; regenerated it (2**(dq-1..0))", key)


def config_metadata(config: BSQVAEConfig) -> dict[str, str]:
    """safetensors metadata that lets :func:`load_bsq_vae` rebuild what detection cannot (``norm_groups``)."""
    return {CONFIG_METADATA_KEY: json.dumps({"norm_groups": config.norm_groups})}


def _metadata_fields(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return {}
    raw = read_safetensors_metadata(source).get(CONFIG_METADATA_KEY)
    return {k: v for k, v in json.loads(raw).items() if k == "norm_groups"} if raw else {}


def load_bsq_vae(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> BSQVAE:
    """Build a BSQ-VAE whose architecture is detected from ``source`` and load it strictly (eval, frozen).

    ``source``: an official ``{"vae": state_dict}`` .pth (other top-level entries are ignored), a
    plain state-dict .pth, a .safetensors file, or an already-loaded dict of either form. Legacy
    un-wrapped conv/norm key names are converted. Fields the shapes cannot show (``norm_groups``) come
    from the file's metadata when it is one of our exports. ``overrides`` replace detected
    :class:`BSQVAEConfig` fields.
    """
    obj = read_checkpoint(source, _WHAT)
    origin = "<state dict>" if isinstance(source, Mapping) else str(source)
    what = "the BSQ-VAE state dict" if isinstance(source, Mapping) else f"{_WHAT} {origin}"
    try:
        sd, renamed = convert_legacy_keys(_extract_state_dict(obj, origin))
        fields = {**_metadata_fields(source), **overrides}
        config = dataclasses.replace(detect_config(sd, fields.pop("norm_groups", None)), **fields)
    except TypeError as e:
        raise ValueError(f"unknown BSQVAEConfig override in {sorted(overrides)}: {e}") from e
    except ValueError as e:
        if str(e).startswith(origin):
            raise
        raise ValueError(f"{origin}: {e}") from e
    _fill_masks(sd, config.codebook_dim)
    model = BSQVAE(config)
    load_strict(model, sd, what, target=f"the BSQ-VAE {config}")
    model.eval().requires_grad_(False)
    logger.info("loaded BSQ-VAE from %s: %s (%d legacy keys renamed)", origin, config, renamed)
    return model
