"""`dwdp-bench kernels --transport`: what moves between ranks for one MoE layer, measured on N ranks.

Each rank builds one MoE layer of the model as the DWDP strategy does (runtime/strategies.py: the
ExpertPartition, the local experts in one arena exported through CUDA IPC or shared memory, the
prefetch stream), then per case (tokens per rank, routing skew) measures

    dwdp-prefetch       the layer's prefetch as the forward pass issues it (`DWDP.begin_forward`:
                        cudaMemcpyAsync through the peers' IPC pointers on the prefetch stream); bytes
                        = (N-1) x P experts of W13 + W2 in NVFP4
    peer-copy           the same bytes copied from buffers on the peers' devices with cudaMemcpyPeerAsync
                        (a torch copy on CPU): the link's speed without IPC or the prefetch stream, the
                        reference for dwdp-prefetch
    gemm-fc1            the FC1-shaped dense bf16 GEMM (routed rows x H -> 2I) alone ...
    gemm-fc1+prefetch   ... and while prefetches of the layer run on the prefetch stream, back to back
                        (they start with the GEMMs and the last may outlast them): slowdown = its time
                        over the time alone; its bytes and GB/s are the prefetches' under that load
    ep-dispatch         EP's dispatch all-to-alls (bf16 hidden rows, plus each row's expert id and
                        router weight) and ...
    ep-combine          ... its combine (the rows back), issued as the EP strategy issues them
                        (torch.distributed.all_to_all_single with per-rank splits); the row-count
                        exchange before them is left out (latency, not bytes)

Bytes are per rank and one way: what a rank pulls (DWDP, peer copy) or sends to other ranks (EP).
Every rank measures at the same time, as in a forward pass. Rank 0 writes one CSV row per (case,
measurement) as soon as the case is measured: bytes (mean over ranks), ms (the slowest rank's median
over repeats: what a layer waits for), GB/s = bytes / ms. On CPU ranks shared memory, a copy thread
and gloo stand in: the code paths run, the times mean little.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from .kernelbench import bench, route
from .kernels import get_kernels
from .results import RowWriter, fmt
from .runtime.comm import RankContext
from .runtime.config import get_config
from .runtime.strategies import DWDP, ExpertPartition, StrategyOptions, ep_send_rows
from .runtime.timeline import Timeline
from .runtime.transport import check_cuda
from .runtime.weights import SyntheticWeights

COLUMNS = ["timestamp", "device", "model", "ranks", "tokens", "skew", "measure", "bytes", "ms", "gbps", "x_peer_copy", "slowdown"]
MEASURES = ("dwdp-prefetch", "peer-copy", "gemm-fc1", "gemm-fc1+prefetch", "ep-dispatch", "ep-combine")
REPEATS = 10  # timed repeats of every measurement (after one warm-up)
GEMM_WINDOW_MS = 20.0  # GEMMs are timed in back-to-back runs of about this long


def validate(models: list[str], ranks: int) -> None:
    """Raises ValueError, saying what to change, when the transport cases cannot run on `ranks` ranks."""
    if ranks < 2:
        raise ValueError(
            f"the transport cases need at least 2 ranks (DWDP pulls experts from peers, EP sends them tokens), got {ranks}; "
            "give --ranks N (or use >= 2 GPUs), or --no-transport"
        )
    for m in models:
        e = get_config(m).n_routed_experts
        ExpertPartition.default(e, ranks)  # DWDP's coverage rule, with its own message
        if e % ranks:
            raise ValueError(f"EP splits the {e} routed experts of {m} evenly over the ranks: {ranks} ranks do not divide {e}")


def _window_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of `fn`, the device work it queues included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _repeat(ctx: RankContext, fn) -> list:
    """`fn()` once to warm up, then REPEATS times, every rank starting each call together."""
    fn()
    out = []
    for _ in range(REPEATS):
        ctx.barrier()
        out.append(fn())
    return out


def _peer_copy_ms(ctx: RankContext, dwdp: DWDP, devices: list[str], nbytes: int) -> float:
    """Median ms of a plain copy of `nbytes`, split evenly over the peers this rank pulls from, from
    buffers on their devices into this rank's, on this rank's current stream: cudaMemcpyPeerAsync with
    peer access enabled (no IPC, no prefetch stream) on CUDA, a torch copy on CPU."""
    per_peer = nbytes // len(dwdp.pulls)
    sources = [torch.randint(0, 256, (per_peer,), dtype=torch.uint8, device=devices[peer]) for peer, _ in dwdp.pulls]
    dst = torch.empty(per_peer * len(sources), dtype=torch.uint8, device=ctx.device)
    if ctx.is_cuda:
        from cuda.bindings import runtime as cudart

        for src in sources:  # the IPC handles may have enabled it already
            (err,) = cudart.cudaDeviceEnablePeerAccess(src.device.index, 0)
            if err not in (cudart.cudaError_t.cudaSuccess, cudart.cudaError_t.cudaErrorPeerAccessAlreadyEnabled):
                raise RuntimeError(f"cudaDeviceEnablePeerAccess({src.device.index}) failed: {err!r}")

        def copy() -> None:
            stream = torch.cuda.current_stream(ctx.device).cuda_stream
            for i, src in enumerate(sources):
                args = (dst.data_ptr() + i * per_peer, ctx.device.index, src.data_ptr(), src.device.index, per_peer, stream)
                check_cuda(cudart.cudaMemcpyPeerAsync(*args), "cudaMemcpyPeerAsync")
    else:

        def copy() -> None:
            for i, src in enumerate(sources):
                dst[i * per_peer : (i + 1) * per_peer].copy_(src)

    ctx.barrier()
    return bench(copy, ctx.device)


def _ep(ctx: RankContext, cfg, tokens: int, skew: float, gen: torch.Generator) -> dict[str, tuple[int, float, float]]:
    """Bytes sent to other ranks and median ms (twice, as `measure` returns them) of EP's dispatch and
    combine for this rank's tokens."""
    dev, n, r = ctx.device, ctx.world_size, ctx.rank
    e, k, h = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    x = torch.randn(tokens, h, device=dev, generator=gen).bfloat16()
    weights, idx = route(tokens, e, k, skew, dev, gen)
    _, send_counts, send_x, meta = ep_send_rows(x, idx, weights, e // n, n)  # exactly what EP sends
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x, recv_meta, back = x.new_empty(sum(recv), h), meta.new_empty(sum(recv), 2), x.new_empty(tokens * k, h)

    def dispatch() -> None:
        dist.all_to_all_single(recv_x, send_x, recv, send)
        dist.all_to_all_single(recv_meta, meta, recv, send)

    def combine() -> None:
        dist.all_to_all_single(back, recv_x, send, recv)

    row = h * x.element_size()
    dispatch_ms = statistics.median(_repeat(ctx, lambda: _window_ms(dispatch, dev)))
    combine_ms = statistics.median(_repeat(ctx, lambda: _window_ms(combine, dev)))
    return {
        "ep-dispatch": ((sum(send) - send[r]) * (row + meta.shape[1] * meta.element_size()), dispatch_ms, dispatch_ms),
        "ep-combine": ((sum(recv) - recv[r]) * row, combine_ms, combine_ms),
    }


def _gemm_under_prefetch(ctx: RankContext, dwdp: DWDP, tokens: int, prefetch_ms: float, gen: torch.Generator) -> tuple[float, list]:
    """Median ms of an FC1-sized bf16 GEMM alone, and per repeat (ms, bytes, prefetch ms) while layer
    prefetches run. Its inputs (7.5 GB for DeepSeek-V3 at 64K tokens) are freed on return, before EP's
    buffers are made."""
    cfg, dev = dwdp.cfg, ctx.device
    rows, h, inter = tokens * cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    a = torch.randn(rows, h, device=dev, generator=gen).bfloat16()
    b = torch.randn(h, 2 * inter, device=dev, generator=gen).bfloat16()
    gemm_ms = bench(lambda: a @ b, dev)
    count = max(4, math.ceil(GEMM_WINDOW_MS / gemm_ms))
    # Enough prefetches to outlast the GEMMs, issued before them: the copies run through the whole window.
    layers = math.ceil(count * gemm_ms / prefetch_ms) + 1

    def gemms() -> None:
        for _ in range(count):
            a @ b

    def gemms_while_prefetching() -> tuple[float, int, float]:
        for _ in range(layers):
            dwdp.begin_forward()
        ms = _window_ms(gemms, dev) / count
        stats = dwdp.transport_stats()
        return ms, stats["bytes"], stats["ms"]

    alone = statistics.median(_repeat(ctx, lambda: _window_ms(gemms, dev) / count))
    loaded = _repeat(ctx, gemms_while_prefetching)
    return alone, loaded


def measure(ctx: RankContext, dwdp: DWDP, devices: list[str], tokens: int, skew: float, seed: int) -> dict[str, tuple]:
    """This rank's (bytes or None, median ms, ms the bytes took or None) per measurement of one case."""
    cfg, dev = dwdp.cfg, ctx.device
    gen = torch.Generator(device=dev).manual_seed(seed * 1000 + ctx.rank)  # every rank its own tokens
    what = f"tokens={tokens} skew={skew:g}"

    def prefetch() -> tuple[int, float]:
        dwdp.begin_forward()
        stats = dwdp.transport_stats()  # waits for the copies; ms: the prefetch stream's time
        return stats["bytes"], stats["ms"]

    ctx.progress(f"{what}: DWDP prefetch")
    runs = _repeat(ctx, prefetch)
    layer_bytes, prefetch_ms = runs[0][0], statistics.median(ms for _, ms in runs)
    ctx.progress(f"{what}: peer copy")
    copy_ms = _peer_copy_ms(ctx, dwdp, devices, layer_bytes)

    ctx.progress(f"{what}: FC1 GEMM with and without the prefetch")
    alone, loaded = _gemm_under_prefetch(ctx, dwdp, tokens, prefetch_ms, gen)

    ctx.progress(f"{what}: EP dispatch and combine")
    return {
        "dwdp-prefetch": (layer_bytes, prefetch_ms, prefetch_ms),
        "peer-copy": (layer_bytes, copy_ms, copy_ms),
        "gemm-fc1": (None, alone, None),
        "gemm-fc1+prefetch": (loaded[0][1], statistics.median(r[0] for r in loaded), statistics.median(r[2] for r in loaded)),
        **_ep(ctx, cfg, tokens, skew, gen),
    }


def case_rows(model: str, device: str, tokens: int, skew: float, ranks: list[dict]) -> list[dict]:
    """One row per measurement from every rank's `measure` result: bytes are the mean over ranks, ms
    the slowest rank's, GB/s the mean bytes over the slowest rank's time for them."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = {}
    for m in MEASURES:
        moved, ms, transfer_ms = zip(*(r[m] for r in ranks))
        nbytes = statistics.mean(moved) if moved[0] is not None else None
        rows[m] = {
            "timestamp": stamp, "device": device, "model": model, "ranks": len(ranks), "tokens": tokens, "skew": skew, "measure": m,
            "bytes": nbytes, "ms": max(ms), "gbps": nbytes / max(transfer_ms) / 1e6 if nbytes is not None else None,
            "x_peer_copy": None, "slowdown": None,
        }
    rows["dwdp-prefetch"]["x_peer_copy"] = rows["dwdp-prefetch"]["gbps"] / rows["peer-copy"]["gbps"]
    rows["gemm-fc1+prefetch"]["slowdown"] = rows["gemm-fc1+prefetch"]["ms"] / rows["gemm-fc1"]["ms"]
    return list(rows.values())


def rank_main(ctx: RankContext, a: dict) -> None:
    """The launcher's job on every rank: one DWDP layer per model, then every (tokens, skew) case."""
    lead = ctx.rank == 0
    writer = RowWriter(Path(a["out"]), COLUMNS) if lead else None
    devices = ctx.all_gather_object(str(ctx.device))
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.is_cuda else "cpu"
    rows = []
    for model in a["models"]:
        full = get_config(model)
        cfg = full.with_overrides(layers=full.first_k_dense_replace + 1)  # one MoE layer
        ctx.progress(f"{model}: building one DWDP layer and exchanging handles")
        dwdp = DWDP(ctx, SyntheticWeights(cfg, a["seed"]), get_kernels("torch", ctx.device), StrategyOptions(), Timeline(ctx.device))
        for tokens in a["tokens"]:
            for skew in a["skew"]:
                gathered = ctx.all_gather_object(measure(ctx, dwdp, devices, tokens, skew, a["seed"]))
                if lead:
                    for row in case_rows(model, device_name, tokens, skew, gathered):
                        writer.write(row)
                        rows.append(row)
        dwdp.close()
        del dwdp
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    if lead:
        Console().print(table(rows))
        Console().print(f"transport rows: {writer.path}")


def table(rows: list[dict]) -> Table:
    t = Table(title="Transport per MoE layer and rank: bytes, slowest rank's median ms, GB/s")
    for col in ("model", "tokens", "skew", "measure", "MB", "ms", "GB/s", "x peer copy", "slowdown"):
        t.add_column(col, justify="left" if col in ("model", "measure") else "right")
    for r in rows:
        t.add_row(
            r["model"], str(r["tokens"]), f"{r['skew']:g}", r["measure"], fmt(None if r["bytes"] is None else r["bytes"] / 1e6, ".4g"), f"{r['ms']:.3f}",
            fmt(r["gbps"], ".4g"), fmt(r["x_peer_copy"], ".2f"), fmt(r["slowdown"], ".3f"),
        )
    return t
