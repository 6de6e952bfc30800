"""Hopper (sm_90a) NVFP4 MoE kernels in CuTe DSL: FC1 = permute + grouped GEMM + SwiGLU, FC2 = grouped
GEMM + finalize, each one persistent, warp-specialized kernel.

Hopper has no FP4 MMA. The weights are the wgmma A operand, taken from registers: each consumer thread
decodes its own fragment (e2m1 x e4m3 -> bf16 is exact: 6 significant bits) and the routed-token rows are
the B operand in shared memory; fp32 accumulate, the global scale in the epilogue. A work tile is (by
default) 128 weight rows x 256 routed rows of one expert; K advances 64 at a time through a ring of smem
stages:

    producer warpgroup   the token rows, contiguous per expert, into a swizzled stage as one TMA box;
                         the expert's packed codes and block scales (contiguous chunks in the fragment
                         order) by cp.async into a raw stage; the stage is full when the cp.async
                         arrivals and the TMA bytes have landed. FC2's rows are its input; FC1's warp 0
                         loads while the other three copy the token rows into the permuted order first
                         (permute_rows), each tile's loads waiting for its rows (wait_rows)
    2 consumer warpgroups  per 16-wide k block: decode the fragment's word with quack's lookup, scale
                         (bf16x2 multiply), then wgmma m64nNk16 RS (N the tile's token width), so
                         that a block's wgmmas run while the next block decodes

The weights are read in the fragment order (`to_fragment_order`, applied once when the model is built:
the kernel sets' `prepare_experts`): per 128 weight rows of a work tile and K step, a 4 KB chunk of
codes in which consumer thread c's 16 bytes at 16 c are its four k blocks' fragment words, and a
512-byte chunk of block scales with the 8 bytes of each thread row pair. Each thread loads a K step's
codes and scales with one 16-byte and one 8-byte shared load per 128 rows, and decodes without picking
bytes out of four rows' words (3 prmt per word and 4 loads per step in the row layout). FC1's rows are
stored in its work tile's order (gate and up interleaved, see weight_row).

A weight fragment decoded once feeds 256 token columns, which is why the default tile is 256 tokens wide.
A tile runs at the narrowest token width, a multiple of 64, that covers its rows (one tiled MMA per width,
see mainloop; the token rows come as a TMA box of that width), so whatever the tile an expert's rows are
padded to a multiple of 64 rather than of the tile: in the 128 x 256 tile on
DeepSeek-V3-Lite shapes, 1K-32K tokens, FC2 1-28% and FC1 1-8% faster than running every tile at full width
(results/README.md, session 8). FC2's rows kernel gained another 1-14% (V3-Lite 4K-32K and V3 8K-16K tokens,
session 9) when its box took the tile's width rather than the full tile's. The tile table splits an expert's
rows evenly over its tiles (kernels/fused.py: `tile_table`). A tile of 256 weight rows x 128 tokens halves
the token traffic per FLOP but decodes twice as much: it is faster where an expert has about one narrow tile
of rows, so each call picks one by its mean rows per expert (kernels/fused.py: `work_tile`); both read the
same fragment-ordered weights.

FC1's token rows: Hopper's TMA cannot gather rows by index. Gathering them into every work tile by cp.async
(each row as many times as N has weight blocks, from all four producer warps) cost the 128 x 256 tile 10-13%
against the same kernel over pre-permuted rows by TMA boxes, and not through the consumers' proxy fence
(dropping it changed nothing); permuting first in a separate pass cost about what it saved (results/README.md,
session 11). So the kernel permutes for itself: three producer warps per CTA copy the rows once into an [R, K]
buffer, a few rows per claim of a global counter, in row order, flagging each group; a tile's loads wait for
its groups, and the copies run under the MMAs of the tiles before. Claims are dynamic, so the copying never
waits on a CTA that is not running. Against the gather, bit-equal: FC1 +4-5% at V3-Lite's 8K tokens, +2-3%
at 32K, +11% at V3's 32K; in the 256 x 128 tile (fewer rows per expert) -4% to +5%, within the readings'
spread but for -2 to -4% at V3-Lite's 1K. Other costs, bounded by throwaway variants (sessions 7 and 10):
the decode 4-7%, FC1's epilogue ~5%, FC2's finalize (cute-det's separate pass) ~11% at 8K tokens.

Epilogues:
    FC1  weight tile rows interleave gate and up in groups of 8, so that a thread's accumulator rows r and
         r + 8 are the gate and the up of one output column: h = silu(g / s) * (u / s), bf16.
    FC2  (rows_out, `cute-det`) z as bf16 into the routed row's [R, N] output; a fixed-order finalize
         (kernels/grouped.py) then adds each token's rows times router weight / global scale, as the torch
         reference does: bit-reproducible.
         Both write their bf16 tile into smem by transposing stmatrix (8 x 8 blocks of accumulators become
         token rows) as 64 x 64 TMA boxes, and the tile's whole 64-token groups leave by TMA stores that run
         on during the next tile's main loop (its last rows, fewer than 64, by 16-byte stores). Against
         scalar smem stores and every row stored by the consumers: FC2's rows kernel +1-8%, FC1 -2.5 to
         +2.7% on DeepSeek-V3-Lite shapes (1K-32K tokens), both +2-6% on V3's (8K, 16K); skipping the
         epilogue altogether would gain another 0.4-10% (results/README.md, session 10).
    FC2  (`cute`) z * coef[row] (router weight / global scale) into smem rows of the tile's output columns, 32 KB
         at a time through two buffers; each token row is then added into out[token] by one
         bulk asynchronous fp32 reduction (cp.reduce.async.bulk .add.f32, the copy engine does the
         adds): no unpermute pass and no per-thread atomics (6-9% faster than 16-byte vector atomics).
         The order of a token's k additions depends on timing, so FC2 is reproducible to fp32
         rounding, not bitwise, and a deep random model amplifies that; and the fp32 rows it adds miss
         L2, so with the TMA loads it is also the slower form: `cute-det`'s rows + finalize measured
         1.12-1.24x its FC2 on DeepSeek-V3-Lite shapes from 4K tokens (on V3's 1.06-1.10x: results/README.md, session 10).

The weight view is a table of per-expert base pointers (packed codes, block scales): local experts in
place and prefetched experts in their buffer are read where they are, with no merge copy. Pointers
rather than a CUDA-VMM range because the strategies already own plain device allocations (IPC-exported
arenas, prefetch buffers); the two [E] int64 tables of a view (16 x E bytes) are built once per
distinct set of segment addresses.

Row tiles per expert come from a tile table built on the device ([expert, first row, end row] per tile,
padded to a static bound so that building it never waits on the GPU); work items past the end are
skipped.
"""

from __future__ import annotations

import functools

import cutlass
import torch
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass import pipeline
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum
from quack.blockscaled.nvfp4_utils import decode_e2m1x8_to_bf16x8, make_decode_luts, mul_bf16x2_bcast

from .interface import UnsupportedCase
from .nvfp4 import ROWS, NVFP4Weights, check_layout

TILE_W = 128  # weight rows per work tile: 2 consumer warpgroups x 64 (FC1: gate and up rows)
TILE_M = 256  # routed-token rows per work tile (the widest wgmma N)
TILE_K = 64
STAGES = 4
PRODUCER_THREADS = 128  # warpgroup 0: loads only (cp.async; FC2's token rows by TMA)
CONSUMER_THREADS = 256  # warpgroups 1 and 2: decode, wgmma, epilogue
THREADS = PRODUCER_THREADS + CONSUMER_THREADS
PRODUCER_REGS, CONSUMER_REGS = 40, 232  # setmaxnreg moves registers within the launch's 384 x 168 = 64512: 128 x 40 + 256 x 232; a larger sum leaves setmaxnreg.inc waiting forever
BLOCK = 16  # NVFP4 block: one e4m3 scale per 16 k
CODE_CHUNK = 128 * TILE_K // 2  # bytes of packed codes of 128 weight rows per K step (fragment order)
SCALE_CHUNK = 128 * TILE_K // BLOCK  # bytes of their block scales
LOG2E = 1.4426950408889634
WIDTH_STEP = 64  # token widths of a work tile's MMA: WIDTH_STEP, 2 x WIDTH_STEP, .., tile_m (see mainloop). At 32 ptxas
# serializes every kernel's wgmmas (C7512: insufficient registers)
OUT_BOX = 64  # FC1's and FC2 rows_out's output tile leaves in TMA boxes of OUT_BOX tokens x OUT_BOX columns (bf16 rows of
# 128 bytes: the 128-byte swizzle's span)
PERMUTE_BATCH = 5  # FC1: 16-byte loads a permuting thread has in flight (4 registers each, within PRODUCER_REGS)
PERMUTE_ROWS = 4  # FC1: token rows copied into the permuted buffer per claim of a permuting warp (see permute_rows)
FC2_CHUNK_FLOATS = 8192  # FC2's finalize stages 32 KB of its tile in smem at a time: 8192 / tile_w token rows


def check_shape(fc1: bool, n: int, k: int, a=None, tile_w: int = TILE_W) -> None:
    """Clear errors for what the kernels do not cover: weight shape [N, K] of one expert, activations `a`."""
    if k % TILE_K or n % tile_w:
        raise UnsupportedCase(
            f"the CuTe DSL MoE kernels need K % {TILE_K} == 0 and N % {tile_w} == 0 (got N={n}, K={k}); "
            "use --kernels grouped or torch for this model"
        )
    if a is not None and (a.dtype != torch.bfloat16 or a.shape[-1] != k or not a.is_cuda):
        raise ValueError(f"the CuTe DSL MoE kernels take bf16 CUDA activations [rows, {k}], got {a.dtype} {tuple(a.shape)} on {a.device}")


class MoEGemmSm90:
    """One grouped NVFP4 GEMM with a fused epilogue; `fc1` picks permute + SwiGLU or FC2, whose epilogue is
    the finalize into token order or, with `rows_out`, each routed row's bf16 result.

    n, k: the weight shape [N, K] of one expert (FC1: N = 2I, K = H; FC2: N = H, K = I); tile_w x tile_m:
    weight rows x token rows of a work tile (tile_w 128 or 256: each consumer warpgroup holds tile_w / 128
    blocks of 64 weight rows); stages: depth of the smem ring."""

    def __init__(self, fc1: bool, n: int, k: int, tile_w: int = TILE_W, tile_m: int = TILE_M, stages: int = STAGES, rows_out: bool = False):
        check_shape(fc1, n, k, tile_w=tile_w)
        if fc1 and rows_out:
            raise ValueError("rows_out is FC2's: FC1 always writes its SwiGLU rows")
        if tile_w not in (128, 256) or tile_m % WIDTH_STEP or not 64 <= tile_m <= 256:
            raise ValueError(f"tile {tile_w} x {tile_m}: the weight rows must be 128 or 256, the token rows 64, 128, 192 or 256")
        self.fc1, self.n, self.k, self.tile_w, self.tile_m, self.stages = fc1, n, k, tile_w, tile_m, stages
        self.rows_out = rows_out  # FC2: write each routed row's bf16 result [R, N] instead of adding into token order
        self.reps = tile_w // 128  # blocks of 64 weight rows per consumer warpgroup

    @cute.jit
    def __call__(
        self,
        mA: cute.Tensor,  # [rows_src, K] bf16: FC1 tokens x, FC2 hidden rows h
        mRowToken: cute.Tensor,  # [R] int32: row -> token (FC1 permutes by it, `cute`'s FC2 scatters by it)
        mWPtr: cute.Tensor,  # [E] int64: base address of expert e's packed codes [N, K/2]
        mSFPtr: cute.Tensor,  # [E] int64: base address of expert e's block scales [N, K/16]
        mScale: cute.Tensor,  # FC1: [E] fp32 1/global scale; FC2: [R] fp32 router weight / global scale (unread with rows_out)
        mTiles: cute.Tensor,  # [tiles, 3] int32: expert, first row, end row (exclusive) of each work tile
        mOut: cute.Tensor,  # FC1: [R, N/2] bf16; FC2: [T, N] fp32, accumulated into; FC2 rows_out: [R, N] bf16
        mRows: cute.Tensor,  # [R, K] bf16 routed rows, loaded by TMA: FC1 the permuted tokens it copies there first, FC2 mA
        mReady: cute.Tensor,  # FC1: [1 + ceil(R / PERMUTE_ROWS)] int32, zero: claims, then which row groups are copied
        num_ctas: cutlass.Int32,  # persistent CTAs (the SM count)
        stream,
    ):
        # weights are the wgmma A operand, from registers; routed-token rows are B, from smem. A tiled MMA
        # covers 128 weight rows (warpgroup g: rows 64g..64g+63); a work tile repeats it tile_w / 128 times,
        # so tile row t belongs to warpgroup (t // 64) % 2, block t // 128. One tiled MMA per token width
        # in widths(): a tile runs the narrowest that covers its rows
        mmas = tuple(
            sm90_utils.make_trivial_tiled_mma(
                cutlass.BFloat16, cutlass.BFloat16, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32,
                (2, 1, 1), tiler_mn=(64, width), a_source=warpgroup.OperandSource.RMEM,
            )
            for width in self.widths()
        )
        b_layout = self.rows_layout(self.tile_m)
        work = cute.size(mTiles, mode=[0]) * (self.n // self.tile_w)
        # the token rows of mRows are contiguous per expert: one TMA box per K step of the tile's token width
        # (a copy atom per width)
        tmas = tuple(
            cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mRows, cute.slice_(self.rows_layout(width), (None, None, 0)), (width, TILE_K))
            for width in self.widths()
        )
        # FC1 and FC2 rows_out: the tile's whole OUT_BOX-row groups leave by TMA stores of OUT_BOX x OUT_BOX boxes
        store = None
        if cutlass.const_expr(self.fc1 or self.rows_out):
            store = tuple(cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileS2GOp(), mOut, cute.slice_(self.out_boxes_layout(), (None, None, 0)), (OUT_BOX, OUT_BOX)))
        self.kernel(mmas, mA, mRowToken, mWPtr, mSFPtr, mScale, mTiles, mOut, mRows, mReady, b_layout, tmas, store).launch(
            grid=(cutlass.min(num_ctas, work), 1, 1), block=(THREADS, 1, 1), stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        mmas: tuple,
        mA: cute.Tensor,
        mRowToken: cute.Tensor,
        mWPtr: cute.Tensor,
        mSFPtr: cute.Tensor,
        mScale: cute.Tensor,
        mTiles: cute.Tensor,
        mOut: cute.Tensor,
        mRows: cute.Tensor,
        mReady: cute.Tensor,
        b_layout: cute.ComposedLayout,
        tmas: tuple,
        store: tuple,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        stages, tile_w, tile_m = self.stages, self.tile_w, self.tile_m
        work_count = cute.size(mTiles, mode=[0]) * (self.n // tile_w)
        k_tiles = self.k // TILE_K

        smem = SmemAllocator()
        barriers = smem.allocate_array(cutlass.Int64, 2 * stages)
        sX = smem.allocate_tensor(cutlass.BFloat16, b_layout.outer, 1024, b_layout.inner)
        # a stage of weights is the global fragment order's chunk of each 128-row block (to_fragment_order):
        # consumer thread c's 16 code bytes at 16 c, its row pair's 8 scale bytes at 8 (c // 4)
        sW = smem.allocate_tensor(
            cutlass.Uint8, cute.make_layout((16, CONSUMER_THREADS, self.reps, stages), stride=(1, 16, CODE_CHUNK, tile_w * TILE_K // 2)), 16
        )
        sSF = smem.allocate_tensor(
            cutlass.Uint8, cute.make_layout((8, CONSUMER_THREADS // 4, self.reps, stages), stride=(1, 8, SCALE_CHUNK, tile_w * TILE_K // BLOCK)), 16
        )
        # the epilogues go through smem: FC1 and FC2 with rows_out stage the bf16 output tile as TMA boxes (see
        # store_tile); FC2's finalize transposes its accumulators 64 tokens at a time (rows padded by 16 bytes
        # against bank conflicts) so that a thread owns 4 consecutive columns of one token
        if cutlass.const_expr(self.fc1 or self.rows_out):
            boxes = self.out_boxes_layout()
            sEpi = smem.allocate_tensor(cutlass.BFloat16, boxes.outer, 1024, boxes.inner)
        else:
            chunk = FC2_CHUNK_FLOATS // tile_w
            sEpi = (
                smem.allocate_tensor(cutlass.Float32, cute.make_layout((2, chunk, tile_w), stride=(chunk * (tile_w + 4), tile_w + 4, 1)), 16),
                smem.allocate_tensor(cutlass.Float32, cute.make_layout((tile_m,)), 16),
            )
        # full[s]: the producer's cp.async copies (and FC2's TMA bytes) into stage s landed; empty[s]: the
        # consumers' wgmmas on stage s are done
        ring = pipeline.PipelineCpAsync.create(
            barrier_storage=barriers,
            num_stages=stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.loaders() + 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, CONSUMER_THREADS),
        )

        if warp < PRODUCER_THREADS // 32:
            # ---- producer: the token rows by TMA, the weights by cp.async (see load_step); FC1's warps past the
            # loaders first copy the token rows into mRows in the permuted order (see permute_rows) ----
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            permutes = tidx >= self.loaders() if cutlass.const_expr(self.fc1) else False  # FC2: every producer thread loads
            if permutes:
                self.permute_rows(mA, mRowToken, mRows, mReady, tidx - self.loaders())
            else:
                state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
                for w in cutlass.range(bid, work_count, grid, unroll=1):
                    n_blk, expert, row_start, row_end = self.work_item(mTiles, w)
                    if row_start < row_end:
                        narrowest = self.width_index(row_end - row_start)
                        if cutlass.const_expr(self.fc1):
                            self.wait_rows(mReady, row_start, row_end, tidx)
                        sources = (mWPtr[expert], mSFPtr[expert])
                        for k_tile in cutlass.range(k_tiles, unroll=1):
                            ring.producer_acquire(state)
                            # the full barrier counts this arrival too (producer group loaders + 1) and the box's
                            # bytes; the DSL issues the copy from one elected lane of the whole warp (an `if tidx ==
                            # 0` around it never issues and hangs the kernel)
                            if warp == 0:
                                for i in cutlass.range_constexpr(len(tmas)):
                                    if narrowest == i:
                                        self.load_rows(tmas[i], self.widths()[i], sX, row_start, k_tile, state.index, ring.producer_get_barrier(state))
                            self.load_step(sources, n_blk * self.reps, (sW, sSF), k_tile, state.index, tidx)
                            ring.producer_commit(state)
                            state.advance()
        else:
            # ---- consumers: decode the weight fragment into registers, wgmma, epilogue ----
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            ctid = tidx - PRODUCER_THREADS
            thr_mma = mmas[-1].get_slice(ctid)
            frag = mmas[-1].make_fragment_A(thr_mma.partition_shape_A((tile_w, TILE_K)))
            acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_w, tile_m)), cutlass.Float32)
            # per token width: its MMA, the stages' first `width` token rows as its B operand, and the part of
            # the accumulators it writes (each 64-row block's first width / 2 elements: element 4i + e is of
            # token group 8i..8i+7, see epilogue)
            variants = []
            for width, mma in zip(self.widths(), mmas):
                mma.set(warpgroup.Field.ACCUMULATE, True)
                rows = cute.make_tensor(sX.iterator, cute.make_layout(((8, width // 8), TILE_K, stages), stride=((TILE_K, 8 * TILE_K), 1, tile_m * TILE_K)))
                part = cute.make_tensor(acc.iterator, cute.make_layout(((2, 2, width // 8), self.reps, 1), stride=((1, 2, 4), tile_m // 2, 0)))
                variants.append((mma, mma.make_fragment_B(mma.get_slice(ctid).partition_B(rows)), part))
            luts = make_decode_luts()
            # this K step's code words [k block, j] and block-scale words [k block // 2, j] of the thread's
            # fragment (see decode_block), loaded once per step
            codes = cute.make_rmem_tensor((TILE_K // 16, self.reps), cutlass.Int32)
            scale_words = cute.make_rmem_tensor((TILE_K // 32, self.reps), cutlass.Int32)
            # what the epilogue reads from global memory, loaded before the main loop hides its latency:
            # FC1 the expert's 1 / global scale; FC2's finalize the token and coefficient of the row the
            # thread adds (rows_out: nothing)
            epi_scale = cute.make_rmem_tensor((1,), cutlass.Float32)
            epi_token = cute.make_rmem_tensor((1,), cutlass.Int32)
            read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
            release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
            for w in cutlass.range(bid, work_count, grid, unroll=1):
                n_blk, expert, row_start, row_end = self.work_item(mTiles, w)
                if row_start < row_end:
                    self.epilogue_inputs(mRowToken, mScale, ctid, expert, row_start, row_end, epi_scale, epi_token)
                    acc.fill(0.0)
                    narrowest = self.width_index(row_end - row_start)  # an expert's last tiles are often narrower
                    for i in cutlass.range_constexpr(len(variants)):
                        if narrowest == i:
                            read, release = self.mainloop(variants[i], frag, codes, scale_words, luts, sW, sSF, ring, read, release, ctid)
                    self.epilogue(acc, thr_mma, epi_scale, epi_token, mOut, sEpi, ctid, row_start, row_end, n_blk, store)
            cute.arch.cp_async_bulk_wait_group(0)  # the last TMA stores (FC2's finalize: bulk additions) have read their smem

    @cute.jit
    def mainloop(self, variant, frag, codes, scale_words, luts, sW, sSF, ring, read, release, ctid):
        """A work tile's K loop at one token width, `variant` = (its mma, B operand, accumulators): returns the ring
        states past the tile's stages, all of which it releases."""
        mma, tCrX, acc = variant
        for k_tile in cutlass.range(self.k // TILE_K, unroll=1):
            ring.consumer_wait(read)
            for j in cutlass.range_constexpr(self.reps):
                cute.autovec_copy(cute.recast_tensor(sW[None, ctid, j, read.index], cutlass.Int32), codes[None, j])
                cute.autovec_copy(cute.recast_tensor(sSF[None, ctid // 4, j, read.index], cutlass.Int32), scale_words[None, j])
            # one 16-wide k block at a time: its wgmmas run while the next block decodes. The fragment has a
            # register slot per block; slot kb is free again once the previous K step's block kb is done,
            # which is what waiting for all but the 3 newest groups means
            for kb in cutlass.range_constexpr(TILE_K // 16):
                warpgroup.wait_group(3)
                self.decode_block(codes, scale_words, kb, frag, luts)
                warpgroup.fence()
                cute.gemm(mma, acc, frag[None, None, kb], tCrX[None, None, kb, read.index], acc)
                warpgroup.commit_group()
            if k_tile > 0:
                ring.consumer_release(release)  # every wgmma of the previous K step is done
                release.advance()
            read.advance()
        warpgroup.wait_group(0)
        ring.consumer_release(release)
        release.advance()
        return read, release

    def load_rows(self, tma, width: int, sX, row_start, k_tile, stage, bar):
        """K step k_tile of the tile's token rows from row_start on, as one TMA box of the copy atom's width
        (rows past the tile's end are read but never stored; past the tensor's end TMA fills zeros) into the
        first rows of `stage`, completing on `bar` with the box's bytes."""
        atom, rows = tma
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(bar, width * TILE_K * 2)
        gX = cute.local_tile(cute.domain_offset((row_start, 0), rows), (width, TILE_K), (0, k_tile))
        sXw = cute.local_tile(sX[None, None, stage], (width, TILE_K), (0, 0))
        sX_tma, gX_tma = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(sXw, 0, 2), cute.group_modes(gX, 0, 2))
        cute.copy(atom, gX_tma, sX_tma, tma_bar_ptr=bar)

    def out_columns(self) -> int:
        """Output columns of a work tile (FC1: SwiGLU halves the weight rows; FC2 rows_out: one per weight row)."""
        return self.tile_w // 2 if self.fc1 else self.tile_w

    def out_boxes_layout(self):
        """FC1's and FC2 rows_out's smem output tile: (tile_m / OUT_BOX) x (out_columns / OUT_BOX) boxes of OUT_BOX
        tokens x OUT_BOX columns bf16 in the 128-byte swizzle (TMA's), box c * (tile_m / OUT_BOX) + q holding
        tokens OUT_BOX q .. and columns OUT_BOX c .. (see out_box_address)."""
        boxes = (self.tile_m // OUT_BOX) * (self.out_columns() // OUT_BOX)
        return sm90_utils.make_smem_layout_epi(cutlass.BFloat16, LayoutEnum.ROW_MAJOR, (OUT_BOX, OUT_BOX), boxes)

    def out_box_address(self, sEpi, token, column):
        """The smem address of out_boxes_layout's 8 columns from `column` (a multiple of 8) of `token`: a
        token's OUT_BOX columns of a box are 128 bytes, whose 16-byte chunk c sits at chunk c ^ (token % 8)."""
        row_bytes = OUT_BOX * 2
        return sEpi.iterator.toint() + ((column // OUT_BOX) * self.tile_m + token) * row_bytes + (((column % OUT_BOX) // 8) ^ (token % 8)) * 16

    @cute.jit
    def store_tile(self, store, sEpi, mOut, ctid, row_start, row_end, n_blk):
        """The smem output tile (out_boxes_layout, written by every consumer) -> out rows row_start .. row_end - 1,
        columns n_blk x out_columns ..: its whole OUT_BOX-token groups by TMA stores from one warp, which run on
        while the next tile's main loop does (the next epilogue waits for them to have read sEpi), and its last
        rows (fewer than OUT_BOX: a box would write into the next tile's) in 16-byte stores."""
        rows = row_end - row_start
        full = rows // OUT_BOX
        cols = self.out_columns()
        cute.arch.fence_proxy("async.shared", space="cta")  # TMA reads the tile through the async proxy
        cute.arch.barrier(barrier_id=1, number_of_threads=CONSUMER_THREADS)
        if ctid < 32:
            for q in cutlass.range_constexpr(self.tile_m // OUT_BOX):
                if q < full:
                    for c in cutlass.range_constexpr(cols // OUT_BOX):
                        self.store_box(store, sEpi[None, None, c * (self.tile_m // OUT_BOX) + q], row_start + OUT_BOX * q, n_blk * cols + OUT_BOX * c)
            cute.arch.cp_async_bulk_commit_group()
        chunks = cols // 8
        for step in cutlass.range_constexpr(OUT_BOX * chunks // CONSUMER_THREADS):
            m = full * OUT_BOX + ctid // chunks + (CONSUMER_THREADS // chunks) * step
            if m < rows:
                part = cute.make_rmem_tensor((8,), cutlass.BFloat16)
                cute.autovec_copy(bf16x8_at(self.out_box_address(sEpi, m, (ctid % chunks) * 8), cute.AddressSpace.smem), part)
                # 64-bit row addresses: FC2's [R, N] passes 2^31 elements at DeepSeek-V3's 64K tokens
                dst = mOut.iterator.toint() + (cutlass.Int64(row_start + m) * cute.size(mOut, mode=[1]) + n_blk * cols + (ctid % chunks) * 8) * 2
                cute.autovec_copy(part, bf16x8_at(dst, cute.AddressSpace.gmem))

    def store_box(self, store, sBox, row, col):
        """A TMA store of one smem box to out[row .., col ..] (issued by one elected lane of the calling warp)."""
        atom, out = store
        gBox = cute.local_tile(cute.domain_offset((row, col), out), (OUT_BOX, OUT_BOX), (0, 0))
        s_part, g_part = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(sBox, 0, 2), cute.group_modes(gBox, 0, 2))
        cute.copy(atom, s_part, g_part)

    def rows_layout(self, width: int):
        """The smem ring of token rows at one token width: `stages` x (width rows x TILE_K) bf16 in wgmma's 128-byte
        swizzle (rows of 128 bytes, so the first w rows of a stage are the w-row layout's stage)."""
        return sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (self.tile_w, width, TILE_K), cutlass.BFloat16, self.stages)

    def widths(self) -> tuple[int, ...]:
        """The token widths a work tile runs at: WIDTH_STEP, 2 x WIDTH_STEP, .., tile_m."""
        return tuple(range(WIDTH_STEP, self.tile_m + 1, WIDTH_STEP))

    def width_index(self, rows):
        """Which of widths() a work tile holding `rows` (>= 1) rows of its expert runs at: the narrowest that
        covers them. The producer loads that many rows and the consumers run that width's MMA."""
        return cutlass.min((rows - 1) // WIDTH_STEP, self.tile_m // WIDTH_STEP - 1)

    def work_item(self, mTiles, w):
        """Work item w: weight block n_blk of token tile w // n_blocks (consecutive items share a token
        tile) as (n_blk, expert, first row, end row). Producer and consumers walk the same items."""
        m_blk = w // (self.n // self.tile_w)
        return w % (self.n // self.tile_w), mTiles[m_blk, 0], mTiles[m_blk, 1], mTiles[m_blk, 2]

    def swiglu_column(self, t):
        """FC1: the output column, within the work tile's tile_w / 2, of weight tile row t. Tile rows
        interleave gate and up in groups of 8 (rows 16i..16i+7 gate, 16i+8..16i+15 up of the same 8
        columns), so that a thread's accumulator rows t and t + 8 are the gate and the up of one column.
        Each 128-row block b of the tile holds output columns 64 b..64 b+63, warpgroup g the g-th 32 of
        them: a 256-row tile is two 128-row tiles side by side, so that both widths read the same
        fragment-ordered weights and a call can pick either."""
        g, u = (t // 64) % 2, t % 64
        return (t // 128) * 64 + g * 32 + (u // 16) * 8 + u % 8

    def weight_row(self, n_blk, t):
        """The expert weight row held by tile row t of weight block n_blk (FC1: gate rows [0, N/2), up
        rows [N/2, N)); to_fragment_order stores the rows in this order."""
        if cutlass.const_expr(self.fc1):
            return (self.n // 2) * ((t // 8) % 2) + n_blk * (self.tile_w // 2) + self.swiglu_column(t)
        return n_blk * self.tile_w + t

    def loaders(self) -> int:
        """Producer threads that load the stages: FC1's warp 0 (its other warps permute the token rows), FC2's 4 warps."""
        return 32 if self.fc1 else PRODUCER_THREADS

    @cute.jit
    def load_step(self, sources, block0, buffers, k_tile, stage, p):
        """cp.async K step `k_tile` of the expert's weights into `stage` (the token rows come as one TMA box):
        its 128-row blocks block0, block0 + 1, .. are contiguous chunks of codes and scales in the fragment
        order (to_fragment_order: a K step of 128 weight rows is one 4 KB code chunk and one 512-byte scale
        chunk), copied 16 (codes) and 4 (scales) bytes per thread and copy, consecutive threads on consecutive
        bytes, so that a warp reads whole 128-byte lines."""
        copy16 = cute.make_copy_atom(cpasync.CopyG2SOp(cpasync.LoadCacheMode.GLOBAL), cutlass.Uint8, num_bits_per_copy=128)
        copy4 = cute.make_copy_atom(cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=32)
        w_base, sf_base = sources
        sW, sSF = buffers
        k_tiles, loaders = self.k // TILE_K, self.loaders()
        kinds = (  # source, chunk bytes, destination, atom, bytes per copy
            (w_base, CODE_CHUNK, sW.iterator.toint() + stage * (self.tile_w * TILE_K // 2), copy16, 16),
            (sf_base, SCALE_CHUNK, sSF.iterator.toint() + stage * (self.tile_w * TILE_K // BLOCK), copy4, 4),
        )
        for base, chunk, dst0, atom, size in kinds:
            first = base + cutlass.Int64((block0 * k_tiles + k_tile) * chunk + p * size)
            for i in cutlass.range_constexpr(self.reps * chunk // (loaders * size)):
                j, within = divmod(i * loaders * size, chunk)  # copy i: byte `within` of block block0 + j
                src = cute.make_ptr(cutlass.Uint8, first + j * k_tiles * chunk + within, cute.AddressSpace.gmem, assumed_align=size)
                dst = cute.make_ptr(cutlass.Uint8, dst0 + i * loaders * size + p * size, cute.AddressSpace.smem, assumed_align=size)
                cute.copy(atom, cute.make_tensor(src, cute.make_layout(size)), cute.make_tensor(dst, cute.make_layout(size)))

    @cute.jit
    def permute_rows(self, mA, mRowToken, mRows, mReady, p):
        """FC1: mRows[r] = mA[row -> token r] for every routed row, by the producer warps past the loaders of every
        CTA, PERMUTE_ROWS rows per claim of mReady[0] (a warp claims the next group until none is left), each
        group marked copied in mReady[1 + group] (release) for the loaders (wait_rows). Claims go in row order, so
        the first tiles' rows are copied first. Copying once per row rather than gathering each row into every
        work tile by cp.async (as many times as N has weight blocks) takes the gather off the load path."""
        lane = p % 32
        rows = cute.size(mRows, mode=[0])
        row_bytes = self.k * 2
        steps = -(-row_bytes // 512)  # a warp copies 512 bytes of a row per step (see chunk_pair)
        group = self.claim(mReady, lane)
        while group * PERMUTE_ROWS < rows:
            for r in cutlass.range_constexpr(PERMUTE_ROWS):
                row = group * PERMUTE_ROWS + r
                if row < rows:
                    row_src = mA.iterator.toint() + cutlass.Int64(mRowToken[row]) * row_bytes
                    row_dst = mRows.iterator.toint() + cutlass.Int64(row) * row_bytes
                    # all of a row's loads first, then its stores: each thread has PERMUTE_BATCH 16-byte loads in flight
                    for b in cutlass.range_constexpr(0, steps, PERMUTE_BATCH):
                        pairs = [self.chunk_pair(row_src, row_dst, lane, step) for step in range(b, min(b + PERMUTE_BATCH, steps))]
                        parts = [cute.make_rmem_tensor((8,), cutlass.BFloat16) for _ in pairs]
                        for i in cutlass.range_constexpr(len(pairs)):
                            cute.autovec_copy(bf16x8_at(pairs[i][0], cute.AddressSpace.gmem), parts[i])
                        for i in cutlass.range_constexpr(len(pairs)):
                            cute.autovec_copy(parts[i], bf16x8_at(pairs[i][1], cute.AddressSpace.gmem))
            cute.arch.sync_warp()
            if lane == 0:
                # the rows are read by TMA (the async proxy) on other SMs once the flag is seen
                cute.arch.fence_proxy("async.global")
                cute.arch.fence_acq_rel_gpu()
                cute.arch.store(mReady.iterator + 1 + group, cutlass.Int32(1), sem="release", scope="gpu")
            group = self.claim(mReady, lane)

    def chunk_pair(self, row_src, row_dst, lane, step):
        """FC1's permute: the source and destination address of `lane`'s 16-byte chunk of a row in `step`: lane l
        copies chunks l, l + 32, .. In a last step of fewer than 32 chunks (K not a multiple of 256) the lanes
        past the row's end copy its last chunk again (the same bytes to the same place)."""
        chunks = self.k * 2 // 16
        if 32 * (step + 1) <= chunks:
            return row_src + lane * 16 + step * 512, row_dst + lane * 16 + step * 512
        offset = cutlass.min(lane + 32 * step, chunks - 1) * 16
        return row_src + offset, row_dst + offset

    @cute.jit
    def claim(self, mReady, lane):
        """The next row group for a permuting warp: lane 0 takes it from mReady[0], the warp shares it."""
        group = cutlass.Int32(0)
        if lane == 0:
            group = cute.arch.atomic_add(mReady.iterator, cutlass.Int32(1), sem="relaxed", scope="gpu")
        return cute.arch.shuffle_sync(group, 0)

    @cute.jit
    def wait_rows(self, mReady, row_start, row_end, lane):
        """FC1's loader warp: until the row groups holding rows row_start .. row_end - 1 are copied into mRows
        (permute_rows), then the warp's TMA loads may read them. Rows past row_end that a box reads may still be
        being copied: their results are never stored."""
        for g in cutlass.range(row_start // PERMUTE_ROWS + lane, (row_end - 1) // PERMUTE_ROWS + 1, 32, unroll=1):
            done = cutlass.Int32(0)
            while done == 0:
                done = cute.arch.load(mReady.iterator + 1 + g, cutlass.Int32, sem="acquire", scope="gpu")
        cute.arch.sync_warp()
        cute.arch.fence_proxy("async.global")

    @cute.jit
    def decode_block(self, codes, scale_words, kb, frag, luts):
        """Decode this thread's wgmma A fragment of 16-wide k block kb into `frag`. Per block j of 128
        weight rows the fragment holds (row r, k 2q..2q+1), (row r+8, same k), (row r, k 8+2q..), (row r+8,
        k 8+2q..): in the fragment order that is one word, codes[kb, j], which quack's lookup decodes into
        the four bf16x2 registers; one bf16x2 multiply each applies the block scale of the row (exact:
        e2m1 x e4m3 fits bf16's mantissa), the scales of rows r and r+8 being the low or high half of
        scale_words[kb // 2, j]."""
        words = cute.recast_tensor(frag, cutlass.Int32)
        for j in cutlass.range_constexpr(self.reps):
            decoded = decode_e2m1x8_to_bf16x8(codes[kb, j], luts)
            scales = e4m3x2_to_bf16x2(scale_words[kb // 2, j], kb % 2 == 1)
            words[0, j, kb] = mul_bf16x2_bcast(decoded[0], scales, False)
            words[1, j, kb] = mul_bf16x2_bcast(decoded[1], scales, True)
            words[2, j, kb] = mul_bf16x2_bcast(decoded[2], scales, False)
            words[3, j, kb] = mul_bf16x2_bcast(decoded[3], scales, True)

    @cute.jit
    def epilogue_inputs(self, mRowToken, mScale, ctid, expert, row_start, row_end, epi_scale, epi_token):
        """FC1: epi_scale[0] = 1 / the expert's global scale. FC2's finalize: the token and coefficient of tile
        row ctid, the row this thread adds (see epilogue); 0 past the tile's rows. rows_out: nothing."""
        if cutlass.const_expr(self.fc1):
            epi_scale[0] = mScale[expert]
        elif cutlass.const_expr(not self.rows_out):
            row = row_start + ctid
            epi_token[0] = 0
            epi_scale[0] = 0.0
            if ctid < self.tile_m and row < row_end:
                epi_token[0] = mRowToken[row]
                epi_scale[0] = mScale[row]

    @cute.jit
    def epilogue(self, acc, thr_mma, epi_scale, epi_token, mOut, sEpi, ctid, row_start, row_end, n_blk, store):
        """Accumulator element (weight tile row t, token row m) -> the output. Per block of 64 weight rows
        a thread holds rows t and t + 8 for the same token columns: elements 4i, 4i+1 and 4i+2, 4i+3
        (tokens 8i + 2q, + 1), the block's tile_m / 2 elements after the previous block's."""
        tile_m = self.tile_m
        lane = ctid % 32
        if cutlass.const_expr(self.fc1 or self.rows_out):
            if ctid < 32:  # the warp that issues the TMA stores: the previous tile's have read sEpi
                cute.arch.cp_async_bulk_wait_group(0, read=True)
            cute.arch.barrier(barrier_id=1, number_of_threads=CONSUMER_THREADS)
            for j in cutlass.range_constexpr(self.reps):
                if cutlass.const_expr(self.fc1):
                    # h = silu(gate / s) * (up / s): a thread's h of tile rows t (gate), t + 8 (up) and tokens m,
                    # m + 1 is element (row t % 8, columns m % 8, + 1) of an 8 x 8 block of the 8 output columns
                    # of t (see swiglu_column: 64 j + 32 g + 8 w .. for warp w of warpgroup g), and 4 consecutive
                    # 8-token blocks leave by one transposing stmatrix (lane l addresses token 32 p + l)
                    for p in cutlass.range_constexpr(tile_m // 32):
                        h = []
                        for e in cutlass.range_constexpr(8):
                            idx = (tile_m // 2) * j + 16 * p + 4 * (e // 2) + e % 2
                            gate = acc[idx] * epi_scale[0]
                            up = acc[idx + 2] * epi_scale[0]
                            sig = cute.arch.rcp_approx(1.0 + cute.math.exp2(gate * -LOG2E, fastmath=True))
                            h.append(gate * sig * up)
                        store_trans_x4(self.out_box_address(sEpi, 32 * p + lane, 64 * j + 8 * (ctid // 32)), h)
                else:
                    # z (no scale: the finalize applies router weight / global scale): a thread's elements 8p ..
                    # 8p + 7 of each 64-row block are, two by two, element (row t % 8, columns m % 8, + 1) of the
                    # 8 x 8 blocks (rows t, t + 8) x (tokens 16p .. + 7, 16p + 8 .. + 15), which leave by one
                    # transposing stmatrix (lane l addresses token 16 p + l % 8 + 8 (l // 16) of rows from
                    # t - t % 8 + 8 ((l // 8) % 2))
                    for p in cutlass.range_constexpr(tile_m // 16):
                        z = [acc[(tile_m // 2) * j + 8 * p + e] for e in range(8)]
                        token = 16 * p + lane % 8 + 8 * (lane // 16)
                        store_trans_x4(self.out_box_address(sEpi, token, 128 * j + 16 * (ctid // 32) + 8 * ((lane // 8) % 2)), z)
            self.store_tile(store, sEpi, mOut, ctid, row_start, row_end, n_blk)
        else:
            # finalize: z * coef[token] into smem rows of tile_w output columns, a chunk of tokens at a
            # time through two buffers; then each token's row is added into out[token] by one bulk
            # asynchronous fp32 reduction, issued by the thread of that tile row (no per-thread atomics)
            coords = thr_mma.partition_C(cute.make_identity_tensor((self.tile_w, tile_m)))
            rows, coefs = sEpi
            chunk = FC2_CHUNK_FLOATS // self.tile_w
            own = ctid // chunk  # the chunk holding tile row ctid, the row this thread adds
            if ctid < tile_m:
                coefs[ctid] = epi_scale[0]
            for c in cutlass.range_constexpr(tile_m // chunk):
                # the buffer of chunk c was last read by the additions of chunk c - 2 (of the previous
                # tile for c < 2: those were issued a main loop ago, all waited for at c == 0)
                if cutlass.const_expr(c == 0):
                    cute.arch.cp_async_bulk_wait_group(0, read=True)
                elif cutlass.const_expr(c >= 2):
                    if own == c - 2:
                        cute.arch.cp_async_bulk_wait_group(0, read=True)
                cute.arch.barrier(barrier_id=1, number_of_threads=CONSUMER_THREADS)
                for n8 in cutlass.range_constexpr(chunk // 8):
                    # this thread's two tokens of the 8-token group (m, m + 1; m even): one 8-byte load
                    _, m = coords[4 * (chunk // 8 * c + n8)]
                    pair = cute.make_rmem_tensor((2,), cutlass.Float32)
                    cute.autovec_copy(cute.local_tile(coefs, (2,), (m // 2,)), pair)
                    for j in cutlass.range_constexpr(self.reps):
                        for e in cutlass.range_constexpr(4):
                            idx = (tile_m // 2) * j + 4 * (chunk // 8 * c + n8) + e
                            t, m = coords[idx]
                            rows[c % 2, m - chunk * c, t] = acc[idx] * pair[e % 2]
                cute.arch.fence_proxy("async.shared", space="cta")  # the bulk copy reads through the async proxy
                cute.arch.barrier(barrier_id=1, number_of_threads=CONSUMER_THREADS)
                if own == c and row_start + ctid < row_end:
                    dst = mOut.iterator.toint() + cutlass.Int64(epi_token[0] * self.n + n_blk * self.tile_w) * 4
                    bulk_add_f32(dst, rows[c % 2, ctid - chunk * c, None].iterator.toint(), self.tile_w * 4)
                    cute.arch.cp_async_bulk_commit_group()


@dsl_user_op
def bulk_add_f32(dst: cutlass.Int64, src: cutlass.Int32, nbytes: int, *, loc=None, ip=None) -> None:
    """out[dst .. dst + nbytes) += smem[src .. src + nbytes) as fp32, by the bulk copy engine (asynchronous:
    commit and wait with cp.async.bulk groups; both addresses 16-byte aligned, nbytes a multiple of 16)."""
    llvm.inline_asm(
        None, [cutlass.Int64(dst).ir_value(loc=loc, ip=ip), cutlass.Int32(src).ir_value(loc=loc, ip=ip)],
        f"cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], {nbytes};", "l,r,~{memory}",
        has_side_effects=True, loc=loc, ip=ip,
    )


def bf16x8_at(address, space):
    """The 8 bf16 (16 bytes) at a 16-byte aligned `address` of memory `space`, as a tensor: one vector load or store."""
    return cute.make_tensor(cute.make_ptr(cutlass.BFloat16, address, space, assumed_align=16), cute.make_layout(8))


@dsl_user_op
def store_trans_x4(addr: cutlass.Int32, values: list, *, loc=None, ip=None) -> None:
    """Four 8 x 8 bf16 blocks into smem, transposed, by one warp (stmatrix .x4 .trans): this thread's `values`
    2q, 2q + 1 (fp32, rounded to bf16) are element (row l // 4, columns 2 (l % 4), + 1) of block q, and lane l
    gives the 16-byte aligned smem address at which column l % 8 of block l // 8 is stored as 8 contiguous
    bf16 (its rows 0..7)."""
    llvm.inline_asm(
        None, [cutlass.Int32(addr).ir_value(loc=loc, ip=ip)] + [cutlass.Float32(v).ir_value(loc=loc, ip=ip) for v in values],
        "{.reg .b32 r0, r1, r2, r3; cvt.rn.bf16x2.f32 r0, $2, $1; cvt.rn.bf16x2.f32 r1, $4, $3; "
        "cvt.rn.bf16x2.f32 r2, $6, $5; cvt.rn.bf16x2.f32 r3, $8, $7; "
        "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [$0], {r0, r1, r2, r3};}",
        "r,f,f,f,f,f,f,f,f,~{memory}", has_side_effects=True, loc=loc, ip=ip,
    )


@dsl_user_op
def e4m3x2_to_bf16x2(pairs: cutlass.Int32, high: bool, *, loc=None, ip=None) -> cutlass.Int32:
    """The two e4m3 values in the low (or `high`) 16 bits of `pairs` as a bf16x2 word (exact, subnormals
    included: e4m3 -> f16 -> f32 -> bf16)."""
    return cutlass.Int32(
        llvm.inline_asm(
            T.i32(), [cutlass.Int32(pairs).ir_value(loc=loc, ip=ip)],
            "{.reg .b16 p, q, lo, hi; .reg .b32 h2; .reg .f32 f0, f1; mov.b32 {p, q}, $1; "
            f"cvt.rn.f16x2.e4m3x2 h2, {'q' if high else 'p'}; "
            "mov.b32 {lo, hi}, h2; cvt.f32.f16 f0, lo; cvt.f32.f16 f1, hi; cvt.rn.bf16x2.f32 $0, f1, f0;}",
            "=r,r", has_side_effects=False, loc=loc, ip=ip,
        )
    )


def _fake(dtype, shape, align: int = 16):
    """A row-major symbolic tensor for compiling (`None` in `shape`: a runtime extent)."""
    shape = tuple(cute.sym_int() if s is None else s for s in shape)
    return cute.runtime.make_fake_compact_tensor(dtype, shape, stride_order=tuple(reversed(range(len(shape)))), assumed_align=align)


def fragment_layout(fc1: bool) -> str:
    """The name of `to_fragment_order`'s byte order (the same for both work tile widths, see swiglu_column)."""
    return "cute-fc1" if fc1 else "cute-fc2"


def to_fragment_order(w: NVFP4Weights, fc1: bool) -> NVFP4Weights:
    """Experts in the `rows` layout -> the same bytes in the order the kernels' threads read them (see
    the module docstring); shapes and sizes unchanged, each expert's bytes stay its own."""
    e, n, k = w.shape
    check_layout(w, ROWS, "the fragment reorder")
    t = torch.arange(n, device=w.device)
    rows = MoEGemmSm90(fc1, n, k).weight_row(t // TILE_W, t % TILE_W)  # MoEGemmSm90 checks the shape
    steps = k // TILE_K
    # tile-order row 128 b + 16 w + 8 h + l is row r + 8 h of thread 32 w + 4 l + q (r = 16 w + l, any q);
    # byte 8 kb + 4 s + q of a row's K step is byte q of its code word 2 kb + s (k 16 kb + 8 s + 2 q ..)
    codes = w.packed[:, rows].view(e, n // 128, 8, 2, 8, steps, 4, 2, 4)
    codes = codes.permute(0, 1, 5, 2, 4, 8, 6, 7, 3)  # expert, b, step | thread (w, l, q) | word kb | byte (s, h)
    # scale byte kb of a row's K step; a row pair's word kb // 2 holds bytes (kb, row r), (kb, row r + 8)
    scales = w.block_scale[:, rows].view(torch.uint8).view(e, n // 128, 8, 2, 8, steps, 2, 2)
    scales = scales.permute(0, 1, 5, 2, 4, 6, 7, 3)  # expert, b, step | row pair (w, l) | kb | h
    return NVFP4Weights(
        codes.reshape(e, n, k // 2), scales.reshape(e, n, k // BLOCK).view(torch.float8_e4m3fn), w.global_scale, fragment_layout(fc1)
    )


@functools.cache
def compile_gemm(fc1: bool, n: int, k: int, tile_w: int = TILE_W, tile_m: int = TILE_M, rows_out: bool = False, ptx_dir: str | None = None):
    """Compile one stage for one expert weight shape [N, K] and work tile (once per process; also runs on a
    CPU machine with CUTE_DSL_ARCH=sm_90a, which is how CI checks that every kernel builds). ptx_dir: also
    write the kernel's PTX into this directory (and keep it in the result's `__ptx__`), for CI's ptxas check."""
    out = _fake(cutlass.BFloat16, (None, n // 2)) if fc1 else _fake(cutlass.BFloat16 if rows_out else cutlass.Float32, (None, n))
    return cute.compile(
        MoEGemmSm90(fc1, n, k, tile_w, tile_m, rows_out=rows_out),
        _fake(cutlass.BFloat16, (None, k)),
        _fake(cutlass.Int32, (None,), 4),
        _fake(cutlass.Int64, (None,), 8),
        _fake(cutlass.Int64, (None,), 8),
        _fake(cutlass.Float32, (None,), 4),
        _fake(cutlass.Int32, (None, 3), 4),
        out,
        _fake(cutlass.BFloat16, (None, k)),
        _fake(cutlass.Int32, (None,), 4),
        cutlass.Int32(1),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi" + (f" --keep-ptx --dump-dir={ptx_dir}" if ptx_dir else ""),
    )
