"""InfinityPilot: a CAR control branch on a frozen Infinity.

The branch reads a control image (glyph mask, normal map, canny edges, ...) at every scale,
runs ``car_depth`` Infinity blocks over "control + current image tokens", and feeds their
outputs into the last ``car_depth`` base blocks in CAR's mirrored order: base block
``depth - K + j`` receives CAR block ``K - 1 - j``. One function (:meth:`InfinityPilot.fusion_hook`)
does the fusion for training and for sampling, so both paths compute the same thing.

``fusion="residual"`` (default): ``x <- x + lin(norm([x; c]))`` with ``car_skip_linear``
zero-initialised, so an untrained pilot *is* the base model. ``fusion="replace"``: CAR's
``x <- lin(norm([x; c]))``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..scales import normalize_schedule
from .infinity import BlockHook, GuidancePlan, InferenceOutput, Infinity, TextContext
from .layers import AttentionMask, CrossAttnBlock, no_autocast

logger = logging.getLogger(__name__)

CAR_PREFIXES = ("car_", "control_")
FUSION_MODES = ("residual", "replace")


def is_car_key(name: str) -> bool:
    """True for parameters/buffers of the control branch (``car_*`` / ``control_*``)."""
    return name.startswith(CAR_PREFIXES)


class ControlConditionEmbedding(nn.Module):
    """ControlNet's conditioning stem: Cc -> 64 -> 128 -> 256 -> 512 -> 1024 -> C, SiLU.

    Each stage is a 3x3 conv then a stride-2 3x3 conv, so ``len(channels) - 1`` stages give a
    ``2**(len(channels) - 1)`` downsampling (16 by default: one token per 16x16 pixels). ``unshuffle`` > 1
    first folds each ``unshuffle x unshuffle`` pixel block into channels (lossless, ``pixel_unshuffle``) and
    multiplies the downsampling by it: no convolution then runs at the full control resolution.
    ``out_kernel`` is ``conv_out``'s kernel size (3 in CAR; 1 makes it a per-token projection).
    """

    def __init__(
        self,
        conditioning_channels: int,
        embed_dim: int,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        unshuffle: int = 1,
        out_kernel: int = 3,
    ) -> None:
        super().__init__()
        if int(unshuffle) < 1:
            raise ValueError(f"control unshuffle must be >= 1, got {unshuffle}")
        self.unshuffle = int(unshuffle)
        self.conv_in = nn.Conv2d(conditioning_channels * self.unshuffle**2, channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], embed_dim, out_kernel, padding=out_kernel // 2)
        self.downsample = self.unshuffle * 2 ** (len(channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        # NHWC activations (the weights keep their layout, so FSDP2 shards them as usual): oneDNN's and
        # cuDNN's fast path for convolutions; on CPU this stem's step is 1.5x faster under bf16 autocast
        # and 1.06x in fp32 (the demo's CAR step: 0.78 vs 0.83 min for 120 steps).
        x = F.silu(self.conv_in(x.contiguous(memory_format=torch.channels_last)))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def build_control_pyramid(
    control_image: Tensor, scale_schedule: Sequence[Sequence[int]], patch: int = 16, binary: bool = False
) -> list[Tensor]:
    """One control tensor per scale: (B, Cc, patch*h_k, patch*w_k), resized in pixel space.

    Antialiased bilinear downscaling by default; ``binary=True`` uses nearest-exact so masks
    stay two-valued.
    """
    if control_image.dim() != 4:
        raise ValueError(f"control_image must be (B, Cc, H, W), got shape {tuple(control_image.shape)}")
    out = []
    for _, h, w in normalize_schedule(scale_schedule):
        size = (patch * h, patch * w)
        if tuple(control_image.shape[-2:]) == size:
            out.append(control_image)
        elif binary:
            out.append(F.interpolate(control_image, size=size, mode="nearest-exact"))
        else:
            out.append(F.interpolate(control_image, size=size, mode="bilinear", antialias=True, align_corners=False))
    return out


class InfinityPilot(Infinity):
    """Infinity + CAR control branch; only ``car_*`` / ``control_*`` parameters are meant to train."""

    def __init__(
        self,
        infinity_base_model: Infinity | Mapping[str, Tensor] | str | os.PathLike | None = None,
        init_car_modules: bool = True,
        freeze_infinity: bool = True,
        car_depth: int = 8,
        fusion: str = "residual",
        conditioning_channels: int = 3,
        condition_names: Sequence[str] = ("glyph",),
        control_channels: Sequence[int] = (64, 128, 256, 512, 1024),
        control_unshuffle: int = 1,
        token_conv_kernel: int = 3,
        car_init: str = "copy",
        **infinity_kwargs: Any,
    ) -> None:
        base_sd = None
        if infinity_base_model is not None:
            from ..checkpoint import detect_infinity_config, read_checkpoint, unwrap_infinity_state_dict

            if isinstance(infinity_base_model, nn.Module):
                base_sd = infinity_base_model.state_dict()
            else:
                base_sd = unwrap_infinity_state_dict(read_checkpoint(infinity_base_model))
            base_sd = {k: v for k, v in base_sd.items() if not is_car_key(k)}
            infinity_kwargs = {**detect_infinity_config(base_sd), "drop_path_rate": 0.0, **infinity_kwargs}
        if base_sd is not None:
            with torch.device("meta"):
                super().__init__(**infinity_kwargs)
        else:
            super().__init__(**infinity_kwargs)
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        if not 1 <= car_depth <= self.depth // 2:
            raise ValueError(
                f"car_depth={car_depth} must be between 1 and depth // 2 = {self.depth // 2} "
                f"(the branch feeds the last car_depth of the {self.depth} base blocks, CAR's design)"
            )
        if car_init not in ("copy", "spread", "random"):
            raise ValueError(f"car_init must be 'copy', 'spread' or 'random', got {car_init!r}")
        self.car_depth, self.fusion = car_depth, fusion
        self.conditioning_channels = conditioning_channels
        self.condition_names = list(condition_names)
        self.control_channels = tuple(control_channels)
        self.car_init = car_init
        if int(control_unshuffle) < 1:
            raise ValueError(f"control_unshuffle must be >= 1, got {control_unshuffle}")
        self.control_unshuffle = int(control_unshuffle)
        # The two C-channel convolutions at the token grid (car_var_conv, the stem's conv_out): 3x3 in CAR.
        if int(token_conv_kernel) < 1 or int(token_conv_kernel) % 2 == 0:
            raise ValueError(f"token_conv_kernel must be an odd size >= 1, got {token_conv_kernel}")
        self.token_conv_kernel = int(token_conv_kernel)
        self.control_patch = self.control_unshuffle * 2 ** (len(self.control_channels) - 1)
        # Set to a list to record (fusion index, per-token strength (B, L)) during a forward.
        self.fusion_probe: list[tuple[int, Tensor]] | None = None
        # Autocast dtype for the control stem (None: the tokens' dtype); not part of the weights.
        self.control_autocast_dtype: torch.dtype | None = None
        if base_sd is not None:
            from ..checkpoint import _normalise_infinity_keys, block_layout, convert_block_keys, load_strict

            base_sd = _normalise_infinity_keys(base_sd, self.num_heads)
            if block_layout(base_sd)[1] != self.num_block_chunks:
                base_sd = convert_block_keys(base_sd, self.num_block_chunks)
            base_sd = {k: v.float() if v.is_floating_point() else v for k, v in base_sd.items()}
            load_strict(self, base_sd, "the Infinity base weights", assign=True)
        if init_car_modules:
            self.init_car_modules_if_needed()
        if freeze_infinity:
            self.freeze_infinity_parameters()

    # ------------------------------------------------------------------ modules and parameter groups

    def has_car_modules(self) -> bool:
        """Whether the control branch exists (it is built lazily, before any FSDP wrapping)."""
        return hasattr(self, "car_blocks")

    def init_car_modules_if_needed(self) -> None:
        """Create the control branch on the base model's device (no-op if it exists)."""
        if self.has_car_modules():
            return
        device = self.pos_start.device
        C = self.C
        with torch.device(device):
            k = self.token_conv_kernel
            self.car_control_convs = ControlConditionEmbedding(
                self.conditioning_channels, C, self.control_channels, self.control_unshuffle, k
            )
            self.car_var_conv = nn.Conv2d(C, C, k, padding=k // 2)
            dpr = torch.linspace(0, float(self.drop_path_rate), self.depth, device="cpu").tolist()
            self.car_blocks = nn.ModuleList(
                CrossAttnBlock(C, self.num_heads, self.ffn_hidden, self.shared_aln, self.norm_eps, 0.0, dpr[i])
                for i in range(self.car_depth)
            )
            self.car_skip_norm = nn.ModuleList(nn.LayerNorm(2 * C, eps=1e-6) for _ in range(self.car_depth))
            self.car_skip_linear = nn.ModuleList(nn.Linear(2 * C, C) for _ in range(self.car_depth))
        self.init_car_weights()

    def init_weights(self, **kwargs: Any) -> None:
        """Base initialisation (see :meth:`Infinity.init_weights`), then the branch's own (which copies blocks)."""
        super().init_weights(**kwargs)
        if self.has_car_modules():
            self.init_car_weights()

    @torch.no_grad()
    def init_car_weights(self) -> None:
        """Stem: small trunc-normal convs; blocks: copies of base blocks (or random); fusion: zero (residual)."""
        for m in self.car_control_convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.car_var_conv.weight, std=0.02)
        nn.init.zeros_(self.car_var_conv.bias)
        base = self.block_list
        if self.car_init == "random" or base[0].sa.q_bias.is_meta:
            std = (1 / (3 * self.C)) ** 0.5
            for blk in self.car_blocks:
                for m in blk.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.trunc_normal_(m.weight, std=std)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        else:
            # ControlNet's recipe: start the branch as a copy of (the first, or evenly spread) base blocks.
            if self.car_init == "copy":
                sources = range(self.car_depth)
            else:
                sources = torch.linspace(0, self.depth - 1, self.car_depth).round().long().tolist()
            for blk, src in zip(self.car_blocks, sources):
                blk.load_state_dict(base[src].state_dict())
        for norm in self.car_skip_norm:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        for lin in self.car_skip_linear:
            if self.fusion == "residual":
                nn.init.zeros_(lin.weight)  # untrained pilot == base model
            else:
                # Replace mode: start as "keep x" -- identity on the x half, zero on the control half.
                lin.weight.zero_()
                lin.weight[:, : self.C].copy_(torch.eye(self.C))
            nn.init.zeros_(lin.bias)

    def car_parameters(self) -> list[nn.Parameter]:
        """The trainable control-branch parameters."""
        return [p for n, p in self.named_parameters() if is_car_key(n)]

    def infinity_parameters(self) -> list[nn.Parameter]:
        """The base model's parameters."""
        return [p for n, p in self.named_parameters() if not is_car_key(n)]

    def freeze_infinity_parameters(self) -> None:
        """Base frozen (no grads, and kept in eval mode: no drop-path noise), control branch trainable."""
        for n, p in self.named_parameters():
            p.requires_grad_(is_car_key(n))
        self.base_frozen = True
        self.train(self.training)

    def unfreeze_infinity_parameters(self) -> None:
        """Everything trainable (full fine-tuning)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.base_frozen = False
        self.train(self.training)

    def train(self, mode: bool = True) -> InfinityPilot:
        """Train mode for the branch; a frozen base stays in eval mode (the prompt drop for CFG still applies)."""
        super().train(mode)
        if mode and getattr(self, "base_frozen", False):
            for name, child in self.named_children():
                if not is_car_key(name):
                    child.eval()
        return self

    def kv_caching(self, enable: bool) -> None:
        """Caches of the base blocks and of the CAR blocks."""
        super().kv_caching(enable)
        if self.has_car_modules():
            for blk in self.car_blocks:
                blk.kv_caching(enable)

    def car_config(self) -> dict[str, Any]:
        """The control-branch settings (written next to separated weights)."""
        return dict(
            car_depth=self.car_depth,
            fusion=self.fusion,
            conditioning_channels=self.conditioning_channels,
            condition_names=self.condition_names,
            control_channels=list(self.control_channels),
            control_unshuffle=self.control_unshuffle,
            token_conv_kernel=self.token_conv_kernel,
            car_init=self.car_init,
        )

    # ------------------------------------------------------------------ control path

    def check_controls(self, control_tensors: Sequence[Tensor], sched, batch: int) -> None:
        """One finite (B, Cc, p*h_k, p*w_k) tensor per scale, or a ValueError naming what is wrong."""
        if not self.has_car_modules():
            raise ValueError("control_tensors were given but the model has no CAR modules (init_car_modules=False)")
        if len(control_tensors) != len(sched):
            raise ValueError(f"expected {len(sched)} control tensors (one per scale), got {len(control_tensors)}")
        p = self.control_patch
        for k, (ctrl, (_, h, w)) in enumerate(zip(control_tensors, sched)):
            expected = (batch, self.conditioning_channels, p * h, p * w)
            if tuple(ctrl.shape) != expected:
                raise ValueError(f"control tensor of scale {k} must be {expected}, got {tuple(ctrl.shape)}")
            if not torch.isfinite(ctrl).all():
                raise ValueError(f"control tensor of scale {k} contains NaN or Inf")

    def car_scale_input(self, tokens: Tensor, control: Tensor, hw: tuple[int, int]) -> Tensor:
        """CAR stream tokens of one scale: car_var_conv(token map) + control features (B, h*w, C)."""
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, *hw)
        return (self.car_var_conv(grid) + control).flatten(2).transpose(1, 2)

    def run_car_blocks(self, x: Tensor, ctx: TextContext, attn_mask: AttentionMask, rope: Tensor) -> list[Tensor]:
        """The CAR stack; returns every block's output (the features to fuse)."""
        outs = []
        for blk in self.car_blocks:
            x = blk(x, ctx.cond, ctx.text, attn_mask, rope)
            outs.append(x)
        return outs

    def fuse(self, j: int, x: Tensor, c: Tensor, keep: Tensor | None) -> Tensor:
        """Fusion into base block ``depth - car_depth + j``; rows with ``keep == False`` skip it."""
        with no_autocast(x.device.type):
            y = self.car_skip_norm[j](torch.cat([x, c], dim=-1).float())
        y = self.car_skip_linear[j](y).float()
        fused = x + y if self.fusion == "residual" else y
        if self.fusion_probe is not None:  # monitoring: per-token fusion strength ||fused - x|| / ||x||
            ratio = (fused - x).detach().float().norm(dim=-1) / x.detach().float().norm(dim=-1).clamp_min(1e-12)
            self.fusion_probe.append((j, ratio))
        return fused if keep is None else torch.where(keep[:, None, None], fused, x)

    def fusion_hook(self, car_outputs: list[Tensor], keep: Tensor | None) -> BlockHook:
        """The base-block hook of both training and sampling: mirrored pairing, one fusion map."""
        first = self.depth - self.car_depth

        def hook(i: int, x: Tensor) -> Tensor:
            if i < first:
                return x
            j = i - first
            return self.fuse(j, x, car_outputs[self.car_depth - 1 - j], keep)

        return hook

    # ------------------------------------------------------------------ training forward

    def control_features(self, control: Tensor, dtype: torch.dtype) -> Tensor:
        """The conditioning stem on one scale's control image, in ``dtype`` (the tokens').

        With :attr:`control_autocast_dtype` set (the training module's ``conv_precision``), the stem's
        convolutions run under autocast to it: on a CPU with native bf16 they are 1.5x faster, a tenth of
        the demo's CAR step, while the transformer stays in fp32.
        """
        if self.control_autocast_dtype is None:
            return self.car_control_convs(control.to(dtype))
        with torch.autocast(control.device.type, dtype=self.control_autocast_dtype):
            return self.car_control_convs(control).to(dtype)

    def forward(
        self,
        label_B_or_BLT,
        x_BLC_wo_prefix: Tensor,
        scale_schedule,
        control_tensors: Sequence[Tensor] | None = None,
        control_keep: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits; with ``control_tensors`` the CAR branch steers the base.

        ``control_keep`` (B,) bool drops the control per sample (dropped rows are the base model).
        """
        tokens, ctx, sched = self.prepare_inputs(label_B_or_BLT, x_BLC_wo_prefix, scale_schedule, text_keep)
        mask, rope = self.attention_inputs(sched, tokens.device)
        lvl = self.scale_embedding(sched, tokens.device)
        hook = None
        if control_tensors is not None:
            b = tokens.shape[0]
            self.check_controls(control_tensors, sched, b)
            car_in, start = [], 0
            for ctrl, (_, h, w) in zip(control_tensors, sched):
                seg = tokens[:, start : start + h * w]
                car_in.append(self.car_scale_input(seg, self.control_features(ctrl, seg.dtype), (h, w)))
                start += h * w
            car_outputs = self.run_car_blocks(torch.cat(car_in, dim=1) + lvl, ctx, mask, rope)
            keep = None if control_keep is None else control_keep.to(tokens.device).bool()
            hook = self.fusion_hook(car_outputs, keep)
        return self.get_logits(self.run_blocks(tokens + lvl, ctx, mask, rope, hook), ctx.cond_BD)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        vae: nn.Module | None = None,
        scale_schedule=None,
        label_B_or_BLT=None,
        B: int = 1,
        g_seed: int | None = None,
        cfg_list: float | Sequence[float] = 1.0,
        tau_list: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_insertion_layer: int | Sequence[int] = (0,),
        negative_label_B_or_BLT=None,
        gt_leak: int = 0,
        gt_ls_Bl: Sequence[Tensor] | None = None,
        return_logits: bool = False,
        control_tensors: Sequence[Tensor] | None = None,
        control_cfg: float | Sequence[float] = 1.0,
    ) -> InferenceOutput:
        """Sample with the control; two-axis guidance over text (``cfg_list``) and control (``control_cfg``).

        ``logits = u + s_c (c - u) + s_t (tc - c)`` with tc = text + control, c = null text +
        control, u = null text without control (the base model). ``control_cfg = 1`` is plain
        text guidance with the control in both halves (CAR's convention); without
        ``control_tensors`` this is the base model's sampler.
        """
        if control_tensors is None:
            return super().autoregressive_infer_cfg(
                vae,
                scale_schedule,
                label_B_or_BLT,
                B,
                g_seed,
                cfg_list,
                tau_list,
                top_k,
                top_p,
                cfg_insertion_layer,
                negative_label_B_or_BLT,
                gt_leak,
                gt_ls_Bl,
                return_logits,
            )
        sched, text, s_t = self._sampling_inputs(scale_schedule, label_B_or_BLT, B, cfg_list)
        self.check_controls(control_tensors, sched, B)
        s_c = [
            float(v)
            for v in (
                [control_cfg] * len(sched) if isinstance(control_cfg, (int, float)) else control_cfg[: len(sched)]
            )
        ]
        if len(s_c) != len(sched):
            raise ValueError(f"control_cfg has {len(s_c)} entries, the schedule has {len(sched)} scales")
        if any(c != 1.0 for c in s_c):
            neg = self._negative(text, negative_label_B_or_BLT, B)
            plan = GuidancePlan([text, neg, neg], [[t, c - t, 1.0 - c] for t, c in zip(s_t, s_c)])
            keep_branches = [True, True, False]
        elif any(t != 1.0 for t in s_t):
            plan = GuidancePlan([text, self._negative(text, negative_label_B_or_BLT, B)], [[t, 1.0 - t] for t in s_t])
            keep_branches = [True, True]
        else:
            plan = GuidancePlan([text], [[1.0]] * len(sched))
            keep_branches = [True]
        device = self.pos_start.device
        self._sampling_control = (
            [c.to(device) for c in control_tensors],
            torch.tensor(keep_branches, device=device).repeat_interleave(B),
            sched,
        )
        try:
            return self._sample(
                vae,
                sched,
                plan,
                B,
                g_seed=g_seed,
                tau_list=tau_list,
                top_k=top_k,
                top_p=top_p,
                cfg_insertion_layer=cfg_insertion_layer,
                gt_leak=gt_leak,
                gt_ls_Bl=gt_ls_Bl,
                return_logits=return_logits,
            )
        finally:
            self._sampling_control = None

    def scale_hook(
        self, k: int, tokens: Tensor, ctx: TextContext, rope: Tensor, rows_per_branch: int
    ) -> BlockHook | None:
        """At sampling scale k: control features once, the CAR blocks with their KV cache, then fusion."""
        state = getattr(self, "_sampling_control", None)
        if state is None:
            return None
        controls, keep, sched = state
        _, h, w = sched[k]
        feats = self.control_features(controls[k], tokens.dtype)
        feats = feats.repeat(tokens.shape[0] // rows_per_branch, 1, 1, 1)
        car_in = self.car_scale_input(tokens, feats, (h, w)) + self.lvl_embed.weight[k]
        return self.fusion_hook(self.run_car_blocks(car_in, ctx, None, rope), keep)
