"""`dwdp-bench e2e` end to end on CPU ranks: DWDP's logic (partition, shared-memory handle exchange,
double buffer, event ordering) against replicated, EP against replicated, and fault injection."""

import pytest

from dwdp_bench.runtime.config import get_config
from dwdp_bench.runtime.weights import expert_nbytes
from e2e_helpers import cli, e2e_rows

GIB = 2**30
# EP's stated tolerance against replicated on the tiny model in bf16: its expert GEMMs see other row
# sets (other rounding), and its combine rounds weighted rows to bf16 before summing.
EP_REL_TOL = 0.02


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
    ],
)
def test_bad_configs_stop_before_launch(tmp_path, args, message):
    out = tmp_path / "never.csv"
    done = cli("e2e", "--device", "cpu", "--model", "synthetic:tiny", *[a for a in args if a != "--device"], "--out", str(out), timeout=120) if "--gpus" not in args else cli("e2e", *args, "--out", str(out), timeout=120)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())
    assert not out.exists()
