"""The fused Hopper NVFP4 MoE kernels (kernels/cute_moe.py) behind the `MoEKernels` interface.

FC1 and FC2 are one CuTe DSL kernel each (cute-det's FC2 then the fixed-order finalize); what stays on the
host side is building their small inputs on the device without waiting on it: the per-expert row tile
table and int32 row -> token map (once per routing plan, shared by FC1 and FC2), the per-expert pointer
tables of a weight view (cached by segment addresses: a model's views keep their addresses, DWDP's two
prefetch buffers included, so after the first forward every lookup hits), per-row scales, and per FC1 call
the [R, K] buffer its kernel copies the token rows into (permuted) with the zeroed flags of its row groups. The
finalize of cute-det and EP's combine (`reduce_rows`) are the Triton one of kernels/grouped.py.
"""

from __future__ import annotations

import functools

import torch

from .cute_moe import PERMUTE_ROWS, TILE_M, TILE_W, WIDTH_STEP, check_shape, compile_gemm, fragment_layout, to_fragment_order
from .grouped import GroupedTritonKernels
from .interface import RoutingPlan, UnsupportedCase, WeightView
from .nvfp4 import ROWS, NVFP4Weights, check_layout
from .reference import TorchReferenceKernels, finalize_coef

_POINTER_CACHE_SIZE = 4096  # entries of 16 x E bytes; DeepSeek-V3 needs 2 per MoE layer (116)
_INT32_MAX = 2**31 - 1
WIDE_TILE = (256, 128)  # the other work tile (weight rows x token rows) a call may pick, see work_tile
# the fewest mean rows per expert at which FC1 and FC2 take the default (narrow) tile rather than WIDE_TILE. With
# fewer, a work item of 128 weight rows x the few token rows of an expert runs far below the wide tile's 256 x 128
# (V3-Lite at 1K tokens, 85 rows: FC1 321 against 367 TFLOP/s); the wide tile measured faster up to 341 rows for
# FC1 (V3-Lite 4K tokens; V3 8K, 256) and 85 for FC2, the narrow one from 683 for FC1 and 256 for FC2 (one H200,
# DeepSeek-V3-Lite and V3 shapes, 1K-64K tokens, results/README.md session 8), but for V3's FC1 at 32K tokens (1024
# rows: wide 2.7% faster) and V3-Lite at 4K tokens with skew 2 (the other tile 2-3% faster for both stages)
NARROW_MIN_ROWS = (512, 192)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The kernels are persistent: one CTA per SM."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_table(plan: RoutingPlan, tile_m: int = TILE_M) -> torch.Tensor:
    """[tiles, 3] int32 (expert, first row, end row) of every work tile, padded with empty tiles (first row ==
    end row) to the static bound ceil(R / tile_m) + E. An expert's rows take the fewest tiles of at most
    tile_m rows, split evenly in WIDTH_STEP-row steps (the widest first), since a tile runs at the narrowest
    width that covers its rows: 796 rows in a 256-row tile are 256 + 192 + 192 + 156 rather than 256 + 256 +
    256 + 28. A tile's weights are decoded once whatever its width, so one tile of 64 rows costs well over
    a quarter of a full one: even splits measured +1% (FC1) to +2% (FC2's rows kernel) on average on
    DeepSeek-V3-Lite and V3 shapes at 4K-32K tokens, up to +5% for V3's FC1 at 16K (results/README.md,
    session 9)."""
    offsets = plan.expert_offsets
    e = plan.num_experts
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + tile_m - 1) // tile_m
    steps = (counts + WIDTH_STEP - 1) // WIDTH_STEP
    per_tile = steps // tiles.clamp(min=1)
    wider = steps - per_tile * tiles  # the expert's first `wider` tiles take one step more
    tile_ends = torch.cumsum(tiles, 0)
    index = torch.arange((plan.num_rows + tile_m - 1) // tile_m + e, device=offsets.device)
    expert = torch.searchsorted(tile_ends, index, right=True).clamp(max=e - 1)
    j = index - (tile_ends[expert] - tiles[expert])  # the tile's index within its expert
    first = offsets[expert] + (j * per_tile[expert] + torch.minimum(j, wider[expert])) * WIDTH_STEP
    end = torch.minimum(first + (per_tile[expert] + (j < wider[expert]).long()) * WIDTH_STEP, offsets[expert + 1])
    live = index < tile_ends[-1]
    first, end = (torch.where(live, bound, offsets[expert + 1]) for bound in (first, end))
    return torch.stack([expert, first, end], dim=1).to(torch.int32)


def _check_int32_offsets(largest_offset: int) -> None:
    """The kernels compute their inputs' and `cute`'s FC2 output's element offsets in 32 bits (FC1's and
    cute-det's row outputs in 64): refuse what would overflow rather than write to wrong addresses."""
    if largest_offset > _INT32_MAX:
        raise UnsupportedCase(
            f"the CuTe DSL MoE kernels address at most 2^31 elements per input tensor and per `cute` FC2 output, "
            f"this batch needs {largest_offset}: use fewer tokens per batch (--max-tokens) or --kernels grouped"
        )


def _check_fc1_out(out: torch.Tensor, rows: int, cols: int) -> None:
    """FC1 stores 16-byte vectors into a dense bf16 [rows, cols]: refuse any other `out` rather than write
    past or between its rows."""
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (rows, cols) or not out.is_contiguous() or out.data_ptr() % 16:
        raise ValueError(
            f"FC1's output must be a contiguous, 16-byte aligned bf16 tensor [{rows}, {cols}]; got {out.dtype} "
            f"{tuple(out.shape)} with strides {out.stride()} at an address {out.data_ptr() % 16} bytes past alignment"
        )


class FusedCuteKernels(GroupedTritonKernels):
    """FC1 = permute + NVFP4 grouped GEMM + SwiGLU and FC2 = NVFP4 grouped GEMM + finalize, fused. They read
    the weights in the fragment order (kernels/cute_moe.py), which `prepare_experts` makes once."""

    name = "cute"
    fused = (True, True)  # which of FC1, FC2 run the fused kernels

    def __init__(self, act_quant: bool = False, tile: tuple[int, int] | None = None):
        """tile: weight rows x token rows of every call's work tile; None: `work_tile` picks one per call."""
        super().__init__(act_quant)
        self.tile = tile
        self.layouts = tuple(fragment_layout(fc1) if fused else ROWS for fc1, fused in zip((True, False), self.fused))
        self._pointers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plan: tuple[RoutingPlan, torch.Tensor, dict[int, torch.Tensor]] | None = None

    def prepare_experts(self, w13: NVFP4Weights, w2: NVFP4Weights) -> tuple[NVFP4Weights, NVFP4Weights]:
        """The fused stages' weights in the fragment order (a reordered copy; the others as they come)."""
        return tuple(to_fragment_order(w, fc1) if fused else w for w, fc1, fused in zip((w13, w2), (True, False), self.fused))

    def work_tile(self, plan: RoutingPlan, fc1: bool, n: int) -> tuple[int, int]:
        """The work tile of a call of FC1 or FC2 on `plan` with weights [N, K] per expert: the narrow default
        from NARROW_MIN_ROWS mean rows per expert (tokens x top-k / experts, known on the host, so the choice
        never waits on the GPU), else WIDE_TILE where N fits it. Both pad an expert's rows to a multiple of 64
        (a tile runs at the narrowest token width that covers its rows), so the choice is about work per
        tile, not padding."""
        if self.tile is not None:
            return self.tile
        mean = plan.num_tokens * plan.top_k / plan.num_experts  # without the row bound's align padding
        if n % WIDE_TILE[0] or mean >= NARROW_MIN_ROWS[0 if fc1 else 1]:
            return TILE_W, TILE_M
        return WIDE_TILE

    def plan_tables(self, plan: RoutingPlan, tile_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tile table of `plan` for tile_m-row tiles and its int32 row -> token map, each built once for
        the plan's FC1 and FC2."""
        if self._plan is None or self._plan[0] is not plan:
            self._plan = (plan, plan.row_token.to(torch.int32), {})
        tables = self._plan[2]
        if tile_m not in tables:
            tables[tile_m] = tile_table(plan, tile_m)
        return tables[tile_m], self._plan[1]

    def pointer_tables(self, view: WeightView) -> tuple[torch.Tensor, torch.Tensor]:
        """[E] int64 base addresses of each expert's packed codes and block scales, in expert order."""
        key = tuple((s.packed.data_ptr(), s.packed.stride(), s.block_scale.data_ptr(), s.block_scale.stride(), s.num_experts) for s in view.segments)
        if key not in self._pointers:
            codes, scales = [], []
            for seg in view.segments:  # an empty segment (a DWDP peer holding none of them) adds no pointers
                if seg.num_experts and not (seg.packed[0].is_contiguous() and seg.block_scale[0].is_contiguous()):
                    raise ValueError("the CuTe DSL kernels need each expert's packed codes and block scales contiguous")
                codes += [seg.packed.data_ptr() + i * seg.packed.stride(0) for i in range(seg.num_experts)]
                scales += [seg.block_scale.data_ptr() + i * seg.block_scale.stride(0) for i in range(seg.num_experts)]
            if any(p % 16 for p in codes) or any(p % 4 for p in scales):
                raise ValueError("the CuTe DSL kernels need expert weights 16-byte aligned and block scales 4-byte aligned")
            if len(self._pointers) >= _POINTER_CACHE_SIZE:
                self._pointers.pop(next(iter(self._pointers)))  # the oldest
            device = view.segments[0].device
            table = torch.tensor(codes + scales, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
            self._pointers[key] = (table[: len(codes)], table[len(codes) :])
        return self._pointers[key]

    def fc1(self, x: torch.Tensor, plan: RoutingPlan, w13: WeightView) -> torch.Tensor:
        out = torch.empty(plan.num_rows, w13.n // 2, dtype=torch.bfloat16, device=x.device)
        return self.fc1_into(x, plan, w13, out)

    def fc1_into(self, x: torch.Tensor, plan: RoutingPlan, w13: WeightView, out: torch.Tensor) -> torch.Tensor:
        """FC1 into `out` [R, I]: every row of an expert is written, rows past the last expert are not."""
        check_layout(w13, self.layouts[0], f"kernels {self.name!r} FC1")
        tile = self.work_tile(plan, True, w13.n)
        check_shape(True, w13.n, w13.k, x, tile[0])
        _check_fc1_out(out, plan.num_rows, w13.n // 2)
        _check_int32_offsets(x.numel())  # its output rows are addressed in 64 bits
        if plan.num_tokens:
            self._launch(True, x, plan, w13, tile, 1.0 / w13.global_scales(), out)
        return out

    def _launch(
        self, fc1: bool, a: torch.Tensor, plan: RoutingPlan, view: WeightView, tile: tuple[int, int], scale: torch.Tensor, out: torch.Tensor, rows_out: bool = False
    ) -> None:
        """One fused kernel over the routed rows of `plan` in `tile`-sized work tiles (arguments as kernels/cute_moe.py's
        MoEGemmSm90 takes them)."""
        codes, scales = self.pointer_tables(view)
        tiles, row_token = self.plan_tables(plan, tile[1])
        a = self._input(a).contiguous()
        if fc1:  # the kernel first copies the token rows into `rows` in the permuted order, marking groups in `ready`
            rows = torch.empty(plan.num_rows, view.k, dtype=a.dtype, device=a.device)
            ready = torch.zeros(1 + -(-plan.num_rows // PERMUTE_ROWS), dtype=torch.int32, device=a.device)
        else:
            rows, ready = a, row_token[:1]  # FC2's rows are its input; `ready` is not read
        compile_gemm(fc1, view.n, view.k, *tile, rows_out=rows_out)(
            a, row_token, codes, scales, scale, tiles, out, rows, ready, _sm_count(a.device),
        )

    def _fc2_tile(self, h: torch.Tensor, plan: RoutingPlan, w2: WeightView) -> tuple[int, int]:
        """FC2's input checks, and the call's work tile."""
        check_layout(w2, self.layouts[1], f"kernels {self.name!r} FC2")
        tile = self.work_tile(plan, False, w2.n)
        check_shape(False, w2.n, w2.k, h, tile[0])
        return tile

    def fc2(self, h: torch.Tensor, plan: RoutingPlan, w2: WeightView) -> torch.Tensor:
        tile = self._fc2_tile(h, plan, w2)
        _check_int32_offsets(max(h.numel(), plan.num_tokens * w2.n))  # h and the fp32 output
        out = torch.zeros(plan.num_tokens, w2.n, dtype=torch.float32, device=h.device)
        if plan.num_tokens:
            coef = torch.zeros(plan.num_rows, dtype=torch.float32, device=h.device)  # padding rows add 0
            coef[plan.token_rows.reshape(-1)] = finalize_coef(plan, w2).reshape(-1)
            self._launch(False, h, plan, w2, tile, coef, out)
        return out.to(h.dtype)


class FusedDeterministicKernels(FusedCuteKernels):
    """Both fused kernels, FC2's writing each routed row's bf16 result (no scale) and the fixed-order finalize
    of kernels/grouped.py adding a token's rows times router weight / global scale: the torch reference's
    numerics, bit-reproducible, and 1.12-1.24x cute's in-kernel reduction on DeepSeek-V3-Lite shapes from 4K tokens
    (1.06-1.10x on V3's; results/README.md, session 10)."""

    name = "cute-det"

    def fc2(self, h: torch.Tensor, plan: RoutingPlan, w2: WeightView) -> torch.Tensor:
        tile = self._fc2_tile(h, plan, w2)
        if plan.num_tokens == 0:
            return h.new_zeros(0, w2.n)
        _check_int32_offsets(h.numel())  # z's rows are addressed in 64 bits
        z = torch.empty(plan.num_rows, w2.n, dtype=torch.bfloat16, device=h.device)
        coef = finalize_coef(plan, w2)
        self._launch(False, h, plan, w2, tile, coef.reshape(-1), z, rows_out=True)  # the kernel does not read the scale
        return self.reduce_rows(z, plan.token_rows, coef)


class FusedFC1Kernels(FusedCuteKernels):
    """The fused FC1 with grouped's FC2 (Triton decode + torch._grouped_mm + a finalize that sums a token's k
    rows in a fixed order): bit-reproducible. The default before cute-det (whose fused FC2 with the same
    finalize is 1.14-1.52x this FC2 from 8K tokens, session 10), kept to reproduce the results measured with it."""

    name = "cute-fc1"
    fused = (True, False)
    fc2 = TorchReferenceKernels.fc2
