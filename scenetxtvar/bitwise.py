"""Bitwise codes: BSQ quantisation, per-scale targets with bitwise self-correction, and the
next-scale input chain shared by training (teacher forcing) and the sampler.

Layout conventions (official Infinity):
- a tokenizer latent is ``(B, dq, H, W)``; per-scale codes are +-1/sqrt(dq), bit 1 = positive;
- the transformer sees ``d = dq`` bits per token, or ``d = 4 dq`` with spatial patchify
  (2x2 pixel-unshuffle of a latent grid twice the token grid, channel index c*4 + 2i + j);
- token grids are flattened row-major; per-scale bits are ``(B, 1, h, w, dq)`` on the latent grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .codes import ScaleTargets, sample_from_logits
from .scales import normalize_schedule


def bsq_quantize(x: Tensor, straight_through: bool = True) -> tuple[Tensor, Tensor]:
    """Binary spherical quantisation over dim 1: (codes +-1/sqrt(d), bits in {0,1} int32).

    Each position is L2-normalised, then ``sign / sqrt(d)`` with sign(0) = -1. With
    ``straight_through`` the codes carry the gradient of the normalised input.
    """
    d = x.shape[1]
    z = F.normalize(x.float(), dim=1)
    q = torch.where(z > 0, 1.0, -1.0).to(z.dtype) / math.sqrt(d)
    codes = z + (q - z).detach() if straight_through else q
    return codes, (q > 0).to(torch.int32)


def bits_to_codes(bits: Tensor, dim: int = 1) -> Tensor:
    """Bits in {0,1} with channels along ``dim`` -> codes +-1/sqrt(d) (same layout)."""
    s = 1.0 / math.sqrt(bits.shape[dim])
    return bits.float() * (2 * s) - s


def area_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Area downsampling of a (B, C, H, W) map (done in 3-D with t=1, as the official code)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode="area").squeeze(2)


def trilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Trilinear (t=1, i.e. bilinear, align_corners=False) resize of a (B, C, H, W) map."""
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode="trilinear").squeeze(2)


def grid_to_tokens(x: Tensor, patchify: bool = False) -> Tensor:
    """(B, C, H, W) latent map -> (B, h*w, d) tokens (2x2 pixel-unshuffle first when patchifying)."""
    if patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: Tensor, hw: tuple[int, int], patchify: bool = False) -> Tensor:
    """Inverse of :func:`grid_to_tokens`: (B, h*w, d) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    if n != hw[0] * hw[1]:
        raise ValueError(f"expected {hw[0] * hw[1]} tokens for grid {hw}, got {n}")
    x = tokens.transpose(1, 2).reshape(b, d, *hw)
    return F.pixel_shuffle(x, 2) if patchify else x


@dataclass
class BitwiseTargets:
    """Teacher-forcing inputs and labels for one batch."""

    x_BLC_wo_prefix: Tensor  # (B, L - 1, d) inputs of scales 1..K-1
    gt_bits: Tensor  # (B, L, d) int64 labels of every scale (un-flipped)
    scale_bits: list[Tensor]  # per scale (B, 1, h, w, dq) int32, latent grid


class CodeAccumulator:
    """The running sum of upsampled codes and the next-scale inputs derived from it.

    One mechanism for both paths: training feeds ground-truth (or self-corrected) bits, the
    sampler feeds its samples; either way scale k+1 sees
    ``trilinear(sum_{i<=k} trilinear_up(codes_i), grid_{k+1})``.
    """

    def __init__(
        self,
        schedule: Sequence[Sequence[int]],
        batch: int,
        code_dim: int,
        *,
        patchify: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.grids = latent_grids(schedule, patchify)
        self.patchify = patchify
        self.summed = torch.zeros(batch, code_dim, *self.grids[-1], device=device)

    def add(self, k: int, codes: Tensor) -> Tensor | None:
        """Add scale k's codes (B, dq, h, w); return scale k+1's input tokens (or None at the end)."""
        self.summed = self.summed + trilinear_resize(codes, self.grids[-1])
        if k + 1 >= len(self.grids):
            return None
        return grid_to_tokens(trilinear_resize(self.summed, self.grids[k + 1]), self.patchify)


def latent_grids(schedule: Sequence[Sequence[int]], patchify: bool = False) -> list[tuple[int, int]]:
    """Per-scale grids on the tokenizer latent (twice the token grid with spatial patchify)."""
    f = 2 if patchify else 1
    return [(h * f, w * f) for _, h, w in normalize_schedule(schedule)]


def build_targets(
    features: Tensor,
    schedule: Sequence[Sequence[int]],
    *,
    patchify: bool = False,
    noise_strength: float = 0.0,
    noise_layers: int = 0,
    requant: bool = True,
    generator: torch.Generator | None = None,
) -> BitwiseTargets:
    """Per-scale BSQ targets and teacher-forcing inputs with bitwise self-correction.

    ``features`` are raw tokenizer features (B, dq, H, W) whose grid must equal the
    schedule's last latent grid. For scales ``k < noise_layers`` a flip probability
    ``p ~ U{0, 0.01, ..., noise_strength}`` is drawn and the bits are flipped with it; the
    corrupted codes feed the running sum (``requant``) so later scales learn to correct them,
    while the labels stay the clean bits.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, dq, H, W), got shape {tuple(features.shape)}")
    grids = latent_grids(schedule, patchify)
    if tuple(features.shape[-2:]) != grids[-1]:
        raise ValueError(
            f"the schedule's last scale {grids[-1]} (latent grid) does not match the features' "
            f"grid {tuple(features.shape[-2:])}"
        )
    features = features.float()
    b, dq = features.shape[:2]
    acc = CodeAccumulator(schedule, b, dq, patchify=patchify, device=features.device)
    inputs, labels, scale_bits = [], [], []
    for k, hw in enumerate(grids):
        residual = area_resize(features - acc.summed, hw)
        codes, bits = bsq_quantize(residual, straight_through=False)
        scale_bits.append(bits.permute(0, 2, 3, 1).unsqueeze(1))
        labels.append(grid_to_tokens(bits, patchify))
        if k < noise_layers and noise_strength > 0:
            p = torch.randint(0, int(round(100 * noise_strength)) + 1, (), generator=generator).item() * 0.01
            flip = torch.rand(bits.shape, generator=generator).to(bits.device) < p
            if requant:
                codes = bits_to_codes(bits ^ flip.to(bits.dtype))
        nxt = acc.add(k, codes)
        if nxt is not None:
            inputs.append(nxt)
    return BitwiseTargets(torch.cat(inputs, dim=1), torch.cat(labels, dim=1).long(), scale_bits)


def bitwise_loss_per_token(logits: Tensor, gt_bits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Two-class cross-entropy per bit, averaged over bits: (B, L, 2d), (B, L, d) -> (B, L)."""
    b, n, v = logits.shape
    if gt_bits.shape != (b, n, v // 2):
        raise ValueError(
            f"gt_bits must be {(b, n, v // 2)} for logits {tuple(logits.shape)}, got {tuple(gt_bits.shape)}"
        )
    ce = F.cross_entropy(
        logits.float().reshape(b, n, v // 2, 2).permute(0, 3, 1, 2),
        gt_bits.long(),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return ce.mean(dim=-1)


def scale_loss_weights(schedule: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Tensor:
    """Per-token weights (L,): w_k proportional to sqrt(area_K / area_k), normalised to sum 1."""
    sched = normalize_schedule(schedule)
    t_k, h_k, w_k = sched[-1]
    last = math.sqrt(t_k * h_k * w_k)
    w = torch.cat([torch.full((t * h * w,), last / math.sqrt(t * h * w)) for t, h, w in sched])
    return (w / w.sum()).to(device)


def bitwise_accuracy_per_token(logits: Tensor, gt_bits: Tensor) -> Tensor:
    """Fraction of each token's bits predicted right: (B, L, 2d), (B, L, d) -> (B, L)."""
    b, n, v = logits.shape
    pred = logits.reshape(b, n, v // 2, 2).argmax(dim=-1)
    return (pred == gt_bits).float().mean(dim=-1)


class BitwiseSampler:
    """Sampling state for bits: the running code sum and the sampled bits of every scale."""

    def __init__(
        self, schedule: Sequence[Sequence[int]], batch: int, code_dim: int, patchify: bool, device: torch.device | str
    ) -> None:
        self.token_grids = [(h, w) for _, h, w in normalize_schedule(schedule)]
        self.patchify = patchify
        self.acc = CodeAccumulator(schedule, batch, code_dim, patchify=patchify, device=device)
        self.labels: list[Tensor] = []

    @property
    def summed(self) -> Tensor:
        """(B, dq, H, W): what the tokenizer's decoder takes."""
        return self.acc.summed

    def step(
        self,
        k: int,
        logits: Tensor,
        *,
        top_k: int = 0,
        top_p: float = 0.0,
        generator: torch.Generator | None = None,
        forced: Tensor | None = None,
    ) -> Tensor | None:
        """Sample scale k's bits from (B, h*w, 2d) logits (or take ``forced`` (B,1,h,w,dq) bits)."""
        if forced is not None:
            grid = forced.to(self.acc.summed.device).long().squeeze(1).permute(0, 3, 1, 2)
        else:
            b, n, v = logits.shape
            bits = sample_from_logits(logits.reshape(b, n, v // 2, 2), top_k, top_p, generator)
            grid = tokens_to_grid(bits, self.token_grids[k], self.patchify)
        self.labels.append(grid.permute(0, 2, 3, 1).unsqueeze(1))
        return self.acc.add(k, bits_to_codes(grid))


class BitwiseCodes:
    """The BSQ code space: ``d`` bits per token (x4 with patchify), a 2-way head per bit."""

    def __init__(self, code_dim: int, patchify: bool = False) -> None:
        self.code_dim, self.patchify = code_dim, patchify
        self.token_dim = code_dim * (4 if patchify else 1)
        self.head_dim = 2 * self.token_dim

    def targets(
        self,
        features: Tensor,
        schedule: Sequence[Sequence[int]],
        *,
        noise_strength: float = 0.0,
        noise_layers: int = 0,
        generator: torch.Generator | None = None,
    ) -> ScaleTargets:
        """Bit labels and teacher-forcing inputs with bitwise self-correction (see :func:`build_targets`)."""
        t = build_targets(
            features,
            schedule,
            patchify=self.patchify,
            noise_strength=noise_strength,
            noise_layers=noise_layers,
            generator=generator,
        )
        return ScaleTargets(t.x_BLC_wo_prefix, t.gt_bits, t.scale_bits)

    def loss_per_token(self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean bitwise cross-entropy per token."""
        return bitwise_loss_per_token(logits, labels, label_smoothing)

    def accuracy_per_token(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Bit accuracy per token."""
        return bitwise_accuracy_per_token(logits, labels)

    def sampler(self, schedule: Sequence[Sequence[int]], batch: int, device: torch.device | str) -> BitwiseSampler:
        """Fresh sampling state."""
        return BitwiseSampler(schedule, batch, self.code_dim, self.patchify, device)
