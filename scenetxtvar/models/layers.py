"""Building blocks of the Infinity transformer, named so the official state dict loads as is.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``; variable-length
text is handled by padding the packed prompts once per forward and masking, so no flash-attn
varlen kernel (and no Python loop over prompts) is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ..scales import normalize_schedule, rope_reference_grid


def no_autocast(device_type: str):
    """A context that turns autocast off: the official code keeps text, AdaLN and head in fp32."""
    return torch.autocast(device_type=device_type, enabled=False)


class RMSNorm(nn.Module):
    """RMSNorm with an affine weight (official ``FastRMSNorm`` fallback), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# --------------------------------------------------------------------------------------------
# Text: packed prompts -> padded keys/values with a mask
# --------------------------------------------------------------------------------------------


@dataclass
class TextKV:
    """Prompt features padded to the longest prompt, with the mask of valid tokens."""

    kv: Tensor  # (B, Lmax, D)
    mask: Tensor  # (B, Lmax) bool, True where a token is real

    def with_kv(self, kv: Tensor) -> TextKV:
        """The same mask over new features (e.g. after a projection)."""
        return TextKV(kv, self.mask)


def pad_packed(kv_compact: Tensor, lens: Tensor, cu_seqlens: Tensor, max_len: int) -> TextKV:
    """Scatter packed rows (sum(lens), D) into (B, max_len, D) in one indexing op."""
    b = lens.numel()
    batch_idx = torch.repeat_interleave(torch.arange(b, device=kv_compact.device), lens)
    pos = torch.arange(kv_compact.shape[0], device=kv_compact.device) - cu_seqlens[:-1].long()[batch_idx]
    padded = kv_compact.new_zeros(b, max_len, kv_compact.shape[1])
    padded[batch_idx, pos] = kv_compact
    mask = torch.arange(max_len, device=kv_compact.device)[None, :] < lens[:, None]
    return TextKV(padded, mask)


# --------------------------------------------------------------------------------------------
# 2-D RoPE
# --------------------------------------------------------------------------------------------


class Rope2D:
    """Interleaved-pair 2-D rotary tables, first half of the pairs for rows, second for columns.

    Mode ``rope2d_normalized_by_hw=2`` (the released one): every scale's positions are spread
    over a reference grid -- the last grid of the template's 1M schedule -- with
    ``round(arange(h) * UH / h)`` (half-to-even, as ``torch.round``). Tables are built per
    schedule on first use and cached (they are not part of the state dict). A table holds each
    pair's rotation as a unit complex number, so applying it is one complex multiply.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        # Built on the CPU explicitly: models may be constructed under a meta-device context.
        steps = torch.arange(0, half, 2, dtype=torch.int64, device="cpu").float()
        self.inv_freq = 1.0 / (base ** (steps / half))
        self._cache: dict[tuple, Tensor] = {}

    def table(self, schedule, device: torch.device) -> Tensor:
        """``cos + i sin`` (L, head_dim / 2) complex64 for all tokens of ``schedule``: one per pair."""
        sched = tuple(normalize_schedule(schedule))
        key = (sched, str(device))
        if key not in self._cache:
            uh, uw = rope_reference_grid(sched)
            angles = []
            for _, h, w in sched:
                rows = torch.round(torch.arange(h, dtype=torch.float32, device="cpu") * (uh / h))
                cols = torch.round(torch.arange(w, dtype=torch.float32, device="cpu") * (uw / w))
                fy = torch.outer(rows, self.inv_freq)  # (h, c/4)
                fx = torch.outer(cols, self.inv_freq)  # (w, c/4)
                grid = torch.cat([fy[:, None, :].expand(h, w, -1), fx[None, :, :].expand(h, w, -1)], dim=-1)
                angles.append(grid.reshape(h * w, -1))
            ang = torch.cat(angles)
            self._cache[key] = torch.polar(torch.ones_like(ang), ang).to(device)
        return self._cache[key]


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate consecutive pairs (2p, 2p+1) of (B, H, L, c) by the (L, c/2) unit complex ``rotation``, in fp32.

    ``(a + ib)(cos + i sin)`` is the rotation ``(a cos - b sin, a sin + b cos)`` in one kernel each way: the
    real-valued form (four products, a stack) took 3x the time of the whole pair product forward + backward
    on a 2-core CPU, ~5% of a demo CAR step.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleCausalMask:
    """The block-causal mask of a teacher-forced next-scale sequence: a token sees its own and coarser scales.

    The last scale sees every token, so :func:`scale_causal_attention` gives its queries (the largest share of
    the sequence: 128 of 171 tokens in the demo, 4096 of ~10k at 1M pixels) unmasked attention -- the
    kernels' fast path, flash attention on GPUs -- and masks only the queries before it.
    """

    dense: Tensor  # (L, L) bool, True where a query (row) may attend a key (column)
    last_start: int  # index of the last scale's first token

    def __post_init__(self) -> None:
        n = self.dense.shape[-1]
        if not 0 <= self.last_start < n:
            raise ValueError(f"last_start={self.last_start} must index a token of the {n}-token sequence")


AttentionMask = Tensor | ScaleCausalMask | None


def scale_causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: ScaleCausalMask, scale: float) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask.dense)`` as a masked head and an unmasked tail.

    Exact: the last scale's rows of the mask are all True, and the earlier scales never see it. ~10% less
    attention time (forward + backward) at the demo's shapes on CPU: a fifth fewer query-key pairs, most unmasked.
    """
    p = mask.last_start
    tail = F.scaled_dot_product_attention(q[:, :, p:], k, v, scale=scale)
    if p == 0:
        return tail
    head = F.scaled_dot_product_attention(
        q[:, :, :p], k[:, :, :p], v[:, :, :p], attn_mask=mask.dense[:p, :p], scale=scale
    )
    return torch.cat([head, tail], dim=2)


class SelfAttention(nn.Module):
    """Cosine self-attention with a learned per-head scale, 2-D RoPE and an optional KV cache."""

    def __init__(self, embed_dim: int, num_heads: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        # Stored as a log, clamped at log(100) in use (official).
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.max_scale_mul = math.log(100.0)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.caching = False
        self.cached_k: Tensor | None = None
        self.cached_v: Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Turn the KV cache on (empty) or off (freed)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: Tensor, attn_mask: AttentionMask, rope: Tensor) -> Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, c)
        scale = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        # Cosine attention: unit q and k (F.normalize's eps), the learned scale folded into q's divisor.
        q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat([self.cached_k, k], dim=2)
                v = torch.cat([self.cached_v, v], dim=2)
            self.cached_k, self.cached_v = k, v
        dt = v.dtype
        if isinstance(attn_mask, ScaleCausalMask):
            out = scale_causal_attention(q.to(dt), k.to(dt), v, attn_mask, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v, attn_mask=attn_mask, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, ``pool=True``) to padded prompt tokens."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, pool: bool = False, proj_drop: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.pool = num_heads, embed_dim // num_heads, pool
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.caching = False
        self.cached_kv: tuple[Tensor, Tensor] | None = None

    def kv_caching(self, enable: bool) -> None:
        """During sampling the prompt is fixed: project its keys/values once, not once per scale."""
        self.caching, self.cached_kv = enable, None

    def _keys_values(self, text: TextKV) -> tuple[Tensor, Tensor]:
        if self.caching and self.cached_kv is not None:
            return self.cached_kv
        b, n, _ = text.kv.shape
        bias = torch.cat([self.zero_k_bias, self.v_bias])
        kv = F.linear(text.kv, self.mat_kv.weight, bias).view(b, n, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, Lk, c)
        if self.caching:
            self.cached_kv = (k, v)
        return k, v

    def forward(self, x: Tensor | None, text: TextKV) -> Tensor:
        k, v = self._keys_values(text)
        b = k.shape[0]
        if self.pool:
            q = self.mat_q.to(v.dtype).unsqueeze(2).expand(b, -1, -1, -1)  # (B, H, 1, c)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        mask = text.mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.to(v.dtype), k, v, attn_mask=mask)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        return out.squeeze(1) if self.pool else out


class TextAttentivePool(nn.Module):
    """Pools a prompt into one vector with a learned query (``text_proj_for_sos.ca``)."""

    def __init__(self, text_dim: int, embed_dim: int) -> None:
        super().__init__()
        head_dim = 64 if embed_dim > 4096 else 128
        num_heads = text_dim // head_dim
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"the text pool needs text_channels // {head_dim} >= 1 heads dividing embed_dim; "
                f"got text_channels={text_dim}, embed_dim={embed_dim}"
            )
        self.ca = CrossAttention(embed_dim, text_dim, num_heads, pool=True)

    def forward(self, text: TextKV) -> Tensor:
        return self.ca(None, text)


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, embed_dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, embed_dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


# --------------------------------------------------------------------------------------------
# AdaLN
# --------------------------------------------------------------------------------------------


class SharedAdaLin(nn.Linear):
    """The model-wide AdaLN projection: (B, C) -> (B, 1, 6, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).view(-1, 1, 6, self.out_features // 6)


def ada_layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """LN(x) * (1 + scale) + shift in fp32 (no affine LN)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale) + shift


class CrossAttnBlock(nn.Module):
    """One Infinity block: AdaLN self-attention, cross-attention to the prompt, AdaLN FFN."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ffn_hidden: int,
        shared_aln: bool = True,
        norm_eps: float = 1e-6,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.C, self.shared_aln, self.norm_eps = embed_dim, shared_aln, norm_eps
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sa = SelfAttention(embed_dim, num_heads, proj_drop=drop)
        self.ca = CrossAttention(embed_dim, embed_dim, num_heads, proj_drop=drop)
        self.ffn = FFN(embed_dim, ffn_hidden, drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=True)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def kv_caching(self, enable: bool) -> None:
        """Enable or clear both attention caches."""
        self.sa.kv_caching(enable)
        self.ca.kv_caching(enable)

    def forward(self, x: Tensor, cond: Tensor, text: TextKV, attn_mask: AttentionMask, rope: Tensor) -> Tensor:
        """``cond`` is the shared AdaLN output (B, 1, 6, C), or the pooled text (B, C) when not shared."""
        with no_autocast(x.device.type):
            table = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond.float()).view(-1, 1, 6, self.C)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = table.unbind(2)
            h = ada_layer_norm(x, scale1, shift1, self.norm_eps)
        x = x + self.drop_path(self.sa(h, attn_mask, rope).float() * gamma1)
        x = x + self.ca(self.ca_norm(x), text).float()
        with no_autocast(x.device.type):
            h = ada_layer_norm(x, scale2, shift2, self.norm_eps)
        return x + self.drop_path(self.ffn(h).float() * gamma2)


class AdaLNBeforeHead(nn.Module):
    """AdaLN on the last hidden state, conditioned on the pooled text (order: scale, shift)."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x.float()) * (1 + scale) + shift


class BlockChunk(nn.Module):
    """A group of consecutive blocks (official ``MultipleLayers``: keys ``block_chunks.i.module.j``)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)
