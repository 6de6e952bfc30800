"""Where a rank's time goes: marks on the compute stream.

Each `mark(what, layer)` starts an interval that lasts until the next mark. On CUDA a mark is an
event recorded on the current stream, so an interval is what the GPU spent between the two points,
including any time the stream stalled on a wait enqueued inside it; marks named `wait:<reason>` are
placed right before such waits (a prefetch event, a collective, a host sync) and the next mark right
after, so stalls get their own intervals. On CPU the clock is the host's: compute is synchronous.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

WAIT_PREFETCH = "wait:prefetch"
WAIT_COLLECTIVE = "wait:collective"


@dataclass
class Interval:
    what: str
    layer: int
    start_ms: float
    duration_ms: float


class Timeline:
    def __init__(self, device: torch.device | str, enabled: bool = True):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self._marks: list[tuple[str, int, object]] = []

    def mark(self, what: str, layer: int = -1) -> None:
        if not self.enabled:
            return
        if self.cuda:
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self._marks.append((what, layer, stamp))

    def clear(self) -> None:
        self._marks.clear()

    def intervals(self) -> list[Interval]:
        """The intervals between consecutive marks (synchronises the device once)."""
        if len(self._marks) < 2:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            first = self._marks[0][2]
            times = [first.elapsed_time(m[2]) for m in self._marks]
        else:
            t0 = self._marks[0][2]
            times = [(m[2] - t0) * 1e3 for m in self._marks]
        return [
            Interval(what, layer, times[i], times[i + 1] - times[i])
            for i, (what, layer, _) in enumerate(self._marks[:-1])
        ]


def totals(intervals: list[Interval]) -> dict[str, float]:
    """Milliseconds per interval kind."""
    out: dict[str, float] = defaultdict(float)
    for iv in intervals:
        out[iv.what] += iv.duration_ms
    return dict(out)

