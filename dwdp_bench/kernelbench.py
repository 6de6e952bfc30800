"""`dwdp-bench kernels`: the MoE kernels on one device, against baselines measured in the same run.

Per case (model shapes, tokens, routing skew) and stage (FC1 = gather + grouped GEMM + SwiGLU, FC2 =
grouped GEMM + finalize), each implementation's median time and TFLOP/s, next to

    bf16-grouped-gemm   torch._grouped_mm on weights decoded beforehand: the GEMM alone
    dense-bf16          one cuBLAS (or CPU) bf16 matmul with the same FLOPs: the ceiling
    quack-w4a16         Hopper only: quack-kernels' dense NVFP4-weight x bf16 GEMM (`gemm_w4a16`) with
                        the same M (routed rows), N and K, on one expert's weights: what decoding NVFP4
                        in registers costs a dense GEMM, the bar for the grouped kernels

FLOPs count only the rows tokens use (2 x rows x N x K). Inputs are fresh random data (never zeros);
GPU times are CUDA-event medians from triton.testing.do_bench after warm-up, over about MIN_CALLS calls at
the least. With rounds > 1 each implementation and dense-bf16 are timed that many times, round-robin
(each round starting one later, so none always runs first): `ms` is the median of its readings and
`spread` (max - min) / median, how far one reading can be trusted. On an H200 the fused kernels run
against the power cap and one reading moves by up to ~10% with the clock it leaves (results/README.md,
session 10); timing dense-bf16 in the same rounds takes each ratio to it at comparable clocks. The other
two baselines are timed once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from rich.table import Table

from .kernels import UnsupportedCase, WeightView, build_plan, get_kernels
from .kernels.nvfp4 import NVFP4Weights, quantize
from .kernels.reference import decode_view, grouped_gemm
from .results import fmt
from .runtime.config import get_config

COLUMNS = ["timestamp", "device", "model", "tokens", "skew", "routed_rows", "stage", "impl", "ms", "tflops", "frac_ceiling", "x_vs_torch", "tile", "spread"]


@dataclass(frozen=True)
class Case:
    model: str
    tokens: int
    skew: float  # 0: uniform expert load; larger: expert e's logit gets + skew * (1 - 2e/(E-1))


MIN_CALLS = 10  # timed calls behind a GPU median at the least


def bench(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per call. On a GPU, triton's do_bench times rep_ms / (its estimate of a call) calls,
    a single one for calls over half of rep_ms (DeepSeek-V3's FC1 at 64K tokens takes ~55 ms): calls over
    rep_ms / MIN_CALLS are timed again over about MIN_CALLS of them (do_bench divides by its own estimate)."""
    if device.type == "cuda":
        import triton.testing

        ms = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        if ms * MIN_CALLS > rep_ms:
            ms = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=ms * MIN_CALLS, return_mode="median"))
        return ms
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def route(tokens: int, experts: int, top_k: int, skew: float, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing (weights, expert ids), each `[tokens, top_k]`; `skew` as in `Case`."""
    logits = torch.randn(tokens, experts, device=device, generator=gen) + skew * torch.linspace(1, -1, experts, device=device)
    return torch.softmax(logits, -1).topk(top_k, dim=-1)


def _experts(e: int, n: int, k: int, device: torch.device, gen: torch.Generator) -> NVFP4Weights:
    """Random NVFP4 experts, quantised a few experts at a time to bound the fp32 temporary."""
    chunk = max(1, (1 << 28) // (n * k))
    parts = [quantize(torch.randn(min(chunk, e - s), n, k, device=device, generator=gen) * k**-0.5) for s in range(0, e, chunk)]
    return NVFP4Weights.cat(parts)


def quack_w4a16_runs(device: torch.device, k: int) -> bool:
    """quack's W4A16 GEMM needs a Hopper GPU, quack-kernels importable, and K a multiple of its 64-wide k-tile."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9 or k % 64:
        return False
    try:
        import quack.gemm_w4  # noqa: F401
    except ImportError:
        return False
    return True


def quack_w4a16(act: torch.Tensor, w: NVFP4Weights):
    """A call of quack's dense `gemm_w4a16`: `act [M, K] @ w[0]^T` on expert 0's NVFP4 weights `[N, K]`.

    quack's "nvfp4" format is ours, byte for byte: packed e2m1 `[N, K/2]` with the low nibble the even
    k, and one e4m3 scale per 16 k, `[N, K/16]`, that already holds our global scale, so the weights are
    (e2m1 x scale) x (1 / global_scale[0]) and the reciprocal is quack's per-tensor epilogue alpha.
    `prepare_w4_weight` repacks both once into the WGMMA fragment order (N padded to 128)."""
    from quack.gemm_w4 import gemm_w4a16, prepare_w4_weight

    blob, sf = prepare_w4_weight(w.packed[0], w.block_scale[0], wformat="nvfp4")
    alpha, n = 1.0 / float(w.global_scale[0]), w.shape[1]
    return lambda: gemm_w4a16(act, blob, sf, tensor_scale=alpha, n_out=n, wformat="nvfp4")


def _baselines(stage, view, experts, dense_a, gemm_rows, plan, device) -> dict[tuple[str, str], float]:
    """One stage's quack-w4a16 and bf16-grouped-gemm, timed once. Their inputs live only inside this call
    (DeepSeek-V3 shapes at 64K tokens hold ~40 GiB of decoded weights), so the implementations are timed
    with that memory free again."""
    out = {}
    k_dim = dense_a.shape[1]
    if quack_w4a16_runs(device, k_dim):
        out[(stage, "quack-w4a16")] = bench(quack_w4a16(dense_a, experts), device)
    decoded, a = decode_view(view, torch.bfloat16), gemm_rows()
    out[(stage, "bf16-grouped-gemm")] = bench(lambda: grouped_gemm(a, decoded, plan), device)
    return out


def run_case(case: Case, device: torch.device, impls: list[str], seed: int = 0, rounds: int = 1) -> tuple[list[dict], list[str]]:
    """The case's rows, and a line per implementation and stage that cannot run the case (UnsupportedCase:
    e.g. a kernel's 32-bit offsets on a large batch): the others are still measured; any other error ends
    the run. Each implementation and dense-bf16 are timed `rounds` times, round-robin (see the module
    docstring); the other baselines once."""
    cfg = get_config(case.model)
    e, h, inter, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.tokens, h, device=device, generator=gen).bfloat16()
    weights, idx = route(case.tokens, e, k, case.skew, device, gen)
    plan = build_plan(idx, weights, e)
    q13, q2 = _experts(e, 2 * inter, h, device, gen), _experts(e, h, inter, device, gen)
    w13, w2 = WeightView([q13]), WeightView([q2])
    rows = case.tokens * k
    flops = {"fc1": 2 * rows * h * 2 * inter, "fc2": 2 * rows * inter * h}
    hidden = get_kernels("torch", device).fc1(x, plan, w13)
    kernels = {name: get_kernels(name, device) for name in impls}
    # each set's weights in its own layout, made once as at model build (not timed)
    views = {name: [WeightView([w]) for w in kern.prepare_experts(q13, q2)] for name, kern in kernels.items()}
    timings: dict[tuple[str, str], float] = {}
    tiles: dict[tuple[str, str], str] = {}  # the work tile each fused stage picked for this case
    spreads: dict[tuple[str, str], float] = {}
    refused: list[str] = []
    for stage, view, experts, (k_dim, n_dim) in (("fc1", w13, q13, (h, 2 * inter)), ("fc2", w2, q2, (inter, h))):
        gemm_rows = (lambda: x[plan.row_token]) if stage == "fc1" else (lambda: hidden)
        dense_a = torch.randn(rows, k_dim, device=device, generator=gen).bfloat16()
        dense_b = torch.randn(k_dim, n_dim, device=device, generator=gen).bfloat16()
        timings.update(_baselines(stage, view, experts, dense_a, gemm_rows, plan, device))
        calls = {"dense-bf16": lambda: dense_a @ dense_b}
        for name, kern in kernels.items():
            v13, v2 = views[name]
            call = (lambda kern=kern, v13=v13: kern.fc1(x, plan, v13)) if stage == "fc1" else (lambda kern=kern, v2=v2: kern.fc2(hidden, plan, v2))
            try:
                call()  # the implementation's input checks, before any timing
            except UnsupportedCase as e:
                refused.append(f"{stage} {name}: {e}")
                continue
            calls[name] = call
            if getattr(kern, "fused", (False, False))[stage == "fc2"]:
                tiles[(stage, name)] = "x".join(map(str, kern.work_tile(plan, stage == "fc1", n_dim)))
        names = list(calls)
        readings: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            first = r % len(names)  # each round starts one implementation later
            for name in names[first:] + names[:first]:
                readings[name].append(bench(calls[name], device))
        for name, ms in readings.items():
            timings[(stage, name)] = statistics.median(ms)
            if rounds > 1:
                spreads[(stage, name)] = (max(ms) - min(ms)) / timings[(stage, name)]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = []
    for (stage, impl), ms in timings.items():
        tflops = flops[stage] / (ms * 1e-3) / 1e12
        out.append(
            {
                "timestamp": stamp, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": case.model,
                "tokens": case.tokens, "skew": case.skew, "routed_rows": rows, "stage": stage, "impl": impl, "ms": ms, "tflops": tflops,
                "frac_ceiling": timings[(stage, "dense-bf16")] / ms, "x_vs_torch": timings[(stage, "torch")] / ms if (stage, "torch") in timings else None,
                "tile": tiles.get((stage, impl), ""), "spread": spreads.get((stage, impl)),
            }
        )
    return out, refused


def table(rows: list[dict]) -> Table:
    t = Table(title="MoE kernels: median time, TFLOP/s, fraction of the dense bf16 ceiling")
    for col in ("model", "tokens", "skew", "stage", "impl", "ms", "spread", "TFLOP/s", "x ceiling", "x torch"):
        t.add_column(col, justify="left" if col in ("model", "stage", "impl") else "right")
    for r in rows:
        t.add_row(
            r["model"], str(r["tokens"]), f"{r['skew']:g}", r["stage"], r["impl"], f"{r['ms']:.3f}", fmt(r["spread"], ".1%"), f"{r['tflops']:.1f}",
            f"{r['frac_ceiling']:.2f}", "" if r["x_vs_torch"] is None else f"{r['x_vs_torch']:.2f}",
        )
    return t
