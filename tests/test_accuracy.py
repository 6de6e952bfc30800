"""`dwdp-bench accuracy gsm8k` on CPU ranks: lm-eval's gsm8k task, offline, through every strategy."""

import csv
import json

import pandas as pd
import torch
import pytest

from dwdp_bench.accuracy import merge_round_robin, split_round_robin
from dwdp_bench.gate import detectable_drop, pass_threshold
from e2e_helpers import cli

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 6 pens. How many pens are in 5 boxes?", "6 * 5 = <<6*5=30>>30\n#### 30"),
    ("Ana had 20 stamps and gave away 8. How many are left?", "20 - 8 = <<20-8=12>>12\n#### 12"),
    ("A train travels 60 km each hour for 3 hours. How far does it go?", "60 * 3 = <<60*3=180>>180\n#### 180"),
    ("Li reads 12 pages a day for 7 days. How many pages does Li read?", "12 * 7 = <<12*7=84>>84\n#### 84"),
    ("Omar has 1,200 dollars and spends 450. How much is left?", "1200 - 450 = <<1200-450=750>>750\n#### 750"),
]


def write_gsm8k(path, fmt="jsonl"):
    rows = [{"question": q, "answer": a} for q, a in QUESTIONS]
    if fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, *args):
    out = tmp_path / "acc.csv"
    done = cli("accuracy", "gsm8k", "--device", "cpu", "--max-gen-toks", "8", "--num-fewshot", "2", "--timeout", "120", "--out", str(out), *args)
    return done, out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_synthetic_agreement_two_ranks(tmp_path, fmt):
    data = write_gsm8k(tmp_path / f"gsm8k.{fmt}", fmt)
    done, out = run(tmp_path, "--ranks", "2", "--data", str(data))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert list(rows) == ["replicated", "replicated-rerun", "dwdp", "ep"]
    for r in rows.values():
        assert int(r["questions"]) == len(QUESTIONS)
        assert 0 <= float(r["strict_match"]) <= 100 and 0 <= float(r["flexible_extract"]) <= 100
    for name in ("replicated-rerun", "dwdp"):
        assert float(rows[name]["identical_fraction"]) == 1.0
        assert float(rows[name]["prefill_logit_max_abs"]) == 0.0
    # EP: other GEMM row sets, so not bit-identical; stated tolerance on the prefill logits
    assert float(rows["ep"]["prefill_logit_rel"]) < 0.02
    samples = json.loads(out.with_name("acc.samples.json").read_text())
    assert len(samples["dwdp"]) == len(QUESTIONS) and all(len(s["tokens"]) <= 8 for s in samples["dwdp"])


def test_missing_or_malformed_data_is_a_clear_error(tmp_path):
    done, out = run(tmp_path, "--ranks", "2")
    assert done.returncode == 2 and "--data" in done.stderr and "Nothing is downloaded" in " ".join(done.stderr.split())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "label": "y"}) + "\n")
    done, out = run(tmp_path, "--ranks", "2", "--data", str(bad))
    assert done.returncode == 2 and "question" in done.stderr
    assert not out.exists()


def test_pass_threshold_matches_the_design():
    assert pass_threshold(63.71, 1319) == pytest.approx(63.71 - 3.20, abs=0.01)
    assert detectable_drop(1319) == pytest.approx(4.84, abs=0.01)
    assert pass_threshold(63.71, 100) < pass_threshold(63.71, 1319)  # fewer questions, wider margin


@pytest.mark.parametrize("n, world", [(0, 2), (5, 2), (7, 3), (2, 4)])
def test_round_robin_split_and_merge_are_inverse(n, world):
    items = list(range(n))
    parts = split_round_robin(items, world)
    assert len(parts) == world and sum(map(len, parts)) == n
    assert merge_round_robin(parts, n) == items


def test_real_checkpoint_path_scores_end_to_end(tmp_path):
    """A tiny DeepSeek-V3 checkpoint with its own tokenizer, written here: scores per strategy (near
    zero for random weights) and pass/fail against a reference by the one-sided test."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from checkpoints import synthetic_checkpoint, write_checkpoint
    from dwdp_bench.runtime.config import get_config
    from dwdp_bench.runtime.weights import SyntheticWeights

    cfg = get_config("tiny", vocab_size=320)
    path = write_checkpoint(tmp_path / "ckpt", cfg, synthetic_checkpoint(SyntheticWeights(cfg, seed=3), experts="bf16", dtype=torch.bfloat16))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([q + " " + a for q, a in QUESTIONS] * 4, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(path)
    data = write_gsm8k(tmp_path / "gsm8k.jsonl")
    done, out = run(tmp_path, "--ranks", "2", "--model", str(path), "--data", str(data), "--reference", "63.71", "--strategies", "replicated,dwdp")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"replicated", "replicated-rerun", "dwdp"}
    for r in rows.values():
        assert int(r["questions"]) == len(QUESTIONS)
        assert float(r["pass_threshold"]) == pytest.approx(pass_threshold(63.71, len(QUESTIONS)), rel=1e-5)  # CSV keeps 6 digits
        assert r["passed"] == str(float(r["flexible_extract"]) >= float(r["pass_threshold"]))
    assert float(rows["dwdp"]["identical_fraction"]) == 1.0
