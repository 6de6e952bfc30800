"""Hopper (sm_90a) NVFP4 MoE kernels in CuTe DSL: FC1 = gather + grouped GEMM + SwiGLU, FC2 = grouped
GEMM + finalize, each one kernel.

Hopper has no FP4 MMA, so the weights are decoded to bf16 inside the kernel and multiplied with bf16
wgmma, fp32 accumulate; the global scale goes into the epilogue. One CTA computes a 128-row x 128-column
tile of one expert (two warpgroups, 64 rows each) and loops over K in 64-wide steps:

    cp.async   activation rows, gathered by index (FC1: row -> token), into a swizzled smem stage;
               the expert's packed e2m1 bytes and e4m3 block scales into a raw smem stage
               (`stages` deep, so loads run that far ahead of the MMA)
    decode     every thread turns 32 packed weights of the raw stage into bf16 in registers (exact:
               e2m1 x e4m3 needs 6 significant bits) and stores them into one of two swizzled bf16 tiles
    wgmma      A = activations, B = decoded weights; the decode of step k+1 runs while the tensor cores
               work on step k

Epilogues, straight from the accumulator registers:
    FC1  the weight tile interleaves gate and up rows (gate row c, up row c, gate row c+1, ...), so each
         thread holds gate and up of an output column side by side: h = silu(g / s) * (u / s), bf16.
    FC2  z = acc * coef[row] (router weight / global scale) added with fp32 atomics into out[token]:
         no unpermute pass. The order of the k additions per token is not fixed, so FC2 is
         reproducible to fp32 rounding, not bitwise.

The weight view is a table of per-expert base pointers (one for the packed codes, one for the block
scales): local experts in place and prefetched experts in their buffer are read where they are, with no
merge copy. Pointers rather than a CUDA-VMM range because the strategies already own plain device
allocations (IPC-exported arenas, prefetch buffers); a [E] int64 table per view costs 1 KiB and is built
once per distinct set of segment addresses.

Work is split into row tiles per expert by a tile table built on the device ([expert, row start, row
end] per tile, padded to a static bound so that building it never waits on the GPU); CTAs whose tile
is past the end exit at once.
"""

from __future__ import annotations

import functools
import os

import cutlass
import torch
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass import pipeline
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum
from quack.blockscaled.nvfp4_utils import decode_e2m1x8_to_bf16x8, make_decode_luts

TILE_M = 128  # rows (routed tokens) per work tile: two consumer warpgroups of 64
TILE_N = 128  # weight rows per work tile (FC1: 64 gate + 64 up -> 64 output columns)
TILE_K = 64
PRODUCER_THREADS = 256  # warpgroups 0 and 1: loads and decode, two threads per tile row
THREADS = PRODUCER_THREADS + 256  # warpgroups 2 and 3: wgmma and epilogue
BLOCK = 16  # NVFP4 block: one e4m3 scale per 16 k


def check_shape(fc1: bool, n: int, k: int, a=None) -> None:
    """Clear errors for what the kernels do not cover: weight shape [N, K] of one expert, activations `a`."""
    if k % TILE_K or n % TILE_N:
        raise ValueError(
            f"the CuTe DSL MoE kernels need K % {TILE_K} == 0 and N % {TILE_N} == 0 (got N={n}, K={k}); "
            "use --kernels grouped or torch for this model"
        )
    if a is not None and (a.dtype != torch.bfloat16 or a.shape[-1] != k or not a.is_cuda):
        raise ValueError(f"the CuTe DSL MoE kernels take bf16 CUDA activations [rows, {k}], got {a.dtype} {tuple(a.shape)} on {a.device}")


class MoEGemmSm90:
    """One grouped NVFP4 GEMM with a fused epilogue; `fc1` picks gather + SwiGLU or finalize.

    n, k: the weight shape [N, K] of one expert (FC1: N = 2I, K = H; FC2: N = H, K = I).
    stages: depth of the smem ring; lag: how many K steps the producer's loads run ahead of its decode."""

    def __init__(self, fc1: bool, n: int, k: int, stages: int = 5, lag: int = 2):
        check_shape(fc1, n, k)
        if not 0 < lag < stages - 1:
            raise ValueError(f"need 0 < lag < stages - 1, got stages={stages}, lag={lag}")
        self.fc1, self.n, self.k, self.stages, self.lag = fc1, n, k, stages, lag

    @cute.jit
    def __call__(
        self,
        mA: cute.Tensor,  # [rows_src, K] bf16: FC1 tokens x, FC2 hidden rows h
        mRowToken: cute.Tensor,  # [R] int32: row -> token (FC1 gathers by it, FC2 scatters by it)
        mWPtr: cute.Tensor,  # [E] int64: base address of expert e's packed codes [N, K/2]
        mSFPtr: cute.Tensor,  # [E] int64: base address of expert e's block scales [N, K/16]
        mScale: cute.Tensor,  # FC1: [E] fp32 1/global scale; FC2: [R] fp32 router weight / global scale
        mTiles: cute.Tensor,  # [tiles, 3] int32: expert, first row, end row (exclusive) of the expert
        mOut: cute.Tensor,  # FC1: [R, N/2] bf16; FC2: [T, N] fp32, accumulated into
        num_ctas: cutlass.Int32,  # persistent CTAs (the SM count)
        stream,
    ):
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            cutlass.BFloat16, cutlass.BFloat16, LayoutEnum.ROW_MAJOR.sm90_mma_major_mode(),
            LayoutEnum.ROW_MAJOR.sm90_mma_major_mode(), cutlass.Float32, (2, 1, 1), tiler_mn=(64, TILE_N),
        )
        tile = (TILE_M, TILE_N, TILE_K)
        a_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, tile, cutlass.BFloat16, self.stages)
        b_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile, cutlass.BFloat16, self.stages)
        work = cute.size(mTiles, mode=[0]) * (self.n // TILE_N)
        self.kernel(tiled_mma, mA, mRowToken, mWPtr, mSFPtr, mScale, mTiles, mOut, a_layout, b_layout).launch(
            grid=(cutlass.min(num_ctas, work), 1, 1), block=(THREADS, 1, 1), stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        tiled_mma: cute.TiledMma,
        mA: cute.Tensor,
        mRowToken: cute.Tensor,
        mWPtr: cute.Tensor,
        mSFPtr: cute.Tensor,
        mScale: cute.Tensor,
        mTiles: cute.Tensor,
        mOut: cute.Tensor,
        a_layout: cute.ComposedLayout,
        b_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        stages = self.stages
        n_blocks = self.n // TILE_N
        work_count = cute.size(mTiles, mode=[0]) * n_blocks
        k_tiles = self.k // TILE_K

        smem = SmemAllocator()
        barriers = smem.allocate_array(cutlass.Int64, 2 * stages)
        sA = smem.allocate_tensor(cutlass.BFloat16, a_layout.outer, 1024, a_layout.inner)
        sB = smem.allocate_tensor(cutlass.BFloat16, b_layout.outer, 1024, b_layout.inner)
        sW = smem.allocate_tensor(
            cutlass.Uint8, cute.make_layout((TILE_N, TILE_K // 2, stages), stride=(TILE_K // 2, 1, TILE_N * TILE_K // 2)), 16
        )
        # each of a row's two producer threads keeps its own copy of the row's 4 block scales
        sf_step = TILE_K // BLOCK
        sSF = smem.allocate_tensor(cutlass.Uint8, cute.make_layout((TILE_N, 2, sf_step, stages), stride=(2 * sf_step, sf_step, 1, 2 * TILE_N * sf_step)), 16)
        # full[s]: the producer warpgroup's activations landed and weights decoded; empty[s]: both
        # consumer warpgroups' wgmmas on stage s are done
        ring = pipeline.PipelineAsync.create(
            barrier_storage=barriers,
            num_stages=stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, PRODUCER_THREADS),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, THREADS - PRODUCER_THREADS),
        )

        if warp < PRODUCER_THREADS // 32:
            # ---- producers: thread p loads half of activation row p // 2, half of weight tile row p // 2
            # and the row's block scales for step t, then decodes its half weight row of step t - lag
            # (its own cp.async data, so no barrier among producers) ----
            row = tidx // 2
            half = tidx % 2
            luts = make_decode_luts()
            issue = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
            ready = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
            pending = cutlass.Int32(0)
            for w in cutlass.range(bid, work_count, grid, unroll=1):
                m_blk = w // n_blocks
                n_blk = w % n_blocks
                expert = mTiles[m_blk, 0]
                row_start = mTiles[m_blk, 1]
                row_end = mTiles[m_blk, 2]
                if row_start < row_end:
                    src_row = row_start + row
                    if src_row >= row_end:
                        src_row = row_start  # rows past the expert compute garbage that is never stored
                    if cutlass.const_expr(self.fc1):
                        src_row = mRowToken[src_row]
                    w_row = self.weight_row(n_blk, row)
                    mW = cute.make_tensor(
                        cute.make_ptr(cutlass.Uint8, mWPtr[expert], cute.AddressSpace.gmem, assumed_align=16),
                        cute.make_layout((self.n, self.k // 2), stride=(self.k // 2, 1)),
                    )
                    mSF = cute.make_tensor(
                        cute.make_ptr(cutlass.Uint8, mSFPtr[expert], cute.AddressSpace.gmem, assumed_align=4),
                        cute.make_layout((self.n, self.k // BLOCK), stride=(self.k // BLOCK, 1)),
                    )
                    for k_tile in cutlass.range(k_tiles, unroll=1):
                        ring.producer_acquire(issue)
                        self.load_step(mA[src_row, None], mW[w_row, None], mSF[w_row, None], sA, sW, sSF, row, half, k_tile, issue.index)
                        cute.arch.cp_async_commit_group()
                        issue.advance()
                        pending += 1
                        if pending > self.lag:
                            cute.arch.cp_async_wait_group(self.lag)
                            self.decode_half_row(sW, sSF, sB, ready.index, row, half, luts)
                            cute.arch.fence_proxy("async.shared", space="cta")
                            ring.producer_commit(ready)
                            ready.advance()
                            pending -= 1
            cute.arch.cp_async_wait_group(0)
            while pending > 0:
                self.decode_half_row(sW, sSF, sB, ready.index, row, half, luts)
                cute.arch.fence_proxy("async.shared", space="cta")
                ring.producer_commit(ready)
                ready.advance()
                pending -= 1
        else:
            # ---- consumers: wgmma over the ring, then the epilogue from registers ----
            ctid = tidx - PRODUCER_THREADS
            thr_mma = tiled_mma.get_slice(ctid)
            tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
            acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_M, TILE_N)), cutlass.Float32)
            coords = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, TILE_N)))
            k_blocks = cute.size(tCrA, mode=[2])
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
            release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
            for w in cutlass.range(bid, work_count, grid, unroll=1):
                m_blk = w // n_blocks
                n_blk = w % n_blocks
                expert = mTiles[m_blk, 0]
                row_start = mTiles[m_blk, 1]
                row_end = mTiles[m_blk, 2]
                if row_start < row_end:
                    acc.fill(0.0)
                    for k_tile in cutlass.range(k_tiles, unroll=1):
                        ring.consumer_wait(read)
                        warpgroup.fence()
                        for kb in cutlass.range_constexpr(k_blocks):
                            cute.gemm(tiled_mma, acc, tCrA[None, None, kb, read.index], tCrB[None, None, kb, read.index], acc)
                        warpgroup.commit_group()
                        read.advance()
                        warpgroup.wait_group(1)  # the previous step's wgmmas are done: release its stage
                        if k_tile > 0:
                            ring.consumer_release(release)
                            release.advance()
                    warpgroup.wait_group(0)
                    ring.consumer_release(release)
                    release.advance()
                    self.epilogue(acc, coords, mRowToken, mScale, mOut, expert, row_start, row_end, n_blk)

    @cute.jit
    def epilogue(self, acc, coords, mRowToken, mScale, mOut, expert, row_start, row_end, n_blk):
        if cutlass.const_expr(self.fc1):
            inv_scale = mScale[expert]
            for i in cutlass.range_constexpr(0, cute.size(acc), 2):
                r, c = coords[i]
                row = row_start + r
                if row < row_end:
                    gate = acc[i] * inv_scale
                    up = acc[i + 1] * inv_scale
                    h = gate / (1.0 + cute.math.exp(-gate)) * up
                    mOut[row, n_blk * (TILE_N // 2) + c // 2] = h.to(cutlass.BFloat16)
        else:
            for i in cutlass.range(cute.size(acc), unroll_full=True):
                r, c = coords[i]
                row = row_start + r
                if row < row_end:
                    ptr = mOut.iterator + mRowToken[row] * self.n + n_blk * TILE_N + c
                    cute.arch.atomic_add(ptr, acc[i] * mScale[row])

    @cute.jit
    def load_step(self, a_row, w_row, sf_row, sA, sW, sSF, row, half, k_tile, stage):
        """cp.async K step `k_tile` of half an activation row (64 bytes), half a packed weight row (16
        bytes) and the row's 4 block scales into tile row `row` of `stage`."""
        copy16 = cute.make_copy_atom(cpasync.CopyG2SOp(cpasync.LoadCacheMode.GLOBAL), cutlass.BFloat16, num_bits_per_copy=128)
        copy16_u8 = cute.make_copy_atom(cpasync.CopyG2SOp(cpasync.LoadCacheMode.GLOBAL), cutlass.Uint8, num_bits_per_copy=128)
        copy4_u8 = cute.make_copy_atom(cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=32)
        for c in cutlass.range_constexpr(TILE_K // 16):
            chunk = half * (TILE_K // 16) + c
            cute.copy(copy16, cute.local_tile(a_row, (8,), (k_tile * (TILE_K // 8) + chunk,)), cute.local_tile(sA[row, None, stage], (8,), (chunk,)))
        cute.copy(copy16_u8, cute.local_tile(w_row, (16,), (k_tile * 2 + half,)), cute.local_tile(sW[row, None, stage], (16,), (half,)))
        cute.copy(copy4_u8, cute.local_tile(sf_row, (4,), (k_tile,)), sSF[row, half, None, stage])

    def weight_row(self, n_blk, j):
        """The expert weight row that tile row j of column block n_blk holds (FC1: gate and up rows
        interleaved, so that output column c's gate and up land in adjacent accumulator columns)."""
        if cutlass.const_expr(self.fc1):
            return (self.n // 2) * (j % 2) + n_blk * (TILE_N // 2) + j // 2
        return n_blk * TILE_N + j

    @cute.jit
    def decode_half_row(self, sW, sSF, sB, stage, row, half, luts):
        """Decode half of weight tile row `row` of `stage` (32 values) into bf16. quack's prmt lookup
        turns 8 e2m1 codes into 4 bf16x2 words; one bf16x2 multiply per word applies the block scale
        (exact: e2m1 x e4m3 fits bf16's mantissa)."""
        words = cute.make_rmem_tensor((4,), cutlass.Int32)
        cute.autovec_copy(cute.recast_tensor(cute.local_tile(sW[row, None, stage], (16,), (half,)), cutlass.Int32), words)
        scales = cute.make_rmem_tensor((4,), cutlass.Float8E4M3FN)
        cute.autovec_copy(cute.recast_tensor(sSF[row, half, None, stage], cutlass.Float8E4M3FN), scales)
        sf = scales.load().to(cutlass.Float32)
        out = cute.make_rmem_tensor((16,), cutlass.Int32)  # 32 bf16, as bf16x2 words
        for i in cutlass.range_constexpr(4):
            scale = cute.make_rmem_tensor((2,), cutlass.BFloat16)
            scale[0] = sf[2 * half + i // 2].to(cutlass.BFloat16)
            scale[1] = scale[0]
            scale2 = cute.recast_tensor(scale, cutlass.Int32)[0]
            decoded = decode_e2m1x8_to_bf16x8(words[i], luts)
            for j in cutlass.range_constexpr(4):
                out[4 * i + j] = mul_bf16x2(decoded[j], scale2)
        cute.autovec_copy(cute.recast_tensor(out, cutlass.BFloat16), cute.local_tile(sB[row, None, stage], (32,), (half,)))


@dsl_user_op
def mul_bf16x2(a: cutlass.Int32, b: cutlass.Int32, *, loc=None, ip=None) -> cutlass.Int32:
    """Lane-wise product of two bf16x2 words (round to nearest; exact for the products used here)."""
    return cutlass.Int32(
        llvm.inline_asm(
            T.i32(), [cutlass.Int32(a).ir_value(loc=loc, ip=ip), cutlass.Int32(b).ir_value(loc=loc, ip=ip)],
            "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", has_side_effects=False, loc=loc, ip=ip,
        )
    )


def _fake(dtype, shape, align: int = 16):
    """A row-major symbolic tensor for compiling (`None` in `shape`: a runtime extent)."""
    shape = tuple(cute.sym_int() if s is None else s for s in shape)
    return cute.runtime.make_fake_compact_tensor(dtype, shape, stride_order=tuple(reversed(range(len(shape)))), assumed_align=align)


@functools.cache
def compile_gemm(fc1: bool, n: int, k: int, stages: int = 5, lag: int = 2):
    """Compile one stage for one expert weight shape [N, K] (once per process; also runs on a CPU machine
    with CUTE_DSL_ARCH=sm_90a, which is how CI checks that both kernels build)."""
    out = _fake(cutlass.BFloat16, (None, n // 2)) if fc1 else _fake(cutlass.Float32, (None, n))
    return cute.compile(
        MoEGemmSm90(fc1, n, k, stages, lag),
        _fake(cutlass.BFloat16, (None, k)),
        _fake(cutlass.Int32, (None,), 4),
        _fake(cutlass.Int64, (None,), 8),
        _fake(cutlass.Int64, (None,), 8),
        _fake(cutlass.Float32, (None,), 4),
        _fake(cutlass.Int32, (None, 3), 4),
        out,
        cutlass.Int32(1),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi" + os.environ.get("DWDP_CUTE_OPTIONS", ""),
    )
