"""`dwdp-bench kernels --transport` on 2 CPU ranks (gloo, shared-memory arenas, the copy thread): one
MoE layer's DWDP prefetch, the plain copy of the same bytes, the GEMM under it, EP's all-to-alls."""

import csv

import pytest

from e2e_helpers import cli

from dwdp_bench.runtime.config import get_config


def test_transport_on_two_cpu_ranks_writes_every_measurement(tmp_path):
    out = tmp_path / "k.csv"
    done = cli("kernels", "--device", "cpu", "--tokens", "32", "--skew", "0,2", "--transport", "--ranks", "2", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Transport per MoE layer" in done.stdout
    rows = list(csv.DictReader((tmp_path / "k.transport.csv").open()))
    measures = ["dwdp-prefetch", "peer-copy", "gemm-fc1", "gemm-fc1+prefetch", "ep-dispatch", "ep-combine"]
    assert [(r["skew"], r["measure"]) for r in rows] == [(s, m) for s in ("0", "2") for m in measures]
    cfg = get_config("tiny")
    h, i, p = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts // 2  # N = 2: L = P = E/2
    nvfp4 = lambda n, k: n * k // 2 + n * k // 16 + 4  # codes, e4m3 scales, fp32 global scale  # noqa: E731
    layer_bytes = p * (nvfp4(2 * i, h) + nvfp4(h, i))
    for r in rows:
        assert r["model"] == "tiny" and r["ranks"] == "2" and r["tokens"] == "32"
        assert float(r["ms"]) > 0
        if r["measure"] != "gemm-fc1":
            assert float(r["bytes"]) > 0 and float(r["gbps"]) > 0, r
        if r["measure"] in ("dwdp-prefetch", "peer-copy"):
            assert int(r["bytes"]) == layer_bytes
        if r["measure"] == "gemm-fc1+prefetch":
            # whole layers' prefetches, at least two per rank, ran alongside the GEMMs (bytes: the mean of 2 ranks)
            assert 2 * float(r["bytes"]) % layer_bytes == 0 and float(r["bytes"]) >= 2 * layer_bytes
            assert 0.2 < float(r["slowdown"]) < 50
        if r["measure"] == "dwdp-prefetch":
            assert float(r["x_peer_copy"]) == pytest.approx(float(r["gbps"]) / float(next(
                q["gbps"] for q in rows if q["skew"] == r["skew"] and q["measure"] == "peer-copy")), rel=1e-3)
    # EP: what the ranks send in the dispatch (rows + 8 bytes of expert id and weight) comes back in the
    # combine (rows), so the mean bytes per rank are in the ratio row / (row + 8)
    row = 2 * h
    for skew in ("0", "2"):
        sent = {r["measure"]: float(r["bytes"]) for r in rows if r["skew"] == skew and r["measure"].startswith("ep-")}
        assert sent["ep-combine"] / row == pytest.approx(sent["ep-dispatch"] / (row + 8), rel=1e-9)


def test_transport_rejects_bad_input(tmp_path):
    out = tmp_path / "k.csv"
    done = cli("kernels", "--device", "cpu", "--tokens", "32", "--transport", "--ranks", "1", "--out", str(out), timeout=120)
    assert done.returncode == 2 and "need at least 2 ranks" in " ".join(done.stderr.split())
    done = cli("kernels", "--device", "cpu", "--tokens", "32", "--transport", "--ranks", "3", "--out", str(out), timeout=120)
    assert done.returncode == 2 and "3 ranks do not divide 8" in " ".join(done.stderr.split())
    assert not out.exists()  # rejected before anything ran


def test_help_explains_transport():
    done = cli("kernels", "--help", timeout=60)
    text = " ".join(done.stdout.split())
    for phrase in ("--transport", "--no-transport", "--ranks", "peer copy", "all-to-all", "quack"):
        assert phrase in text, phrase
