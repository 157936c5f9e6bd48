"""VAR's multi-scale residual VQ-VAE, re-implemented to load the official ``vae_ch160v4096z32`` weights.

The module reproduces the state-dict layout and the numerics of FoundationVision/VAR
(``models/vqvae.py``, ``models/quant.py``, ``models/basic_vae.py``):

* a taming/LDM "vq-f16" encoder/decoder (GroupNorm(32), SiLU, single-head spatial attention at the
  lowest resolution and in the middle block);
* ``quant_conv`` / ``post_quant_conv`` around a single shared codebook;
* a residual multi-scale quantizer: at every scale the residual is area-downsampled, snapped to the
  nearest code, bicubic-upsampled back, refined by a shared conv "Phi" and subtracted.

Token maps are flattened row-major (index ``y * w + x``).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_strict, read_checkpoint

__all__ = [
    "DEFAULT_CH_MULT",
    "DEFAULT_PATCH_NUMS",
    "AttnBlock",
    "Decoder",
    "Encoder",
    "MultiScaleVectorQuantizer",
    "Phi",
    "PhiNonShared",
    "PhiPartiallyShared",
    "PhiShared",
    "ResnetBlock",
    "VQVAE",
    "VectorQuantizer2",
    "infer_vqvae_kwargs",
    "load_vq_vae",
    "phi_ticks",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

DEFAULT_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEFAULT_CH_MULT: tuple[int, ...] = (1, 1, 2, 2, 4)
IMAGE_CHANNELS = 3
_NUM_GROUPS = 32  # the official Normalize() hard-codes 32 groups
_EMA_KEY = "quantize.ema_vocab_hit_SV"

PatchNum = int | tuple[int, int]


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder building blocks
# ----------------------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6, affine) as used everywhere in the VAE."""
    if channels % _NUM_GROUPS:
        raise ValueError(f"{channels} channels cannot be split into {_NUM_GROUPS} GroupNorm groups")
    return nn.GroupNorm(_NUM_GROUPS, channels, eps=1e-6, affine=True)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """3x3 convolution (the default kernel of the VAE)."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv) twice plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        # Identity (not Dropout(0)) so an eval/train switch can never change the numerics.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.scale = channels**-0.5

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
        # Explicit bmm + softmax instead of SDPA: keeps the rounding of the official code, which matters
        # because the encoder output feeds an argmin with small margins.
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # (B, HWq, HWk)
        out = torch.bmm(v, attn.transpose(1, 2))  # (B, C, HWq)
        return x + self.proj_out(out.reshape(b, c, h, w))


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv after zero-padding right/bottom by one pixel (halves H and W exactly)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (resnets), ``attn`` (empty or one per resnet), optional resampler."""

    def __init__(self, channels: Sequence[tuple[int, int]], with_attn: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in, c_out, dropout) for c_in, c_out in channels)
        self.attn = nn.ModuleList(AttnBlock(c_out) for _, c_out in channels) if with_attn else nn.ModuleList()

    def forward(self, h: Tensor) -> Tensor:
        """Run the resnets, each followed by its attention block when the level has them."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _MidBlock(nn.Module):
    """Resnet, attention (or identity), resnet at the lowest resolution."""

    def __init__(self, channels: int, using_attn: bool, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1: nn.Module = AttnBlock(channels) if using_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        """Apply the block."""
        return self.block_2(self.attn_1(self.block_1(h)))


def _level_widths(in_ch: int, out_ch: int, n_blocks: int) -> list[tuple[int, int]]:
    """(in, out) channels of ``n_blocks`` resnets where only the first one changes the width."""
    return [(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks)]


class Encoder(nn.Module):
    """Image (B,3,H,W) -> latent (B,z,H/2^(L-1),W/2^(L-1)); L = len(ch_mult)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = IMAGE_CHANNELS,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        n_levels = len(ch_mult)
        self.conv_in = _conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            last = i == n_levels - 1
            level = _Level(
                _level_widths(width, ch * mult, num_res_blocks), with_attn=last and using_sa, dropout=dropout
            )
            width = ch * mult
            if not last:
                level.downsample = Downsample2x(width)
            self.down.append(level)
        self.mid = _MidBlock(width, using_mid_sa, dropout)
        self.norm_out = _group_norm(width)
        self.conv_out = _conv3x3(width, z_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Encode an image to the pre-quant_conv latent."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,z,h,w) -> image (B,3,h*2^(L-1),w*2^(L-1)), unclamped."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = IMAGE_CHANNELS,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        n_levels = len(ch_mult)
        width = ch * ch_mult[-1]
        self.conv_in = _conv3x3(z_channels, width)
        self.mid = _MidBlock(width, using_mid_sa, dropout)
        levels: list[_Level] = []
        # Built coarse-to-fine (the data flow), stored fine-to-coarse so up.{i} matches encoder level i.
        for i in reversed(range(n_levels)):
            out = ch * ch_mult[i]
            level = _Level(
                _level_widths(width, out, num_res_blocks + 1),
                with_attn=i == n_levels - 1 and using_sa,
                dropout=dropout,
            )
            width = out
            if i != 0:
                level.upsample = Upsample2x(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(width)
        self.conv_out = _conv3x3(width, in_channels)

    def forward(self, z: Tensor) -> Tensor:
        """Decode a post_quant_conv latent to an (unclamped) image."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# Phi: the residual refinement convs shared across scales
# ----------------------------------------------------------------------------------------------------------
def phi_ticks(k: int) -> np.ndarray:
    """Positions in [0, 1] owned by each of ``k`` Phi convs (the official rule, including its K=4 case)."""
    # VAR uses a narrower margin (1/(3K)) for exactly K=4 and 1/(2K) otherwise; both are kept for parity.
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(margin, 1 - margin, k)


def _nearest_tick(ticks: np.ndarray, at: float) -> int:
    """Index of the tick nearest to ``at`` (first one on exact ties, as np.argmin)."""
    return int(np.argmin(np.abs(ticks - at)))


class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) * h + r * conv3x3(h), with r = |quant_resi|."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        """Blend the input with its convolution."""
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    """A Phi conv, or identity when the ratio is zero (the official code skips the conv then)."""
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One Phi for every scale (``share_quant_resi == 1``); state-dict key ``qresi``."""

    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        """The Phi used at relative scale position ``at_from_0_to_1``."""
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K Phi convs spread over the scales by nearest tick (``share_quant_resi = K > 1``, VAR's default)."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        """The Phi used at relative scale position ``at_from_0_to_1``."""
        return self.qresi_ls[_nearest_tick(self.ticks, at_from_0_to_1)]

    def extra_repr(self) -> str:
        """Show the ticks in the module repr."""
        return f"ticks={self.ticks}"


class PhiNonShared(nn.ModuleList):
    """One Phi per tick (``share_quant_resi == 0``); state-dict keys ``quant_resi.{i}``."""

    def __init__(self, qresi: Sequence[nn.Module]) -> None:
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float | int | slice) -> nn.Module:  # type: ignore[override]
        """Float: the Phi at that relative position; int/slice: plain ModuleList indexing."""
        if isinstance(at_from_0_to_1, float):
            return super().__getitem__(_nearest_tick(self.ticks, at_from_0_to_1))
        return super().__getitem__(at_from_0_to_1)

    def extra_repr(self) -> str:
        """Show the ticks in the module repr."""
        return f"ticks={self.ticks}"


def _make_phi_bank(channels: int, quant_resi: float, share_quant_resi: int, n_non_shared: int) -> nn.Module:
    """Build the Phi container the official ``share_quant_resi`` value selects."""
    if share_quant_resi == 0:
        return PhiNonShared([_make_phi(channels, quant_resi) for _ in range(n_non_shared)])
    if share_quant_resi == 1:
        return PhiShared(_make_phi(channels, quant_resi))
    return PhiPartiallyShared(nn.ModuleList(_make_phi(channels, quant_resi) for _ in range(share_quant_resi)))


# ----------------------------------------------------------------------------------------------------------
# Multi-scale residual quantizer
# ----------------------------------------------------------------------------------------------------------
def _as_hw(pn: PatchNum) -> tuple[int, int]:
    """Patch number as (h, w)."""
    return (pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1]))


def _bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize (align_corners=False), the official token-map upsampler."""
    return F.interpolate(x, size=size, mode="bicubic")


def _area(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Area resize, the official residual downsampler."""
    return F.interpolate(x, size=size, mode="area")


class MultiScaleVectorQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: one codebook, K scales, residual quantisation with shared Phi convs."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        using_znorm: bool = False,
        beta: float = 0.25,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ) -> None:
        super().__init__()
        if not v_patch_nums or any(int(p) < 1 for p in v_patch_nums):
            raise ValueError(f"v_patch_nums must be a non-empty sequence of positive ints, got {v_patch_nums!r}")
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.using_znorm = using_znorm
        self.beta = beta
        self.v_patch_nums: tuple[int, ...] = tuple(int(p) for p in v_patch_nums)
        self.quant_resi_ratio = quant_resi
        self.quant_resi = _make_phi_bank(
            Cvae, quant_resi, share_quant_resi, default_qresi_counts or len(self.v_patch_nums)
        )
        # Codebook-usage statistics of VAE training; kept only so official checkpoints load strictly.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        """Show the schedule in the module repr."""
        return f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}, quant_resi={self.quant_resi_ratio}"

    # ---- helpers -------------------------------------------------------------------------------------
    def phi(self, si: int, num_scales: int) -> nn.Module:
        """The Phi conv applied at scale ``si`` of ``num_scales`` (position si / (SN - 1))."""
        # A one-scale schedule would divide by zero in the official code; position 0 is the natural choice.
        return self.quant_resi[si / (num_scales - 1) if num_scales > 1 else 0.0]

    def nearest_code(self, z_NC: Tensor) -> Tensor:
        """Index of the nearest codebook entry for each row of (N, C) features: one matmul per call."""
        codebook = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        # |z|^2 + |e|^2 - 2 z.e through addmm, in the same order as the official code so ties/rounding agree.
        dist = z_NC.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        dist.addmm_(z_NC, codebook.T, beta=1, alpha=-2)
        return torch.argmin(dist, dim=1)

    def idx_to_h(self, idx_Bl: Tensor, hw: tuple[int, int]) -> Tensor:
        """Token indices (B, h*w) -> code embeddings (B, Cvae, h, w)."""
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, *hw)

    def check_idx_Bl(self, ms_idx_Bl: Sequence[Tensor], allow_missing_last: bool = False) -> None:
        """Raise ValueError unless the index list fits the patch schedule (length, shapes, dtype, range)."""
        sn = len(self.v_patch_nums)
        valid_lengths = (sn - 1, sn) if allow_missing_last else (sn,)
        if len(ms_idx_Bl) not in valid_lengths or len(ms_idx_Bl) == 0:
            raise ValueError(
                f"expected {' or '.join(map(str, valid_lengths))} index tensors for patch schedule "
                f"{self.v_patch_nums}, got {len(ms_idx_Bl)}"
            )
        batch = ms_idx_Bl[0].shape[0] if ms_idx_Bl[0].dim() else -1
        for si, (idx, pn) in enumerate(zip(ms_idx_Bl, self.v_patch_nums)):
            if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
                raise ValueError(f"index tensor {si} must be an integer tensor, got {idx.dtype}")
            if tuple(idx.shape) != (batch, pn * pn):
                raise ValueError(
                    f"index tensor {si} has shape {tuple(idx.shape)}, "
                    f"expected ({batch}, {pn * pn}) for patch number {pn}"
                )
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
                raise ValueError(f"index tensor {si} has values outside [0, {self.vocab_size})")

    # ---- encode ---------------------------------------------------------------------------------------
    def f_to_idxBl_or_fhat(
        self, f_BChw: Tensor, to_fhat: bool, v_patch_nums: Sequence[PatchNum] | None = None
    ) -> list[Tensor]:
        """Residual multi-scale quantisation of f: per-scale indices (B, h*w) or running f_hat (B,C,H,W)."""
        if f_BChw.dim() != 4 or f_BChw.shape[1] != self.Cvae:
            raise ValueError(f"expected features (B, {self.Cvae}, H, W), got {tuple(f_BChw.shape)}")
        B, C, H, W = f_BChw.shape
        patch_hws = [_as_hw(pn) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(
                f"the last patch number {patch_hws[-1]} must equal the latent size ({H}, {W}); "
                "resize the image or pass a v_patch_nums that ends at the latent size"
            )
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        sn = len(patch_hws)
        outputs: list[Tensor] = []
        for si, hw in enumerate(patch_hws):
            last = si == sn - 1
            z = f_rest if last else _area(f_rest, hw)
            idx_N = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.idx_to_h(idx_N.view(B, -1), hw)
            if not last:
                h = _bicubic(h, (H, W))
            h = self.phi(si, sn)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            outputs.append(f_hat.clone() if to_fhat else idx_N.view(B, hw[0] * hw[1]))
        return outputs

    # ---- decode / teacher forcing / inference -----------------------------------------------------------
    def embed_to_fhat(
        self, ms_h_BChw: Sequence[Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> Tensor | list[Tensor]:
        """Sum Phi(upsampled code maps) over scales; the final f_hat or the list of running f_hats."""
        if len(ms_h_BChw) != len(self.v_patch_nums):
            raise ValueError(f"expected {len(self.v_patch_nums)} code maps, got {len(ms_h_BChw)}")
        B = ms_h_BChw[0].shape[0]
        sn = len(self.v_patch_nums)
        running: list[Tensor] = []
        if all_to_max_scale:
            hw = _as_hw(self.v_patch_nums[-1])
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, *hw, dtype=torch.float32)
            for si, h in enumerate(ms_h_BChw):
                if si < sn - 1:
                    h = _bicubic(h, hw)
                f_hat.add_(self.phi(si, sn)(h))
                if not last_one:
                    running.append(f_hat.clone())
        else:
            # Official experimental variant: grow f_hat scale by scale instead of working at full size.
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = _bicubic(f_hat, (pn, pn))
                f_hat.add_(self.phi(si, sn)(ms_h_BChw[si]))
                running.append(f_hat)
        return f_hat if last_one else running

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[Tensor]) -> Tensor:
        """Teacher-forcing input (B, L - pn_0^2, Cvae): running f_hat area-downsampled to each next scale."""
        self.check_idx_Bl(gt_ms_idx_Bl, allow_missing_last=True)
        B = gt_ms_idx_Bl[0].shape[0]
        sn = len(self.v_patch_nums)
        hw = _as_hw(self.v_patch_nums[-1])
        f_hat = torch.zeros(B, self.Cvae, *hw, device=self.embedding.weight.device, dtype=torch.float32)
        next_scales: list[Tensor] = []
        for si in range(sn - 1):
            pn, pn_next = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            h = _bicubic(self.idx_to_h(gt_ms_idx_Bl[si], (pn, pn)), hw)
            f_hat.add_(self.phi(si, sn)(h))
            next_scales.append(_area(f_hat, (pn_next, pn_next)).flatten(2).transpose(1, 2))
        if not next_scales:  # one-scale schedule: nothing to teacher-force (official returns None)
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """Add scale ``si``'s code map to ``f_hat`` in place; return (f_hat, next scale's input map)."""
        if not 0 <= si < SN:
            raise ValueError(f"scale index {si} out of range for {SN} scales")
        hw = _as_hw(self.v_patch_nums[-1])
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(_bicubic(h_BChw, hw)))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, _area(f_hat, (pn_next, pn_next))
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat


VectorQuantizer2 = MultiScaleVectorQuantizer  # the official class name


# ----------------------------------------------------------------------------------------------------------
# VQVAE
# ----------------------------------------------------------------------------------------------------------
class VQVAE(nn.Module):
    """VAR's VQVAE: encoder, quant_conv, multi-scale quantizer, post_quant_conv, decoder."""

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 128,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
        test_mode: bool = True,
        *,
        ch_mult: Sequence[int] = DEFAULT_CH_MULT,
        num_res_blocks: int = 2,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        self.test_mode = test_mode
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.ch_mult: tuple[int, ...] = tuple(ch_mult)
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        arch = dict(
            ch=ch,
            ch_mult=self.ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            dropout=dropout,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
        )
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleVectorQuantizer(
            vocab_size=vocab_size,
            Cvae=z_channels,
            using_znorm=using_znorm,
            beta=beta,
            default_qresi_counts=default_qresi_counts,
            v_patch_nums=v_patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    # ---- tokenizer protocol ---------------------------------------------------------------------------
    @property
    def code_dim(self) -> int:
        """Channels of the latent / codebook entries (Cvae)."""
        return self.Cvae

    @property
    def patch_nums(self) -> tuple[int, ...]:
        """The multi-scale patch-number schedule."""
        return self.quantize.v_patch_nums

    def check_image(self, img: Tensor) -> None:
        """Raise ValueError unless ``img`` is (B, 3, H, W) with H and W divisible by the downsample factor."""
        if img.dim() != 4:
            raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(img.shape)}")
        if img.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"expected {IMAGE_CHANNELS} image channels, got {img.shape[1]} (shape {tuple(img.shape)})")
        h, w = img.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE downsample factor {self.downsample}")

    def encode_for_raw_features(self, img: Tensor) -> Tensor:
        """Continuous features to be quantised: quant_conv(encoder(img)), (B, Cvae, H/16, W/16)."""
        self.check_image(img)
        return self.quant_conv(self.encoder(img))

    def decode(self, z: Tensor) -> Tensor:
        """Latent f_hat (B, Cvae, h, w) -> image in [-1, 1]."""
        return self.fhat_to_img(z)

    # ---- official API -----------------------------------------------------------------------------------
    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """decoder(post_quant_conv(f_hat)) clamped to [-1, 1]."""
        if f_hat.dim() != 4 or f_hat.shape[1] != self.Cvae:
            raise ValueError(f"expected a latent (B, {self.Cvae}, h, w), got {tuple(f_hat.shape)}")
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: Tensor, v_patch_nums: Sequence[PatchNum] | None = None) -> list[Tensor]:
        """Image -> per-scale token indices, a list of (B, pn^2) int64."""
        f = self.encode_for_raw_features(inp_img_no_grad)
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_h(self, ms_idx_Bl: Sequence[Tensor]) -> list[Tensor]:
        """Per-scale indices -> per-scale code maps (B, Cvae, pn, pn)."""
        self.quantize.check_idx_Bl(ms_idx_Bl)
        return [self.quantize.idx_to_h(idx, (pn, pn)) for idx, pn in zip(ms_idx_Bl, self.patch_nums)]

    def idxBl_to_img(
        self, ms_idx_Bl: Sequence[Tensor], same_shape: bool, last_one: bool = False
    ) -> Tensor | list[Tensor]:
        """Per-scale indices -> image(s) in [-1, 1] (the final one, or one per scale)."""
        return self.embed_to_img(self.idxBl_to_h(ms_idx_Bl), all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(
        self, ms_h_BChw: Sequence[Tensor], all_to_max_scale: bool, last_one: bool = False
    ) -> Tensor | list[Tensor]:
        """Per-scale code maps -> image(s) in [-1, 1]."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(
        self, x: Tensor, v_patch_nums: Sequence[PatchNum] | None = None, last_one: bool = False
    ) -> Tensor | list[Tensor]:
        """Encode, quantise and decode: the final reconstruction or one per scale."""
        f = self.encode_for_raw_features(x)
        f_hats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[Tensor]) -> Tensor:
        """Teacher-forcing input of VAR, (B, L - 1, Cvae) for the default schedule (see the quantizer)."""
        return self.quantize.idxBl_to_var_input(gt_ms_idx_Bl)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One VAR inference step on f_hat (see the quantizer)."""
        return self.quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """nn.Module.load_state_dict, keeping our usage buffer when the checkpoint has another scale count."""
        ema = state_dict.get(_EMA_KEY)
        if isinstance(ema, Tensor) and ema.dim() == 2 and ema.shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            # The buffer's first dim is the training schedule's length; it is unused at inference, and the
            # official loader swaps in the model's own buffer too. Copy so the caller's dict is untouched.
            logger.debug(
                "keeping %s of shape %s (checkpoint: %s)",
                _EMA_KEY,
                self.quantize.ema_vocab_hit_SV.shape,
                ema.shape,
            )
            state_dict = {**state_dict, _EMA_KEY: self.quantize.ema_vocab_hit_SV}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def _unwrap(obj: Any, origin: str) -> dict[str, Tensor]:
    """Accept a plain state dict or one nested under "vae" / "state_dict"; up-cast float tensors to fp32."""
    for key in ("vae", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{origin} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{origin} is not a state dict: {len(bad)} entries are not tensors, e.g. {bad[:3]}")
    # Checkpoints may be stored in fp16/bf16; the model computes in fp32.
    return {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Read a VQVAE state dict from a .pth/.pt/.safetensors path or a (possibly nested) mapping."""
    origin = "the given mapping" if isinstance(source, Mapping) else str(source)
    return _unwrap(read_checkpoint(source, "VQVAE checkpoint"), origin)


def _indices_under(sd: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``{prefix}{i}.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    """The tensor under ``key``, or a ValueError saying the architecture cannot be detected."""
    if key not in sd:
        raise ValueError(f"cannot detect the VQVAE architecture: key {key!r} is missing from the state dict")
    return sd[key]


def infer_vqvae_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """VQVAE constructor kwargs implied by the key names and shapes of a state dict."""
    vocab_size, z_channels = _require(sd, "quantize.embedding.weight").shape
    ch = _require(sd, "encoder.conv_in.weight").shape[0]
    levels = _indices_under(sd, "encoder.down.")
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"cannot detect the VQVAE architecture: encoder.down levels are {levels}")
    ch_mult = []
    for i in levels:
        width = _require(sd, f"encoder.down.{i}.block.0.conv1.weight").shape[0]
        if width % ch:
            raise ValueError(f"cannot detect the VQVAE architecture: level {i} width {width} is not a multiple of {ch}")
        ch_mult.append(width // ch)
    kwargs: dict[str, Any] = dict(
        vocab_size=int(vocab_size),
        z_channels=int(z_channels),
        ch=int(ch),
        ch_mult=tuple(ch_mult),
        num_res_blocks=len(_indices_under(sd, "encoder.down.0.block.")),
        using_sa=any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in sd),
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
    )
    if "quant_conv.weight" in sd:
        kwargs["quant_conv_ks"] = int(sd["quant_conv.weight"].shape[-1])
    partially = _indices_under(sd, "quantize.quant_resi.qresi_ls.")
    non_shared = _indices_under(sd, "quantize.quant_resi.")
    if partially:
        kwargs["share_quant_resi"] = len(partially)
    elif "quantize.quant_resi.qresi.weight" in sd:
        kwargs["share_quant_resi"] = 1
    elif non_shared:
        kwargs.update(share_quant_resi=0, default_qresi_counts=len(non_shared))
    else:
        kwargs["quant_resi"] = 0.0  # no Phi convs stored: the checkpoint was trained with identity Phi
    return kwargs


def _with_model_ema(model: VQVAE, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` with the model's own usage buffer where the checkpoint's differs only in its scale count.

    ``ema_vocab_hit_SV`` is (num training scales, vocab); it is unused at inference, so a checkpoint
    trained with another schedule fits (as in :meth:`VQVAE.load_state_dict`). Other shapes stay as
    they are, so a real mismatch is still reported.
    """
    ema, own = sd.get(_EMA_KEY), model.quantize.ema_vocab_hit_SV
    if ema is None or ema.shape == own.shape or ema.shape[1:] != own.shape[1:]:
        return sd
    return {**sd, _EMA_KEY: own.detach().clone()}


_CTOR_PARAMS = frozenset(inspect.signature(VQVAE.__init__).parameters) - {"self"}


def load_vq_vae(source: str | Path | Mapping[str, Any], **overrides: Any) -> VQVAE:
    """Build a frozen eval-mode VQVAE whose architecture is read from the weights, and load them strictly."""
    origin = str(source) if isinstance(source, (str, Path)) else "the given state dict"
    unknown = sorted(set(overrides) - _CTOR_PARAMS)
    if unknown:
        raise ValueError(f"unknown VQVAE option(s) {unknown}; allowed: {sorted(_CTOR_PARAMS)}")
    sd = read_state_dict(source)
    kwargs = {"v_patch_nums": DEFAULT_PATCH_NUMS, **infer_vqvae_kwargs(sd), **overrides, "test_mode": True}
    logger.info("building VQVAE from %s with %s", origin, kwargs)
    model = VQVAE(**kwargs)
    what = "the given VQVAE state dict" if isinstance(source, Mapping) else f"VQVAE checkpoint {origin}"
    load_strict(model, _with_model_ema(model, sd), what, target=f"VQVAE({kwargs})")
    return model.eval().requires_grad_(False)
