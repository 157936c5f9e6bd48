"""``PilotModule``: trains the CAR branch of an InfinityPilot on a frozen base, VAE and text encoder.

One training step (see DESIGN.md): prompts -> packed text; images -> tokenizer features ->
per-scale labels + teacher-forcing input (bitwise self-correction); controls -> per-scale
pyramid; forward; cross-entropy per token, per-scale reweighting; only ``car_*``/``control_*``
parameters are in the optimizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.nn import functional as F

from ..bitwise import scale_loss_weights
from ..models.pilot import InfinityPilot, build_control_pyramid, is_car_key
from ..scales import normalize_schedule, scale_lengths, var_schedule
from .builders import build_pilot, build_text_encoder, build_tokenizer, check_code_dim
from .feature_cache import FeatureCache, sample_names


def base_fingerprint(model: nn.Module) -> Tensor:
    """A cheap checksum of every frozen tensor (float64 sums of the local values), in a fixed order."""
    sums = []
    for name, t in model.state_dict().items():
        if is_car_key(name) or not t.is_floating_point():
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        sums.append(local.detach().double().sum())
    return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states."""
    import random

    import numpy as np

    # Plain types and tensors only: Lightning reads checkpoints with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import random

    import numpy as np

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
    """Linear warm-up, then constant or cosine decay to ``min_ratio`` of the peak."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def batch_schedule(
    batch: Mapping[str, Any], fallback: Sequence[Sequence[int]] | None = None
) -> list[tuple[int, int, int]]:
    """The batch's template schedule, else the configured ``schedule.scales`` (custom schedules), else an error."""
    if batch.get("schedule") is not None:
        return normalize_schedule(batch["schedule"])
    if fallback:
        return normalize_schedule(fallback)
    raise ValueError(
        "the batch has no scale schedule: configure the data with a pn preset, or give the scales "
        "explicitly (schedule.scales, e.g. schedule=demo64x128)"
    )


def encode_batch(
    text_encoder: Any,
    vae: nn.Module,
    codes: Any,
    batch: Mapping[str, Any],
    sched: Sequence[Sequence[int]],
    loss_cfg: Mapping[str, Any],
    noise: bool,
    device: torch.device,
    conv_dtype: torch.dtype | None = None,
    feature_cache: FeatureCache | None = None,
) -> tuple[Any, Any]:
    """Frozen helpers: captions -> packed text; images -> per-scale targets (self-correction when ``noise``).

    ``conv_dtype``: run the tokenizer's encoder under autocast to it; the features are quantised in fp32.
    ``feature_cache``: take the features of samples seen before from it (:class:`FeatureCache`).
    """

    def encode(images: Tensor) -> Tensor:
        if conv_dtype is None:
            return vae.encode_for_raw_features(images)
        with torch.autocast(device.type, dtype=conv_dtype):
            return vae.encode_for_raw_features(images).float()

    with torch.no_grad():
        text = text_encoder.encode(list(batch["captions"])).to(device)
        if feature_cache is None:
            feats = encode(batch["images"])
        else:
            feats = feature_cache.features(encode, batch["images"], sample_names(batch))
        targets = codes.targets(
            feats,
            sched,
            noise_strength=loss_cfg["noise_strength"] if noise else 0.0,
            noise_layers=loss_cfg["noise_layers"] if noise else 0,
        )
    return text, targets


def scale_loss_stats(
    codes: Any,
    logits: Tensor,
    labels: Tensor,
    sched: Sequence[Sequence[int]],
    valid: Tensor,
    loss_cfg: Mapping[str, Any],
    token_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Next-scale loss (per-scale reweighted, invalid samples ignored), accuracies and per-scale statistics.

    ``token_weights`` (B, L), optional: multipliers on the per-token loss (e.g. :func:`glyph_token_weights`).
    """
    device = logits.device
    per_token = codes.loss_per_token(logits, labels, loss_cfg["label_smoothing"])
    if loss_cfg["reweight_by_scale"]:
        weights = scale_loss_weights(sched, device=device)
    else:
        weights = torch.full((per_token.shape[1],), 1.0 / per_token.shape[1], device=device)
    if token_weights is not None:
        weights = weights * token_weights
    per_sample = (per_token * weights).sum(dim=1)
    loss = (per_sample * valid).sum() / valid.sum().clamp_min(1.0)
    with torch.no_grad():
        acc = codes.accuracy_per_token(logits.detach(), labels)
        mask = valid[:, None]
        denom = valid.sum().clamp_min(1.0)
        stats = {
            "loss": loss,
            "acc": (acc * mask).mean(1).sum() / denom,
            "token_acc": ((acc == 1).float() * mask).mean(1).sum() / denom,
        }
        start = 0
        for k, n in enumerate(scale_lengths(sched)):
            stats[f"loss_s{k}"] = (per_token[:, start : start + n] * mask).mean(1).sum() / denom
            stats[f"acc_s{k}"] = (acc[:, start : start + n] * mask).mean(1).sum() / denom
            start += n
        stats["tokens"] = torch.tensor(float(per_token.shape[1] * valid.sum()))
    return stats


def glyph_mask(controls: Tensor, conditions: Sequence[str]) -> Tensor:
    """(B, 1, H, W) float: 1 where any channel of the batch's glyph condition is > 0 (text strokes)."""
    i = list(conditions).index("glyph")
    return (controls[:, 3 * i : 3 * i + 3] > 0).any(dim=1, keepdim=True).float()


def glyph_token_weights(mask: Tensor, sched: Sequence[Sequence[int]], weight: float) -> Tensor:
    """(B, L) loss multipliers that make text tokens count more *within* each scale.

    ``mask`` (B, 1, H, W) is 1 on text strokes. A token's glyph coverage ``c`` (the mask's mean over its patch at
    that scale's grid) gives ``1 + weight * c``, divided by the scale's mean so each scale keeps its total weight
    (the scale reweighting stays as configured): the bits that draw the strokes get more of the gradient than
    the background's, which no caption or control can predict.
    """
    parts = []
    for _, h, w in normalize_schedule(sched):
        m = 1.0 + weight * F.adaptive_avg_pool2d(mask, (h, w)).flatten(1)
        parts.append(m / m.mean(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


CONV_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}

DEFAULT_OPTIM: dict[str, Any] = {
    "lr": 1e-4,
    "betas": (0.9, 0.97),
    "weight_decay": 0.005,
    "warmup_steps": 0,
    "schedule": "constant",
    "min_lr_ratio": 0.0,
}
DEFAULT_LOSS: dict[str, Any] = {
    "noise_strength": 0.3,
    "noise_layers": 13,
    "reweight_by_scale": True,
    "label_smoothing": 0.0,
    "glyph_weight": 0.0,
}


def adamw_kernel(trainer, device: torch.device) -> dict[str, bool]:
    """How AdamW runs its update: one fused kernel over all tensors where Lightning allows it, else the
    multi-tensor (foreach) path; torch's CPU default is a Python loop over the tensors (the demo
    tokenizer's 72: 8.1 ms a step, foreach 4.8, fused 1.2 on a 2-core CPU).

    Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer (it unscales
    inside its step), bf16 included, so clipped mixed-precision runs take foreach.
    """
    if device.type not in ("cuda", "cpu"):
        return {}
    clips = trainer is not None and bool(trainer.gradient_clip_val)
    if clips and isinstance(trainer.precision_plugin, MixedPrecision):
        return {"foreach": True}
    return {"fused": True}


def adamw_with_schedule(
    named: Sequence[tuple[str, nn.Parameter]],
    cfg: Mapping[str, Any],
    trainer,
    device: torch.device,
    no_decay=lambda name, p: p.ndim < 2 or "norm" in name,
) -> dict:
    """AdamW (no weight decay on 1-D parameters and norms) + per-step warm-up/cosine LR, for Lightning."""
    decay = [p for n, p in named if not no_decay(n, p)]
    keep = [p for n, p in named if no_decay(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": keep, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
        **adamw_kernel(trainer, device),
    )
    total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(int(cfg["warmup_steps"]), total, cfg["schedule"], float(cfg["min_lr_ratio"]))
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TransformerStage(L.LightningModule):
    """What the base and CAR stages share: frozen tokenizer and text encoder beside a trained transformer,
    step logging and the optimizer over the parameters that require grad."""

    model: nn.Module

    def attach_frozen_helpers(
        self,
        vae_cfg: Mapping[str, Any],
        text_cfg: Mapping[str, Any],
        conv_precision: str = "fp32",
        feature_cache: int = 0,
    ) -> None:
        """Build the frozen VAE and text encoder outside the module tree (not trained, not checkpointed).

        ``conv_precision="bf16"`` runs the convolutions around the transformer (the tokenizer's encode and,
        for the pilot, the control stem) under bf16 autocast; the transformer keeps the trainer's precision.
        ``feature_cache > 0`` remembers the tokenizer's features of that many samples (:class:`FeatureCache`).
        """
        if conv_precision not in CONV_DTYPES:
            raise ValueError(f"conv_precision must be one of {sorted(CONV_DTYPES)}, got {conv_precision!r}")
        self.conv_dtype = CONV_DTYPES[conv_precision]
        if hasattr(self.model, "control_autocast_dtype"):
            self.model.control_autocast_dtype = self.conv_dtype
        object.__setattr__(self, "_vae", build_tokenizer(**vae_cfg))
        object.__setattr__(self, "_text", build_text_encoder(**dict(text_cfg)))
        if self._text.dim != self.model.text_channels:
            raise ValueError(
                f"the text encoder gives {self._text.dim} channels, the model expects "
                f"{self.model.text_channels}: set text.dim or choose another model"
            )
        if self.model.bitwise:
            check_code_dim(self._vae, self.model.codebook_dim, vae_cfg.get("path"))
        self.codes = self.model.code_space(self._vae)
        self.feature_cache = FeatureCache(feature_cache) if feature_cache else None
        self._last_step_time: float | None = None

    @property
    def vae(self) -> nn.Module:
        """The frozen tokenizer, moved to this module's device on first use."""
        if next(self._vae.parameters()).device != self.device:
            self._vae.to(self.device)
        return self._vae

    @property
    def text_encoder(self):
        """The frozen text encoder, moved to this module's device on first use."""
        if next(self._text.parameters()).device != self.device:
            self._text.to(self.device)
        return self._text

    def encode(self, batch: Mapping[str, Any], sched: Sequence[Sequence[int]], noise: bool) -> tuple[Any, Any]:
        """Packed text and per-scale targets of a batch from the frozen helpers (:func:`encode_batch`)."""
        return encode_batch(
            self.text_encoder,
            self.vae,
            self.codes,
            batch,
            sched,
            self.loss_cfg,
            noise,
            self.device,
            self.conv_dtype,
            self.feature_cache,
        )

    def step_stats(self, batch: Mapping[str, Any], train: bool) -> dict[str, Tensor]:
        """Loss and statistics of one batch (training: with noise / dropout)."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        stats = self.step_stats(batch, train=True)
        b = batch["images"].shape[0]
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k not in ("loss", "tokens")}, batch_size=b)
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = now - self._last_step_time
            self.log_dict({"perf/images_per_s": b / dt, "perf/tokens_per_s": float(stats["tokens"]) / dt}, batch_size=b)
        self._last_step_time = now
        # text.cache_prompts / vae.cache_samples > 0: the share served from each cache so far (big enough?)
        for name, cache in (("text", self._text), ("feature", self.feature_cache)):
            hits, misses = getattr(cache, "hits", 0), getattr(cache, "misses", 0)
            if hits + misses:
                self.log(f"perf/{name}_cache_hit_rate", hits / (hits + misses), batch_size=b)
        return stats["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        stats = self.step_stats(batch, train=False)
        b = batch["images"].shape[0]
        self.log_dict({f"val/{k}": v for k, v in stats.items() if k != "tokens"}, batch_size=b, sync_dist=True)

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return adamw_with_schedule(named, self.optim_cfg, self.trainer, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the RNG states: self-correction noise, dropout and prompt drop continue on resume."""
        checkpoint.setdefault("scenetxtvar", {})["rng"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the RNG states recorded at save; they are restored before the first resumed batch."""
        self._pending_rng = checkpoint.get("scenetxtvar", {}).get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore a resumed run's RNG states right before its first batch, where the uninterrupted run
        stood when the checkpoint was saved (the loaders draw from their own generators, not the global RNG)."""
        pending = getattr(self, "_pending_rng", None)
        if pending is not None:
            restore_rng_state(pending)
            self._pending_rng = None


class PilotModule(TransformerStage):
    """Frozen Infinity + trainable CAR branch; the VAE and text encoder are frozen helpers, not weights."""

    def __init__(
        self,
        model: Mapping[str, Any],
        vae: Mapping[str, Any],
        text: Mapping[str, Any],
        conditions: Sequence[str] = ("glyph",),
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        control_dropout: float = 0.1,
        activation_checkpointing: bool = False,
        schedule: Sequence[Sequence[int]] | None = None,
        conv_precision: str = "fp32",
        feature_cache: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = {**DEFAULT_OPTIM, **dict(optim or {})}
        self.loss_cfg = {**DEFAULT_LOSS, **dict(loss or {})}
        if not 0.0 <= control_dropout < 1.0:
            raise ValueError(f"control_dropout must be in [0, 1), got {control_dropout}")
        self.control_dropout = control_dropout
        self.conditions = list(conditions)
        glyph_weight = float(self.loss_cfg["glyph_weight"])
        if glyph_weight < 0 or (glyph_weight > 0 and "glyph" not in self.conditions):
            raise ValueError(
                f"loss.glyph_weight={glyph_weight} needs to be >= 0, and > 0 only with a 'glyph' condition "
                f"(conditions: {self.conditions})"
            )
        # Explicit scales (schedule.scales) for batches whose template carries none (custom image sizes).
        self.schedule = normalize_schedule(schedule) if schedule else None
        vae_cfg = dict(vae)
        model_cfg = {**dict(model), **dict(vae_cfg.pop("model_overrides", {}) or {})}
        self.model: InfinityPilot = build_pilot(
            **model_cfg, conditioning_channels=3 * len(self.conditions), condition_names=self.conditions
        )
        self.model.checkpointing = activation_checkpointing
        self.attach_frozen_helpers(vae_cfg, text, conv_precision, feature_cache)
        self.is_vq = not self.model.bitwise
        self._base_fingerprint = base_fingerprint(self.model)
        # Lightning checkpoints carry the CAR branch only: the base comes from model.base_weights.
        self.strict_loading = False

    # ------------------------------------------------------------------ helpers

    def schedule_for(self, batch: Mapping[str, Any]) -> list[tuple[int, int, int]]:
        """The batch's scale schedule: its template's (BSQ) or VAR's patch numbers (VQ)."""
        if self.is_vq:
            return normalize_schedule([(1, p, p) for p in self._vae.patch_nums])
        return batch_schedule(batch, self.schedule)

    def compute_loss(self, batch: Mapping[str, Any], noise: bool, drop_control: bool) -> dict[str, Tensor]:
        """Loss, accuracies and per-scale statistics for one batch."""
        images, controls = batch["images"], batch["controls"]
        b = images.shape[0]
        valid = batch.get("valid", torch.ones(b, dtype=torch.bool)).to(self.device).float()
        sched = self.schedule_for(batch) if not self.is_vq else normalize_schedule(var_schedule(images.shape[-1]))
        text, targets = self.encode(batch, sched, noise and not self.is_vq)
        with torch.no_grad():
            pyramid = build_control_pyramid(controls, sched, patch=self.model.control_patch)
        keep = None
        if drop_control and self.control_dropout > 0:
            keep = torch.rand(b, device=self.device) >= self.control_dropout
        logits = self.model(text, targets.x_BLC_wo_prefix, sched, control_tensors=pyramid, control_keep=keep)
        token_weights = None
        glyph_weight = float(self.loss_cfg["glyph_weight"])
        if glyph_weight > 0:  # the constructor checked that the glyph condition is there
            token_weights = glyph_token_weights(glyph_mask(controls, self.conditions), sched, glyph_weight)
        return scale_loss_stats(self.codes, logits, targets.labels, sched, valid, self.loss_cfg, token_weights)

    # ------------------------------------------------------------------ Lightning hooks

    def step_stats(self, batch: Mapping[str, Any], train: bool) -> dict[str, Tensor]:
        """Training: self-correction noise and control dropout; validation: neither."""
        return self.compute_loss(batch, noise=train, drop_control=train)

    def configure_model(self) -> None:
        """FSDP2: shard every base and CAR block, then the rest, over the data-parallel mesh."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for blk in [*self.model.block_list, *self.model.car_blocks]:
            fully_shard(blk, mesh=dp)
        fully_shard(self.model, mesh=dp)

    def configure_optimizers(self):
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        car = {n for n, _ in self.model.named_parameters() if is_car_key(n)}
        if names != car:
            raise RuntimeError(
                f"the optimizer must hold exactly the car_*/control_* parameters; extra {sorted(names - car)[:5]}, "
                f"missing {sorted(car - names)[:5]}"
            )
        return super().configure_optimizers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the CAR branch; record the base's fingerprint so a resume can check it."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if not is_car_key(k.removeprefix("model."))]:
                del state[key]
        super().on_save_checkpoint(checkpoint)
        checkpoint["scenetxtvar"].update(base_fingerprint=self._base_fingerprint, car_config=self.model.car_config())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose CAR keys do not match, or that was trained on another base."""
        state = checkpoint.get("state_dict", {})
        expected = {f"model.{k}" for k in self.model.state_dict() if is_car_key(k)}
        missing = sorted(expected - set(state))
        if state and missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} CAR tensors, e.g. {missing[:5]}")
        info = checkpoint.get("scenetxtvar", {})
        saved = info.get("base_fingerprint")
        if saved is not None and not torch.allclose(saved.double(), self._base_fingerprint, rtol=1e-9, atol=1e-6):
            raise ValueError("this checkpoint was trained on different base weights than model.base_weights")
        super().on_load_checkpoint(checkpoint)
