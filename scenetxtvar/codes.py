"""The seam between tokenizers and the transformer.

A :class:`Tokenizer` turns images into raw latent features and latents back into images. A
:class:`CodeSpace` says how the transformer sees a tokenizer's multi-scale codes: what it
is taught (per-scale labels and teacher-forcing inputs), how it is scored, and how sampled
labels become the next scale's input. Two code spaces exist: bits of a BSQ-VAE
(:class:`scenetxtvar.bitwise.BitwiseCodes`, head 2d) and indices of VAR's VQ-VAE
(:class:`scenetxtvar.tokenizers.vq_codes.IndexCodes`, head V). It lives outside
``tokenizers`` so that ``bitwise`` and the tokenizers can both depend on it without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Tokenizer(Protocol):
    """A frozen image tokenizer (VAE) as the transformer's trainer and sampler use it."""

    code_dim: int  # channels of the latent grid
    downsample: int  # pixels per latent position

    def encode_for_raw_features(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latent features (B, code_dim, H / s, W / s)."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, code_dim, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        ...


@dataclass
class ScaleTargets:
    """What the transformer is trained on for one batch."""

    x_BLC_wo_prefix: Tensor  # (B, L - 1, d): inputs of scales 1..K-1
    labels: Tensor  # (B, L, d) bits, or (B, L) indices
    # The clean labels per scale in the sampler's layout (its ``forced``; the sampler's ``gt_ls_Bl``).
    per_scale: list[Tensor] | None = None


class ScaleSampler(Protocol):
    """The per-run state of sampling: labels so far and the running latent."""

    summed: Tensor  # the latent the decoder takes
    labels: list[Tensor]  # per scale, in the tokenizer's layout

    def step(
        self,
        k: int,
        logits: Tensor,
        *,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
        forced: Tensor | None = None,
    ) -> Tensor | None:
        """Sample scale k from guided logits (or take ``forced`` labels); return scale k+1's inputs."""
        ...


class CodeSpace(Protocol):
    """How the transformer reads and writes one tokenizer's codes."""

    token_dim: int  # transformer input width d
    head_dim: int  # transformer output width V

    def targets(
        self,
        features: Tensor,
        schedule: Sequence[Sequence[int]],
        *,
        noise_strength: float = 0.0,
        noise_layers: int = 0,
        generator: torch.Generator | None = None,
    ) -> ScaleTargets:
        """Labels and teacher-forcing inputs from raw features."""
        ...

    def loss_per_token(self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy per token (B, L)."""
        ...

    def accuracy_per_token(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Fraction of each token's labels predicted right (B, L)."""
        ...

    def sampler(self, schedule: Sequence[Sequence[int]], batch: int, device: torch.device) -> ScaleSampler:
        """Fresh sampling state for one run."""
        ...


def sample_from_logits(
    logits: Tensor, top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Sample the last axis of ``logits`` (..., V) with VAR's top-k / top-p filter -> (...) int64.

    Top-k keeps values not below the k-th largest; top-p removes the least likely values whose
    cumulative probability stays within ``1 - top_p`` (the most likely one always survives).
    """
    shape, v = logits.shape[:-1], logits.shape[-1]
    lg = logits.float().reshape(-1, v)
    if 0 < top_k < v:
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_lg, order = lg.sort(dim=-1, descending=False)
        remove_sorted = sorted_lg.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[:, -1] = False
        lg = lg.masked_fill(torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted), float("-inf"))
    # Inverse-CDF sampling: one uniform per row; much faster than torch.multinomial for many small rows
    # (a 256x256 image has ~16k two-way bit choices per scale).
    cdf = lg.softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return (cdf < u).sum(dim=-1).clamp_max(v - 1).view(shape)
