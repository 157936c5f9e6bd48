"""Infinity: the bitwise next-scale autoregressive text-to-image transformer.

Module names and state-dict keys follow the official FoundationVision/Infinity release, so
its checkpoints load strictly (see ``scenetxtvar.checkpoint.load_infinity``). The sampler lives
beside the model it samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..bitwise import BitwiseCodes
from ..codes import CodeSpace
from ..scales import normalize_schedule, scale_lengths
from ..text import PackedText, as_packed_text
from .layers import (
    AdaLNBeforeHead,
    AttentionMask,
    BlockChunk,
    CrossAttnBlock,
    RMSNorm,
    Rope2D,
    ScaleCausalMask,
    SharedAdaLin,
    TextAttentivePool,
    TextKV,
    no_autocast,
    pad_packed,
)

# A hook run on the hidden state before base block i (InfinityPilot fuses its CAR features here).
BlockHook = Callable[[int, Tensor], Tensor]


@dataclass
class InferenceOutput:
    """What ``autoregressive_infer_cfg`` returns."""

    summed_codes: Tensor  # (B, dq, h_K, w_K) on the tokenizer latent grid: what the decoder takes
    scale_bits: list[Tensor]  # per scale: bits (B, 1, h, w, dq) int64 in {0, 1}; VQ: indices (B, h*w)
    scale_logits: list[Tensor] | None = None  # per scale (rows, h*w, V) before 1/tau and CFG
    image: Tensor | None = None  # (B, 3, H, W) in [-1, 1] when a tokenizer was given


@dataclass
class GuidancePlan:
    """Sampling branches (one prompt batch each) and, per scale, the weights that mix their logits."""

    texts: list[PackedText]
    weights: list[list[float]]  # [scale][branch]; each row sums to 1


@dataclass
class TextContext:
    """Everything the blocks need from the prompt, computed once per forward."""

    cond_BD: Tensor  # (B, C) pooled prompt: SOS token and head conditioning
    cond: Tensor  # AdaLN input of the blocks: (B, 1, 6, C) shared, else cond_BD
    text: TextKV  # projected prompt tokens for cross-attention


def ffn_hidden_size(embed_dim: int, mlp_ratio: float) -> int:
    """Official FFN width: round(C * mlp_ratio / 256) * 256 (Python round, half-to-even)."""
    return round(embed_dim * mlp_ratio / 256) * 256


class Infinity(nn.Module):
    """Official-compatible Infinity transformer with a bitwise (2d) or index (V) head."""

    def __init__(
        self,
        *,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        ffn_hidden: int | None = None,
        text_channels: int = 2048,
        text_maxlen: int = 512,
        codebook_dim: int = 32,
        apply_spatial_patchify: bool = False,
        vocab_size: int = 0,
        shared_aln: bool = True,
        block_chunks: int = 1,
        num_scale_embeddings: int = 15,
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cond_drop_rate: float = 0.1,
        checkpointing: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if block_chunks < 1 or depth % block_chunks:
            raise ValueError(f"depth {depth} must be divisible by block_chunks {block_chunks}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.depth, self.C, self.num_heads = depth, embed_dim, num_heads
        self.text_channels, self.text_maxlen = text_channels, text_maxlen
        self.codebook_dim, self.apply_spatial_patchify = codebook_dim, bool(apply_spatial_patchify)
        # Token width d: bits per token (x4 with 2x2 patchify) or the VQ code width.
        self.d = codebook_dim * (4 if self.apply_spatial_patchify else 1)
        self.vocab_size = vocab_size
        self.bitwise = vocab_size == 0
        self.V = 2 * self.d if self.bitwise else vocab_size
        self.shared_aln, self.norm_eps = shared_aln, norm_eps
        self.cond_drop_rate, self.checkpointing = cond_drop_rate, checkpointing
        self.num_block_chunks, self.drop_path_rate = block_chunks, drop_path_rate
        hidden = ffn_hidden or ffn_hidden_size(embed_dim, mlp_ratio)
        self.ffn_hidden = hidden

        # Text path (fp32): null prompt for CFG, norm, attentive pool (SOS), projection for CA.
        self.cfg_uncond = nn.Parameter(torch.empty(text_maxlen, text_channels))
        self.pos_start = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.text_norm = RMSNorm(text_channels, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, embed_dim)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(text_channels, embed_dim), nn.GELU(approximate="tanh"), nn.Linear(embed_dim, embed_dim)
        )
        self.lvl_embed = nn.Embedding(num_scale_embeddings, embed_dim)
        self.word_embed = nn.Linear(self.d, embed_dim)
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(embed_dim, 6 * embed_dim))

        # Registered before the blocks so the state dict has the official key order.
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        blocks = [
            CrossAttnBlock(embed_dim, num_heads, hidden, shared_aln, norm_eps, drop_rate, dpr[i]) for i in range(depth)
        ]
        if block_chunks > 1:
            n = depth // block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[i * n : (i + 1) * n]) for i in range(block_chunks))
        else:
            self.blocks = nn.ModuleList(blocks)

        self.rope = Rope2D(embed_dim // num_heads, base=rope_base)
        if not self.pos_start.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------ structure

    @property
    def block_list(self) -> list[CrossAttnBlock]:
        """All blocks in order, whatever the chunk layout."""
        if self.num_block_chunks > 1:
            return [blk for chunk in self.block_chunks for blk in chunk.module]
        return list(self.blocks)

    def init_weights(
        self,
        *,
        aln: float = 1e-3,
        aln_gamma: float = 5e-6,
        head_scale: float = 0.02,
        proj_scale: float = 1.0,
        seed: int | None = None,
    ) -> None:
        """Official initialisation (``init_weights`` + ``special_init``; released values by default)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = math.sqrt(1 / (3 * self.C))

        def tn(t: Tensor, s: float, a: float = -2.0, b: float = 2.0) -> None:
            with torch.no_grad():
                t.copy_(nn.init.trunc_normal_(torch.empty(t.shape), std=s, a=a, b=b, generator=gen))

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                tn(m.weight, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            # Null prompt: trunc-normal(1.2) from a fixed generator, scaled by 1/sqrt(Dt) (official).
            null = nn.init.trunc_normal_(
                torch.empty(self.cfg_uncond.shape),
                std=1.2,
                a=-2,
                b=2,
                generator=torch.Generator().manual_seed(0),
            )
            self.cfg_uncond.copy_(null / math.sqrt(self.text_channels))
            tn(self.pos_start, std)
            tn(self.text_proj_for_sos.ca.mat_q, std)
            self.text_norm.weight.fill_(1.0)
            self.head_nm.ada_lin[-1].weight.mul_(aln)
            self.head_nm.ada_lin[-1].bias.zero_()
            self.head.weight.mul_(head_scale)
            self.head.bias.zero_()
            for blk in self.block_list:
                blk.sa.scale_mul_1H11.fill_(math.log(4.0))
                blk.sa.q_bias.zero_()
                blk.sa.v_bias.zero_()
                blk.ca.v_bias.zero_()
                for lin in (blk.sa.proj, blk.ca.proj, blk.ffn.fc2):
                    lin.weight.div_(math.sqrt(2 * self.depth) / proj_scale)
                if self.shared_aln:
                    g = torch.randn(blk.ada_gss.shape, generator=gen) / math.sqrt(self.C)
                    g[..., :2, :] *= aln_gamma
                    g[..., 2:, :] *= aln
                    blk.ada_gss.copy_(g)
                else:
                    lin = blk.ada_lin[-1]
                    lin.weight.mul_(aln)
                    lin.bias.zero_()

    def kv_caching(self, enable: bool) -> None:
        """Enable (empty) or disable (free) the KV caches of every block."""
        for blk in self.block_list:
            blk.kv_caching(enable)

    # ------------------------------------------------------------------ shared pieces

    def check_schedule(self, schedule: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
        """Validate a scale schedule against this model."""
        sched = normalize_schedule(schedule)
        if len(sched) > self.lvl_embed.num_embeddings:
            raise ValueError(
                f"scale_schedule has {len(sched)} scales but lvl_embed has {self.lvl_embed.num_embeddings} rows"
            )
        if sched[0][1:] != (1, 1):
            raise ValueError(f"the first scale must be (1, 1, 1) (the SOS token), got {sched[0]}")
        return sched

    def encode_text(self, text: PackedText) -> TextContext:
        """Prompt -> pooled condition, AdaLN input and cross-attention memory (all fp32)."""
        if text.kv_compact.shape[1] != self.text_channels:
            raise ValueError(
                f"text features have {text.kv_compact.shape[1]} channels, the model expects {self.text_channels}"
            )
        if text.max_seqlen_k > self.text_maxlen:
            raise ValueError(f"a prompt has {text.max_seqlen_k} tokens, more than text_maxlen={self.text_maxlen}")
        with no_autocast(text.kv_compact.device.type):
            kv = self.text_norm(text.kv_compact)
            padded = pad_packed(kv, text.lens, text.cu_seqlens_k, text.max_seqlen_k)
            cond_BD = self.text_proj_for_sos(padded)
            memory = padded.with_kv(self.text_proj_for_ca(padded.kv))
            cond = self.shared_ada_lin(cond_BD) if self.shared_aln else cond_BD
        return TextContext(cond_BD, cond, memory)

    def null_text_like(self, text: PackedText) -> PackedText:
        """The unconditional prompt of each sample: ``cfg_uncond[:len_b]`` (same lengths)."""
        pos = torch.arange(text.kv_compact.shape[0], device=text.lens.device)
        pos = pos - torch.repeat_interleave(text.cu_seqlens_k[:-1].long(), text.lens)
        return PackedText(
            self.cfg_uncond[pos].to(text.kv_compact.dtype), text.lens, text.cu_seqlens_k, text.max_seqlen_k
        )

    def drop_text(self, text: PackedText, keep: Tensor) -> PackedText:
        """Replace the prompts with ``keep[b] == False`` by the null prompt (CFG training)."""
        null = self.null_text_like(text).kv_compact
        row_keep = torch.repeat_interleave(keep, text.lens)[:, None]
        return text._replace(kv_compact=torch.where(row_keep, text.kv_compact, null))

    def embed_scale_inputs(self, x_BLC: Tensor) -> Tensor:
        """Next-scale inputs (B, l, d) -> token embeddings (fp32)."""
        with no_autocast(x_BLC.device.type):
            return self.word_embed(x_BLC.float())

    def get_logits(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        """AdaLN-before-head + head, in fp32."""
        with no_autocast(h.device.type):
            return self.head(self.head_nm(h.float(), cond_BD.float()))

    def run_blocks(
        self,
        x: Tensor,
        ctx: TextContext,
        attn_mask: AttentionMask,
        rope: Tensor,
        hook: BlockHook | None = None,
    ) -> Tensor:
        """The block stack; ``hook(i, x)`` may rewrite the hidden state before block i."""
        ckpt = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.block_list):
            if hook is not None:
                x = hook(i, x)
            if ckpt:
                x = checkpoint(blk, x, ctx.cond, ctx.text, attn_mask, rope, use_reentrant=False)
            else:
                x = blk(x, ctx.cond, ctx.text, attn_mask, rope)
        return x

    @staticmethod
    def scale_ids(schedule: Sequence[Sequence[int]], device: torch.device) -> Tensor:
        """Scale index of every token (L,)."""
        lens = torch.tensor(scale_lengths(schedule), device=device)
        return torch.repeat_interleave(torch.arange(len(lens), device=device), lens)

    # ------------------------------------------------------------------ training forward

    def prepare_inputs(
        self, label_B_or_BLT, x_BLC_wo_prefix: Tensor, scale_schedule, text_keep: Tensor | None = None
    ) -> tuple[Tensor, TextContext, list[tuple[int, int, int]]]:
        """Validate and embed the teacher-forced inputs: (tokens (B, L, C) before the scale embedding,
        TextContext, schedule)."""
        sched = self.check_schedule(scale_schedule)
        text = as_packed_text(label_B_or_BLT)
        if x_BLC_wo_prefix.dim() != 3:
            raise ValueError(f"x_BLC_wo_prefix must be (B, L-1, d), got shape {tuple(x_BLC_wo_prefix.shape)}")
        b, n, d = x_BLC_wo_prefix.shape
        if text.batch_size != b:
            raise ValueError(f"the text batch has {text.batch_size} prompts but x_BLC_wo_prefix has batch {b}")
        expected = sum(scale_lengths(sched)) - 1
        if n != expected:
            raise ValueError(f"x_BLC_wo_prefix has {n} tokens; the schedule {sched} needs L-1 = {expected}")
        if d != self.d:
            raise ValueError(f"x_BLC_wo_prefix has width {d}, the model expects d={self.d}")
        if text_keep is None and self.training and self.cond_drop_rate > 0:
            text_keep = torch.rand(b, device=x_BLC_wo_prefix.device) >= self.cond_drop_rate
        if text_keep is not None:
            text = self.drop_text(text, text_keep.to(x_BLC_wo_prefix.device))
        ctx = self.encode_text(text)
        with no_autocast(x_BLC_wo_prefix.device.type):
            sos = ctx.cond_BD.unsqueeze(1) + self.pos_start
            tokens = torch.cat([sos, self.embed_scale_inputs(x_BLC_wo_prefix)], dim=1)
        return tokens, ctx, sched

    def scale_embedding(self, sched, device: torch.device) -> Tensor:
        """``lvl_embed`` of every token (L, C): added once, before the first block."""
        return self.lvl_embed(self.scale_ids(sched, device))

    def forward(
        self, label_B_or_BLT, x_BLC_wo_prefix: Tensor, scale_schedule, text_keep: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced logits (B, L, V) for all scales at once (block-causal attention).

        ``text_keep`` (B,) bool overrides the random CFG prompt drop of training mode.
        """
        tokens, ctx, sched = self.prepare_inputs(label_B_or_BLT, x_BLC_wo_prefix, scale_schedule, text_keep)
        mask, rope = self.attention_inputs(sched, tokens.device)
        x = tokens + self.scale_embedding(sched, tokens.device)
        return self.get_logits(self.run_blocks(x, ctx, mask, rope), ctx.cond_BD)

    def attention_inputs(self, sched, device: torch.device) -> tuple[ScaleCausalMask, Tensor]:
        """Block-causal mask (L, L; a token sees its own and coarser scales) and RoPE tables."""
        ids = self.scale_ids(sched, device)
        last_start = sum(scale_lengths(sched)[:-1])
        return ScaleCausalMask(ids[:, None] >= ids[None, :], last_start), self.rope.table(sched, device)

    # ------------------------------------------------------------------ sampler

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        vae: nn.Module | None = None,
        scale_schedule: Sequence[Sequence[int]] | None = None,
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
    ) -> InferenceOutput:
        """Sample scale by scale with KV caches, classifier-free guidance and a seeded generator.

        Guidance: ``logits = cfg * cond + (1 - cfg) * uncond`` (after ``1 / tau``), the
        unconditional prompt being ``cfg_uncond[:len_b]`` or ``negative_label_B_or_BLT``.
        ``cfg_insertion_layer`` 0 mixes logits; ``-m`` mixes hidden states after block
        ``depth - m``. With ``gt_leak = k`` the first k scales take the labels in ``gt_ls_Bl``
        instead of sampling (teacher-forced inference).
        """
        sched, text, cfgs = self._sampling_inputs(scale_schedule, label_B_or_BLT, B, cfg_list)
        if any(c != 1.0 for c in cfgs):
            plan = GuidancePlan([text, self._negative(text, negative_label_B_or_BLT, B)], [[c, 1.0 - c] for c in cfgs])
        else:
            plan = GuidancePlan([text], [[1.0]] * len(sched))
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

    def _sampling_inputs(self, scale_schedule, label_B_or_BLT, B: int, cfg_list):
        if scale_schedule is None or label_B_or_BLT is None:
            raise ValueError("scale_schedule and label_B_or_BLT are required")
        sched = self.check_schedule(scale_schedule)
        text = as_packed_text(label_B_or_BLT)
        if text.batch_size != B:
            raise ValueError(f"the text batch has {text.batch_size} prompts but B={B}")
        return sched, text, _per_scale(cfg_list, len(sched), "cfg_list")

    def _negative(self, text: PackedText, negative_label_B_or_BLT, B: int) -> PackedText:
        """The unconditional prompts: the learned null prompt, or the user's negative prompts."""
        if negative_label_B_or_BLT is None:
            return self.null_text_like(text)
        neg = as_packed_text(negative_label_B_or_BLT)
        if neg.batch_size != B:
            raise ValueError(f"the negative prompt batch has {neg.batch_size} prompts but B={B}")
        return neg.to(text.kv_compact.device)

    def scale_hook(
        self, k: int, tokens: Tensor, ctx: TextContext, rope: Tensor, rows_per_branch: int
    ) -> BlockHook | None:
        """A hook on the base blocks at sampling scale k (none here; InfinityPilot fuses its control)."""
        return None

    def _sample(
        self,
        vae,
        sched,
        plan: GuidancePlan,
        B: int,
        *,
        g_seed,
        tau_list,
        top_k,
        top_p,
        cfg_insertion_layer,
        gt_leak,
        gt_ls_Bl,
        return_logits,
    ) -> InferenceOutput:
        """The KV-cached sampling loop over guidance branches (each B rows, stacked)."""
        num_scales, n = len(sched), len(plan.texts)
        taus = _per_scale(tau_list, num_scales, "tau_list")
        insertion = _insertion_layer(cfg_insertion_layer, self.depth) if n > 1 else None
        if gt_leak and (gt_ls_Bl is None or len(gt_ls_Bl) < gt_leak):
            raise ValueError(f"gt_leak={gt_leak} needs at least that many entries in gt_ls_Bl")
        device = self.pos_start.device
        texts = [t.to(device) for t in plan.texts]
        ctx = self.encode_text(texts[0] if n == 1 else _concat_text(texts))
        gen = torch.Generator(device=device).manual_seed(g_seed) if g_seed is not None else None
        rotation = self.rope.table(sched, device)
        offsets = [0, *torch.tensor(scale_lengths(sched)).cumsum(0).tolist()]
        blocks = self.block_list
        state = self.code_space(vae).sampler(sched, B, device)

        def mix(t: Tensor, weights: list[float]) -> Tensor:
            return sum(w * t[j * B : (j + 1) * B] for j, w in enumerate(weights))

        with no_autocast(device.type):
            tokens = ctx.cond_BD.unsqueeze(1) + self.pos_start
        scale_logits = []
        self.kv_caching(True)
        try:
            for k in range(num_scales):
                rope = rotation[offsets[k] : offsets[k + 1]]
                hook = self.scale_hook(k, tokens, ctx, rope, B)
                x = tokens + self.lvl_embed.weight[k]
                for i, blk in enumerate(blocks):
                    if hook is not None:
                        x = hook(i, x)
                    x = blk(x, ctx.cond, ctx.text, None, rope)
                    if insertion is not None and i == insertion:
                        # Guidance inside the stack: mix once, then carry the mixed state in every branch.
                        x = mix(x, plan.weights[k]).repeat(n, 1, 1)
                if insertion is not None:
                    logits = self.get_logits(x[:B], ctx.cond_BD[:B])
                    guided = logits / taus[k]
                else:
                    logits = self.get_logits(x, ctx.cond_BD)
                    guided = mix(logits / taus[k], plan.weights[k])
                if return_logits:
                    scale_logits.append(logits)
                forced = gt_ls_Bl[k] if k < gt_leak else None
                nxt = state.step(k, guided, top_k=top_k, top_p=top_p, generator=gen, forced=forced)
                if nxt is not None:
                    tokens = self.embed_scale_inputs(nxt).repeat(n, 1, 1)
        finally:
            self.kv_caching(False)

        image = vae.decode(state.summed) if vae is not None else None
        return InferenceOutput(state.summed, state.labels, scale_logits if return_logits else None, image)

    def code_space(self, vae: nn.Module | None = None) -> CodeSpace:
        """How this model's head maps to tokenizer codes: bits (BSQ) or indices (needs the VQ-VAE)."""
        if self.bitwise:
            if vae is not None and getattr(vae, "code_dim", self.codebook_dim) != self.codebook_dim:
                raise ValueError(f"the tokenizer has {vae.code_dim} bits per position, the model {self.codebook_dim}")
            return BitwiseCodes(self.codebook_dim, self.apply_spatial_patchify)
        from ..tokenizers.vq import VQVAE
        from ..tokenizers.vq_codes import IndexCodes

        if not isinstance(vae, VQVAE):
            raise ValueError("an index-head Infinity (vocab_size > 0) samples through its VQ-VAE: pass vae=<VQVAE>")
        codes = IndexCodes(vae)
        if (codes.token_dim, codes.head_dim) != (self.d, self.V):
            raise ValueError(
                f"VQ-VAE codes (Cvae={codes.token_dim}, V={codes.head_dim}) do not fit the model "
                f"(d={self.d}, V={self.V})"
            )
        return codes


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) < n:
        raise ValueError(f"{name} has {len(value)} entries, the schedule has {n} scales")
    return value[:n]


def _insertion_layer(cfg_insertion_layer: int | Sequence[int], depth: int) -> int | None:
    """None for guidance at the logits; otherwise the block index after which to mix."""
    layers = [cfg_insertion_layer] if isinstance(cfg_insertion_layer, int) else list(cfg_insertion_layer)
    if len(layers) != 1:
        raise ValueError(f"cfg_insertion_layer takes one value, got {layers}")
    layer = int(layers[0])
    if layer == 0:
        return None
    if not -depth <= layer < 0:
        raise ValueError(f"cfg_insertion_layer must be 0 (logits) or in [-{depth}, -1], got {layer}")
    return depth + layer


def _concat_text(texts: Sequence[PackedText]) -> PackedText:
    device = texts[0].kv_compact.device
    lens = torch.cat([t.lens.to(device) for t in texts])
    return as_packed_text((torch.cat([t.kv_compact.to(device) for t in texts]), lens, None, None))
