"""One rank of a launched job: `python -m dwdp_bench.worker JOB.json` (started by launcher.launch).

A job is a function `(ctx: RankContext, args: dict) -> None`: a name in JOBS, or any importable
"module:function". The worker reports progress, completion or its error to the launcher over the
pipe in DWDP_CONTROL_FD.
"""

from __future__ import annotations

import importlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

JOBS = {
    "e2e": "dwdp_bench.e2e:rank_main",
    "accuracy": "dwdp_bench.accuracy:rank_main",
    "transport": "dwdp_bench.transportbench:rank_main",
}


def _job_function(name: str):
    target = JOBS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown job {name!r}: a name in {sorted(JOBS)} or module:function")
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


class Control:
    """JSON lines to the launcher (a pipe), or nothing when there is no launcher."""

    def __init__(self, fd: int | None):
        self._file = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        self._lock = threading.Lock()
        self.last_progress = time.monotonic()

    def send(self, kind: str, **fields) -> None:
        self.last_progress = time.monotonic()
        if self._file is None:
            return
        with self._lock:
            self._file.write(json.dumps({"kind": kind, **fields}) + "\n")

    def progress(self, what: str) -> None:
        self.send("progress", what=what)


def _run(job: str, args: dict, device: str, timeout_s: float, rank: int, world: int, local_rank: int, addr: str, port: int, control: Control) -> None:
    from .runtime.comm import init_process_group, shutdown

    ctx = init_process_group(rank, world, local_rank, device, addr, port, timeout_s)
    ctx.progress = control.progress
    control.progress("initialised")
    _job_function(job)(ctx, args)
    # Only after success: on an error, peers may sit in a collective that a graceful shutdown would
    # wait for, hiding the error; the process exits instead (and the launcher stops the others).
    shutdown()


def main() -> None:
    # The launcher sends SIGUSR1 to every rank before stopping a hung run: each prints where it is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=os.environ.get("DWDP_LOG_LEVEL", "WARNING"), format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    spec = json.loads(open(sys.argv[1]).read())
    env = os.environ
    rank = int(env["RANK"])
    control = Control(int(env["DWDP_CONTROL_FD"]) if "DWDP_CONTROL_FD" in env else None)
    try:
        _run(
            spec["job"], spec["args"], spec["device"], spec["timeout_s"],
            rank, int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]), control,
        )
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher
        traceback.print_exc()
        control.send("error", error=f"{type(e).__name__}: {e}")
        sys.stderr.flush()
        os._exit(1)
    control.send("done")
    sys.stdout.flush()
    os._exit(0)


def run_mpi_rank(job: str, args: dict, device: str, timeout_s: float, master_addr: str) -> None:
    """This process is one rank of an MPI world: agree on a rendezvous through MPI, run the job,
    abort the MPI job on an error or when this rank makes no progress for timeout_s."""
    from mpi4py import MPI

    from .launcher import free_port, mpi_world

    rank, world, local_rank = mpi_world()
    if not MPI.Is_initialized():  # `dwdp-bench env` info may have imported mpi4py without starting MPI
        MPI.Init()
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    if rank == 0:
        addr = master_addr if len(set(hosts)) == 1 else MPI.Get_processor_name()
        rendezvous = (addr, free_port(addr if addr != "localhost" else "127.0.0.1"))
    else:
        rendezvous = None
    addr, port = comm.bcast(rendezvous, root=0)
    control = Control(None)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            idle = time.monotonic() - control.last_progress
            if idle > timeout_s:
                print(f"rank {rank} hung: no progress for {idle:.0f} s (timeout {timeout_s:g} s); aborting the MPI job", file=sys.stderr, flush=True)
                comm.Abort(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        _run(job, args, device, timeout_s, rank, world, local_rank, addr, port, control)
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"rank {rank} failed: {type(e).__name__}: {e}; aborting the MPI job", file=sys.stderr, flush=True)
        comm.Abort(1)
    comm.Barrier()
    if not MPI.Is_finalized():
        MPI.Finalize()


if __name__ == "__main__":
    main()
