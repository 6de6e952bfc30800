"""The prefill engine: runs a workload on this rank under one strategy and measures it.

    replicated, dwdp  each rank runs its own queue back to back; nothing waits on another rank
    ep                all ranks step in lockstep through the longest queue, joining every
                      collective with an empty batch once their own queue is done
    ep-overlap        like ep, each batch split into two micro-batches whose forward passes are
                      interleaved at every collective, so one's all-to-all runs under the other's compute
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..kernels import MoEKernels
from .comm import RankContext
from .model import Model, Steps, run_steps
from .strategies import DWDP, EP, Replicated, Strategy, StrategyOptions
from .timeline import Timeline, totals
from .weights import DenseWeights, WeightSource
from .workload import Batch, Workload, split_micro_batches

_STRATEGY_CLASSES = {"replicated": Replicated, "dwdp": DWDP, "ep": EP, "ep-overlap": EP}


def build_strategy(name: str, ctx: RankContext, source: WeightSource, kernels: MoEKernels, options: StrategyOptions, timeline: Timeline) -> Strategy:
    if name not in _STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(_STRATEGY_CLASSES)}")
    return _STRATEGY_CLASSES[name](ctx, source, kernels, options, timeline)


def run_interleaved(passes: list[Steps]) -> list[torch.Tensor]:
    """Advance several forward passes round-robin, one step (up to the next collective) at a time.
    Every rank interleaves identically, so collectives are issued in the same order everywhere."""
    results: list = [None] * len(passes)
    live = list(range(len(passes)))
    while live:
        for i in list(live):
            try:
                next(passes[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results


@dataclass
class RankRun:
    """What one rank measured in one pass over its workload."""

    wall_s: float
    intervals: list  # timeline.Interval, this rank's whole pass
    request_done_ms: dict[int, float]  # request id -> time its batch finished (from the start)
    time_ms: dict[str, float]  # per interval kind, summed
    transport: dict[str, float]
    peak_bytes: int | None
    tokens: int
    last_logits: list[torch.Tensor] = field(default_factory=list)  # per batch, on the host


class Engine:
    def __init__(self, ctx: RankContext, source: WeightSource, dense: DenseWeights, kernels: MoEKernels):
        self.ctx = ctx
        self.source = source
        self.dense = dense
        self.kernels = kernels

    def model(self, name: str, options: StrategyOptions, timing: bool = True) -> Model:
        """The model under strategy `name` (`model.experts`); `timing` records the timeline."""
        timeline = Timeline(self.ctx.device, enabled=timing)
        strategy = build_strategy(name, self.ctx, self.source, self.kernels, options, timeline)
        return Model(self.source.config, self.dense, strategy, timeline=timeline)

    def run(self, name: str, model: Model, workload: Workload, keep_logits: bool = False, on_batch=None) -> RankRun:
        ctx, cfg, timeline = self.ctx, self.source.config, model.timeline
        mine = workload.batches[ctx.rank]
        if name.startswith("ep"):
            empty = Batch([], [])
            mine = mine + [empty] * (workload.steps - len(mine))
        # Inputs go to the device before the clock starts; ep-overlap's micro-batches are made here too.
        inputs = []
        for b in mine:
            parts = split_micro_batches(b) if name == "ep-overlap" else (b,)
            inputs.append((b, [(p, workload.batch_tokens(p, cfg.vocab_size).to(ctx.device)) for p in parts]))
        if ctx.is_cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        strategy = model.experts
        strategy.transport_stats()  # reset the counters
        ctx.synchronize()
        ctx.barrier()
        timeline.clear()
        start = time.perf_counter()
        timeline.mark("start")
        logits = []
        for i, (batch, parts) in enumerate(inputs):
            strategy.begin_forward()
            if len(parts) == 1:
                out = run_steps(model.forward_steps(parts[0][1], batch.seq_lens))
            else:
                outs = run_interleaved([model.forward_steps(tokens, p.seq_lens) for p, tokens in parts])
                out = _reorder(batch, [p for p, _ in parts], outs)
            timeline.mark("batch_done", i)
            if keep_logits and batch.request_ids:
                logits.append(out.cpu())
            if on_batch is not None:
                on_batch(i, len(inputs))
        timeline.mark("end")
        ctx.synchronize()
        wall = time.perf_counter() - start
        intervals = timeline.intervals()
        done_at = {iv.layer: iv.start_ms for iv in intervals if iv.what == "batch_done"}
        request_done = {rid: done_at[i] for i, (b, _) in enumerate(inputs) for rid in b.request_ids}
        kinds = totals(intervals)
        for bookkeeping in ("start", "batch_done", "end"):
            kinds.pop(bookkeeping, None)
        return RankRun(
            wall_s=wall,
            intervals=intervals,
            request_done_ms=request_done,
            time_ms=kinds,
            transport=strategy.transport_stats(),
            peak_bytes=torch.cuda.max_memory_allocated(ctx.device) if ctx.is_cuda else None,
            tokens=sum(b.tokens for b, _ in inputs),
            last_logits=logits,
        )


def _reorder(batch: Batch, parts: list[Batch], outs: list[torch.Tensor]) -> torch.Tensor:
    """Last-token logits of the micro-batches back in the batch's request order."""
    row = {}
    for part, out in zip(parts, outs):
        for j, rid in enumerate(part.request_ids):
            row[rid] = out[j]
    if not batch.request_ids:
        return outs[0]
    return torch.stack([row[rid] for rid in batch.request_ids])
