"""`dwdp-bench kernels` on CPU: every implementation and both baselines, per case and stage; quack's
W4A16 baseline reads our NVFP4 layout as it is (its GEMM on a Hopper GPU)."""

import csv
import json

import pytest
import torch

from dwdp_bench.kernelbench import quack_w4a16, quack_w4a16_runs
from dwdp_bench.kernels.nvfp4 import dequantize, quantize
from e2e_helpers import cli


def test_kernels_command_writes_rows_for_every_case(tmp_path):
    out = tmp_path / "k.csv"
    done = cli("kernels", "--device", "cpu", "--tokens", "32,80", "--skew", "0,2", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "k.transport.csv").exists()  # transport cases are off by default without 2 GPUs
    env = json.loads((tmp_path / "k.env.json").read_text())  # the machine and versions beside the rows
    assert env["command"] == "kernels" and env["args"]["tokens"] == [32, 80] and env["env"]["packages"]["torch"]
    rows = list(csv.DictReader(out.open()))
    cases = {(r["tokens"], r["skew"]) for r in rows}
    assert cases == {("32", "0"), ("32", "2"), ("80", "0"), ("80", "2")}
    for tokens, skew in cases:
        impls = {(r["stage"], r["impl"]) for r in rows if (r["tokens"], r["skew"]) == (tokens, skew)}
        assert impls == {(s, i) for s in ("fc1", "fc2") for i in ("torch", "bf16-grouped-gemm", "dense-bf16")}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["tflops"]) > 0 and r["spread"] == ""  # one round: no spread
        assert int(r["routed_rows"]) == int(r["tokens"]) * 2  # tiny: top-2
        if r["impl"] == "torch":
            assert float(r["x_vs_torch"]) == 1.0
        if r["impl"] == "dense-bf16":
            assert float(r["frac_ceiling"]) == 1.0


@pytest.mark.parametrize("call_ms,timed_again", [(0.5, False), (9.0, False), (11.0, True), (55.0, True)])
def test_long_gpu_calls_are_timed_over_enough_calls(monkeypatch, call_ms, timed_again):
    """do_bench times rep / (a call's estimated time) calls, one for DeepSeek-V3's 55 ms FC1 at 64K tokens:
    calls longer than rep / MIN_CALLS are timed again over MIN_CALLS calls, and that median is the result."""
    triton_testing = pytest.importorskip("triton.testing")
    from dwdp_bench.kernelbench import MIN_CALLS, bench

    reps = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        reps.append(rep)
        return call_ms if len(reps) == 1 else call_ms * 0.9  # the second, longer timing reads differently

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    ms = bench(lambda: None, torch.device("cuda"))
    assert reps[0] == 100
    if timed_again:
        assert reps[1:] == [call_ms * MIN_CALLS] and ms == pytest.approx(call_ms * 0.9)
    else:
        assert reps == [100] and ms == call_ms


def test_an_implementation_that_refuses_a_case_is_reported_and_the_rest_measured(monkeypatch):
    """A kernel set that cannot run a stage (UnsupportedCase, as `cute`'s FC2 past 2^31 output elements)
    loses that stage's row, not the case; any other error still ends the run. Fused stages' rows name the
    work tile they ran."""
    from dwdp_bench import kernelbench
    from dwdp_bench.kernels import UnsupportedCase

    real = kernelbench.get_kernels
    torch_kernels = type(real("torch", torch.device("cpu")))

    class RefusesFC2(torch_kernels):
        def fc2(self, h, plan, w2):
            raise UnsupportedCase("this batch needs 2^32 elements")

    class BrokenFC2(torch_kernels):
        def fc2(self, h, plan, w2):
            raise ValueError("a bug")

    class FusedFC1(torch_kernels):
        """As `cute-fc1`: a fused FC1 whose work tile depends on the call."""

        fused = (True, False)

        def work_tile(self, plan, fc1, n):
            assert fc1 and n == 2 * 32  # tiny: I = 32
            return (256, 128) if plan.num_tokens < 64 else (128, 256)

    fakes = {"refuser": RefusesFC2, "broken": BrokenFC2, "fused-fc1": FusedFC1}
    monkeypatch.setattr(kernelbench, "get_kernels", lambda name, device: fakes[name]() if name in fakes else real(name, device))
    rows, refused = kernelbench.run_case(kernelbench.Case("tiny", 32, 0.0), torch.device("cpu"), ["torch", "refuser", "fused-fc1"])
    measured = {(r["stage"], r["impl"]) for r in rows}
    assert ("fc1", "refuser") in measured and ("fc2", "refuser") not in measured and ("fc2", "torch") in measured
    # the tile column: the work tile a fused stage picked for the case, empty for every other row
    assert {(r["stage"], r["impl"]): r["tile"] for r in rows if r["tile"]} == {("fc1", "fused-fc1"): "256x128"}
    assert refused == ["fc2 refuser: this batch needs 2^32 elements"]
    with pytest.raises(ValueError, match="a bug"):
        kernelbench.run_case(kernelbench.Case("tiny", 32, 0.0), torch.device("cpu"), ["torch", "broken"])


def test_rounds_interleave_the_implementations_and_report_their_spread(monkeypatch):
    """With rounds, each implementation and dense-bf16 are timed that many times, round-robin, each round
    starting one later; a row's ms is the median and spread (max - min) / median. The other baselines: one
    timing, no spread."""
    from dwdp_bench import kernelbench

    real = kernelbench.get_kernels
    torch_kernels = type(real("torch", torch.device("cpu")))
    timed: list[tuple[str, str]] = []  # (stage, implementation) of every call

    def named(tag):
        class Named(torch_kernels):
            def fc1(self, x, plan, w13):
                timed.append(("fc1", tag))
                return super().fc1(x, plan, w13)

            def fc2(self, h, plan, w2):
                timed.append(("fc2", tag))
                return super().fc2(h, plan, w2)

        return Named()

    readings = {"a": [3.0, 1.0, 2.0], "b": [5.0, 5.0, 5.0], "c": [1.0, 4.0, 2.0]}

    def fake_bench(fn, device):
        calls = len(timed)
        fn()
        if len(timed) == calls:
            return 10.0  # a baseline
        stage, tag = timed[-1]
        return readings[tag][sum(1 for s, t in timed[:-1] if (s, t) == (stage, tag)) - 1]  # its n-th timing, after the input check

    monkeypatch.setattr(kernelbench, "get_kernels", lambda name, device: named(name) if name in readings else real(name, device))
    monkeypatch.setattr(kernelbench, "bench", fake_bench)
    rows, _ = kernelbench.run_case(kernelbench.Case("tiny", 32, 0.0), torch.device("cpu"), ["a", "b", "c"], rounds=3)
    fc1 = [tag for stage, tag in timed if stage == "fc1"]
    # input checks, then 3 rounds of dense-bf16, a, b, c (dense, not logged, first in the first round, last in the second)
    assert fc1 == ["a", "b", "c"] + ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"]
    got = {(r["stage"], r["impl"]): (r["ms"], r["spread"]) for r in rows}
    for stage in ("fc1", "fc2"):
        assert got[(stage, "a")] == (2.0, 1.0) and got[(stage, "b")] == (5.0, 0.0) and got[(stage, "c")] == (2.0, 1.5)
        assert got[(stage, "dense-bf16")] == (10.0, 0.0) and got[(stage, "bf16-grouped-gemm")] == (10.0, None)


def test_kernels_rejects_unknown_names(tmp_path):
    done = cli("kernels", "--device", "cpu", "--impls", "no-such-kernels", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "unknown kernel implementation" in done.stderr
    done = cli("kernels", "--device", "cpu", "--models", "gpt-5", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "unknown model config" in done.stderr
    done = cli("kernels", "--device", "cpu", "--impls", "cute", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "cute do not run on cpu" in done.stderr and "Hopper" in done.stderr
    done = cli("kernels", "--device", "cpu", "--rounds", "0", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr
    assert not (tmp_path / "k.csv").exists()


def test_quack_nvfp4_format_is_ours():
    """quack's "nvfp4" reference dequantisation of our packed codes and scales, with 1 / global scale as
    the per-tensor scale, gives our weights: the mapping the quack-w4a16 baseline relies on."""
    pytest.importorskip("quack")
    from quack.blockscaled.nvfp4_utils import dequant_nvfp4_reference

    q = quantize(torch.randn(2, 192, 128))
    for e in range(2):
        theirs = dequant_nvfp4_reference(q.packed[e], q.block_scale[e], 1.0 / float(q.global_scale[e]))
        torch.testing.assert_close(theirs, dequantize(q)[e], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_quack_w4a16_matches_dequantised_matmul():
    if not quack_w4a16_runs(torch.device("cuda"), 512):
        pytest.skip("quack-w4a16 needs a Hopper GPU and quack-kernels")
    gen = torch.Generator("cuda").manual_seed(0)
    w = quantize(torch.randn(1, 320, 512, device="cuda", generator=gen) * 512**-0.5)
    act = torch.randn(1024, 512, device="cuda", generator=gen).bfloat16()
    out = quack_w4a16(act, w)()
    assert out.shape == (1024, 320)
    torch.testing.assert_close(out.float(), act.float() @ dequantize(w)[0].T, rtol=2e-2, atol=2e-2)
