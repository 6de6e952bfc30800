"""Start N ranks and supervise them.

Outside MPI, `launch` spawns N local worker processes (`python -m dwdp_bench.worker`), one per GPU or
CPU rank, with a loopback rendezvous. Each worker reports over a pipe: progress heartbeats, then
`done` or its error. The launcher brings the whole run down when any rank fails or when a running
rank shows no progress for `timeout_s` seconds, names that rank and its error, and leaves no orphan
processes (each worker also dies with the launcher, through PR_SET_PDEATHSIG).

Inside `mpirun` / `srun` (an MPI world of more than one process), every process is already a rank:
`launch` runs the job in this process, with rendezvous details agreed through mpi4py, a watchdog
thread for hangs, and MPI_Abort on any error so that the launcher of the MPI job stops the rest.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from rich.console import Console

console = Console(stderr=True)


class LaunchError(RuntimeError):
    """A rank failed or hung; the message names it."""


def mpi_world() -> tuple[int, int, int] | None:
    """(rank, size, local rank) when this process is one of several MPI ranks, else None."""
    env = os.environ
    for rank_key, size_key, local_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rank_key in env and size_key in env and int(env[size_key]) > 1:
            return int(env[rank_key]), int(env[size_key]), int(env.get(local_key, env[rank_key]))
    return None


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launcher dies, and a session of its own (so a
    terminal's Ctrl-C reaches the launcher, which stops the ranks in order)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    fd: int
    last_progress: float
    what: str = "starting"
    error: str | None = None
    done: bool = False
    buffer: bytes = field(default=b"")


def launch(job: str, args: dict, nprocs: int, device: str, timeout_s: float, master_addr: str = "127.0.0.1") -> None:
    """Run `job` (a name in worker.JOBS) with `args` on `nprocs` ranks; raise LaunchError on failure."""
    if mpi_world() is not None:
        from .worker import run_mpi_rank

        run_mpi_rank(job, args, device, timeout_s, master_addr)
        return
    port = free_port(master_addr)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="dwdp-job-", delete=False) as f:
        json.dump({"job": job, "args": args, "device": device, "timeout_s": timeout_s}, f)
        job_file = f.name
    ranks: list[_Rank] = []
    sel = selectors.DefaultSelector()
    try:
        for r in range(nprocs):
            read_fd, write_fd = os.pipe()
            env = dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE=str(nprocs),
                LOCAL_RANK=str(r),
                MASTER_ADDR=master_addr,
                MASTER_PORT=str(port),
                DWDP_CONTROL_FD=str(write_fd),
                NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
                # Connect every NCCL channel at init: lazily made point-to-point connections need both
                # ranks' host threads inside the same call, which overlapped all-to-alls cannot promise.
                NCCL_RUNTIME_CONNECT=os.environ.get("NCCL_RUNTIME_CONNECT", "0"),
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "dwdp_bench.worker", job_file], env=env, pass_fds=(write_fd,), preexec_fn=_die_with_parent
            )
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            ranks.append(_Rank(r, proc, read_fd, time.monotonic()))
            sel.register(read_fd, selectors.EVENT_READ, ranks[-1])
        _supervise(ranks, sel, timeout_s)
    except KeyboardInterrupt:
        raise LaunchError("interrupted: all ranks stopped") from None
    finally:
        _stop(ranks)
        for rk in ranks:
            try:
                os.close(rk.fd)
            except OSError:
                pass
        os.unlink(job_file)


def _read(rk: _Rank, sel: selectors.BaseSelector) -> None:
    try:
        chunk = os.read(rk.fd, 1 << 16)
    except BlockingIOError:
        return
    if not chunk:  # the rank closed its end: stop watching, or select() returns at once forever
        if rk.fd in sel.get_map():
            sel.unregister(rk.fd)
        return
    rk.buffer += chunk
    *lines, rk.buffer = rk.buffer.split(b"\n")
    for line in lines:
        if not line.strip():
            continue
        msg = json.loads(line)
        rk.last_progress = time.monotonic()
        if msg["kind"] == "progress":
            rk.what = msg["what"]
        elif msg["kind"] == "error":
            rk.error = msg["error"]
        elif msg["kind"] == "done":
            rk.done = True


def _supervise(ranks: list[_Rank], sel: selectors.BaseSelector, timeout_s: float) -> None:
    while True:
        for key, _ in sel.select(timeout=0.5):
            _read(key.data, sel)
        now = time.monotonic()
        running = []
        for rk in ranks:
            rc = rk.proc.poll()
            if rc is None:
                running.append(rk)
                continue
            _read(rk, sel)
            if rc != 0 or not rk.done:
                _stop(ranks)
                why = rk.error or (f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}") + f" (last progress: {rk.what})"
                raise LaunchError(f"rank {rk.rank} failed: {why}")
        if not running:
            return
        stalled = [rk for rk in running if now - rk.last_progress > timeout_s]
        if stalled:
            for rk in running:  # each rank prints its Python stacks (worker.py registers SIGUSR1)
                rk.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            _stop(ranks)
            worst = min(stalled, key=lambda rk: rk.last_progress)
            others = ", ".join(f"rank {rk.rank}: {rk.what!r} {now - rk.last_progress:.0f} s ago" for rk in ranks if rk is not worst)
            raise LaunchError(
                f"rank {worst.rank} hung: no progress for {now - worst.last_progress:.0f} s (timeout {timeout_s:g} s; "
                f"last: {worst.what!r}){'; ' + others if others else ''}. Raise --timeout if a step legitimately takes longer."
            )


def _stop(ranks: list[_Rank], grace_s: float = 5.0) -> None:
    """SIGTERM every live rank's process group, then SIGKILL what is left after `grace_s`."""
    live = [rk for rk in ranks if rk.proc.poll() is None]
    for rk in live:
        try:
            os.killpg(rk.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for rk in live:
        try:
            rk.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(rk.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rk.proc.wait()
