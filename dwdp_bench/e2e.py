"""`dwdp-bench e2e`: prefill throughput of replicated, DWDP and EP on the same model and workload.

This module holds the rank side (`rank_main`, run on every rank by the launcher) and the summary
table. One CSV row per (strategy, spread, repeat) is written by rank 0 as soon as it is measured.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .kernels import default_kernels, get_kernels
from .results import RowWriter, e2e_medians, fmt, sidecar, write_json
from .runtime.comm import RankContext
from .runtime.engine import Engine, RankRun
from .runtime.strategies import ExpertPartition, StrategyOptions
from .runtime.timeline import WAIT_COLLECTIVE, WAIT_PREFETCH
from .runtime.weights import expert_nbytes, load_weight_source
from .runtime.workload import Workload, WorkloadSpec

COLUMNS = [
    "timestamp", "model", "layers", "strategy", "world_size", "dwdp_size", "dwdp_local", "dwdp_prefetch", "slice_bytes",
    "kernels", "dtype", "device", "isl", "cv", "cv_actual", "max_tokens", "requests", "repeat", "tokens",
    "wall_s", "tps_per_gpu", "ttft_p50_s", "ttft_p90_s", "ttft_max_s",
    "busy_ms_mean", "wait_collective_ms_mean", "wait_prefetch_ms_mean", "moe_ms_mean", "exposed_prefetch_pct",
    "transport_bytes_per_rank", "transport_gbps", "peak_mem_gib_max", "expert_gib_per_rank", "expert_gib_expected",
    "logit_max_abs_diff", "logit_rel_diff", "fault",
]
# Interval kinds that belong to a MoE layer (the denominator of "exposed prefetch, % of MoE time").
MOE_KINDS = ("moe", "experts", "combine", WAIT_PREFETCH, WAIT_COLLECTIVE)
GIB = 2**30


def strategy_options(a: dict) -> StrategyOptions:
    """The job's StrategyOptions (they travel to the ranks as a dict, inside the JSON job file)."""
    return StrategyOptions(**a["options"])


def _logit_diff(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """Max |a - b| and that over max |b|, across all batches; NaN anywhere counts as infinite."""
    worst, scale = 0.0, 0.0
    for a, b in zip(logits, reference):
        d = (a - b).abs()
        worst = max(worst, float("inf") if not torch.isfinite(d).all() else float(d.max()) if d.numel() else 0.0)
        scale = max(scale, float(b.abs().max()) if b.numel() else 0.0)
    return worst, (worst / scale if scale else 0.0)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def source_from_args(a: dict):
    """The weight source the arguments name (synthetic config with overrides, or a checkpoint)."""
    return load_weight_source(a["model"], a["seed"], **({"layers": a["layers"]} if a.get("layers") else {}))


def rank_main(ctx: RankContext, a: dict) -> None:
    source = source_from_args(a)
    cfg = source.config
    dtype = getattr(torch, a["dtype"])
    kernel_name = a["kernels"] or default_kernels(ctx.device, cfg.hidden_size, cfg.moe_intermediate_size)
    kernels = get_kernels(kernel_name, ctx.device, a["act_quant"])
    ctx.progress("building dense weights")
    engine = Engine(ctx, source, source.dense(ctx.device, dtype), kernels)
    options = strategy_options(a)
    workloads = {
        cv: Workload.generate(WorkloadSpec(a["requests_per_rank"], a["isl"], cv, a["max_tokens"], a["seed"]), ctx.world_size)
        for cv in a["cvs"]
    }
    lead = ctx.rank == 0
    out = Path(a["out"])
    writer = RowWriter(out, COLUMNS) if lead else None
    rows, timelines = [], []
    # Replicated first: its logits are the reference the others are compared with.
    order = sorted(a["strategies"], key=lambda s: s != "replicated")
    reference = None
    passes = a["warmup"] + a["repeats"]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not lead or not a["progress"])
    with progress:
        task = progress.add_task("e2e", total=len(order) * len(a["cvs"]) * passes)
        for name in order:
            ctx.progress(f"{name}: building expert weights")
            model = engine.model(name, options)
            strategy = model.experts
            partition = getattr(strategy, "partition", None)
            diff = (None, None)  # logits vs replicated, from the first spread's first pass
            for cv, workload in workloads.items():
                for p in range(passes):
                    repeat = p - a["warmup"]
                    label = f"{name} cv={cv:g} " + (f"warm-up {p + 1}" if repeat < 0 else f"repeat {repeat + 1}/{a['repeats']}")
                    progress.update(task, description=label)
                    keep = p == 0 and cv == a["cvs"][0]
                    run = engine.run(name, model, workload, keep_logits=keep, on_batch=lambda i, n: ctx.progress(f"{label}: batch {i + 1}/{n}"))
                    if keep:
                        if name == "replicated":
                            reference = run.last_logits
                        if reference is not None:
                            diff = _logit_diff(run.last_logits, reference)
                    last = repeat == a["repeats"] - 1
                    gathered = ctx.all_gather_object(_summary(run, diff, strategy.expert_bytes(), with_intervals=last))
                    progress.advance(task)
                    if repeat < 0:
                        continue
                    if lead:
                        row = _row(a, cfg, name, kernel_name, workload, repeat, gathered, partition)
                        writer.write(row)
                        rows.append(row)
                        if last:
                            timelines.append({"strategy": name, "cv": cv, "ranks": [g["intervals"] for g in gathered]})
            strategy.close()
            del strategy, model
            if ctx.is_cuda:
                torch.cuda.empty_cache()
    if lead:
        write_json(sidecar(out, "timeline"), {"columns": ["what", "layer", "start_ms", "duration_ms"], "runs": timelines})
        Console().print(summary_table(rows))
        Console().print(f"rows: {out}")


def _summary(run: RankRun, diff: tuple, expert_bytes: int, with_intervals: bool) -> dict:
    return {
        "wall_s": run.wall_s,
        "request_done_ms": run.request_done_ms,
        "time_ms": run.time_ms,
        "transport": run.transport,
        "peak_bytes": run.peak_bytes,
        "tokens": run.tokens,
        "diff": diff,
        "expert_bytes": expert_bytes,
        "intervals": [[iv.what, iv.layer, round(iv.start_ms, 4), round(iv.duration_ms, 4)] for iv in run.intervals] if with_intervals else None,
    }


def _row(a: dict, cfg, name: str, kernel_name: str, workload: Workload, repeat: int, ranks: list[dict], partition: ExpertPartition | None) -> dict:
    world = len(ranks)
    wall = max(r["wall_s"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    ttft = [ms / 1e3 for r in ranks for ms in r["request_done_ms"].values()]
    total = [sum(r["time_ms"].values()) for r in ranks]
    wait_c = [r["time_ms"].get(WAIT_COLLECTIVE, 0.0) for r in ranks]
    wait_p = [r["time_ms"].get(WAIT_PREFETCH, 0.0) for r in ranks]
    moe = [sum(r["time_ms"].get(k, 0.0) for k in MOE_KINDS) for r in ranks]
    moved = [r["transport"]["bytes"] for r in ranks]
    # GB/s: DWDP's copies over the time the prefetch stream spent copying; EP's all-to-all bytes over
    # the time the compute stream waited on collectives (what the all-to-all cost, not link speed).
    spent_ms = [r["transport"]["ms"] if r["transport"]["ms"] is not None else w for r, w in zip(ranks, wait_c)]
    gbps = sum(moved) / (sum(spent_ms) / 1e3) / 1e9 if sum(spent_ms) > 0 and sum(moved) else None
    per_expert = expert_nbytes(cfg)
    if name == "dwdp" and partition is not None:
        expected = (cfg.num_moe_layers * partition.local + 2 * (partition.group_size - 1) * partition.prefetch) * per_expert
    elif name.startswith("ep"):
        expected = cfg.num_moe_layers * cfg.n_routed_experts // world * per_expert
    else:
        expected = cfg.num_moe_layers * cfg.n_routed_experts * per_expert
    diffs = [r["diff"] for r in ranks if r["diff"][0] is not None]
    peaks = [r["peak_bytes"] for r in ranks if r["peak_bytes"] is not None]
    o = a["options"]
    faults = [k for k in ("fault_delay_prefetch_s", "fault_skip_prefetch_wait") if o[k]]
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": a["model"],
        "layers": cfg.num_hidden_layers,
        "strategy": name,
        "world_size": world,
        "dwdp_size": partition.group_size if partition else None,
        "dwdp_local": partition.local if partition else None,
        "dwdp_prefetch": partition.prefetch if partition else None,
        "slice_bytes": o["slice_bytes"] if name == "dwdp" else None,
        "kernels": kernel_name,
        "dtype": a["dtype"],
        "device": a["device_name"],
        "isl": workload.spec.mean_len,
        "cv": workload.spec.cv,
        "cv_actual": workload.actual_cv(),
        "max_tokens": workload.spec.max_tokens,
        "requests": len(workload.lengths),
        "repeat": repeat,
        "tokens": tokens,
        "wall_s": wall,
        "tps_per_gpu": tokens / wall / world,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p90_s": _percentile(ttft, 0.9),
        "ttft_max_s": max(ttft),
        "busy_ms_mean": statistics.mean(t - c - p for t, c, p in zip(total, wait_c, wait_p)),
        "wait_collective_ms_mean": statistics.mean(wait_c),
        "wait_prefetch_ms_mean": statistics.mean(wait_p),
        "moe_ms_mean": statistics.mean(moe),
        "exposed_prefetch_pct": 100 * sum(wait_p) / sum(moe) if name == "dwdp" and sum(moe) else None,
        "transport_bytes_per_rank": statistics.mean(moved),
        "transport_gbps": gbps,
        "peak_mem_gib_max": max(peaks) / GIB if peaks else None,
        "expert_gib_per_rank": max(r["expert_bytes"] for r in ranks) / GIB,
        "expert_gib_expected": expected / GIB,
        "logit_max_abs_diff": max(d[0] for d in diffs) if diffs else None,
        "logit_rel_diff": max(d[1] for d in diffs) if diffs else None,
        "fault": ",".join(faults) or None,
    }


def summary_table(rows: list[dict]) -> Table:
    """Medians over repeats per (strategy, spread), with DWDP's ratio to the better EP form."""
    table = Table(title="e2e prefill: medians over repeats")
    for col in ("cv", "strategy", "tok/s/GPU", "x best EP", "x repl", "TTFT p90 s", "wait ms", "prefetch %MoE", "GB/s", "peak GiB", "expert GiB", "logit rel err"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for _, r in e2e_medians(rows).sort_values(["cv", "strategy"]).iterrows():
        wait = (r.wait_collective_ms_mean or 0) + (r.wait_prefetch_ms_mean or 0)
        table.add_row(
            fmt(r.cv, "g"), r.strategy, fmt(r["median"], ".0f"), fmt(r.x_best_ep, ".3f"), fmt(r.x_replicated, ".3f"), fmt(r.ttft_p90_s, ".3g"),
            fmt(wait, ".1f"), fmt(r.exposed_prefetch_pct, ".2f"), fmt(r.transport_gbps, ".0f"), fmt(r.peak_mem_gib_max, ".1f"),
            fmt(r.expert_gib_per_rank, ".2f"), fmt(r.logit_rel_diff, ".1e"),
        )
    return table


def validate(a: dict, world: int) -> None:
    """Everything that can be checked before any rank starts; raises ValueError with what to change."""
    from .kernels import KERNEL_NAMES

    cfg = source_from_args(a).config
    if a["dtype"] not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype must be bfloat16 or float32, got {a['dtype']!r}")
    if a["kernels"] is not None and a["kernels"] not in KERNEL_NAMES:
        raise ValueError(f"unknown --kernels {a['kernels']!r}; choose from {', '.join(KERNEL_NAMES)}")
    if a["kernels"] not in (None, "torch") and a["device"] != "cuda":
        raise ValueError(f"--kernels {a['kernels']} needs CUDA GPUs; use --kernels torch on CPU")
    if a["repeats"] < 1 or a["warmup"] < 1:
        raise ValueError("--repeats and --warmup must be >= 1 (the first, unmeasured pass also checks logits against replicated)")
    o = a["options"]
    if o["align"] < 1:
        raise ValueError("--align must be >= 1")
    if o["slice_bytes"] < 0 or o["fault_delay_prefetch_s"] < 0:
        raise ValueError("--slice-mib and --fault-delay-prefetch must be >= 0")
    if not a["cvs"]:
        raise ValueError("--cv needs at least one spread")
    for cv in a["cvs"]:
        WorkloadSpec(a["requests_per_rank"], a["isl"], cv, a["max_tokens"], a["seed"]).validate()
    if "dwdp" in a["strategies"]:
        n = o["dwdp_size"] or world
        if world % n:
            raise ValueError(f"--dwdp-size {n} does not divide the number of ranks {world}")
        ExpertPartition.default(cfg.n_routed_experts, n, o["dwdp_local"], o["dwdp_prefetch"])
    if any(s.startswith("ep") for s in a["strategies"]) and cfg.n_routed_experts % world:
        raise ValueError(f"EP needs the {cfg.n_routed_experts} routed experts to divide evenly over {world} ranks")
