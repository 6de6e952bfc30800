"""An independent float64 re-implementation of DeepSeek-V3 prefill, written for clarity, not speed.

Nothing here calls the project's model, kernels or NVFP4 code: NVFP4 is decoded from the raw bytes,
attention is an explicit softmax per sequence and head, rope rotates complex numbers, and the MoE
loops over tokens and their chosen experts one by one.
"""

from __future__ import annotations

import math

import torch

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """[E, N, K/2] bytes, [E, N, K/16] e4m3, [E] fp32 -> [E, N, K] float64."""
    e, n, half = packed.shape
    out = torch.empty(e, n, half * 2, dtype=torch.float64)
    lut = torch.tensor([v for v in E2M1] + [-v for v in E2M1], dtype=torch.float64)
    out[..., 0::2] = lut[(packed & 0xF).long()]
    out[..., 1::2] = lut[(packed >> 4).long()]
    scale = block_scale.to(torch.float64).repeat_interleave(16, dim=-1)
    return out * scale / global_scale.to(torch.float64)[:, None, None]


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_inv_freq(cfg) -> tuple[torch.Tensor, float]:
    d = cfg.qk_rope_head_dim
    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1:
        return inv, 1.0

    def dim_for(rot):
        return d * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    lo, hi = max(math.floor(dim_for(rs.beta_fast)), 0), min(math.ceil(dim_for(rs.beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001
    mixed = []
    for i in range(d // 2):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        keep = 1.0 - ramp
        mixed.append(inv[i].item() / rs.factor * (1 - keep) + inv[i].item() * keep)

    def ms(m):
        return 0.1 * m * math.log(rs.factor) + 1.0

    return torch.tensor(mixed, dtype=torch.float64), ms(rs.mscale) / ms(rs.mscale_all_dim)


def rope(x: torch.Tensor, pos: int, inv: torch.Tensor, mscale: float) -> torch.Tensor:
    """x [..., d]: pairs (x[2i], x[2i+1]) as complex numbers times e^{i pos f_i}."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    z = z * torch.polar(torch.full_like(inv, mscale), pos * inv)
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def attention(cfg, aw, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    f = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    heads, nope, rd, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    inv, mscale = rope_inv_freq(cfg)
    scale = (nope + rd) ** -0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        scale *= (0.1 * cfg.rope_scaling.mscale_all_dim * math.log(cfg.rope_scaling.factor) + 1.0) ** 2
    out = torch.zeros(x.shape[0], heads * vd, dtype=torch.float64)
    start = 0
    for n in seq_lens:
        xs = x[start : start + n]
        if aw.q_proj is not None:
            q = xs @ f(aw.q_proj).T
        else:
            q = rms(xs @ f(aw.q_a_proj).T, f(aw.q_a_norm), cfg.rms_norm_eps) @ f(aw.q_b_proj).T
        q = q.view(n, heads, nope + rd)
        kv_a = xs @ f(aw.kv_a_proj).T
        latent, k_rope = kv_a[:, : cfg.kv_lora_rank], kv_a[:, cfg.kv_lora_rank :]
        kv = (rms(latent, f(aw.kv_a_norm), cfg.rms_norm_eps) @ f(aw.kv_b_proj).T).view(n, heads, nope + vd)
        for h in range(heads):
            qs = torch.stack([torch.cat([q[i, h, :nope], rope(q[i, h, nope:], i, inv, mscale)]) for i in range(n)])
            ks = torch.stack([torch.cat([kv[i, h, :nope], rope(k_rope[i], i, inv, mscale)]) for i in range(n)])
            vs = kv[:, h, nope:]
            for i in range(n):
                logits = (ks[: i + 1] @ qs[i]) * scale
                p = torch.exp(logits - logits.max())
                out[start + i, h * vd : (h + 1) * vd] = (p / p.sum()) @ vs[: i + 1]
        start += n
    return out @ f(aw.o_proj).T


def swiglu(x, gate_up, down):
    inter = gate_up.shape[0] // 2
    g, u = x @ gate_up[:inter].T, x @ gate_up[inter:].T
    return (g / (1 + torch.exp(-g)) * u) @ down.T


def route(cfg, router, x):
    """Per token: the chosen experts and their weights, by the DeepSeek-V3 rules."""
    chosen = []
    e, groups = cfg.n_routed_experts, cfg.n_group
    per = e // groups
    for t in range(x.shape[0]):
        scores = 1 / (1 + torch.exp(-(router.weight.to(torch.float64) @ x[t])))
        biased = scores + router.bias.to(torch.float64)
        allowed = list(range(e))
        if groups > 1:
            gscore = [sorted(biased[g * per : (g + 1) * per].tolist())[-2:] for g in range(groups)]
            best = sorted(range(groups), key=lambda g: -sum(gscore[g]))[: cfg.topk_group]
            allowed = [i for i in range(e) if i // per in best]
        top = sorted(allowed, key=lambda i: -biased[i].item())[: cfg.num_experts_per_tok]
        w = scores[top]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        chosen.append((top, (w * cfg.routed_scaling_factor).tolist()))
    return chosen


def moe(cfg, layer_weights, experts_w13, experts_w2, x):
    """experts_w13 [E, 2I, H], experts_w2 [E, H, I] in float64."""
    out = torch.zeros_like(x)
    for t, (idx, ws) in enumerate(route(cfg, layer_weights.router, x)):
        for e, w in zip(idx, ws):
            out[t] += w * swiglu(x[t : t + 1], experts_w13[e], experts_w2[e])[0]
    if layer_weights.mlp is not None:
        out += swiglu(x, layer_weights.mlp.gate_up.to(torch.float64), layer_weights.mlp.down.to(torch.float64))
    return out


def forward(cfg, dense, experts: dict[int, tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """All-token logits [T, vocab] in float64. `experts[layer]` = float64 (W13, W2) of all experts."""
    x = dense.embed.to(torch.float64)[tokens]
    for i, lw in enumerate(dense.layers):
        x = x + attention(cfg, lw.attention, rms(x, lw.input_norm.to(torch.float64), cfg.rms_norm_eps), seq_lens)
        h = rms(x, lw.post_attention_norm.to(torch.float64), cfg.rms_norm_eps)
        if cfg.is_moe_layer(i):
            x = x + moe(cfg, lw, *experts[i], h)
        else:
            x = x + swiglu(h, lw.mlp.gate_up.to(torch.float64), lw.mlp.down.to(torch.float64))
    return rms(x, dense.final_norm.to(torch.float64), cfg.rms_norm_eps) @ dense.lm_head.to(torch.float64).T
