"""Peer memory and the prefetch stream, on CUDA and on CPU.

DWDP reads its peers' expert weights directly. On CUDA each rank exports one allocation (an *arena*
holding all its local experts) with `cudaIpcGetMemHandle`, plus the arena's offset inside that
allocation; peers open it with `cudaIpcOpenMemHandle` and copy from raw pointers with
`cudaMemcpyAsync` on a dedicated prefetch stream. The runtime call matters: on H200 a cross-device
`tensor.copy_` serialised with the compute stream's GEMMs, while `cudaMemcpyAsync` on its own stream
overlapped them fully (DESIGN.md, measured).

On CPU, POSIX shared memory stands in for IPC and a worker thread stands in for the prefetch stream,
with the same operations (wait on a compute event, copy, record an event, delay), so the whole DWDP
ordering logic runs, and can be broken on purpose, in CI.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import torch

ALIGN = 256  # byte alignment of every tensor inside an arena


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def check_cuda(result, what: str):
    """The values of a cuda-bindings call (which returns (err, *values)); a RuntimeError naming `what` if err is set."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {err!r}")
    return values[0] if len(values) == 1 else values


class Arena:
    """One allocation of `nbytes` that tensors are carved out of, shareable with peer processes."""

    def __init__(self, nbytes: int, device: torch.device, fill: int | None = None):
        self.device = torch.device(device)
        self.nbytes = nbytes
        self._shm = None
        if self.device.type == "cuda":
            self.data = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        else:
            self._shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
            self.data = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=max(nbytes, 1))
        if fill is not None:
            self.data.fill_(fill)

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dtype.itemsize
        if offset % ALIGN or offset + nbytes > self.nbytes:
            raise ValueError(f"arena view [{offset}, {offset + nbytes}) is misaligned or outside {self.nbytes} bytes")
        return self.data[offset : offset + nbytes].view(dtype).view(shape)

    def ptr(self, offset: int) -> int:
        return self.data.data_ptr() + offset

    def export(self) -> dict:
        """A picklable description that `PeerArena` opens in another process."""
        if self._shm is not None:
            return {"kind": "shm", "name": self._shm.name, "nbytes": self.nbytes}
        from cuda.bindings import driver, runtime as cudart

        ptr = self.data.data_ptr()
        base, _size = check_cuda(driver.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
        base = int(base)
        handle = check_cuda(cudart.cudaIpcGetMemHandle(base), "cudaIpcGetMemHandle")
        raw = ctypes.string_at(handle.getPtr(), 64)
        return {"kind": "cuda-ipc", "handle": raw, "offset": ptr - base, "nbytes": self.nbytes}

    def close(self) -> None:
        self.data = None
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


class PeerArena:
    """A peer's arena opened for reading."""

    def __init__(self, exported: dict, device: torch.device):
        self.nbytes = exported["nbytes"]
        self._shm = None
        self._base = None
        if exported["kind"] == "shm":
            self._shm = shared_memory.SharedMemory(name=exported["name"])
            # The creator owns the segment: keep this process's tracker from unlinking it at exit.
            resource_tracker.unregister(self._shm._name, "shared_memory")
            self.data = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=max(self.nbytes, 1))
        elif exported["kind"] == "cuda-ipc":
            from cuda.bindings import runtime as cudart

            handle = cudart.cudaIpcMemHandle_t()
            ctypes.memmove(handle.getPtr(), exported["handle"], 64)
            with torch.cuda.device(device):
                self._base = int(check_cuda(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"))
            self._ptr0 = self._base + exported["offset"]
        else:
            raise ValueError(f"unknown arena kind {exported['kind']!r}")

    def ptr(self, offset: int) -> int:
        return (self._ptr0 if self._shm is None else self.data.data_ptr()) + offset

    def close(self) -> None:
        if self._shm is not None:
            self.data = None
            self._shm.close()
            self._shm = None
        if self._base is not None:
            from cuda.bindings import runtime as cudart

            check_cuda(cudart.cudaIpcCloseMemHandle(self._base), "cudaIpcCloseMemHandle")
            self._base = None


@dataclass
class Copy:
    """`nbytes` from a peer arena at `src_offset` to a local arena at `dst_offset`."""

    dst: Arena
    dst_offset: int
    src: PeerArena
    src_offset: int
    nbytes: int


class CudaPrefetchStream:
    """A dedicated CUDA stream that issues peer copies with cudaMemcpyAsync on raw pointers."""

    def __init__(self, device: torch.device):
        from cuda.bindings import runtime as cudart

        self._cudart = cudart
        self.device = device
        self.stream = torch.cuda.Stream(device)

    # compute-stream side
    def record_compute(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def compute_wait(self, ev: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(ev)

    # prefetch-stream side
    def wait(self, ev: torch.cuda.Event) -> None:
        self.stream.wait_event(ev)

    def record(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        return ev

    def copy(self, c: Copy) -> None:
        check_cuda(
            self._cudart.cudaMemcpyAsync(
                c.dst.ptr(c.dst_offset), c.src.ptr(c.src_offset), c.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDefault, self.stream.cuda_stream
            ),
            "cudaMemcpyAsync",
        )

    def delay(self, seconds: float) -> None:
        with torch.cuda.stream(self.stream):
            # Spins for a number of SM cycles: ~2 GHz is the H100/H200 boost clock, so at lower clocks
            # the delay is longer, which is what fault injection wants.
            torch.cuda._sleep(int(seconds * 2.0e9))

    @staticmethod
    def elapsed_ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.synchronize()


class CpuEvent:
    def __init__(self, done: bool = False):
        self._flag = threading.Event()
        self.time = time.perf_counter() if done else None
        if done:
            self._flag.set()

    def set(self) -> None:
        self.time = time.perf_counter()
        self._flag.set()

    def wait(self, timeout: float) -> bool:
        return self._flag.wait(timeout)


class CpuPrefetchStream:
    """A worker thread that runs wait/copy/record/delay in order, like a CUDA stream."""

    def __init__(self, device: torch.device):
        self._tasks: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prefetch-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            op, arg = self._tasks.get()
            if op == "stop":
                return
            if self._error is not None:
                continue
            try:
                if op == "wait":
                    self._wait(arg)
                elif op == "copy":
                    # A raw memmove, like the GPU path's cudaMemcpyAsync: a torch op on this thread would
                    # start a second OpenMP team next to the compute thread's and slow both ~20x.
                    ctypes.memmove(arg.dst.ptr(arg.dst_offset), arg.src.ptr(arg.src_offset), arg.nbytes)
                elif op == "set":
                    arg.set()
                elif op == "sleep":
                    time.sleep(arg)
            except BaseException as e:  # surfaced to the compute side at its next wait
                self._error = e

    def _wait(self, ev: CpuEvent) -> None:
        while not ev.wait(0.1):
            if self._error is not None:
                raise RuntimeError("prefetch stream failed") from self._error

    # compute side
    def record_compute(self) -> CpuEvent:
        return CpuEvent(done=True)  # CPU compute is synchronous: everything issued so far is done

    def compute_wait(self, ev: CpuEvent) -> None:
        while not ev.wait(0.1):
            if self._error is not None:
                raise RuntimeError(f"prefetch stream failed: {self._error!r}") from self._error

    # prefetch side
    def wait(self, ev: CpuEvent) -> None:
        self._tasks.put(("wait", ev))

    def record(self) -> CpuEvent:
        ev = CpuEvent()
        self._tasks.put(("set", ev))
        return ev

    def copy(self, c: Copy) -> None:
        self._tasks.put(("copy", c))

    def delay(self, seconds: float) -> None:
        self._tasks.put(("sleep", seconds))

    @staticmethod
    def elapsed_ms(start: CpuEvent, end: CpuEvent) -> float:
        return (end.time - start.time) * 1e3

    def synchronize(self) -> None:
        """Wait until everything queued so far has run."""
        self.compute_wait(self.record())

    def close(self) -> None:
        self._tasks.put(("stop", None))
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"prefetch stream failed: {self._error!r}") from self._error


def prefetch_stream(device: torch.device):
    return CudaPrefetchStream(device) if device.type == "cuda" else CpuPrefetchStream(device)
