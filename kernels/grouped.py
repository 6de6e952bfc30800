"""GPU MoE kernels from library GEMMs: Triton NVFP4 decode + `torch._grouped_mm` + Triton epilogues.

Same math and the same decode-then-grouped-GEMM structure as `reference.TorchReferenceKernels`, with
the memory-bound steps written as single-pass Triton kernels instead of chains of torch ops (the torch
decode alone moves ~30x the weight bytes through int64 indices). The default on CUDA where the fused
kernels do not run or fit, its finalize ends the default's FC2 on Hopper (cute-det), and it is the baseline of the
fused kernels (kernels/cute_moe.py); it is not fused: FC1 writes `[R, 2I]` and reads it
back, FC2 writes `[R, H]` and gathers it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nvfp4 import BLOCK, NVFP4Weights
from .reference import TorchReferenceKernels


@triton.jit
def _e2m1_value(code):
    """e2m1 code (0..15, bit 3 = sign) -> fp32 value: 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    exponent = ((code & 7) >> 1).to(tl.int32)
    mantissa = (code & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    value = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _decode_kernel(packed_ptr, scale_ptr, out_ptr, num_blocks, BLOCKS_PER_PROGRAM: tl.constexpr):
    # One 16-value scale block = 8 packed bytes + 1 e4m3 scale -> 16 outputs.
    blk = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    live = blk < num_blocks
    byte = tl.load(packed_ptr + blk[:, None] * 8 + tl.arange(0, 8)[None, :], mask=live[:, None], other=0)
    pairs = tl.join(_e2m1_value(byte & 15), _e2m1_value(byte >> 4))  # [B, 8, 2]: even k, odd k
    values = tl.reshape(pairs, (BLOCKS_PER_PROGRAM, 16))
    scale = tl.load(scale_ptr + blk, mask=live).to(tl.float32)
    out = (values * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + blk[:, None] * 16 + tl.arange(0, 16)[None, :], out, mask=live[:, None])


def decode_into(weights: NVFP4Weights, out: torch.Tensor) -> None:
    """Decode (no global scale) into a contiguous `[e, N, K]` tensor."""
    if not out.is_contiguous() or tuple(out.shape) != weights.shape:
        raise ValueError(f"decode_into needs a contiguous output of shape {weights.shape}, got {tuple(out.shape)}")
    num_blocks = out.numel() // BLOCK
    if num_blocks == 0:
        return
    per_program = 256
    _decode_kernel[(triton.cdiv(num_blocks, per_program),)](
        weights.packed.contiguous(), weights.block_scale.contiguous(), out, num_blocks, BLOCKS_PER_PROGRAM=per_program
    )


@triton.jit
def _swiglu_kernel(y_ptr, inv_scale_ptr, out_ptr, rows, inter, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (r < rows)[:, None] & (c < inter)[None, :]
    s = tl.load(inv_scale_ptr + r, mask=r < rows, other=0.0)[:, None]
    gate = tl.load(y_ptr + r[:, None] * (2 * inter) + c[None, :], mask=live, other=0.0).to(tl.float32) * s
    up = tl.load(y_ptr + r[:, None] * (2 * inter) + inter + c[None, :], mask=live, other=0.0).to(tl.float32) * s
    h = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + r[:, None] * inter + c[None, :], h.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _finalize_kernel(z_ptr, token_rows_ptr, coef_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < hidden
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed order: deterministic
        row = tl.load(token_rows_ptr + t * TOP_K + j)
        coef = tl.load(coef_ptr + t * TOP_K + j)
        acc += coef * tl.load(z_ptr + row * hidden + c, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * hidden + c, acc.to(out_ptr.dtype.element_ty), mask=live)


class GroupedTritonKernels(TorchReferenceKernels):
    name = "grouped"
    decode_into = staticmethod(decode_into)

    def swiglu(self, y: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        rows, inter = y.shape[0], y.shape[1] // 2
        h = torch.empty(rows, inter, dtype=y.dtype, device=y.device)
        _swiglu_kernel[(triton.cdiv(rows, 16), triton.cdiv(inter, 256))](y, inv_scale.contiguous(), h, rows, inter, BLOCK_R=16, BLOCK_C=256)
        return h

    def reduce_rows(self, rows: torch.Tensor, token_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        tokens, hidden = token_rows.shape[0], rows.shape[1]
        out = torch.empty(tokens, hidden, dtype=rows.dtype, device=rows.device)
        if tokens:
            _finalize_kernel[(tokens, triton.cdiv(hidden, 1024))](
                rows, token_rows.contiguous(), coef.float().contiguous(), out, hidden, TOP_K=token_rows.shape[1], BLOCK_C=1024
            )
        return out
