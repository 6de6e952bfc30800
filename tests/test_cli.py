"""Every command explains itself (placeholders such as <config> survive the help's markdown); `env` reports this machine."""

import json

import pytest

from e2e_helpers import cli


@pytest.mark.parametrize(
    "command, phrases",
    [
        ([], ["env", "e2e", "accuracy", "kernels", "report", "gate", "DWDP"]),
        (["env"], ["GPUs", "JSON"]),
        (["e2e"], ["--gpus", "--strategies", "--cv", "--dwdp-local", "--timeout", "tokens/s", "<config>", "<UTC", "<out>.timeline.json"]),
        (["accuracy"], ["gsm8k"]),
        (["accuracy", "gsm8k"], ["--data", "--reference", "--limit", "agreement", "lm-eval", "--suite", "<config>"]),
        (["kernels"], ["FC1", "FC2", "ceiling", "--tokens", "--skew", "--suite", "<UTC", "<out>.transport.csv"]),
        (["report"], ["timeline", "spread", "--out", "<UTC"]),
        (["gate"], ["--reference", "Exit 0", "regression"]),
    ],
)
def test_help_explains(command, phrases):
    done = cli(*command, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} missing from `dwdp-bench {' '.join(command)} --help`"


def test_env_reports_machine_as_table_and_json(tmp_path):
    out = tmp_path / "env.json"
    done = cli("env", "--json", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(out.read_text())
    assert info["packages"]["torch"]
    assert info["python"]
    assert isinstance(info["gpus"], list) and isinstance(info["p2p"], dict)
    assert "mpi" in info and "library" in info["mpi"]
    assert "torch" in done.stdout
