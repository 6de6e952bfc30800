"""Where routed-expert weights come from: replicated, DWDP, EP.

All three run the same MoE kernels on the same routing plan; they differ only in the weight view the
kernels get and in what moves between ranks:

    replicated  every rank holds all E experts; nothing moves.
    dwdp        a group of N ranks partitions the experts (L local per rank); before each MoE layer a
                rank copies the P experts it lacks from every peer into one of two prefetch buffers,
                on a dedicated stream, two layers ahead. No collective in the forward pass.
    ep          experts split E/N per rank; tokens go to their experts' owner and back through
                all-to-all (dispatch, combine). Every rank joins every collective, with zero tokens
                if it has none: that is where unequal work costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import ExpertWeights, MoEKernels, NVFP4Weights, WeightView, build_plan
from ..kernels.interface import count_values
from .comm import RankContext
from .config import ModelConfig
from .model import Steps
from .timeline import WAIT_COLLECTIVE, WAIT_PREFETCH, Timeline
from .transport import Arena, Copy, PeerArena, align_up, prefetch_stream
from .weights import WeightSource

log = logging.getLogger(__name__)


@dataclass
class StrategyOptions:
    align: int = 1  # per-expert row padding of the permuted layout
    dwdp_size: int | None = None  # ranks per DWDP group (default: the whole world)
    dwdp_local: int | None = None  # L: experts stored per rank
    dwdp_prefetch: int | None = None  # P: experts pulled from every peer
    slice_bytes: int = 0  # >0: split prefetch copies into slices this size, peers round-robin
    fault_delay_prefetch_s: float = 0.0  # fault injection: delay every layer's prefetch
    fault_skip_prefetch_wait: bool = False  # fault injection: compute does not wait for prefetches


class Strategy:
    def __init__(self, ctx: RankContext, source: WeightSource, kernels: MoEKernels, options: StrategyOptions, timeline: Timeline):
        self.ctx = ctx
        self.source = source
        self.cfg: ModelConfig = source.config
        self.kernels = kernels
        self.options = options
        self.timeline = timeline

    def begin_forward(self) -> None:
        pass

    def routed(self, moe_layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Steps:
        raise NotImplementedError

    def expert_bytes(self) -> int:
        """Routed-expert bytes this rank holds (weights and any prefetch buffers)."""
        return sum(s.nbytes() for v in self.views for s in (*v.w13.segments, *v.w2.segments))

    def transport_stats(self) -> dict[str, float]:
        """Bytes this rank moved to or from other ranks since the last call, and the time it took."""
        return {"bytes": 0, "ms": 0.0}

    def close(self) -> None:
        pass

    def _layer(self, moe_layer: int) -> int:
        return moe_layer + self.cfg.first_k_dense_replace

    def _load_experts(self, moe_layer: int, lo: int, hi: int) -> tuple[NVFP4Weights, NVFP4Weights]:
        """Experts [lo, hi) of a MoE layer on this rank's device, in the layouts the kernels read."""
        return self.kernels.prepare_experts(*self.source.experts(self._layer(moe_layer), lo, hi, self.ctx.device))

    def _experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, view: ExpertWeights) -> torch.Tensor:
        plan = build_plan(idx, weights, view.num_experts, self.options.align)
        return self.kernels.fc2(self.kernels.fc1(x, plan, view.w13), plan, view.w2)


class Replicated(Strategy):
    def __init__(self, *args):
        super().__init__(*args)
        self.views = []
        for m in range(self.cfg.num_moe_layers):
            w13, w2 = self._load_experts(m, 0, self.cfg.n_routed_experts)
            self.views.append(ExpertWeights(WeightView([w13]), WeightView([w2])))

    def routed(self, moe_layer, x, topk_idx, topk_weights):
        self.timeline.mark("experts", self._layer(moe_layer))
        return self._experts(x, topk_idx, topk_weights, self.views[moe_layer])
        yield  # a generator that never waits


@dataclass(frozen=True)
class ExpertPartition:
    """DWDP's split of E experts over a group of N ranks.

    Rank r stores experts [P*r, P*r + L) and pulls P experts from every peer p: the head of p's range
    (offset 0) when p < r, the tail (offset L - P) when p > r. Coverage needs E = L + (N - 1) * P and
    P <= L; with E=72, N=3, L=32, P=20, rank 1 holds [20, 52) and pulls [0, 20) and [52, 72).
    """

    num_experts: int
    group_size: int
    local: int
    prefetch: int

    def __post_init__(self) -> None:
        e, n, l, p = self.num_experts, self.group_size, self.local, self.prefetch
        if n < 1:
            raise ValueError(f"DWDP group size must be >= 1, got {n}")
        if n == 1:
            if l != e:
                raise ValueError(f"a DWDP group of 1 stores every expert: L must be {e}, got {l}")
            return
        if not 1 <= p <= l:
            raise ValueError(f"DWDP partition needs 1 <= P <= L, got L={l}, P={p}")
        if l + (n - 1) * p != e:
            raise ValueError(
                f"DWDP partition does not cover the experts: E = L + (N-1) x P must hold, but "
                f"{l} + {n - 1} x {p} = {l + (n - 1) * p} != E = {e}. "
                f"For example L = {e - (n - 1) * (e // n)}, P = {e // n}"
            )

    @staticmethod
    def default(num_experts: int, group_size: int, local: int | None = None, prefetch: int | None = None) -> ExpertPartition:
        """Fill in L or P from the other (or both, as evenly as possible), then validate."""
        n, e = group_size, num_experts
        if n == 1:
            return ExpertPartition(e, 1, e if local is None else local, prefetch or 0)
        if prefetch is None and local is None:
            prefetch = e // n
        if prefetch is None:
            if (e - local) % (n - 1):
                raise ValueError(f"with L={local}, E - L = {e - local} is not divisible by N - 1 = {n - 1}")
            prefetch = (e - local) // (n - 1)
        if local is None:
            local = e - (n - 1) * prefetch
        return ExpertPartition(e, n, local, prefetch)

    def local_range(self, r: int) -> tuple[int, int]:
        return self.prefetch * r, self.prefetch * r + self.local

    def pulls(self, r: int) -> list[tuple[int, int]]:
        """(peer, offset of the pulled experts inside the peer's local ones), in global expert order:
        from p < r experts [P*p, P*p + P), from p > r experts [P*p + L - P, P*p + L)."""
        return [(p, 0 if p < r else self.local - self.prefetch) for p in range(self.group_size) if p != r]


# The six tensors of one expert in NVFP4: (name, dtype, shape of one expert given (H, I)).
_KINDS = (
    ("w13.packed", torch.uint8, lambda h, i: (2 * i, h // 2)),
    ("w13.scale", torch.float8_e4m3fn, lambda h, i: (2 * i, h // 16)),
    ("w13.global", torch.float32, lambda h, i: ()),
    ("w2.packed", torch.uint8, lambda h, i: (h, i // 2)),
    ("w2.scale", torch.float8_e4m3fn, lambda h, i: (h, i // 16)),
    ("w2.global", torch.float32, lambda h, i: ()),
)


class ExpertBlock:
    """`n` experts of one layer laid out in an arena: each of the six tensors contiguous, aligned."""

    def __init__(self, cfg: ModelConfig, n: int, base: int):
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.n = n
        self.offsets, self.shapes, self.expert_nbytes = {}, {}, {}
        offset = base
        for name, dtype, shape in _KINDS:
            one = shape(h, i)
            size = dtype.itemsize
            for s in one:
                size *= s
            self.offsets[name], self.shapes[name], self.expert_nbytes[name] = offset, (dtype, one), size
            offset = align_up(offset + n * size)
        self.end = offset

    def weights(self, arena: Arena, layouts: tuple[str, str]) -> tuple[NVFP4Weights, NVFP4Weights]:
        """The block's W13 and W2 in `arena`, holding bytes in `layouts` (the kernels'; see nvfp4.py)."""
        t = {name: arena.view(self.offsets[name], dtype, (self.n, *one)) for name, (dtype, one) in self.shapes.items()}
        return (
            NVFP4Weights(t["w13.packed"], t["w13.scale"], t["w13.global"], layouts[0]),
            NVFP4Weights(t["w2.packed"], t["w2.scale"], t["w2.global"], layouts[1]),
        )


class DWDP(Strategy):
    def __init__(self, *args):
        super().__init__(*args)
        ctx, cfg, opt = self.ctx, self.cfg, self.options
        n = opt.dwdp_size or ctx.world_size
        if ctx.world_size % n:
            raise ValueError(f"DWDP group size {n} does not divide the world size {ctx.world_size}")
        self.group_size = n
        self.group_first = ctx.rank // n * n
        self.r = ctx.rank - self.group_first
        self.partition = ExpertPartition.default(cfg.n_routed_experts, n, opt.dwdp_local, opt.dwdp_prefetch)
        part, layers = self.partition, cfg.num_moe_layers

        # Local experts of every MoE layer, in one exported arena (the same layout on every rank).
        self.local_blocks = []
        offset = 0
        for _ in range(layers):
            self.local_blocks.append(ExpertBlock(cfg, part.local, offset))
            offset = self.local_blocks[-1].end
        self.local_arena = Arena(offset, ctx.device)
        lo, hi = part.local_range(self.r)
        self.local = []
        for m, block in enumerate(self.local_blocks):
            w13, w2 = block.weights(self.local_arena, self.kernels.layouts)
            src13, src2 = self._load_experts(m, lo, hi)
            for dst, src in ((w13, src13), (w2, src2)):
                for d, s in zip(dst.tensors(), src.tensors()):
                    d.copy_(s)
            self.local.append((w13, w2))
            del src13, src2

        # Two prefetch buffers, each with one slot of P experts per peer, poisoned (0xff: NaN scales)
        # so that reading a buffer before its copy landed shows up in the logits.
        self.pulls = part.pulls(self.r)
        self.buffer_blocks = []
        offset = 0
        for _ in range(2):
            slots = []
            for _ in self.pulls:
                slots.append(ExpertBlock(cfg, part.prefetch, offset))
                offset = slots[-1].end
            self.buffer_blocks.append(slots)
        self.buffer_arena = Arena(offset, ctx.device, fill=0xFF)

        # One-time handle exchange with the group (host-side, gloo), then open the peers' arenas. The
        # local experts must have landed before any peer can copy them.
        ctx.synchronize()
        exported = ctx.all_gather_object(self.local_arena.export())
        self.peers = {p: PeerArena(exported[self.group_first + p], ctx.device) for p in range(n) if p != self.r}

        self.views = []
        for m in range(layers):
            buf = [slot.weights(self.buffer_arena, self.kernels.layouts) for slot in self.buffer_blocks[m % 2]]
            below = [b for b, (p, _) in zip(buf, self.pulls) if p < self.r]
            above = [b for b, (p, _) in zip(buf, self.pulls) if p > self.r]
            w13 = [b[0] for b in below] + [self.local[m][0]] + [b[0] for b in above]
            w2 = [b[1] for b in below] + [self.local[m][1]] + [b[1] for b in above]
            self.views.append(ExpertWeights(WeightView(w13), WeightView(w2)))

        self.stream = prefetch_stream(ctx.device)
        self.prefetch_done: list = [None] * layers
        self.compute_done: list = [None] * layers
        self._copy_windows: list = []
        self._copied_bytes = 0

    def _copies(self, moe_layer: int) -> list[Copy]:
        """The copies that fill buffer (layer % 2) for `moe_layer`, in issue order."""
        per_peer = []
        for (peer, peer_offset), slot in zip(self.pulls, self.buffer_blocks[moe_layer % 2]):
            src_block = self.local_blocks[moe_layer]
            copies = []
            for name in slot.offsets:
                size = slot.expert_nbytes[name]
                c = Copy(self.buffer_arena, slot.offsets[name], self.peers[peer], src_block.offsets[name] + peer_offset * size, slot.n * size)
                # raw copies: a layout bug must fail here, not corrupt memory
                assert c.dst_offset + c.nbytes <= c.dst.nbytes and c.src_offset + c.nbytes <= c.src.nbytes, c
                copies.append(c)
            per_peer.append(copies)
        slice_bytes = self.options.slice_bytes
        if not slice_bytes:
            return [c for copies in per_peer for c in copies]
        # Contention fix for groups > 2: slices of ~slice_bytes, peers interleaved round-robin, so
        # the ranks pulling from one peer at the same moment spread over all peers.
        sliced = [[s for c in copies for s in _slices(c, slice_bytes)] for copies in per_peer]
        out = []
        for i in range(max(len(s) for s in sliced)):
            out.extend(s[i] for s in sliced if i < len(s))
        return out

    def _prefetch(self, moe_layer: int, after) -> None:
        self.stream.wait(after)
        start = self.stream.record()
        if self.options.fault_delay_prefetch_s:
            self.stream.delay(self.options.fault_delay_prefetch_s)
        for c in self._copies(moe_layer):
            self.stream.copy(c)
            self._copied_bytes += c.nbytes
        done = self.stream.record()
        self.prefetch_done[moe_layer] = done
        if self.timeline.enabled:
            self._copy_windows.append((start, done))

    def begin_forward(self) -> None:
        # Buffers may still be read by the previous forward's last layers: start after all of it.
        start = self.stream.record_compute()
        for m in range(min(2, self.cfg.num_moe_layers)):
            self._prefetch(m, start)

    def routed(self, moe_layer, x, topk_idx, topk_weights):
        layer = self._layer(moe_layer)
        self.timeline.mark(WAIT_PREFETCH, layer)
        if not self.options.fault_skip_prefetch_wait:
            self.stream.compute_wait(self.prefetch_done[moe_layer])
        self.timeline.mark("experts", layer)
        out = self._experts(x, topk_idx, topk_weights, self.views[moe_layer])
        self.compute_done[moe_layer] = self.stream.record_compute()
        if moe_layer + 2 < self.cfg.num_moe_layers:
            self._prefetch(moe_layer + 2, self.compute_done[moe_layer])
        return out
        yield  # never waits on another rank

    def expert_bytes(self) -> int:
        return self.local_arena.nbytes + self.buffer_arena.nbytes

    def transport_stats(self) -> dict[str, float]:
        self.stream.synchronize()
        ms = sum(self.stream.elapsed_ms(a, b) for a, b in self._copy_windows)
        out = {"bytes": self._copied_bytes, "ms": ms}
        self._copy_windows, self._copied_bytes = [], 0
        return out

    def close(self) -> None:
        self.stream.close()
        self.ctx.barrier()  # no peer may still be reading our arena
        for peer in self.peers.values():
            peer.close()
        self.ctx.barrier()
        self.local_arena.close()
        self.buffer_arena.close()


class _Done:
    """A finished asynchronous operation."""

    def wait(self) -> None:
        pass


def _slices(c: Copy, size: int) -> list[Copy]:
    return [
        Copy(c.dst, c.dst_offset + o, c.src, c.src_offset + o, min(size, c.nbytes - o)) for o in range(0, c.nbytes, size)
    ]


def ep_send_rows(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, per_rank: int, world: int):
    """What EP's dispatch sends: the (token, choice) pairs grouped by owner rank (expert // per_rank),
    stable in token order. Returns the order, rows per destination rank, the rows, and per row its
    owner-local expert and router weight as two int32 columns (the weight as raw bits, so that one
    all-to-all carries both)."""
    k = topk_idx.shape[1]
    dest = (topk_idx // per_rank).reshape(-1)
    order = torch.argsort(dest, stable=True)
    local_expert = topk_idx.reshape(-1)[order] - dest[order] * per_rank
    meta = torch.stack([local_expert.to(torch.int32), topk_weights.reshape(-1)[order].float().view(torch.int32)], dim=1)
    return order, count_values(dest, world), x[order // k], meta


class EP(Strategy):
    """Expert parallelism over the whole world with NCCL (GPU) / gloo (CPU) all-to-all.

    Per MoE layer and micro-batch: exchange per-destination row counts, dispatch the rows (hidden
    states, plus local expert id and router weight), run the local experts, send the weighted rows
    back (combine) and sum each token's k rows in a fixed order. Each exchange is issued
    asynchronously and the generator yields, so `ep-overlap` can run the other micro-batch meanwhile.
    """

    def __init__(self, *args):
        super().__init__(*args)
        ctx, cfg = self.ctx, self.cfg
        n = ctx.world_size
        if cfg.n_routed_experts % n:
            raise ValueError(f"EP needs n_routed_experts ({cfg.n_routed_experts}) divisible by the number of ranks ({n})")
        self.per_rank = cfg.n_routed_experts // n
        lo = ctx.rank * self.per_rank
        self.views = []
        for m in range(cfg.num_moe_layers):
            w13, w2 = self._load_experts(m, lo, lo + self.per_rank)
            self.views.append(ExpertWeights(WeightView([w13]), WeightView([w2])))
        self.count_stream = torch.cuda.Stream(ctx.device) if ctx.is_cuda else None
        # Pinned host buffers for the counts, allocated once: allocating pinned memory can synchronise
        # the device, which must never happen while a collective waits for a peer. Two micro-batches
        # each have at most one exchange in flight; four slots leave room.
        self._host_counts_ring = [torch.empty((2, n), dtype=torch.long, pin_memory=True) for _ in range(4)] if ctx.is_cuda else []
        self._ring_next = 0
        self._sent_bytes = 0

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None):
        """Asynchronous all-to-all; on a single rank, a copy (EP on one GPU moves nothing)."""
        if self.ctx.world_size == 1:
            out.copy_(inp)
            return _Done()
        return dist.all_to_all_single(out, inp, out_splits, in_splits, async_op=True)

    def _exchange_counts(self, send_counts: torch.Tensor):
        """Start the exchange of per-destination row counts; `_host_counts` finishes it.

        On CUDA the device-to-host copy of both count vectors is queued now, on a side stream that
        waits for the compute issued so far and this exchange, but not for what the compute stream
        queues after it (the other micro-batch's attention, under ep-overlap), so finishing it later
        does not wait for that. The count tensors travel in the returned tuple: freed earlier, the
        allocator could hand their memory to the compute stream before the side stream has read
        them (seen: garbage counts, then a hung all-to-all)."""
        recv_counts = torch.empty_like(send_counts)
        work = self._all_to_all(recv_counts, send_counts)
        if self.count_stream is None:
            return work, None, send_counts, recv_counts
        host = self._host_counts_ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % len(self._host_counts_ring)
        self.count_stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with torch.cuda.stream(self.count_stream):
            work.wait()
            host[0].copy_(send_counts, non_blocking=True)
            host[1].copy_(recv_counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return ready, host, send_counts, recv_counts

    @staticmethod
    def _host_counts(pending) -> tuple[list[int], list[int]]:
        done, host, send, recv = pending
        if host is None:  # gloo: the exchange ran on the host
            done.wait()
            counts = (send.tolist(), recv.tolist())
        else:
            done.synchronize()
            counts = (host[0].tolist(), host[1].tolist())
        if any(not 0 <= c < 2**31 for c in counts[1]):  # a corrupt exchange fails here, not as a hung all-to-all
            raise RuntimeError(f"EP count exchange returned impossible row counts {counts[1]}")
        return counts

    def routed(self, moe_layer, x, topk_idx, topk_weights):
        layer, tl = self._layer(moe_layer), self.timeline
        n, r = self.ctx.world_size, self.ctx.rank
        t, k = topk_idx.shape
        hidden = x.shape[1]
        order, send_counts, send_x, meta = ep_send_rows(x, topk_idx, topk_weights, self.per_rank, n)

        pending = self._exchange_counts(send_counts)
        yield
        tl.mark(WAIT_COLLECTIVE, layer)
        send_splits, recv_splits = self._host_counts(pending)
        log.debug("rank %d layer %d: dispatch send %s recv %s", r, layer, send_splits, recv_splits)
        recv_x = x.new_empty(sum(recv_splits), hidden)
        recv_meta = meta.new_empty(sum(recv_splits), 2)
        works = [self._all_to_all(recv_x, send_x, recv_splits, send_splits), self._all_to_all(recv_meta, meta, recv_splits, send_splits)]
        yield
        tl.mark(WAIT_COLLECTIVE, layer)
        for w in works:
            w.wait()
        tl.mark("experts", layer)
        # each received row is its own "token" with one choice: its local expert and router weight
        y = self._experts(recv_x, recv_meta[:, :1].long(), recv_meta[:, 1:].contiguous().view(torch.float32), self.views[moe_layer])
        back = x.new_empty(t * k, hidden)
        work = self._all_to_all(back, y, send_splits, recv_splits)
        yield
        tl.mark(WAIT_COLLECTIVE, layer)
        work.wait()
        tl.mark("combine", layer)
        remote_rows = sum(send_splits) - send_splits[r] + sum(recv_splits) - recv_splits[r]
        self._sent_bytes += (sum(send_splits) - send_splits[r]) * meta.shape[1] * 4 + remote_rows * hidden * x.element_size()
        position = torch.empty_like(order)
        position[order] = torch.arange(t * k, device=order.device)
        # The rows came back already weighted (the owner's FC2 applied the router weights).
        return self.kernels.reduce_rows(back, position.view(t, k), torch.ones(t, k, device=x.device))

    def transport_stats(self) -> dict[str, float]:
        out = {"bytes": self._sent_bytes, "ms": None}
        self._sent_bytes = 0
        return out
