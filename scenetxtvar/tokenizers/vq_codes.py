"""The VQ code space: the transformer predicts one of V codebook indices per token (VAR)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import ScaleTargets, sample_from_logits
from ..scales import normalize_schedule
from .vq import VQVAE


def _check_schedule(vae: VQVAE, schedule: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    grids = [(h, w) for _, h, w in normalize_schedule(schedule)]
    expected = [(p, p) for p in vae.patch_nums]
    if grids != expected:
        raise ValueError(f"the VQ-VAE quantises on patch numbers {vae.patch_nums}; the schedule has grids {grids}")
    return grids


class IndexSampler:
    """Sampling state for indices: VAR's running f_hat and the sampled indices of every scale."""

    def __init__(self, vae: VQVAE, grids: list[tuple[int, int]], batch: int, device: torch.device | str) -> None:
        self.vae, self.grids = vae, grids
        self.summed = torch.zeros(batch, vae.code_dim, *grids[-1], device=device)
        self.labels: list[Tensor] = []

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
        """Sample scale k's indices from (B, h*w, V) logits (or take ``forced`` (B, h*w))."""
        idx = (
            forced.to(self.summed.device).long()
            if forced is not None
            else sample_from_logits(logits, top_k, top_p, generator)
        )
        self.labels.append(idx)
        q = self.vae.quantize
        h_map = q.idx_to_h(idx, self.grids[k])
        self.summed, nxt = q.get_next_autoregressive_input(k, len(self.grids), self.summed, h_map)
        if k + 1 == len(self.grids):
            return None
        return nxt.flatten(2).transpose(1, 2)


class IndexCodes:
    """VAR's code space over a frozen :class:`VQVAE`: token width Cvae, head V, plain CE."""

    def __init__(self, vae: VQVAE) -> None:
        self.vae = vae
        self.token_dim = vae.code_dim
        self.head_dim = vae.quantize.vocab_size

    def targets(
        self,
        features: Tensor,
        schedule: Sequence[Sequence[int]],
        *,
        noise_strength: float = 0.0,
        noise_layers: int = 0,
        generator: torch.Generator | None = None,
    ) -> ScaleTargets:
        """Per-scale indices and VAR's teacher-forcing input from ``quant_conv(encoder(img))``."""
        if noise_strength > 0 and noise_layers > 0:
            raise ValueError("bitwise self-correction applies to BSQ bits only; set noise_strength=0 for vae=vq")
        _check_schedule(self.vae, schedule)
        idx = self.vae.quantize.f_to_idxBl_or_fhat(features.float(), to_fhat=False)
        return ScaleTargets(self.vae.quantize.idxBl_to_var_input(idx), torch.cat(idx, dim=1), list(idx))

    def loss_per_token(self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy over the V indices, per token."""
        return F.cross_entropy(
            logits.float().transpose(1, 2), labels.long(), reduction="none", label_smoothing=label_smoothing
        )

    def accuracy_per_token(self, logits: Tensor, labels: Tensor) -> Tensor:
        """1 where the most likely index is right."""
        return (logits.argmax(dim=-1) == labels).float()

    def sampler(self, schedule: Sequence[Sequence[int]], batch: int, device: torch.device | str) -> IndexSampler:
        """Fresh sampling state (the schedule must be the VAE's patch numbers)."""
        return IndexSampler(self.vae, _check_schedule(self.vae, schedule), batch, device)
