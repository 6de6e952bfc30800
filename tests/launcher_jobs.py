"""Jobs for the launcher tests, run on every rank as "launcher_jobs:<name>" (tests/ is on PYTHONPATH)."""

import os
import signal
import time
from pathlib import Path


def _record_pid(ctx, args):
    Path(args["dir"], f"rank{ctx.rank}.pid").write_text(str(os.getpid()))


def ok(ctx, args):
    _record_pid(ctx, args)
    ctx.progress("working")
    ctx.barrier()


def raise_on(ctx, args):
    _record_pid(ctx, args)
    if ctx.rank == args["rank"]:
        raise ValueError("planted failure")
    ctx.barrier()  # the other ranks wait for the failed one forever: the launcher must stop them


def hang_on(ctx, args):
    _record_pid(ctx, args)
    if ctx.rank == args["rank"]:
        while True:  # no progress, no exit
            time.sleep(0.1)
    time.sleep(0.5)
    ctx.progress("waiting for the others")  # healthy ranks report later than the hung one
    ctx.barrier()


def crash_on(ctx, args):
    _record_pid(ctx, args)
    if ctx.rank == args["rank"]:
        os.kill(os.getpid(), signal.SIGKILL)
    ctx.barrier()
