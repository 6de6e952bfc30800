"""The plain-torch MoE kernels: the reference every other implementation is tested against.

Runs on any device. Each weight view is decoded (e2m1 x e4m3, exact in bf16) into one `[E, N, K]`
scratch tensor segment by segment, in expert order, then a single `torch._grouped_mm` runs over all
experts. Because the decode is exact and the GEMM sees the same bytes whatever the segmentation, a
view of one segment (replicated) and a view of N segments (DWDP) give bit-identical results.
The global scale is applied in fp32 after the GEMM, as a fused epilogue would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import RoutingPlan, WeightView
from .nvfp4 import ROWS, NVFP4Weights, check_layout, decode, fake_quantize_activations


def decode_view(view: WeightView, dtype: torch.dtype, decode_into=None) -> torch.Tensor:
    """All experts of a view decoded (no global scale) into one `[E, N, K]` tensor, in expert order."""
    check_layout(view, ROWS, "decoding a weight view")
    out = torch.empty(view.num_experts, view.n, view.k, dtype=dtype, device=view.segments[0].device)
    start = 0
    for seg in view.segments:
        stop = start + seg.num_experts
        if decode_into is None:
            out[start:stop] = decode(seg, dtype)
        else:
            decode_into(seg, out[start:stop])
        start = stop
    return out


def finalize_coef(plan: RoutingPlan, w2: WeightView) -> torch.Tensor:
    """[T, k] fp32: what FC2's finalize multiplies each of a token's rows by, router weight / global scale."""
    return plan.token_weights / w2.global_scales()[plan.token_experts]


def grouped_gemm(rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """rows `[R, K]` x per-expert weights `[E, N, K]` -> `[R, N]`; rows past the last expert are undefined."""
    return torch._grouped_mm(rows, weights.transpose(1, 2), offs=plan.group_ends())


class TorchReferenceKernels:
    """`act_quant`: quantise-dequantise FC1's and FC2's inputs to NVFP4 (W4A4 numerics).

    The memory-bound steps are methods (`decode_into`, `swiglu`, `reduce_rows`) so that a faster
    implementation of the same structure overrides just those (kernels/grouped.py)."""

    name = "torch"
    layouts = (ROWS, ROWS)
    decode_into = None  # (weights, out) -> None; None: nvfp4.decode

    def __init__(self, act_quant: bool = False):
        self.act_quant = act_quant

    def prepare_experts(self, w13: NVFP4Weights, w2: NVFP4Weights) -> tuple[NVFP4Weights, NVFP4Weights]:
        """The weights as they come: these kernels read the `rows` layout."""
        return w13, w2

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activations(x) if self.act_quant else x

    def fc1(self, x: torch.Tensor, plan: RoutingPlan, w13: WeightView) -> torch.Tensor:
        if plan.num_tokens == 0:
            return x.new_zeros(plan.num_rows, w13.n // 2)
        y = grouped_gemm(self._input(x)[plan.row_token], decode_view(w13, x.dtype, self.decode_into), plan)
        return self.swiglu(y, (1.0 / w13.global_scales())[plan.row_expert])

    def fc2(self, h: torch.Tensor, plan: RoutingPlan, w2: WeightView) -> torch.Tensor:
        if plan.num_tokens == 0:
            return h.new_zeros(0, w2.n)
        z = grouped_gemm(self._input(h), decode_view(w2, h.dtype, self.decode_into), plan)
        return self.reduce_rows(z, plan.token_rows, finalize_coef(plan, w2))

    def swiglu(self, y: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of `[R, 2I]` rows, each row first times its expert's 1 / global scale (fp32)."""
        gate, up = (y.float() * inv_scale.unsqueeze(1)).chunk(2, dim=-1)
        return (F.silu(gate) * up).to(y.dtype)

    def reduce_rows(self, rows: torch.Tensor, token_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_j coef[t, j] * rows[token_rows[t, j]], in fp32, j in order (deterministic).
        FC2's finalize; EP's combine uses it too, to sum the rows that come back to each token."""
        out = torch.zeros(token_rows.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
        for j in range(token_rows.shape[1]):
            out += coef[:, j : j + 1] * rows[token_rows[:, j]].float()
        return out.to(rows.dtype)
