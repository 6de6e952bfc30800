"""Run `dwdp-bench` as a user would (a subprocess) and read its CSV rows."""

import csv
import subprocess
import sys
from pathlib import Path

TINY = ["--device", "cpu", "--model", "synthetic:tiny", "--isl", "48", "--max-tokens", "160", "--requests-per-rank", "4",
        "--repeats", "1", "--warmup", "1", "--timeout", "120", "--no-progress"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dwdp_bench.cli", *args], capture_output=True, text=True, timeout=timeout)


def e2e_rows(tmp_path: Path, *args: str) -> dict[str, dict]:
    """Rows of one e2e run by strategy (one spread, one repeat)."""
    out = tmp_path / f"e2e-{len(list(tmp_path.iterdir()))}.csv"
    done = cli("e2e", *TINY, "--out", str(out), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["strategy"]: r for r in csv.DictReader(out.open())}
