"""The CI gate for real (e2e and accuracy on 2 CPU ranks against the committed CPU reference), and
planted regressions that must make it fail."""

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from e2e_helpers import cli

ROOT = Path(__file__).resolve().parent.parent
CPU_REFERENCE = ROOT / "results" / "reference" / "cpu-tiny.toml"


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory):
    """What CI gates: `--suite ci-cpu` for e2e and accuracy (tiny model, 2 CPU ranks)."""
    d = tmp_path_factory.mktemp("ci")
    e2e, acc = d / "e2e.csv", d / "accuracy.csv"
    for command, out in ((["e2e"], e2e), (["accuracy", "gsm8k"], acc)):
        done = cli(*command, "--suite", "ci-cpu", "--out", str(out), "--timeout", "120", *(["--no-progress"] if command == ["e2e"] else []))
        assert done.returncode == 0, done.stderr[-3000:]
    return e2e, acc


def gate(*paths, reference=CPU_REFERENCE):
    return cli("gate", *map(str, paths), "--reference", str(reference), timeout=120)


def test_ci_results_pass_the_cpu_gate(ci_results):
    done = gate(*ci_results)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checks passed" in done.stdout


def _planted(tmp_path, source: Path, change) -> Path:
    df = pd.read_csv(source)
    change(df)
    out = tmp_path / source.name
    df.to_csv(out, index=False)
    timeline = source.with_name(source.stem + ".timeline.json")
    if timeline.exists():
        shutil.copy(timeline, tmp_path / timeline.name)
    return out


def _set(strategy: str, column: str, value=None, scale=None):
    """A planted change: one strategy's rows get a new value, or their value scaled."""

    def change(df):
        rows = df.strategy == strategy
        if isinstance(value, float) or scale is not None:
            df[column] = df[column].astype(float)
        df.loc[rows, column] = df.loc[rows, column] * scale if scale is not None else value

    return change


@pytest.mark.parametrize(
    "which, change, failing",
    [
        ("e2e", _set("dwdp", "tps_per_gpu", scale=0.2), "DWDP throughput vs replicated"),  # a slower strategy
        ("e2e", _set("dwdp", "logit_max_abs_diff", value=0.25), "DWDP logits identical"),  # a changed logit
        ("e2e", _set("ep", "logit_rel_diff", value=0.3), "EP logits"),
        ("accuracy", _set("dwdp", "identical_fraction", value=0.5), "DWDP generates identical tokens"),
    ],
)
def test_planted_regressions_fail_the_gate(tmp_path, ci_results, which, change, failing):
    e2e, acc = ci_results
    if which == "e2e":
        e2e = _planted(tmp_path, e2e, change)
    else:
        acc = _planted(tmp_path, acc, change)
    done = gate(e2e, acc)
    assert done.returncode == 1, done.stdout + done.stderr
    assert failing in " ".join((done.stdout + done.stderr).split())


def test_unusable_input_exits_2(tmp_path, ci_results):
    e2e, acc = ci_results
    missing = _planted(tmp_path, e2e, lambda df: df.pop("logit_max_abs_diff"))
    done = gate(missing, acc)
    assert done.returncode == 2 and "logit_max_abs_diff" in done.stderr
    stray = _planted(tmp_path, e2e, _set("ep-overlap", "strategy", value="mystery"))
    done = gate(stray, acc)
    assert done.returncode == 2 and "match no reference check" in " ".join(done.stderr.split())
    done = gate(e2e)  # the accuracy checks have nothing to judge
    assert done.returncode == 2 and "accuracy" in done.stderr
    not_results = tmp_path / "other.csv"
    not_results.write_text("a,b\n1,2\n")
    assert gate(not_results, acc).returncode == 2


def test_report_plots_kernel_results(tmp_path):
    kernels = tmp_path / "kernels.csv"
    assert cli("kernels", "--device", "cpu", "--tokens", "32,64", "--skew", "0", "--rounds", "2", "--out", str(kernels), timeout=300).returncode == 0
    done = cli("report", str(kernels), "--out", str(tmp_path / "report"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "kernels-tiny.png").stat().st_size > 10_000
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert re.search(r"\| fc1 \| bf16-grouped-gemm \|  \| [0-9.]+ \|  \|", summary)  # no work tile (not fused), no spread (timed once)
    for impl in ("dense-bf16", "torch"):  # timed in the 2 rounds: their spread
        assert re.search(rf"\| fc1 \| {impl} \|  \| [0-9.]+ \| [0-9.]+% \|", summary)
    df = pd.read_csv(kernels)  # a fused stage's row names the work tile it ran (no fused kernels on CPU: planted)
    df["tile"] = df["tile"].astype(object)
    df.loc[(df.impl == "torch") & (df.stage == "fc1"), "tile"] = "256x128"
    df.to_csv(kernels, index=False)
    assert cli("report", str(kernels), "--out", str(tmp_path / "report"), timeout=120).returncode == 0
    assert "| fc1 | torch | 256x128 |" in (tmp_path / "report" / "summary.md").read_text()


def test_committed_h200_results_pass_their_reference_and_make_plots(tmp_path):
    h200 = ROOT / "results" / "h200x2"
    runs = [h200 / "e2e_h200x2.csv", h200 / "accuracy_h200x2.csv"]
    done = gate(*runs, reference=ROOT / "results" / "reference" / "h200x2.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "report"
    done = cli("report", *map(str, runs), "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("e2e-throughput-0.png", "e2e-timeline-0.png"):
        assert (out / name).stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| 0.2 | dwdp | 45865 |" in summary and "replicated-rerun" in summary
    kernels = [h200 / "kernels_h200x2.csv", h200 / "kernels_h200x2.transport.csv"]
    done = gate(*kernels, reference=ROOT / "results" / "reference" / "h200-kernels.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 15 checks passed" in done.stdout
    done = cli("report", *map(str, kernels), "--out", str(out / "kernels"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| dwdp-prefetch | 238.9 |" in (out / "kernels" / "summary.md").read_text()


def test_relative_to_any_drops_a_where_condition():
    """relative_to's "any": the anchor is the median over every value of that column, so one outlying anchor
    row (a dense GEMM that read 14% fast once) does not move the judged fraction."""
    from dwdp_bench.gate import evaluate

    df = pd.DataFrame({"impl": ["dense-bf16"] * 3 + ["cute"], "tokens": [1024, 8192, 32768, 8192], "stage": "fc1", "tflops": [700.0, 800.0, 680.0, 560.0]})
    cover = {"name": "every row", "kind": "kernels", "where": {"stage": "fc1"}, "metric": "tflops", "min": 0.0}
    check = {"name": "cute x dense", "kind": "kernels", "where": {"impl": "cute", "tokens": 8192}, "metric": "tflops", "min": 0.0}
    same_tokens = evaluate({"kernels": df}, [{**check, "relative_to": {"impl": "dense-bf16"}}, cover])[0]
    any_tokens = evaluate({"kernels": df}, [{**check, "relative_to": {"impl": "dense-bf16", "tokens": "any"}}, cover])[0]
    assert same_tokens.value == pytest.approx(560 / 800)
    assert any_tokens.value == pytest.approx(560 / 700)
