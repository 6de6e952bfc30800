"""The NVFP4 format (kernels/nvfp4.py): e2m1 codes, packing, rounding, quantise/dequantise error, exact bf16
decode, global scales, input validation, activation fake-quantisation and byte counts."""

import pytest
import torch

import reference_model as ref
from dwdp_bench.kernels import nvfp4
from dwdp_bench.kernels.nvfp4 import (
    NVFP4Weights,
    decode,
    dequantize,
    fake_quantize_activations,
    pack,
    quantize,
    round_to_e2m1,
    unpack,
)

# Written out here rather than imported, so a wrong table in the source cannot agree with itself.
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _u8(t):
    """float8 tensors compared bit for bit (and printable) through their bytes."""
    return t.view(torch.uint8)


def _ones_scales(e, n, k):
    return torch.ones(e, n, k // 16).to(torch.float8_e4m3fn), torch.ones(e, dtype=torch.float32)


def _spread_weights(seed, e, n, k, expert_decades=12.0, block_decades=3.0):
    """Gaussian weights whose experts span `expert_decades` decades of magnitude and whose 16-blocks span
    `block_decades` decades within an expert."""
    g = _gen(seed)
    expert = 10 ** (torch.rand(e, 1, 1, 1, generator=g) * expert_decades - expert_decades / 2)
    block = 10 ** (-torch.rand(e, n, k // 16, 1, generator=g) * block_decades)
    return (torch.randn(e, n, k // 16, 16, generator=g) * expert * block).view(e, n, k)


def _block_amax(w):
    e, n, k = w.shape
    return w.double().view(e, n, k // 16, 16).abs().amax(-1, keepdim=True)


# --- e2m1 codes and packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2,), (3, 16), (2, 5, 32)])
def test_pack_unpack_round_trip(seed, shape):
    codes = torch.randint(0, 16, shape, generator=_gen(seed), dtype=torch.uint8)
    packed = pack(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack(packed), codes)


def test_pack_layout_low_nibble_is_even_k_and_every_byte_round_trips():
    assert pack(torch.tensor([3, 5, 15, 0], dtype=torch.uint8)).tolist() == [0x53, 0x0F]
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack(unpack(every_byte)), every_byte)
    with pytest.raises(ValueError, match="odd"):
        pack(torch.zeros(3, dtype=torch.uint8))


def test_each_code_decodes_to_its_e2m1_value():
    # One row of K = 16 holding codes 0..15, a unit block scale and a unit global scale: decode and
    # dequantize both give the e2m1 table, and so does the independent decoder of the tests.
    codes = torch.arange(16, dtype=torch.uint8).view(1, 1, 16)
    q = NVFP4Weights(pack(codes), *_ones_scales(1, 1, 16))
    want = torch.tensor(E2M1_TABLE, dtype=torch.float64)
    for got in (decode(q, torch.float64), decode(q, torch.bfloat16), dequantize(q, torch.float64), ref.decode_nvfp4(*q.tensors())):
        assert got.shape == (1, 1, 16)
        assert torch.equal(got.double().flatten(), want)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [None, 1, 3 * 32 * 2])  # all 3 experts at once; one at a time; 2 then 1
def test_random_codes_decode_through_the_table_with_scales(seed, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(nvfp4, "DECODE_CHUNK", chunk)
    g = _gen(seed)
    e, n, k = 3, 3, 32
    codes = torch.randint(0, 16, (e, n, k), generator=g, dtype=torch.uint8)
    scale_bytes = torch.randint(0, 0x7F, (e, n, k // 16), generator=g, dtype=torch.uint8)  # no NaN (0x7F)
    q = NVFP4Weights(pack(codes), scale_bytes.view(torch.float8_e4m3fn), torch.tensor([2.0, 0.25, 4.0]))
    table = torch.tensor(E2M1_TABLE, dtype=torch.float64)
    scale = q.block_scale.double().repeat_interleave(16, dim=-1)
    want = table[codes.long()] * scale
    assert torch.equal(decode(q, torch.float64), want)
    assert torch.equal(dequantize(q, torch.float64), want / q.global_scale.double()[:, None, None])


# --- round_to_e2m1 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_representable_values_map_to_their_own_code(dtype):
    codes = [c for c in range(16) if c != 8]  # 8 would be negative zero
    values = torch.tensor([E2M1_TABLE[c] for c in codes], dtype=dtype)
    got = round_to_e2m1(values)
    assert got.dtype == torch.uint8
    assert got.tolist() == codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_midpoints_tie_to_the_even_code(dtype):
    # (midpoint, e2m1 value it rounds to): the code with an even mantissa bit, as IEEE RNE does.
    ties = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]
    x = torch.tensor([m for m, _ in ties] + [-m for m, _ in ties], dtype=dtype)
    want = [v for _, v in ties] + [-v for _, v in ties]
    got = [E2M1_TABLE[c] for c in round_to_e2m1(x).tolist()]
    assert got == want
    assert round_to_e2m1(torch.tensor([-0.25], dtype=dtype)).tolist() == [0]  # not negative zero (code 8)


def test_off_midpoint_values_round_to_nearest():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    below = torch.tensor(mids, dtype=torch.float64) - 1e-6
    above = torch.tensor(mids, dtype=torch.float64) + 1e-6
    assert round_to_e2m1(below).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert round_to_e2m1(above).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert round_to_e2m1(-above).tolist() == [9, 10, 11, 12, 13, 14, 15]


def test_large_values_saturate_and_there_is_no_negative_zero():
    big = torch.tensor([6.0, 6.001, 7.0, 100.0, 1e30])
    assert round_to_e2m1(big).tolist() == [7] * 5
    assert round_to_e2m1(-big).tolist() == [15] * 5
    small = torch.tensor([-0.0, -1e-30, -0.1, -0.2499, 0.0, 1e-30, 0.2499])
    assert round_to_e2m1(small).tolist() == [0] * 7


# --- quantise / dequantise -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 8, 64), (6, 5, 48), (2, 33, 160)])
def test_quantize_error_is_bounded_per_block(seed, shape):
    # Why |w - dequant(w)| <= 1.0625 * block_amax / 6 for every element (s = block_amax / 6 is the ideal
    # step that maps the block's largest magnitude onto e2m1's 6):
    #   * the stored scale s' is s rounded to e4m3 (3 mantissa bits, round to nearest): |s' - s| <= 2^-4 s
    #     as long as s is an e4m3 normal number, which holds when the block's amax is more than
    #     2^-6 / 448 ~ 3.5e-5 of its expert's amax (the expert amax is mapped to 448; these blocks span
    #     3 decades, experts 12 decades: the global scale is per expert);
    #   * if |w| / s' <= 6, rounding to the nearest e2m1 value costs at most half the widest gap (4 -> 6),
    #     i.e. 1 in scaled units: |err| <= s' <= 1.0625 s;
    #   * if |w| / s' > 6 (s' was rounded down), w saturates to 6 s': |err| <= 6 s - 6 s' <= 6 * 2^-4 s
    #     = 0.375 s.
    # The float32 arithmetic adds relative errors ~1e-7, covered by the 1e-5 slack.
    e, n, k = shape
    w = _spread_weights(seed, e, n, k)
    q = quantize(w)
    assert q.shape == shape
    dq = dequantize(q)
    assert dq.dtype == torch.float32 and dq.shape == shape
    assert torch.isfinite(dq).all()
    assert (q.block_scale.float() >= E4M3_MIN_NORMAL * 0.999).all()  # the premise of the bound above
    err = (w.double() - dq.double()).view(e, n, k // 16, 16).abs()
    bound = 1.0625 * _block_amax(w) / 6
    assert (err <= bound * (1 + 1e-5)).all(), f"worst err / bound = {(err / bound).max().item():.4f}"
    # The typical error is far below the worst case; on larger tensors the worst case is nearly reached
    # (so the bound above is not vacuous).
    assert (err / bound).mean() < 0.3
    if w.numel() >= 1024:
        assert (err / bound).max() > 0.5
    assert float((w.double() - dq.double()).norm() / w.double().norm()) < 0.12


@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_error_with_subnormal_and_flushed_block_scales(seed):
    # Blocks 1e-3 .. 1e-9 of their expert's amax need e4m3 subnormal scales, or a zero scale: the per-block
    # relative bound above no longer holds (a format limit, not a bug), but the error stays bounded in
    # absolute terms. In scaled units (times the global scale g) with s = block_amax * g / 6 and
    # |s' - s| <= eps = max(2^-4 s, 2^-10) (half the subnormal step 2^-9):
    #   |err| * g <= max(s + eps, 6 eps) <= s + 6 eps.
    e, n, k = 2, 16, 64
    w = _spread_weights(seed, e, n, k, expert_decades=4.0, block_decades=9.0)
    q = quantize(w)
    dq = dequantize(q)
    assert torch.isfinite(dq).all()
    blocks_amax = _block_amax(w)
    assert ((q.block_scale.float() == 0)[..., None] & (blocks_amax > 0)).any()  # some blocks flush to zero
    assert ((q.block_scale.float() > 0) & (q.block_scale.float() < E4M3_MIN_NORMAL)).any()  # some subnormal
    g = q.global_scale.double()[:, None, None, None]
    s = blocks_amax * g / 6
    eps = torch.maximum(s / 16, torch.full_like(s, 2.0**-10))
    err = (w.double() - dq.double()).view(e, n, k // 16, 16).abs()
    assert (err * g <= (s + 6 * eps) * (1 + 1e-5)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_decode_is_exact_over_the_whole_e4m3_range(seed):
    # Every non-NaN, non-negative e4m3 byte (subnormal scales 2^-9.. included, up to 448) as a block scale,
    # random codes: e2m1 (<= 2 significant bits) x e4m3 (<= 4) fits bf16's 8 bits, and 2^-10 .. 2688 its
    # exponent range.
    g = _gen(seed)
    e, n, k = 3, 16, 128
    scale_bytes = torch.cat([torch.arange(0x7F, dtype=torch.uint8), torch.randint(0, 0x7F, (e * n * k // 16 - 0x7F,), generator=g, dtype=torch.uint8)])
    scale_bytes = scale_bytes[torch.randperm(scale_bytes.numel(), generator=g)].view(e, n, k // 16)
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    q = NVFP4Weights(packed, scale_bytes.view(torch.float8_e4m3fn), torch.ones(e))
    exact = decode(q, torch.float64)
    bf16 = decode(q, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.double(), exact)
    assert torch.equal(exact, ref.decode_nvfp4(*q.tensors()))
    assert exact.abs().max() == 6 * E4M3_MAX  # the range really was covered
    assert exact[exact != 0].abs().min() == 0.5 * 2.0**-9


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_decode_of_quantised_weights_is_exact(seed):
    w = _spread_weights(seed, 4, 8, 64, block_decades=9.0)
    q = quantize(w)
    assert torch.equal(decode(q, torch.bfloat16).double(), decode(q, torch.float64))
    # dequantize divides by the global scale in float32: one float32 rounding off the independent decoder
    torch.testing.assert_close(dequantize(q, torch.float64), ref.decode_nvfp4(*q.tensors()), rtol=2.0**-24, atol=0)


# --- global scales ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_scale_is_448_times_6_over_expert_amax(seed):
    w = _spread_weights(seed, 5, 4, 32)
    q = quantize(w)
    amax = w.double().abs().amax(dim=(1, 2))
    assert q.global_scale.dtype == torch.float32
    torch.testing.assert_close(q.global_scale.double(), 448 * 6 / amax, rtol=2e-7, atol=0)
    # The block that holds the expert's amax gets the largest scale, 448.
    assert q.block_scale.float().amax(dim=(1, 2)).tolist() == [E4M3_MAX] * 5


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("power", [-40, -7, 0, 3, 60])
def test_power_of_two_scaling_only_moves_the_global_scale(seed, power):
    w = _spread_weights(seed, 3, 4, 32, expert_decades=4.0)
    q, q2 = quantize(w), quantize(w * 2.0**power)
    assert torch.equal(q2.packed, q.packed)
    assert torch.equal(_u8(q2.block_scale), _u8(q.block_scale))
    assert torch.equal(q2.global_scale, q.global_scale * 2.0**-power)
    assert torch.equal(dequantize(q2), dequantize(q) * 2.0**power)


def test_all_zero_expert_gets_unit_global_scale_and_exact_zeros():
    w = torch.randn(3, 4, 32, generator=_gen(0))
    w[1] = 0
    q = quantize(w)
    assert q.global_scale[1].item() == 1.0
    assert (q.block_scale[1].float() == 0).all()
    dq = dequantize(q)
    assert torch.isfinite(dq).all()
    assert (dq[1] == 0).all()
    assert (q.packed[1] == 0).all()  # +0 codes, no negative zeros
    assert torch.equal(dq[[0, 2]], dequantize(quantize(w[[0, 2]])))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("start,stop", [(0, 1), (1, 4), (2, 6), (5, 6)])
def test_experts_are_quantised_independently(seed, start, stop):
    w = _spread_weights(seed, 6, 4, 48)
    whole = quantize(w).experts(start, stop)
    part = quantize(w[start:stop])
    assert part.shape == whole.shape == (stop - start, 4, 48)
    assert torch.equal(part.packed, whole.packed)
    assert torch.equal(_u8(part.block_scale), _u8(whole.block_scale))
    assert torch.equal(part.global_scale, whole.global_scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_any_float_input_dtype(dtype):
    w = torch.randn(2, 4, 32, generator=_gen(3)).to(dtype)
    q = quantize(w)
    ref32 = quantize(w.float())
    assert torch.equal(q.packed, ref32.packed)
    assert torch.equal(_u8(q.block_scale), _u8(ref32.block_scale))
    assert dequantize(q, dtype).dtype == dtype


# --- validation ----------------------------------------------------------------------------------------


def test_bad_quantize_inputs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        quantize(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        quantize(torch.randn(1, 2, 4, 32))
    for bad in (float("inf"), float("-inf"), float("nan")):
        w = torch.randn(2, 3, 32)
        w[1, 2, 17] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize(w)
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Weights.empty(2, 3, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quantize_activations(torch.randn(3, 20))


def test_float64_input_beyond_float32_range_is_rejected_or_finite():
    w = torch.ones(1, 1, 16, dtype=torch.float64)
    w[0, 0, 3] = 1e39
    try:
        dq = dequantize(quantize(w), torch.float64)
    except ValueError:
        return
    assert torch.isfinite(dq).all(), "finite input quantised to NaN without an error"


def test_nvfp4_weights_checks_dtypes_and_shapes():
    packed = torch.zeros(2, 3, 16, dtype=torch.uint8)
    scale = torch.zeros(2, 3, 2).to(torch.float8_e4m3fn)
    gscale = torch.ones(2)
    q = NVFP4Weights(packed, scale, gscale)
    assert q.shape == (2, 3, 32) and q.num_experts == 2
    with pytest.raises(TypeError, match="uint8"):
        NVFP4Weights(packed.to(torch.int8), scale, gscale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        NVFP4Weights(packed, scale.float(), gscale)
    with pytest.raises(ValueError, match="block_scale"):
        NVFP4Weights(packed, torch.zeros(2, 3, 4).to(torch.float8_e4m3fn), gscale)
    with pytest.raises(ValueError, match="block_scale"):
        NVFP4Weights(packed, torch.zeros(1, 3, 2).to(torch.float8_e4m3fn), gscale)
    with pytest.raises(ValueError, match="global_scale"):
        NVFP4Weights(packed, scale, gscale.double())
    with pytest.raises(ValueError, match="global_scale"):
        NVFP4Weights(packed, scale, torch.ones(3))
    with pytest.raises(ValueError, match="global_scale"):
        NVFP4Weights(packed, scale, torch.ones(2, 1))


def test_nvfp4_weights_rejects_k_not_a_multiple_of_16():
    with pytest.raises(ValueError, match="16"):
        NVFP4Weights(torch.zeros(1, 2, 12, dtype=torch.uint8), torch.zeros(1, 2, 1).to(torch.float8_e4m3fn), torch.ones(1))


# --- activations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_activations_is_per_row(seed, dtype):
    g = _gen(seed)
    m, k = 12, 64
    # rows of very different magnitudes: with a per-tensor global scale the small rows would change
    x = (torch.randn(m, k, generator=g) * 10 ** (torch.rand(m, 1, generator=g) * 8 - 4)).to(dtype)
    y = fake_quantize_activations(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    for i in (0, 5, m - 1):
        assert torch.equal(fake_quantize_activations(x[i : i + 1]), y[i : i + 1])
    perm = torch.randperm(m, generator=g)
    assert torch.equal(fake_quantize_activations(x[perm]), y[perm])
    other = x.clone()
    other[1:] *= 1000
    assert torch.equal(fake_quantize_activations(other)[0], y[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_activations_is_close_and_quantised(seed, dtype):
    x = torch.randn(32, 256, generator=_gen(seed)).to(dtype)
    y = fake_quantize_activations(x)
    rel = float((y.double() - x.double()).norm() / x.double().norm())
    # Gaussian data under 16-element NVFP4 blocks measures 0.09-0.10 (an intrinsic property of 4-bit
    # values, not of this code), so the check is < 0.12 rather than a flaky < 0.1; a broken scale is O(1).
    assert 0.01 < rel < 0.12
    # each element obeys the per-block bound of the weight test
    err = (y.double() - x.double()).view(32, 16, 16).abs()
    amax = x.double().view(32, 16, 16).abs().amax(-1, keepdim=True)
    assert (err <= 1.0625 * amax / 6 * (1 + 1e-5)).all()
    # the result is already on the NVFP4 grid: quantising it again gives the same codes and block scales
    # (the global scale 2688 / amax may move by a float32 ulp, so the values only up to rounding)
    qx, qy = quantize(x.unsqueeze(1)), quantize(y.unsqueeze(1))
    assert torch.equal(qy.packed, qx.packed)
    assert torch.equal(_u8(qy.block_scale), _u8(qx.block_scale))
    torch.testing.assert_close(fake_quantize_activations(y), y, rtol=1e-6, atol=0)


def test_fake_quantize_activations_empty_and_zero_rows():
    empty = torch.empty(0, 32)
    assert fake_quantize_activations(empty).shape == (0, 32)
    x = torch.randn(3, 32, generator=_gen(0))
    x[1] = 0
    y = fake_quantize_activations(x)
    assert (y[1] == 0).all() and torch.isfinite(y).all()
    # a non-finite row (a grouped GEMM's undefined rows past its last group) passes through unchanged
    # and does not affect the others
    z = x.clone()
    z[2, 5] = float("nan")
    yz = fake_quantize_activations(z)
    assert torch.equal(yz[:2], y[:2])
    assert torch.equal(yz[2].isnan(), z[2].isnan()) and torch.equal(yz[2][~z[2].isnan()], z[2][~z[2].isnan()])


# --- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 16), (3, 32), (7, 2048), (2048, 7168)])
def test_nbytes_per_expert(n, k):
    want = n * k // 2 + n * k // 16 + 4
    assert NVFP4Weights.nbytes_per_expert(n, k) == want
    assert NVFP4Weights.empty(1, n, k).nbytes() == want
    assert NVFP4Weights.empty(3, n, k).nbytes() == 3 * want
    if n * k <= 1 << 16:
        assert quantize(torch.randn(2, n, k, generator=_gen(0))).nbytes() == 2 * want


def test_experts_are_views_and_to_keeps_the_bytes():
    q = quantize(torch.randn(5, 4, 32, generator=_gen(0)))
    part = q.experts(1, 4)
    assert part.num_experts == 3
    assert part.packed.data_ptr() == q.packed[1].data_ptr()
    assert part.block_scale.data_ptr() == q.block_scale[1].data_ptr()
    moved = part.to("cpu")
    assert torch.equal(moved.packed, q.packed[1:4]) and torch.equal(moved.global_scale, q.global_scale[1:4])
