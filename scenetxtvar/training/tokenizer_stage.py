"""``TokenizerModule`` (``stage=tokenizer``): train the BSQ-VAE itself on the synthetic shards.

The model is the same :class:`~scenetxtvar.tokenizers.BSQVAE` class that loads official weights, built
from ``vae.build`` (small width, patch 8 or 16). One step:

- encode -> raw features (B, dq, h, w);
- quantise with the *multi-scale* residual BSQ of the transformer's schedule (``schedule.scales`` or the
  batch's template schedule; a single scale, the latent grid, when neither is known), with a
  straight-through gradient. Chosen over single-scale BSQ so that the decoder learns to decode exactly the
  summed codes the next-scale transformer will later produce;
- decode the summed codes (unclamped, so the gradient survives) and score
  ``l1 + glyph_weight * l1 on glyph pixels + commit_weight * commitment`` (+ ``edge_weight`` * L1 of the
  image gradients, :func:`edge_l1`), where the glyph mask is
  ``controls > 0`` over the glyph condition's channels (text strokes would otherwise be a few percent of
  the pixels and wash out) and the commitment is the mean squared distance between the normalised
  per-scale features and their codes (BSQ's commitment term);
- optionally (``tokenizer_stage.adversarial.weight > 0``) a hinge-GAN term from a small PatchGAN critic, with
  VQGAN's adaptive weight; critic and tokenizer step together under one optimizer (see :func:`hinge_terms`).

AdamW with linear warm-up + cosine decay (``tokenizer_stage.optim``). The export is
``tokenizer.safetensors`` + ``tokenizer_config.json``; :func:`~scenetxtvar.tokenizers.load_bsq_vae` reads the
safetensors file (its architecture is detected from the keys; the json is for people).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..bitwise import area_resize, bsq_quantize, trilinear_resize
from ..checkpoint import atomic_write, save_state_dict
from ..scales import normalize_schedule
from ..tokenizers import BSQVAE, BSQVAEConfig
from ..tokenizers.bsq import config_metadata
from .module import adamw_with_schedule, glyph_mask

TOKENIZER_WEIGHTS = "tokenizer.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
# vae.build entries that are not BSQVAEConfig fields.
_NOT_ARCH = ("kind", "path", "seed", "model_overrides")


def multiscale_bsq(features: Tensor, grids: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Residual multi-scale BSQ with straight-through -> (summed codes (B, dq, H, W), commitment loss).

    The same math as :class:`~scenetxtvar.tokenizers.bsq.MultiScaleBSQ` (area-down the residual, quantise,
    trilinear-up, subtract detached), plus the per-scale commitment ``mean((normalise(x) - codes)^2)``.
    """
    full = tuple(features.shape[-2:])
    residual, summed = features, torch.zeros_like(features)
    commit = features.new_zeros(())
    for hw in grids:
        x = area_resize(residual, hw)
        codes, _ = bsq_quantize(x, straight_through=True)
        commit = commit + F.mse_loss(F.normalize(x.float(), dim=1), codes.detach())
        if tuple(hw) != full:
            codes = trilinear_resize(codes, full)
        residual = residual - codes.detach()
        summed = summed + codes
    return summed, commit / len(grids)


def edge_l1(recon: Tensor, target: Tensor) -> Tensor:
    """(B, 1, H, W) L1 distance of the horizontal and vertical finite differences, averaged over channels.

    Plain L1 is content with a blurred stroke edge; this term is not, so it sharpens the glyph outlines OCR
    reads (the last row and column, which have no neighbour, count zero).
    """
    err = recon.new_zeros(recon.shape[0], 1, *recon.shape[-2:])
    for dim in (-1, -2):
        diff = (torch.diff(recon, dim=dim) - torch.diff(target, dim=dim)).abs().mean(dim=1, keepdim=True)
        err = err + F.pad(diff, (0, 1, 0, 0) if dim == -1 else (0, 0, 0, 1))
    return err


class PatchDiscriminator(torch.nn.Module):
    """A small PatchGAN critic for the tokenizer's adversarial term: stride-2 4x4 convs with LeakyReLU, then
    a 3x3 conv to one logit per patch (no normalisation, like the tokenizer)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        cin = 3
        for c in channels:
            layers += [torch.nn.Conv2d(cin, int(c), 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
            cin = int(c)
        layers.append(torch.nn.Conv2d(cin, 1, 3, padding=1))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, H/2^n, W/2^n) logits."""
        return self.net(images)


def hinge_terms(disc: torch.nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(critic loss, generator loss) of the hinge GAN, ready to be summed into one backward.

    The critic's loss sees the reconstruction detached (its gradient reaches only the critic); the generator's
    sees the critic through detached parameters (its gradient reaches only the tokenizer). So one optimizer
    step updates both players, and the stage keeps Lightning's automatic optimization.
    """
    critic = F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake.detach())).mean()
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    generator = -torch.func.functional_call(disc, frozen, (fake,)).mean()
    return critic, generator


class TokenizerModule(L.LightningModule):
    """Trains a BSQ-VAE: reconstruction L1, a glyph-weighted L1 and the BSQ commitment term."""

    def __init__(
        self,
        vae: Mapping[str, Any],
        conditions: Sequence[str] = ("glyph",),
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        schedule: Sequence[Sequence[int]] | None = None,
        panel_samples: int = 4,
        channels_last: bool = True,
        adversarial: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.panel_samples = int(panel_samples)  # reconstructions drawn at each validation (0: none)
        # NHWC convolutions: oneDNN's fast path on CPU (a demo step 1.4x faster alone, 2.3x with bf16
        # autocast on a 2-core AMX Xeon; benchmarks/bench_tokenizer_train.py), and cuDNN's for bf16 on GPUs.
        self.channels_last = bool(channels_last)
        vae_cfg = dict(vae)
        if vae_cfg.get("kind", "bsq") != "bsq":
            kind = vae_cfg.get("kind")
            raise ValueError(f"stage=tokenizer trains the BSQ-VAE: use a bsq config (vae=bsq_demo), got kind {kind!r}")
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in vae_cfg.items() if k not in _NOT_ARCH}
        with torch.random.fork_rng():
            torch.manual_seed(int(vae_cfg.get("seed", 0)))
            self.vae = BSQVAE(BSQVAEConfig(**arch))
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.optim_cfg = {
            "lr": 1e-3,
            "betas": (0.9, 0.99),
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            **dict(optim or {}),
        }
        self.loss_cfg = {"glyph_weight": 0.1, "commit_weight": 0.25, "edge_weight": 0.0, **dict(loss or {})}
        self.conditions = list(conditions)
        if self.loss_cfg["glyph_weight"] > 0 and "glyph" not in self.conditions:
            raise ValueError(
                f"tokenizer_stage.loss.glyph_weight > 0 needs the glyph condition, got conditions {self.conditions}: "
                "use condition=glyph or set tokenizer_stage.loss.glyph_weight=0"
            )
        self.schedule = normalize_schedule(schedule) if schedule else None
        # Optional hinge-GAN term on the reconstructions (weight 0: off, no critic is built).
        self.adv_cfg = {"weight": 0.0, "start_step": 0, "channels": (16, 32, 64), **dict(adversarial or {})}
        self.discriminator = PatchDiscriminator(self.adv_cfg["channels"]) if float(self.adv_cfg["weight"]) > 0 else None
        if self.discriminator is not None and self.channels_last:
            self.discriminator.to(memory_format=torch.channels_last)

    def grids_for(self, batch: Mapping[str, Any], latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Latent grids of the schedule (configured, else the batch's), or the latent grid alone."""
        sched = self.schedule or (normalize_schedule(batch["schedule"]) if batch.get("schedule") else None)
        if sched is None:
            return [latent_hw]
        grids = [(h, w) for _, h, w in sched]
        if grids[-1] != tuple(latent_hw):
            raise ValueError(
                f"the schedule's last scale {grids[-1]} does not match the tokenizer's latent grid {tuple(latent_hw)} "
                f"(image {tuple(batch['images'].shape[-2:])}, patch {self.vae.patch_size})"
            )
        return grids

    def compute_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Reconstruction, glyph and commitment terms for one batch."""
        images = batch["images"]
        b = images.shape[0]
        valid = batch.get("valid", torch.ones(b, dtype=torch.bool)).to(self.device).float()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # fp32 features: under bf16 autocast the residual quantisation would otherwise sum in bf16.
        feats = self.vae.encode_for_raw_features(images).float()
        summed, commit = multiscale_bsq(feats, self.grids_for(batch, tuple(feats.shape[-2:])))
        recon = self.vae.decoder(summed).float()
        err = (recon - images).abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
        denom = valid.sum().clamp_min(1.0)
        l1 = (err.flatten(1).mean(1) * valid).sum() / denom
        stats = {"l1": l1, "commit": commit}
        loss = l1 + self.loss_cfg["commit_weight"] * commit
        if "glyph" in self.conditions:
            mask = glyph_mask(batch["controls"], self.conditions) * valid[:, None, None, None]
            glyph_l1 = (err * mask).sum() / mask.sum().clamp_min(1.0)
            stats["glyph_l1"] = glyph_l1
            loss = loss + self.loss_cfg["glyph_weight"] * glyph_l1
        if float(self.loss_cfg["edge_weight"]) > 0:
            edge = (edge_l1(recon, images).flatten(1).mean(1) * valid).sum() / denom
            stats["edge_l1"] = edge
            loss = loss + float(self.loss_cfg["edge_weight"]) * edge
        keep = valid > 0  # corrupt samples (placeholders) must not teach the critic what "real" looks like
        if self.discriminator is not None and self.global_step >= int(self.adv_cfg["start_step"]) and keep.any():
            critic, generator = hinge_terms(self.discriminator, images[keep], recon[keep])
            weight = float(self.adv_cfg["weight"])
            if self.adv_cfg.get("adaptive", True) and torch.is_grad_enabled():
                weight = weight * self.adaptive_weight(loss, generator)
            stats["critic"], stats["adversarial"], stats["adv_weight"] = critic, generator, recon.new_tensor(weight)
            loss = loss + critic + weight * generator
        stats["loss"] = loss
        return stats

    def adaptive_weight(self, reconstruction: Tensor, generator: Tensor) -> float:
        """VQGAN's balance: |grad of the reconstruction loss| / |grad of the generator loss| at the decoder's
        last conv, so the adversarial term pulls as hard as the reconstruction does whatever their scales."""
        last = self.vae.decoder.conv_out.conv.weight
        g_rec = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(generator, last, retain_graph=True)[0]
        return float((g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        stats = self.compute_loss(batch)
        b = batch["images"].shape[0]
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, batch_size=b)
        return stats["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        stats = self.compute_loss(batch)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=batch["images"].shape[0], sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.panel_samples:
            self.save_reconstruction_panel(batch)

    def save_reconstruction_panel(self, batch: Mapping[str, Any]) -> Path:
        """``<run dir>/panels/reconstructions_step<N>.png``: originals beside their reconstructions."""
        from ..evaluation.reconstruction import reconstruct
        from .panels import column_panel

        n = min(self.panel_samples, batch["images"].shape[0])
        images = batch["images"][:n]
        grids = self.grids_for(batch, tuple(d // self.vae.patch_size for d in images.shape[-2:]))
        recon = reconstruct(self.vae, images, grids)
        panel = column_panel([images.cpu(), recon.cpu()], list(batch["captions"][:n]), ("original", "reconstruction"))
        path = Path(self.trainer.default_root_dir) / "panels" / f"reconstructions_step{self.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        panel.save(path)
        for lg in self.loggers:
            if hasattr(lg, "log_image"):  # wandb
                lg.log_image("tokenizer/reconstructions", [panel], step=self.global_step)
        return path

    def configure_optimizers(self):
        named = list(self.named_parameters())  # the tokenizer's, and the critic's when there is one
        # No decay on 1-D parameters: biases and GroupNorm affines.
        return adamw_with_schedule(named, self.optim_cfg, self.trainer, self.device, no_decay=lambda n, p: p.ndim < 2)

    def export(self, directory: str | os.PathLike, write: bool = True) -> Path | None:
        """Write ``tokenizer.safetensors`` (read by ``load_bsq_vae``) and ``tokenizer_config.json``."""
        if not write:
            return None
        return export_tokenizer(self.vae, directory)


def export_tokenizer(vae: BSQVAE, directory: str | os.PathLike) -> Path:
    """``tokenizer.safetensors`` + ``tokenizer_config.json``, written atomically; returns the weights path."""
    directory = Path(directory)
    # `quantize` aliases `quantizer` (same mask tensor): safetensors refuses shared tensors, and
    # load_bsq_vae regenerates the alias's mask.
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("quantize.")}
    path = save_state_dict(state, directory / TOKENIZER_WEIGHTS, metadata=config_metadata(vae.config))
    config = json.dumps({"kind": "bsq", **dataclasses.asdict(vae.config)}, indent=1)
    atomic_write(directory / TOKENIZER_CONFIG, lambda fh: fh.write(config.encode()))
    return path
