"""The DeepSeek-V3 architecture in plain PyTorch, for packed variable-length prefill and cached decode.

    x = embed(tokens)
    for each layer:  x = x + MLA(rmsnorm(x));  x = x + FFN(rmsnorm(x))
        FFN = dense SwiGLU (first_k_dense_replace layers) or MoE: shared experts + routed experts
    logits = lm_head(rmsnorm(x))

Prefill takes several sequences packed into one token dimension (`seq_lens`), each attending causally
to itself only. MLA keeps DeepSeek's split: a compressed kv (kv_lora_rank, RMS-normed) expanded per
head to k_nope and v, plus one rope key shared by all heads; rope rotates adjacent pairs of the rope
dims (DeepSeek's interleaved layout), with YaRN when the config has rope scaling.

Routed experts are reached only through a `RoutedExperts` object (the parallel strategy), so the same
model runs replicated, DWDP and EP. The forward pass is a generator: a strategy that communicates
yields after issuing an asynchronous collective, which lets a scheduler interleave two micro-batches
(EP with overlap); `Model.forward` simply runs it to the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator, Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .timeline import Timeline
from .weights import AttentionWeights, DenseWeights, MLPWeights, RouterWeights

Steps = Generator[None, None, torch.Tensor]


class RoutedExperts(Protocol):
    """Computes the routed-expert part of MoE layers; implemented by the parallel strategies."""

    def begin_forward(self) -> None: ...

    def routed(self, moe_layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Steps:
        """Weighted sum of each token's chosen experts, `[T, H]`. A generator: yields while waiting."""
        ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w.down)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


class Rope:
    """Rotary embedding of the rope half of q and k (YaRN-scaled when configured)."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        inv_freq = 1.0 / base**exponents
        self.mscale = 1.0
        rs = cfg.rope_scaling
        if rs is not None and rs.factor > 1:
            def correction_dim(rotations: float) -> float:
                return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(correction_dim(rs.beta_fast)), 0)
            high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
            ramp = (torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)
            extrapolate = 1.0 - ramp.clamp(0, 1)  # 1: keep the original frequency (high frequencies)
            inv_freq = inv_freq / rs.factor * (1 - extrapolate) + inv_freq * extrapolate
            self.mscale = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
        self.inv_freq = inv_freq.float()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.mscale, freqs.sin() * self.mscale

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[T, heads, d]`; rotates pairs (x[2i], x[2i+1]) by position-dependent angles."""
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        scale *= _yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


@dataclass
class KVCache:
    """Per-layer keys `[B, S, heads, qk]` and values `[B, S, heads, v]` of B sequences, and their lengths."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] int64, on the host

    @staticmethod
    def allocate(cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        heads = cfg.num_attention_heads
        # Zeros, not empty: decode attends over the longest sequence's span with a mask, and a masked
        # position still multiplies its value row by a zero weight; garbage there can be NaN.
        return KVCache(
            keys=[torch.zeros(batch, max_len, heads, cfg.qk_head_dim, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            values=[torch.zeros(batch, max_len, heads, cfg.v_head_dim, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            lengths=torch.zeros(batch, dtype=torch.long),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, Sq, h, d]`, k `[B, Sk, h, d]`, v `[B, Sk, h, dv]` -> `[B, Sq, h, dv]`.

    On CUDA the cuDNN backend is asked for first: on H200 it runs MLA's shapes (qk 192, v 128) about
    twice as fast as the flash backend, which would also need v padded to 192.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


class Model:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: DenseWeights,
        experts: RoutedExperts,
        timeline: Timeline | None = None,
    ):
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.rope = Rope(cfg, self.device)
        self.scale = softmax_scale(cfg)
        self.timeline = timeline or Timeline(self.device, enabled=False)

    # ---- attention -------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor, aw: AttentionWeights, positions: torch.Tensor):
        c = self.cfg
        heads = c.num_attention_heads
        if aw.q_proj is not None:
            q = F.linear(x, aw.q_proj)
        else:
            q = F.linear(rms_norm(F.linear(x, aw.q_a_proj), aw.q_a_norm, c.rms_norm_eps), aw.q_b_proj)
        q = q.view(-1, heads, c.qk_head_dim)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        kv_a = F.linear(x, aw.kv_a_proj)
        latent, k_rope = kv_a.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = F.linear(rms_norm(latent, aw.kv_a_norm, c.rms_norm_eps), aw.kv_b_proj).view(-1, heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        cos, sin = self.rope.cos_sin(positions)
        q = torch.cat([q_nope, Rope.apply(q_rope, cos, sin)], dim=-1)
        k_rope = Rope.apply(k_rope.unsqueeze(1), cos, sin).expand(-1, heads, -1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return q, k, v

    def _attention_prefill(self, x, aw, layer, seq_lens, positions, cache, slots):
        q, k, v = self._qkv(x, aw, positions)
        outs = []
        start = 0
        for i, n in enumerate(seq_lens):
            qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
            if cache is not None:
                cache.keys[layer][slots[i], :n] = ks
                cache.values[layer][slots[i], :n] = vs
            outs.append(_sdpa(qs[None], ks[None], vs[None], self.scale, causal=True)[0])
            start += n
        o = torch.cat(outs) if outs else q.new_empty(0, self.cfg.num_attention_heads, self.cfg.v_head_dim)
        return F.linear(o.flatten(1), aw.o_proj)

    def _attention_decode(self, x, aw, layer, cache: KVCache, slots: torch.Tensor):
        positions = cache.lengths[slots].to(self.device)
        q, k, v = self._qkv(x, aw, positions)
        slots_dev = slots.to(self.device)
        cache.keys[layer][slots_dev, positions] = k
        cache.values[layer][slots_dev, positions] = v
        span = int(cache.lengths[slots].max()) + 1 if len(slots) else 1
        keys, values = cache.keys[layer][slots_dev, :span], cache.values[layer][slots_dev, :span]
        mask = torch.arange(span, device=self.device)[None, :] <= positions[:, None]  # [B, span]
        o = _sdpa(q[:, None], keys, values, self.scale, causal=False, mask=mask[:, None, None, :])[:, 0]
        return F.linear(o.flatten(1), aw.o_proj)

    # ---- MoE ---------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, router: RouterWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3 routing: sigmoid scores; choose with the correction bias, group-limited; weight
        with the unbiased scores, normalised, times routed_scaling_factor."""
        c = self.cfg
        scores = torch.sigmoid(F.linear(x.float(), router.weight))
        choice = scores + router.bias
        if c.n_group > 1:
            grouped = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        idx = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * c.routed_scaling_factor

    def _moe(self, x: torch.Tensor, layer: int) -> Steps:
        lw = self.w.layers[layer]
        idx, weights = self.route(x, lw.router)
        shared = swiglu_mlp(x, lw.mlp) if lw.mlp is not None else None
        routed = yield from self.experts.routed(self.cfg.moe_index(layer), x, idx, weights)
        return routed if shared is None else routed + shared

    # ---- whole model ---------------------------------------------------------------------------
    def forward_steps(
        self,
        tokens: torch.Tensor,
        seq_lens: list[int] | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        logits: str = "last",
    ) -> Steps:
        """Prefill (`seq_lens` given: packed sequences starting at position 0) or one decode step
        (`seq_lens` None: one new token per cache slot). `logits`: "last" token of each sequence,
        "all" tokens, or "none" (the final hidden states)."""
        c, tl = self.cfg, self.timeline
        decode = seq_lens is None
        if decode:
            if cache is None or slots is None:
                raise ValueError("a decode step needs a KV cache and the cache slots of its sequences")
        else:
            if sum(seq_lens) != tokens.numel():
                raise ValueError(f"seq_lens sum to {sum(seq_lens)} but {tokens.numel()} tokens were given")
            if cache is not None and max(seq_lens, default=0) > cache.max_len:
                raise ValueError(f"a sequence of {max(seq_lens)} tokens does not fit a KV cache of {cache.max_len}")
            positions = torch.cat([torch.arange(n, device=self.device) for n in seq_lens]) if seq_lens else tokens.new_empty(0)
        x = F.embedding(tokens.to(self.device), self.w.embed)
        for layer, lw in enumerate(self.w.layers):
            tl.mark("attention", layer)
            h = rms_norm(x, lw.input_norm, c.rms_norm_eps)
            if decode:
                x = x + self._attention_decode(h, lw.attention, layer, cache, slots)
            else:
                x = x + self._attention_prefill(h, lw.attention, layer, seq_lens, positions, cache, slots)
            h = rms_norm(x, lw.post_attention_norm, c.rms_norm_eps)
            if c.is_moe_layer(layer):
                tl.mark("moe", layer)
                x = x + (yield from self._moe(h, layer))
            else:
                tl.mark("dense_mlp", layer)
                x = x + swiglu_mlp(h, lw.mlp)
        tl.mark("head", c.num_hidden_layers)
        if decode:
            cache.lengths[slots] += 1
        elif cache is not None:
            cache.lengths[slots] = torch.tensor(seq_lens, dtype=torch.long)
        if logits == "none":
            return x
        if logits == "last" and not decode:
            ends = torch.tensor(seq_lens, dtype=torch.long, device=self.device).cumsum(0) - 1
            x = x[ends]
        return F.linear(rms_norm(x, self.w.final_norm, c.rms_norm_eps), self.w.lm_head).float()

    def forward(self, tokens: torch.Tensor, seq_lens: list[int] | None = None, **kw) -> torch.Tensor:
        self.experts.begin_forward()
        return run_steps(self.forward_steps(tokens, seq_lens, **kw))


def run_steps(steps: Steps) -> torch.Tensor:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
