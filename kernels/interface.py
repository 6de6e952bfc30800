"""What every MoE kernel implementation takes and returns.

The MoE layer routes tokens once and permutes them into a contiguous per-expert layout (`RoutingPlan`);
then two kernels run:

    FC1  rows = x[plan.row_token]                     gather
         y    = rows @ W13[e]^T / global13[e]          grouped GEMM, one group per expert
         h    = silu(y[:, :I]) * y[:, I:]              SwiGLU (bf16 out)
    FC2  z    = h @ W2[e]^T / global2[e]               grouped GEMM
         out[t] = sum_j weight[t, j] * z[row(t, j)]    finalize: weighted reduce into token order

Expert weights come as a `WeightView`: the experts in global order as a list of segments (the local
experts in place, prefetched experts in their buffer), never merged into one tensor. Replicated, DWDP
and EP all call the same kernels with different views, so the strategies differ in where weights come
from and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .nvfp4 import NVFP4Weights


class UnsupportedCase(ValueError):
    """A kernel set cannot run this input (its shape or size is outside what the kernels address): a
    limit of the implementation, not a bug; benchmarks report the case as not measured."""


@dataclass
class WeightView:
    """One expert weight tensor (W13 `[E, 2I, H]` or W2 `[E, H, I]`) as segments in expert order."""

    segments: Sequence[NVFP4Weights]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a WeightView needs at least one segment")
        shapes = {s.shape[1:] for s in self.segments}
        if len(shapes) != 1:
            raise ValueError(f"all segments of a WeightView must share [N, K]; got {sorted(shapes)}")
        layouts = {s.layout for s in self.segments}
        if len(layouts) != 1:
            raise ValueError(f"all segments of a WeightView must share one layout; got {sorted(layouts)}")

    @property
    def num_experts(self) -> int:
        return sum(s.num_experts for s in self.segments)

    @property
    def n(self) -> int:
        return self.segments[0].shape[1]

    @property
    def k(self) -> int:
        return self.segments[0].shape[2]

    @property
    def layout(self) -> str:
        return self.segments[0].layout

    def global_scales(self) -> torch.Tensor:
        """[E] fp32 global scales in expert order (a few hundred bytes: concatenating them is no merge)."""
        return torch.cat([s.global_scale for s in self.segments])


@dataclass
class ExpertWeights:
    """The two weight views of one MoE layer."""

    w13: WeightView  # [E, 2I, H]: gate rows first, then up rows
    w2: WeightView  # [E, H, I]

    @property
    def num_experts(self) -> int:
        return self.w13.num_experts


@dataclass
class RoutingPlan:
    """Where each (token, choice) pair lives in the permuted, per-expert-contiguous row layout.

    Rows of expert e are `[expert_offsets[e], expert_offsets[e + 1])`; each expert's row count is padded
    up to `align` (padding rows gather token 0 and are never read back). The number of rows is the
    static bound `T * k + E * (align - 1)` so that building a plan never waits on the GPU.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    align: int
    expert_offsets: torch.Tensor  # [E + 1] int64
    row_token: torch.Tensor  # [R] int64: source token of each permuted row
    row_expert: torch.Tensor  # [R] int64: expert of each permuted row (rows past the end: E - 1)
    token_rows: torch.Tensor  # [T, k] int64: permuted row of each (token, choice)
    token_experts: torch.Tensor  # [T, k] int64
    token_weights: torch.Tensor  # [T, k] float32 router weights

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]

    def group_ends(self) -> torch.Tensor:
        """Cumulative row ends per expert, int32, as grouped GEMMs take them."""
        return self.expert_offsets[1:].to(torch.int32)


def count_values(values: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs. Unlike torch.bincount on CUDA, never syncs with the host
    (bincount reads the maximum back to size its output), so it is safe between async collectives."""
    return torch.zeros(n, dtype=torch.long, device=values.device).scatter_add_(0, values, torch.ones_like(values))


def build_plan(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, align: int = 1) -> RoutingPlan:
    """Permute (token, choice) pairs into a per-expert contiguous layout; stable in token order."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    t, k = topk_idx.shape
    device = topk_idx.device
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = count_values(flat, num_experts)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    unpadded_start = torch.cumsum(counts, 0) - counts
    sorted_expert = flat[order]
    rows = offsets[sorted_expert] + torch.arange(t * k, device=device) - unpadded_start[sorted_expert]
    num_rows = t * k + num_experts * (align - 1)
    token_rows = torch.empty(t * k, dtype=torch.long, device=device)
    token_rows[order] = rows
    row_token = torch.zeros(num_rows, dtype=torch.long, device=device)
    row_token[rows] = order // k
    row_expert = torch.searchsorted(offsets[1:], torch.arange(num_rows, device=device), right=True).clamp(max=num_experts - 1)
    return RoutingPlan(
        num_tokens=t,
        top_k=k,
        num_experts=num_experts,
        align=align,
        expert_offsets=offsets,
        row_token=row_token,
        row_expert=row_expert,
        token_rows=token_rows.view(t, k),
        token_experts=topk_idx.long(),
        token_weights=topk_weights.float(),
    )


class MoEKernels(Protocol):
    """FC1 and FC2 of the routed experts (see the module docstring for the math)."""

    name: str
    layouts: tuple[str, str]  # the byte order FC1 reads W13 in, and FC2 W2 (NVFP4Weights.layout)

    def prepare_experts(self, w13: NVFP4Weights, w2: NVFP4Weights) -> tuple[NVFP4Weights, NVFP4Weights]:
        """One layer's experts in `rows` layout -> in `layouts`: applied once when the model is built."""
        ...

    def fc1(self, x: torch.Tensor, plan: RoutingPlan, w13: WeightView) -> torch.Tensor:
        """x `[T, H]` -> SwiGLU activations `[R, I]` in the plan's row layout."""
        ...

    def fc2(self, h: torch.Tensor, plan: RoutingPlan, w2: WeightView) -> torch.Tensor:
        """h `[R, I]` -> `[T, H]`: each token's rows weighted by the router and summed in fp32."""
        ...

    def reduce_rows(self, rows: torch.Tensor, token_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_j coef[t, j] * rows[token_rows[t, j]] in fp32, j in order; rows' dtype out."""
        ...
