"""Seeded prefill workloads: request lengths, their ranks, and the batches each rank runs.

Every rank regenerates the same workload from the spec, so no rank needs to ask another what its
batches are, and every strategy sees identical requests on identical ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkloadSpec:
    requests_per_rank: int = 16
    mean_len: int = 8192  # ISL
    cv: float = 0.0  # coefficient of variation of the input length (std / mean)
    max_tokens: int = 32768  # max tokens per batch
    seed: int = 0
    min_len: int = 16

    def validate(self) -> None:
        if self.requests_per_rank < 1:
            raise ValueError(f"requests per rank must be >= 1, got {self.requests_per_rank}")
        if not 1 <= self.mean_len <= self.max_tokens:
            raise ValueError(f"mean input length {self.mean_len} must lie in [1, max tokens per batch = {self.max_tokens}]")
        if self.cv < 0:
            raise ValueError(f"length spread (cv) must be >= 0, got {self.cv}")


@dataclass
class Batch:
    request_ids: list[int]
    seq_lens: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.seq_lens)


@dataclass
class Workload:
    spec: WorkloadSpec
    world_size: int
    lengths: list[int]  # per request
    rank_of: list[int]  # per request
    batches: list[list[Batch]]  # per rank, in the order the rank runs them

    @staticmethod
    def generate(spec: WorkloadSpec, world_size: int) -> Workload:
        """Lengths ~ Normal(mean, cv * mean), clipped to [min_len, max_tokens]; requests go to ranks
        round-robin (as a load balancer in front of data-parallel ranks would); each rank packs its
        queue in order into batches of at most max_tokens tokens."""
        spec.validate()
        gen = torch.Generator().manual_seed(spec.seed)
        n = spec.requests_per_rank * world_size
        raw = spec.mean_len * (1 + spec.cv * torch.randn(n, generator=gen, dtype=torch.float64))
        lo = min(spec.min_len, spec.mean_len)
        lengths = [int(v) for v in raw.round().clamp(lo, spec.max_tokens).tolist()]
        rank_of = [i % world_size for i in range(n)]
        batches: list[list[Batch]] = [[] for _ in range(world_size)]
        for r in range(world_size):
            current = Batch([], [])
            for i in (i for i in range(n) if rank_of[i] == r):
                if current.seq_lens and current.tokens + lengths[i] > spec.max_tokens:
                    batches[r].append(current)
                    current = Batch([], [])
                current.request_ids.append(i)
                current.seq_lens.append(lengths[i])
            batches[r].append(current)
        return Workload(spec, world_size, lengths, rank_of, batches)

    def tokens(self, request_id: int, vocab: int) -> torch.Tensor:
        """The prompt of one request: uniform token ids from a per-request generator."""
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + request_id)
        return torch.randint(0, vocab, (self.lengths[request_id],), generator=gen)

    def batch_tokens(self, batch: Batch, vocab: int) -> torch.Tensor:
        if not batch.request_ids:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.tokens(i, vocab) for i in batch.request_ids])

    def actual_cv(self) -> float:
        t = torch.tensor(self.lengths, dtype=torch.float64)
        return float(t.std(unbiased=False) / t.mean()) if len(self.lengths) > 1 else 0.0

    @property
    def steps(self) -> int:
        """Lockstep steps of EP: the longest queue."""
        return max(len(b) for b in self.batches)


def split_micro_batches(batch: Batch) -> tuple[Batch, Batch]:
    """Two micro-batches of whole sequences with token counts as equal as greedy assignment gets
    (longest first). A single sequence cannot be split: the second micro-batch is then empty."""
    halves = (Batch([], []), Batch([], []))
    for i in sorted(range(len(batch.seq_lens)), key=lambda i: -batch.seq_lens[i]):
        target = halves[0] if halves[0].tokens <= halves[1].tokens else halves[1]
        target.request_ids.append(batch.request_ids[i])
        target.seq_lens.append(batch.seq_lens[i])
    return halves
