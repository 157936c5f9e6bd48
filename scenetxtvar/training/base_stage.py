"""``BaseModule`` (``stage=base``): train Infinity itself, text-conditioned, over a frozen tokenizer.

No CAR branch and nothing frozen but the tokenizer and the text encoder. The step is PilotModule's without
the controls: the same targets with bitwise self-correction (:func:`~scenetxtvar.training.module.encode_batch`)
and the same per-scale reweighted loss (:func:`~scenetxtvar.training.module.scale_loss_stats`). The
architecture is the model config's (``model.build``: an ``infinity_pilot_*`` preset maps to its base,
CAR-only settings are ignored; ``model.build.base_weights`` is where the *next* stage reads this stage's
export, so it is not read here). The tokenizer is ``vae.build`` (``vae.build.path``: e.g. the tokenizer
stage's ``export/tokenizer.safetensors``). The export ``base.safetensors`` is a plain Infinity state dict
that :func:`~scenetxtvar.checkpoint.load_infinity` reads and ``stage=car`` takes as
``model.build.base_weights``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import save_state_dict
from ..models.infinity import Infinity
from ..scales import normalize_schedule
from .builders import build_infinity
from .module import DEFAULT_LOSS, DEFAULT_OPTIM, TransformerStage, batch_schedule, scale_loss_stats

BASE_EXPORT = "base.safetensors"


class BaseModule(TransformerStage):
    """A trainable Infinity; the VAE and text encoder are frozen helpers, not weights."""

    def __init__(
        self,
        model: Mapping[str, Any],
        vae: Mapping[str, Any],
        text: Mapping[str, Any],
        conditions: Sequence[str] = ("glyph",),
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        activation_checkpointing: bool = False,
        schedule: Sequence[Sequence[int]] | None = None,
        conv_precision: str = "fp32",
        feature_cache: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = {**DEFAULT_OPTIM, **dict(optim or {})}
        self.loss_cfg = {**DEFAULT_LOSS, **dict(loss or {})}
        vae_cfg = dict(vae)
        model_cfg = {**dict(model), **dict(vae_cfg.pop("model_overrides", {}) or {})}
        self.model: Infinity = build_infinity(**model_cfg)
        if not self.model.bitwise:
            raise ValueError("stage=base trains a bitwise (BSQ) Infinity; index heads (vae=vq) are not supported")
        self.model.checkpointing = activation_checkpointing
        self.attach_frozen_helpers(vae_cfg, text, conv_precision, feature_cache)
        self.schedule = normalize_schedule(schedule) if schedule else None

    def compute_loss(self, batch: Mapping[str, Any], noise: bool) -> dict[str, Tensor]:
        """Loss, accuracies and per-scale statistics for one batch (text-conditioned, no control)."""
        b = batch["images"].shape[0]
        valid = batch.get("valid", torch.ones(b, dtype=torch.bool)).to(self.device).float()
        sched = batch_schedule(batch, self.schedule)
        text, targets = self.encode(batch, sched, noise)
        logits = self.model(text, targets.x_BLC_wo_prefix, sched)
        return scale_loss_stats(self.codes, logits, targets.labels, sched, valid, self.loss_cfg)

    def step_stats(self, batch: Mapping[str, Any], train: bool) -> dict[str, Tensor]:
        """Training with self-correction noise; validation without."""
        return self.compute_loss(batch, noise=train)

    def export(self, directory: str | os.PathLike, write: bool = True) -> Path | None:
        """Write ``base.safetensors``: the whole Infinity state dict (``load_infinity`` reads it)."""
        if not write:
            return None
        return save_state_dict(self.model.state_dict(), Path(directory) / BASE_EXPORT)
