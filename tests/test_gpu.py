"""GPU paths: the grouped (Triton + torch._grouped_mm) kernels against the torch reference, CUDA IPC
peer copies inside DWDP, and a 2-GPU end-to-end run. Skipped without CUDA."""

import csv
import importlib.util
import subprocess
import sys

import pytest
import torch

from dwdp_bench.kernels import WeightView, build_plan, get_kernels
from dwdp_bench.kernels.nvfp4 import decode, quantize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_decode_is_exact(seed):
    from dwdp_bench.kernels.grouped import decode_into

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = quantize(torch.randn(5, 96, 160, device="cuda", generator=g) * 10 ** (seed - 1))
    out = torch.full((5, 96, 160), float("nan"), dtype=torch.bfloat16, device="cuda")
    decode_into(q, out)
    assert torch.equal(out, decode(q, torch.bfloat16))


@pytest.mark.parametrize("shape", [(7, 64, 32, 300, 2, 1), (16, 256, 128, 2048, 6, 1), (9, 128, 64, 513, 3, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_kernels_match_reference(shape, seed):
    e, h, inter, t, k, align = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = quantize(torch.randn(e, 2 * inter, h, device="cuda", generator=g))
    w2 = quantize(torch.randn(e, h, inter, device="cuda", generator=g))
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    # skewed routing with some experts empty
    logits = torch.randn(t, e, device="cuda", generator=g) + torch.linspace(3, -3, e, device="cuda")
    logits[:, 1] = -1e9
    idx = logits.topk(k, dim=-1).indices
    weights = torch.rand(t, k, device="cuda", generator=g)
    plan = build_plan(idx, weights, e, align)
    v13 = WeightView([w13.experts(0, 2), w13.experts(2, e)])
    v2 = WeightView([w2.experts(0, e - 1), w2.experts(e - 1, e)])
    ref, fast = get_kernels("torch", "cuda"), get_kernels("grouped", "cuda")
    h_ref, h_fast = ref.fc1(x, plan, v13), fast.fc1(x, plan, v13)
    used = plan.token_rows.flatten()
    torch.testing.assert_close(h_fast[used], h_ref[used], rtol=2e-2, atol=2e-2)
    out_ref, out_fast = ref.fc2(h_ref, plan, v2), fast.fc2(h_ref, plan, v2)
    assert torch.isfinite(out_fast).all()
    torch.testing.assert_close(out_fast, out_ref, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_e2e_two_gpus_dwdp_is_identical_to_replicated(tmp_path):
    out = tmp_path / "e2e.csv"
    cmd = [sys.executable, "-m", "dwdp_bench.cli", "e2e", "--gpus", "2", "--model", "synthetic:tiny", "--isl", "64", "--max-tokens", "256",
           "--requests-per-rank", "6", "--cv", "0.3", "--repeats", "1", "--out", str(out), "--timeout", "45", "--no-progress"]
    subprocess.run(cmd, check=True, timeout=300)
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"replicated", "dwdp", "ep", "ep-overlap"}
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    assert float(rows["dwdp"]["transport_bytes_per_rank"]) > 0
    for ep in ("ep", "ep-overlap"):
        assert float(rows[ep]["logit_rel_diff"]) < 0.05


@pytest.mark.skipif(torch.cuda.device_count() < 2 or torch.cuda.get_device_capability()[0] != 9, reason="needs 2 Hopper GPUs")
@pytest.mark.skipif(importlib.util.find_spec("cutlass") is None, reason="CuTe DSL (nvidia-cutlass-dsl) not installed")
def test_e2e_default_kernels_on_hopper_keep_dwdp_identical_to_replicated(tmp_path):
    out = tmp_path / "e2e.csv"
    cmd = [sys.executable, "-m", "dwdp_bench.cli", "e2e", "--gpus", "2", "--model", "synthetic:deepseek-v3-lite", "--layers", "3",
           "--isl", "512", "--max-tokens", "2048", "--requests-per-rank", "4", "--cv", "0.3", "--strategies", "replicated,dwdp,ep",
           "--repeats", "1", "--out", str(out), "--timeout", "90", "--no-progress"]
    subprocess.run(cmd, check=True, timeout=400)
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert {r["kernels"] for r in rows.values()} == {"cute-det"}
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    assert float(rows["ep"]["logit_rel_diff"]) < 0.05  # EP's combine adds the rows in another order
