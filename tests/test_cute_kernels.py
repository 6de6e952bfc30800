"""The fused CuTe DSL kernels: both compile for sm_90a on any machine (so a broken kernel fails CI on CPU),
and on a Hopper GPU they match the torch reference on ragged, empty and segmented expert layouts."""

import importlib.util

import pytest
import torch

from dwdp_bench.kernels import WeightView, build_plan, get_kernels
from dwdp_bench.kernels.nvfp4 import E2M1_VALUES, decode, quantize

needs_cute = pytest.mark.skipif(importlib.util.find_spec("cutlass") is None, reason="CuTe DSL (nvidia-cutlass-dsl) not installed")
on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper (sm_90) GPU"
)

# (experts, hidden, intermediate): DeepSeek-V3-Lite and DeepSeek-V3 expert shapes
MODEL_SHAPES = [(72, 2560, 1536), (256, 7168, 2048)]


def _assemble(ptx: str, where) -> str | None:
    """ptxas's warnings for `ptx` (sm_90a), from the first ptxas here that reads its PTX version: the CUDA
    toolkit's on PATH, else the one triton's wheel carries (triton is a dependency). None if none can."""
    import shutil
    import subprocess
    from pathlib import Path

    import triton

    (where / "k.ptx").write_text(ptx)
    for ptxas in (shutil.which("ptxas"), Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"):
        if ptxas is None or not Path(ptxas).is_file():
            continue
        built = subprocess.run([str(ptxas), "-arch=sm_90a", "k.ptx", "-o", "k.cubin"], capture_output=True, text=True, cwd=where)
        if "Unsupported .version" in built.stderr:
            continue  # an older ptxas than the DSL's PTX
        assert built.returncode == 0, built.stderr
        return built.stderr
    return None


@needs_cute
@pytest.mark.parametrize("e,h,inter", MODEL_SHAPES)
@pytest.mark.parametrize("tile", [(128, 256), (256, 128)])
def test_kernels_compile_for_sm90a_without_serialized_wgmmas(e, h, inter, tile, tmp_path):
    """Every kernel builds for sm_90a, and ptxas keeps its wgmmas asynchronous: where it sees other instructions
    read a wgmma's accumulators inside the pipeline (warning C7514) or runs short of registers for them (C7512,
    e.g. with a main loop copy per 32-row token width) it serializes them. cute-det's FC2 kernel was built that
    way until an unrelated edit of its row stores happened to avoid it, 5-14% faster (results/README.md), so a
    change that brings it back must fail here rather than show up as a slower benchmark."""
    from dwdp_bench.kernels.cute_moe import compile_gemm

    unchecked = []
    for fc1, n, k, rows_out in ((True, 2 * inter, h, False), (False, h, inter, False), (False, h, inter, True)):
        kernel = compile_gemm(fc1, n, k, *tile, rows_out=rows_out, ptx_dir=str(tmp_path))
        assert kernel is not None and kernel.__ptx__
        warnings = _assemble(kernel.__ptx__, tmp_path)
        name = f"FC{1 if fc1 else 2}{' rows_out' if rows_out else ''} {tile}"
        if warnings is None:
            unchecked.append(name)
            continue
        assert "wgmma.mma_async instructions are serialized" not in warnings, f"{name}: {warnings}"
    if unchecked:
        pytest.skip(f"built {', '.join(unchecked)}; no ptxas here reads the DSL's PTX version to check them")


@needs_cute
@pytest.mark.parametrize("hidden", [192, 320])
def test_fc1_builds_for_rows_not_a_multiple_of_512_bytes(hidden):
    """FC1's permuting warps copy a row 512 bytes per step; with K x 2 not a multiple of 512 the last step is partial
    (chunk_pair): that path must build too. The GPU test of the same shapes checks what it copies."""
    from dwdp_bench.kernels.cute_moe import compile_gemm

    assert compile_gemm(True, 256, hidden) is not None


@needs_cute
def test_unsupported_shapes_are_refused_clearly():
    from dwdp_bench.kernels.cute_moe import check_shape

    with pytest.raises(ValueError, match="K % 64 == 0 and N % 128 == 0.*--kernels grouped"):
        check_shape(True, 64, 64)  # the tiny model's FC1
    with pytest.raises(ValueError, match="bf16 CUDA activations"):
        check_shape(False, 256, 128, torch.zeros(4, 128))


def test_default_kernels_on_cpu_are_the_reference():
    from dwdp_bench.kernels import default_kernels

    assert default_kernels("cpu", 2560, 1536) == "torch"


@needs_cute
@pytest.mark.parametrize("hidden,inter,expected", [(2560, 1536, "cute-det"), (7168, 2048, "cute-det"), (192, 64, "cute-fc1"), (64, 32, "grouped")])
def test_default_kernels_pick_the_fused_stages_whose_tiles_fit(monkeypatch, hidden, inter, expected):
    """With every set runnable: cute-det where FC1 (K = H % 64, N = 2I % 128) and FC2 (K = I % 64, N = H % 128)
    both fit the fused kernels' tiles, cute-fc1 where only FC1 does (H = 192), else grouped."""
    import dwdp_bench.kernels as kernels

    monkeypatch.setattr(kernels, "available_kernels", lambda device: ["torch", "grouped", "cute", "cute-det", "cute-fc1"])
    assert kernels.default_kernels("cuda", hidden, inter) == expected


@on_hopper
@needs_cute
@pytest.mark.gpu
def test_default_kernels_are_cute_det_where_the_shapes_fit():
    from dwdp_bench.kernels import default_kernels
    from dwdp_bench.runtime.config import get_config

    assert default_kernels("cuda", 2560, 1536) == "cute-det"  # DeepSeek-V3-Lite
    tiny = get_config("tiny")
    assert default_kernels("cuda", tiny.hidden_size, tiny.moe_intermediate_size) == "grouped"


def _views(kernels, w13, w2):
    """The layer's weights as the kernels read them (prepared), in segments as DWDP gives them."""
    p13, p2 = kernels.prepare_experts(w13, w2)
    e = w13.num_experts
    return WeightView([p13.experts(0, 2), p13.experts(2, e)]), WeightView([p2.experts(0, e - 1), p2.experts(e - 1, e)])


def _case(e, h, inter, t, k, align, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # unit-variance outputs, so that one absolute tolerance fits every shape
    w13 = quantize(torch.randn(e, 2 * inter, h, device="cuda", generator=g) * h**-0.5)
    w2 = quantize(torch.randn(e, h, inter, device="cuda", generator=g) * inter**-0.5)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    logits = torch.randn(t, e, device="cuda", generator=g) + torch.linspace(3, -3, e, device="cuda")  # skewed
    logits[:, 1] = -1e9  # expert 1 gets no rows
    idx = logits.topk(k, dim=-1).indices
    weights = torch.rand(t, k, device="cuda", generator=g)
    return x, build_plan(idx, weights, e, align), w13, w2


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 128, 300, 2, 1), (16, 512, 256, 2048, 6, 1), (9, 256, 384, 513, 3, 16), (72, 2560, 1536, 700, 6, 1)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tile", [None, (128, 256), (256, 128)])  # the per-call choice and both tiles it picks from
@pytest.mark.parametrize("name", ["cute", "cute-det"])
def test_cute_kernels_match_reference(shape, seed, tile, name):
    x, plan, w13, w2 = _case(*shape, seed)
    ref, fused = get_kernels("torch", "cuda"), type(get_kernels(name, "cuda"))(tile=tile)
    (r13, r2), (f13, f2) = _views(ref, w13, w2), _views(fused, w13, w2)
    h_ref = ref.fc1(x, plan, r13)
    h = fused.fc1_into(x, plan, f13, torch.full_like(h_ref, float("nan")))  # poisoned: every expert row must be written
    written = int(plan.expert_offsets[-1])
    assert torch.isfinite(h[:written]).all()
    used = plan.token_rows.flatten()
    torch.testing.assert_close(h[used], h_ref[used], rtol=2e-2, atol=2e-2)
    out_ref, out = ref.fc2(h_ref, plan, r2), fused.fc2(h_ref, plan, f2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=5e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_cute_fc1_is_cutes_fc1_and_groupeds_fc2_bit_for_bit(seed):
    x, plan, w13, w2 = _case(16, 512, 256, 2048, 6, 1, seed)
    cute, grouped, mixed = (get_kernels(n, "cuda") for n in ("cute", "grouped", "cute-fc1"))
    (c13, _), (g13, g2), (m13, m2) = (_views(kern, w13, w2) for kern in (cute, grouped, mixed))
    assert mixed.layouts == (cute.layouts[0], grouped.layouts[1])
    h = mixed.fc1(x, plan, m13)
    assert torch.equal(h, cute.fc1(x, plan, c13))
    assert torch.equal(mixed.fc2(h, plan, m2), grouped.fc2(h, plan, g2))
    assert torch.equal(mixed.fc2(h, plan, m2), mixed.fc2(h, plan, m2))  # fixed summation order


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 128, 300, 2, 1), (9, 256, 384, 513, 3, 16), (72, 2560, 1536, 700, 6, 1)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tile", [(128, 256), (256, 128)])
def test_cute_det_fc2_writes_every_row_and_repeats_bit_for_bit(shape, seed, tile):
    """FC2's rows_out kernel writes every expert row of a NaN-poisoned [R, N] with the GEMM's bf16 result
    (against the decoded weights' grouped GEMM), and cute-det's FC2 is the same bits run after run."""
    from dwdp_bench.kernels.fused import FusedDeterministicKernels
    from dwdp_bench.kernels.reference import decode_view, grouped_gemm

    _, plan, w13, w2 = _case(*shape, seed)
    det, ref = FusedDeterministicKernels(tile=tile), get_kernels("torch", "cuda")
    (_, d2), (_, r2) = _views(det, w13, w2), _views(ref, w13, w2)
    h = torch.randn(plan.num_rows, w2.shape[2], device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)).bfloat16()
    z = torch.full((plan.num_rows, w2.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    det._launch(False, h, plan, d2, tile, w2.global_scale, z, rows_out=True)
    written = int(plan.expert_offsets[-1])
    assert torch.isfinite(z[:written]).all() and torch.isnan(z[written:]).all()  # rows past the last expert untouched
    z_ref = grouped_gemm(h, decode_view(r2, torch.bfloat16), plan)
    torch.testing.assert_close(z[:written], z_ref[:written], rtol=2e-2, atol=2e-2)
    out = det.fc2(h, plan, d2)
    assert torch.equal(out, det.fc2(h, plan, d2))
    torch.testing.assert_close(out, ref.fc2(h, plan, r2), rtol=2e-2, atol=5e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("ctas", [1, 5])
@pytest.mark.parametrize("tile", [(128, 256), (256, 128)])
def test_fc1_permutes_every_row_on_any_number_of_ctas(ctas, tile):
    """FC1's permuting warps claim row groups from a global counter and each tile's loads wait for its groups:
    on far fewer CTAs than SMs (as when other kernels hold SMs) every group is still claimed and copied, the
    buffer holds x[row -> token] (padding rows included) and the result is the full grid's, bit for bit."""
    from dwdp_bench.kernels.cute_moe import PERMUTE_ROWS, compile_gemm

    x, plan, w13, w2 = _case(9, 256, 384, 513, 3, 16, 0)
    fused = type(get_kernels("cute", "cuda"))(tile=tile)
    v13, _ = _views(fused, w13, w2)
    h = fused.fc1(x, plan, v13)
    tiles, row_token = fused.plan_tables(plan, tile[1])
    codes, scales = fused.pointer_tables(v13)
    rows = torch.full((plan.num_rows, x.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    ready = torch.zeros(1 + -(-plan.num_rows // PERMUTE_ROWS), dtype=torch.int32, device="cuda")
    out = torch.full_like(h, float("nan"))
    compile_gemm(True, v13.n, v13.k, *tile)(x, row_token, codes, scales, 1.0 / v13.global_scales(), tiles, out, rows, ready, ctas)
    written = int(plan.expert_offsets[-1])
    assert torch.equal(out[:written], h[:written])
    assert torch.equal(rows, x[plan.row_token])
    assert (ready[1:] == 1).all() and int(ready[0]) >= ready.numel() - 1


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [192, 320])  # rows of 384 and 640 bytes: the permute's last step is partial
@pytest.mark.parametrize("tile", [(128, 256), (256, 128)])
def test_fc1_permutes_rows_that_are_not_a_multiple_of_512_bytes(hidden, tile):
    """FC1's permuting warps copy a row 512 bytes per step; where K x 2 is not a multiple of 512 the lanes past the
    row's end repeat its last chunk, and every routed row must still be its token's (FC1 of cute-fc1, whose FC2 is
    grouped's: FC2's tiles need hidden % 128)."""
    x, plan, w13, w2 = _case(8, hidden, 128, 300, 2, 1, 0)
    ref, fused = get_kernels("torch", "cuda"), type(get_kernels("cute-fc1", "cuda"))(tile=tile)
    (r13, _), (f13, _) = _views(ref, w13, w2), _views(fused, w13, w2)
    h_ref = ref.fc1(x, plan, r13)
    h = fused.fc1_into(x, plan, f13, torch.full_like(h_ref, float("nan")))
    used = plan.token_rows.flatten()
    assert torch.isfinite(h[used]).all()
    torch.testing.assert_close(h[used], h_ref[used], rtol=2e-2, atol=2e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(9, 256, 384, 513, 3, 16), (72, 2560, 1536, 700, 6, 1)])
def test_both_work_tiles_give_the_same_bits_from_the_same_weights(shape):
    """Weights prepared once serve both tiles (a call picks one by rows per expert): FC1's SwiGLU rows and
    cute-det's FC2 are bit-identical between a 128 x 256 and a 256 x 128 work tile (same k order per output)."""
    from dwdp_bench.kernels.fused import FusedDeterministicKernels

    x, plan, w13, w2 = _case(*shape, 0)
    narrow, wide = FusedDeterministicKernels(tile=(128, 256)), FusedDeterministicKernels(tile=(256, 128))
    v13, v2 = _views(narrow, w13, w2)
    h = narrow.fc1(x, plan, v13)
    written = int(plan.expert_offsets[-1])  # rows past the last expert are not written
    assert torch.equal(wide.fc1(x, plan, v13)[:written], h[:written])
    assert torch.equal(wide.fc2(h, plan, v2), narrow.fc2(h, plan, v2))


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(128, 256), (256, 128)])
@pytest.mark.parametrize("name", ["cute", "cute-det"])
def test_last_tiles_of_every_token_width_match_reference(tile, name):
    """A work tile runs at the narrowest token width (64, 128, ..) that covers its rows: experts of 1, 63, 64,
    65, .., 449 rows, split evenly over the fewest tiles (see tile_table: in the 128 x 256 tile one tile of each
    width up to 256 rows, in the 256 x 128 one two tiles from 129), and one with none each get their own exact
    result."""
    counts = [1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 0, 257, 320, 449]
    e, h, inter = len(counts), 256, 256
    g = torch.Generator(device="cuda").manual_seed(3)
    w13 = quantize(torch.randn(e, 2 * inter, h, device="cuda", generator=g) * h**-0.5)
    w2 = quantize(torch.randn(e, h, inter, device="cuda", generator=g) * inter**-0.5)
    experts = torch.repeat_interleave(torch.arange(e, device="cuda"), torch.tensor(counts, device="cuda"))
    t = experts.numel()
    plan = build_plan(experts[torch.randperm(t, device="cuda", generator=g)].view(t, 1), torch.rand(t, 1, device="cuda", generator=g), e)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    ref, fused = get_kernels("torch", "cuda"), type(get_kernels(name, "cuda"))(tile=tile)
    (r13, r2), (f13, f2) = _views(ref, w13, w2), _views(fused, w13, w2)
    h_ref = ref.fc1(x, plan, r13)
    h_out = fused.fc1_into(x, plan, f13, torch.full_like(h_ref, float("nan")))
    torch.testing.assert_close(h_out, h_ref, rtol=2e-2, atol=2e-2)  # every row: no padding rows with top-1 and align 1
    torch.testing.assert_close(fused.fc2(h_ref, plan, f2), ref.fc2(h_ref, plan, r2), rtol=2e-2, atol=5e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
def test_default_tiles_differ_between_fc1_and_fc2_and_match_reference():
    """V3-Lite at 4K tokens (341 rows per expert): FC1 takes the wide tile and FC2 the narrow one on the same
    plan (two tile tables), and cute-det's default path still matches the reference."""
    x, plan, w13, w2 = _case(72, 2560, 1536, 4096, 6, 1, 0)
    ref, det = get_kernels("torch", "cuda"), get_kernels("cute-det", "cuda")
    assert det.work_tile(plan, True, 3072) == (256, 128) and det.work_tile(plan, False, 2560) == (128, 256)
    (r13, r2), (d13, d2) = _views(ref, w13, w2), _views(det, w13, w2)
    h_ref = ref.fc1(x, plan, r13)
    used = plan.token_rows.flatten()
    torch.testing.assert_close(det.fc1(x, plan, d13)[used], h_ref[used], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(det.fc2(h_ref, plan, d2), ref.fc2(h_ref, plan, r2), rtol=2e-2, atol=5e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
def test_rows_past_2_31_output_elements_land_in_their_rows():
    """cute-det's FC2 rows [R, N] are addressed in 64 bits: with R x N > 2^31 the last rows hold their own
    results (32-bit offsets would wrap and leave them NaN). FC1's rows go through the same store_tile."""
    from dwdp_bench.kernels.cute_moe import TILE_M, TILE_W
    from dwdp_bench.kernels.fused import FusedDeterministicKernels

    g = torch.Generator(device="cuda").manual_seed(0)
    e, n, inter, t = 2, 2560, 256, 860_000  # R x N = 2.2e9 > 2^31
    w13 = quantize(torch.randn(e, 2 * inter, n, device="cuda", generator=g) * n**-0.5)
    w2 = quantize(torch.randn(e, n, inter, device="cuda", generator=g) * inter**-0.5)
    plan = build_plan((torch.arange(t, device="cuda") % e).view(t, 1), torch.ones(t, 1, device="cuda"), e)
    det = FusedDeterministicKernels()
    _, d2 = _views(det, w13, w2)
    h = torch.randn(t, inter, device="cuda", generator=g).bfloat16()
    z = torch.full((t, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    det._launch(False, h, plan, d2, (TILE_W, TILE_M), w2.global_scale, z, rows_out=True)
    assert torch.isfinite(z).all()
    decoded = decode(w2).float()
    for first in (0, t - 4096):  # the first rows and the last, past 2^31 elements
        rows = torch.arange(first, first + 4096, device="cuda")
        expert = (rows >= plan.expert_offsets[1]).long()
        want = torch.einsum("rk,rnk->rn", h[rows].float(), decoded[expert]).bfloat16()
        torch.testing.assert_close(z[rows], want, rtol=2e-2, atol=2e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
def test_fc1_permuted_rows_past_2_31_elements_are_their_own_tokens():
    """FC1 copies its token rows into an [R, K] buffer (64-bit offsets) that TMA then reads by row: with R x K >
    2^31 the last SwiGLU rows still match the reference's (wrapped offsets would copy or read other rows)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    e, hidden, inter, t = 2, 2560, 256, 430_000  # R = 2 t rows of K = hidden: 2.2e9 > 2^31 elements
    w13 = quantize(torch.randn(e, 2 * inter, hidden, device="cuda", generator=g) * hidden**-0.5)
    w2 = quantize(torch.randn(e, hidden, inter, device="cuda", generator=g) * inter**-0.5)
    tokens = torch.arange(t, device="cuda")
    plan = build_plan(torch.stack([tokens % e, (tokens + 1) % e], dim=1), torch.ones(t, 2, device="cuda"), e)
    x = torch.randn(t, hidden, device="cuda", generator=g).bfloat16()
    fused, ref = get_kernels("cute", "cuda"), get_kernels("torch", "cuda")
    (f13, _), (r13, _) = _views(fused, w13, w2), _views(ref, w13, w2)
    h, want = fused.fc1(x, plan, f13), ref.fc1(x, plan, r13)
    for first in (0, plan.num_rows - 4096):  # the first rows and the last, past 2^31 elements of the buffer
        torch.testing.assert_close(h[first : first + 4096], want[first : first + 4096], rtol=2e-2, atol=2e-2)


@on_hopper
@needs_cute
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cute", "cute-det"])
def test_cute_kernels_with_no_tokens(name):
    x, plan, w13, w2 = _case(8, 256, 128, 0, 2, 1, 0)
    fused = get_kernels(name, "cuda")
    v13, v2 = _views(fused, w13, w2)
    assert fused.fc1(x, plan, v13).shape == (0, 128)
    assert fused.fc2(torch.zeros(0, 128, dtype=torch.bfloat16, device="cuda"), plan, v2).shape == (0, 256)


def _read_like_the_kernel(f, rows_of_tile, n, k):
    """What the kernels' consumer threads decode from fragment-order weights `f`, as [E, N, K] values in
    the rows layout, NaN where nothing was read: per 128-row block b and K step s, thread c (warp w, lane
    4 l + q) reads the word at 16 c + 4 kb of the 4 KB code chunk and holds rows r = 16 w + l and r + 8
    of the block, k 16 kb + 2 q, + 1 (bytes 0, 1) and 16 kb + 8 + 2 q, + 1 (bytes 2, 3); its row pair's
    scales of k block kb are bytes 4 (kb // 2) + 2 (kb % 2) + (0: row r, 1: row r + 8) of the 8 at 8 (c // 4)
    of the 512-byte scale chunk. `rows_of_tile[t]`: the expert row stored as tile-order row t."""
    e, steps = f.num_experts, k // 64
    codes = f.packed.reshape(e, n // 128, steps, 256, 4, 4)
    scales = f.block_scale.view(torch.uint8).reshape(e, n // 128, steps, 64, 8).view(torch.float8_e4m3fn).float()
    values = E2M1_VALUES.to(f.device)
    out = torch.full((e, n, k), float("nan"), device=f.device)
    blocks, step_k = torch.arange(n // 128, device=f.device) * 128, torch.arange(steps, device=f.device) * 64
    for c in range(256):
        w, l, q = c // 32, (c % 32) // 4, c % 4
        for kb in range(4):
            for byte in range(4):
                half, second = byte % 2, byte // 2
                code = codes[:, :, :, c, kb, byte].long()  # [E, blocks, steps]
                scale = scales[:, :, :, c // 4, 4 * (kb // 2) + 2 * (kb % 2) + half]
                rows = rows_of_tile[blocks + 16 * w + l + 8 * half]
                kk = step_k + 16 * kb + 8 * second + 2 * q
                out[:, rows[:, None], kk[None, :]] = values[code & 0xF] * scale
                out[:, rows[:, None], kk[None, :] + 1] = values[code >> 4] * scale
    return out


@needs_cute
@pytest.mark.parametrize("fc1,tile_w,n,k", [(True, 128, 512, 192), (True, 256, 512, 128), (False, 128, 384, 256)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fragment_order_puts_every_weight_where_its_thread_reads_it(fc1, tile_w, n, k, seed):
    """One fragment order serves both work tile widths: what a tile_w-wide tile's threads read is the weights."""
    from dwdp_bench.kernels.cute_moe import MoEGemmSm90, to_fragment_order

    w = quantize(torch.randn(3, n, k, generator=torch.Generator().manual_seed(seed)))
    f = to_fragment_order(w, fc1)
    assert f.layout != w.layout and f.packed.shape == w.packed.shape and torch.equal(f.global_scale, w.global_scale)
    t = torch.arange(n)
    rows_of_tile = MoEGemmSm90(fc1, n, k, tile_w).weight_row(t // tile_w, t % tile_w)
    assert torch.equal(rows_of_tile.sort().values, t)  # every expert row stored once
    if fc1:  # a tile's gate and up rows of one output column sit 8 rows apart, gate first
        assert torch.equal(rows_of_tile.view(-1, 2, 8)[:, 1] - rows_of_tile.view(-1, 2, 8)[:, 0], torch.full((n // 16, 8), n // 2))
    else:
        assert torch.equal(rows_of_tile, t)
    assert torch.equal(_read_like_the_kernel(f, rows_of_tile, n, k), decode(w, torch.float32))


@needs_cute
def test_weights_in_another_layout_are_refused():
    from dwdp_bench.kernels.fused import FusedCuteKernels, FusedDeterministicKernels, FusedFC1Kernels
    from dwdp_bench.kernels.reference import TorchReferenceKernels

    w13, w2 = quantize(torch.randn(4, 256, 128)), quantize(torch.randn(4, 128, 128))
    plan = build_plan(torch.tensor([[0, 1]]), torch.rand(1, 2), 4)
    x = torch.randn(1, 128).bfloat16()
    f13, f2 = FusedCuteKernels().prepare_experts(w13, w2)
    with pytest.raises(ValueError, match="'cute' FC1 needs expert weights in the 'cute-fc1' layout, got 'rows'"):
        FusedCuteKernels().fc1(x, plan, WeightView([w13]))
    with pytest.raises(ValueError, match="FC2 needs expert weights in the 'cute-fc2' layout, got 'rows'"):
        FusedCuteKernels().fc2(x, plan, WeightView([w2]))
    with pytest.raises(ValueError, match="'cute-det' FC2 needs expert weights in the 'cute-fc2' layout, got 'rows'"):
        FusedDeterministicKernels().fc2(x, plan, WeightView([w2]))
    with pytest.raises(ValueError, match="decoding a weight view needs .* 'rows' layout, got 'cute-fc2'"):
        TorchReferenceKernels().fc2(x, plan, WeightView([f2]))
    assert FusedFC1Kernels().prepare_experts(w13, w2)[1] is w2  # its FC2 reads the rows layout
    with pytest.raises(ValueError, match="one layout"):
        WeightView([f13.experts(0, 2), w13.experts(2, 4)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tokens,align", [(1, 1), (300, 1), (1000, 16), (3000, 1), (0, 1)])
@pytest.mark.parametrize("tile_m", [64, 128, 192, 256])
def test_tile_table_covers_every_expert_row_once(tokens, align, seed, tile_m):
    pytest.importorskip("triton")
    from dwdp_bench.kernels.fused import tile_table

    g = torch.Generator().manual_seed(seed)
    e, k = 9, 3
    logits = torch.randn(tokens, e, generator=g) + torch.linspace(4, -4, e)  # skewed
    logits[:, 2] = -1e9  # an empty expert
    plan = build_plan(logits.topk(k, dim=-1).indices, torch.rand(tokens, k, generator=g), e, align)
    table = tile_table(plan, tile_m)
    assert table.dtype == torch.int32 and table.shape == ((plan.num_rows + tile_m - 1) // tile_m + e, 3)
    covered = torch.zeros(plan.num_rows, dtype=torch.long)
    steps = {}  # expert -> its tiles' widths in 64-row steps, in table order
    for expert, first, end in table.tolist():
        if first >= end:
            continue  # padding entry
        start = int(plan.expert_offsets[expert])
        assert start <= first < end <= plan.expert_offsets[expert + 1] and end - first <= tile_m
        assert (first - start) % 64 == 0
        covered[first:end] += 1
        steps.setdefault(expert, []).append(-(-(end - first) // 64))
    assert (covered[: int(plan.expert_offsets[-1])] == 1).all() and not covered[int(plan.expert_offsets[-1]) :].any()
    for expert, widths in steps.items():
        rows = int(plan.expert_offsets[expert + 1] - plan.expert_offsets[expert])
        assert len(widths) == -(-rows // tile_m) and sum(widths) == -(-rows // 64)  # the fewest tiles, no added padding
        assert widths == sorted(widths, reverse=True) and widths[0] - widths[-1] <= 1, widths  # even, widest first


@needs_cute
@pytest.mark.gpu
def test_pointer_tables_follow_segments_in_expert_order():
    """Empty segments (a peer holding none of a view's experts) add nothing and are no error."""
    from dwdp_bench.kernels.fused import FusedCuteKernels

    w = quantize(torch.randn(6, 128, 256, device="cuda"))
    for bounds in ((0, 2, 6), (0, 0, 2, 2, 6, 6)):
        view = WeightView([w.experts(a, b) for a, b in zip(bounds, bounds[1:])])
        codes, scales = FusedCuteKernels().pointer_tables(view)
        assert codes.tolist() == [w.packed[i].data_ptr() for i in range(6)], bounds
        assert scales.tolist() == [w.block_scale[i].data_ptr() for i in range(6)], bounds


def test_routing_tables_are_built_once_per_plan():
    pytest.importorskip("triton")
    from dwdp_bench.kernels.fused import FusedCuteKernels

    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    plan, other = build_plan(idx, torch.rand(3, 2), 3), build_plan(idx.flip(0), torch.rand(3, 2), 3)
    kernels = FusedCuteKernels()
    tiles, rows = kernels.plan_tables(plan, 256)
    assert rows.dtype == torch.int32 and torch.equal(rows, plan.row_token.int())
    assert kernels.plan_tables(plan, 256)[0] is tiles  # FC2 reuses what FC1 built
    narrow, same_rows = kernels.plan_tables(plan, 128)  # a stage with the other tile: its own table, the same map
    assert narrow is not tiles and same_rows is rows and kernels.plan_tables(plan, 256)[0] is tiles
    assert not torch.equal(kernels.plan_tables(other, 256)[1], rows)


@pytest.mark.parametrize("tokens,top_k,experts,fc1,n,fixed,expected", [
    (1024, 6, 72, False, 2560, None, (256, 128)),  # V3-Lite at 1K tokens: 85 rows per expert
    (2048, 6, 72, False, 2560, None, (256, 128)),  # 171 rows
    (4096, 6, 72, True, 3072, None, (256, 128)),  # 341: FC1 keeps the wide tile up to 512 rows
    (4096, 6, 72, False, 2560, None, (128, 256)),  # FC2 from 192
    (8192, 6, 72, True, 3072, None, (128, 256)),  # 683
    (2048, 8, 256, True, 4096, None, (256, 128)),  # V3 at 2K tokens: 64 rows per expert
    (8192, 8, 256, True, 4096, None, (256, 128)),  # V3 at 8K: 256
    (8192, 8, 256, False, 7168, None, (128, 256)),
    (1024, 6, 72, True, 384, None, (128, 256)),  # N not a multiple of 256: only the narrow tile fits
    (1024, 6, 72, True, 3072, (128, 256), (128, 256)),  # a fixed tile is every call's
])
def test_work_tile_is_narrow_from_its_mean_rows_per_expert(tokens, top_k, experts, fc1, n, fixed, expected):
    """The rule's choices from the host-side row bound alone (results/README.md has the H200 sweep behind it;
    V3-Lite at 2K tokens, 171 rows, was not in it)."""
    pytest.importorskip("triton")
    from dwdp_bench.kernels.fused import FusedCuteKernels

    idx = torch.arange(tokens * top_k).remainder(experts).view(tokens, top_k)
    plan = build_plan(idx, torch.rand(tokens, top_k), experts)
    assert FusedCuteKernels(tile=fixed).work_tile(plan, fc1, n) == expected
    padded = build_plan(idx, torch.rand(tokens, top_k), experts, align=64)  # the row bound's align padding is no load
    assert FusedCuteKernels(tile=fixed).work_tile(padded, fc1, n) == expected


def test_fc1_output_must_be_dense_aligned_bf16():
    pytest.importorskip("triton")
    from dwdp_bench.kernels.fused import _check_fc1_out

    _check_fc1_out(torch.empty(8, 64, dtype=torch.bfloat16), 8, 64)
    for bad in (
        torch.empty(8, 64, dtype=torch.float32),  # dtype
        torch.empty(8, 128, dtype=torch.bfloat16)[:, :64],  # row stride
        torch.empty(7, 64, dtype=torch.bfloat16),  # shape
        torch.empty(8 * 64 + 1, dtype=torch.bfloat16)[1:].view(8, 64),  # 2 bytes past alignment
    ):
        with pytest.raises(ValueError, match="contiguous, 16-byte aligned bf16 tensor \\[8, 64\\]"):
            _check_fc1_out(bad, 8, 64)


def test_batches_beyond_32_bit_offsets_are_refused():
    pytest.importorskip("triton")
    from dwdp_bench.kernels.fused import _check_int32_offsets

    _check_int32_offsets(2**31 - 1)
    with pytest.raises(ValueError, match="2\\^31 elements.*--max-tokens.*--kernels grouped"):
        _check_int32_offsets(2**31)
