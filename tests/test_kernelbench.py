"""`dwdp-bench kernels` on CPU: every implementation and both baselines, per case and stage."""

import csv

from e2e_helpers import cli


def test_kernels_command_writes_rows_for_every_case(tmp_path):
    out = tmp_path / "k.csv"
    done = cli("kernels", "--device", "cpu", "--tokens", "32,80", "--skew", "0,2", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    cases = {(r["tokens"], r["skew"]) for r in rows}
    assert cases == {("32", "0"), ("32", "2"), ("80", "0"), ("80", "2")}
    for tokens, skew in cases:
        impls = {(r["stage"], r["impl"]) for r in rows if (r["tokens"], r["skew"]) == (tokens, skew)}
        assert impls == {(s, i) for s in ("fc1", "fc2") for i in ("torch", "bf16-grouped-gemm", "dense-bf16")}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["tflops"]) > 0
        assert int(r["routed_rows"]) == int(r["tokens"]) * 2  # tiny: top-2
        if r["impl"] == "torch":
            assert float(r["x_vs_torch"]) == 1.0
        if r["impl"] == "dense-bf16":
            assert float(r["frac_ceiling"]) == 1.0


def test_kernels_rejects_unknown_names(tmp_path):
    done = cli("kernels", "--device", "cpu", "--impls", "cute", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "unknown kernel implementation" in done.stderr
    done = cli("kernels", "--device", "cpu", "--models", "gpt-5", "--out", str(tmp_path / "k.csv"), timeout=120)
    assert done.returncode == 2 and "unknown model config" in done.stderr
