"""`dwdp-bench accuracy gsm8k`: GSM8K through lm-eval under each strategy, and agreement between them.

Rank 0 runs lm-eval's own gsm8k task (its prompt, stop strings, and the strict-match and
flexible-extract filters) on a local data file, through `DistributedLM`, an lm-eval `LM` that
splits every request list over all ranks; the other ranks serve those requests until told to stop.
Each strategy is evaluated in turn on the same ranks; `replicated` runs first and is the reference.

With synthetic weights the scores mean nothing, so what is reported is agreement with the reference:
the fraction of questions whose generated tokens are identical, the first position where they
differ, and the error of the prefill's last-token logits. With a real checkpoint the scores are the
result, and `--reference` turns them into pass/fail by a one-sided test.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from .e2e import source_from_args, strategy_options
from .gate import pass_threshold
from .kernels import default_kernels, get_kernels
from .results import RowWriter, fmt, sidecar, write_json
from .runtime.comm import RankContext
from .runtime.engine import Engine
from .runtime.generate import Generation, TextEngine

TASK = "dwdp_gsm8k"
COLUMNS = [
    "timestamp", "task", "model", "strategy", "world_size", "device", "kernels", "questions", "num_fewshot", "max_gen_toks",
    "strict_match", "flexible_extract", "metric", "reference_score", "pass_threshold", "passed",
    "identical_fraction", "first_divergence_median", "prefill_logit_max_abs", "prefill_logit_rel", "seconds",
]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: a tokenizer for synthetic models, which have none."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(model: str, vocab_size: int):
    path = Path(model)
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"no usable tokenizer in {path} (tokenizer.json / tokenizer_config.json): {e}") from e

        class HFTokenizer:
            def encode(self, text: str) -> list[int]:
                return tok.encode(text, add_special_tokens=False)

            def decode(self, ids: list[int]) -> str:
                return tok.decode(ids, skip_special_tokens=True)

        return HFTokenizer()
    if vocab_size < 256:
        raise ValueError(f"synthetic models use a byte tokenizer, which needs a vocabulary of >= 256 (this one has {vocab_size})")
    return ByteTokenizer()


def check_data(path: Path | None) -> Path:
    """The GSM8K file, checked before any rank starts."""
    if path is None:
        raise ValueError(
            "GSM8K needs a local data file: --data PATH, a .jsonl or .parquet with `question` and `answer` fields in "
            "the upstream format (answers end with '#### <number>'), e.g. grade_school_math/data/test.jsonl from "
            "github.com/openai/grade-school-math or the test split of openai/gsm8k saved as parquet. Nothing is downloaded."
        )
    if not path.is_file():
        raise ValueError(f"GSM8K data file {path} does not exist")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"GSM8K data file {path} must be .jsonl, .json or .parquet")
    if path.suffix == ".parquet":
        import pandas as pd

        first = pd.read_parquet(path).head(1).to_dict("records")
    else:
        with path.open() as f:
            line = f.readline()
        first = [json.loads(line)] if line.strip() else []
    if not first or not {"question", "answer"} <= set(first[0]):
        raise ValueError(f"{path}: the first record must have `question` and `answer` fields, got {sorted(first[0]) if first else 'nothing'}")
    return path


def task_config(data: Path, train: Path | None) -> dict:
    """lm-eval's own gsm8k task (prompt, stop strings, filters) reading local files."""
    import lm_eval
    import yaml

    upstream = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    cfg = yaml.safe_load(upstream.read_text())
    files = {"test": str(data.resolve())}
    if train is not None:
        files["train"] = str(train.resolve())
    cfg.update(
        task=TASK,
        tag=[],
        dataset_path="parquet" if data.suffix == ".parquet" else "json",
        dataset_name=None,
        dataset_kwargs={"data_files": files},
        training_split="train" if train else None,
        # Without a train file, few-shot examples come from the test file (never the question itself).
        fewshot_split="train" if train else "test",
    )
    return cfg


def split_round_robin(items: list, world: int) -> list[list]:
    return [items[r::world] for r in range(world)]


def merge_round_robin(parts: list[list], total: int) -> list:
    """Inverse of split_round_robin."""
    out = [None] * total
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def serve(ctx: RankContext, text: TextEngine) -> None:
    """Ranks other than 0: answer rank 0's requests until it says stop."""
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0, group=ctx.host_group)
        kind, shares, extra = msg[0]
        if kind == "stop":
            return
        ctx.all_gather_object(_work(text, kind, shares[ctx.rank], extra))


def _work(text: TextEngine, kind: str, share: list, extra: dict) -> list:
    if kind == "generate":
        return text.generate(share, extra["max_new"], extra["until"])
    return text.loglikelihood(share)


def make_lm(ctx: RankContext, text: TextEngine, tokenizer, max_gen_toks: int):
    from lm_eval.api.model import LM

    class DistributedLM(LM):
        """lm-eval's model interface over all ranks: rank 0 splits each request list round-robin,
        every rank runs its share through the same strategy, rank 0 gathers the answers."""

        def __init__(self):
            super().__init__()
            self.generations: dict[str, Generation] = {}

        def _run(self, kind: str, items: list, extra: dict) -> list:
            shares = split_round_robin(items, ctx.world_size)
            if ctx.world_size > 1:
                dist.broadcast_object_list([(kind, shares, extra)], src=0, group=ctx.host_group)
            parts = ctx.all_gather_object(_work(text, kind, shares[0], extra))
            return merge_round_robin(parts, len(items))

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):  # lm-eval may mix generation settings; group by them
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            for key, idx in groups.items():
                kw = json.loads(key)
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                extra = {"max_new": int(kw.get("max_gen_toks", max_gen_toks)), "until": until}
                prompts = [tokenizer.encode(requests[i].args[0]) for i in idx]
                for i, g in zip(idx, self._run("generate", prompts, extra)):
                    self.generations[requests[i].args[0]] = g
                    out[i] = g.text
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                context, continuation = req.args
                ctx_ids = tokenizer.encode(context)
                pairs.append((ctx_ids, tokenizer.encode(context + continuation)[len(ctx_ids) :] or tokenizer.encode(continuation)))
            return self._run("loglikelihood", pairs, {})

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            pairs = []
            for req in requests:
                ids = tokenizer.encode(req.args[0])
                pairs.append((ids[:1], ids[1:]))  # every token after the first, each given what precedes it
            return [ll for ll, _ in self._run("loglikelihood", pairs, {})]

        def stop(self) -> None:
            if ctx.world_size > 1:
                dist.broadcast_object_list([("stop", None, None)], src=0, group=ctx.host_group)

    return DistributedLM()


def _evaluate(lm, a: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_config(Path(a["data"]), Path(a["train"]) if a["train"] else None)],
        task_manager=TaskManager(include_defaults=False),
        num_fewshot=a["num_fewshot"],
        limit=a["limit"],
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": a["max_gen_toks"]},
        apply_chat_template=False,
    )


def agreement(gens: dict[str, Generation], reference: dict[str, Generation]) -> dict:
    """Identical generated tokens, first divergence, prefill logit error, over the shared prompts."""
    keys = [k for k in reference if k in gens]
    identical, divergence, worst, scale = 0, [], 0.0, 0.0
    for k in keys:
        a, b = gens[k], reference[k]
        if a.tokens == b.tokens:
            identical += 1
        else:
            divergence.append(next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens))))
        d = (a.prefill_logits - b.prefill_logits).abs()
        worst = max(worst, float(d.max()) if torch.isfinite(d).all() else float("inf"))
        scale = max(scale, float(b.prefill_logits.abs().max()))
    return {
        "identical_fraction": identical / len(keys) if keys else None,
        "first_divergence_median": statistics.median(divergence) if divergence else None,
        "prefill_logit_max_abs": worst,
        "prefill_logit_rel": worst / scale if scale else None,
    }


def rank_main(ctx: RankContext, a: dict) -> None:
    # Offline, and a datasets cache of this run's own (datasets reads the variable once, at import):
    # an edited data file is never served stale.
    cache = tempfile.mkdtemp(prefix="dwdp-datasets-")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=cache)
    try:
        _rank_main(ctx, a)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _rank_main(ctx: RankContext, a: dict) -> None:
    source = source_from_args(a)
    cfg = source.config
    tokenizer = load_tokenizer(a["model"], cfg.vocab_size)
    kernel_name = a["kernels"] or default_kernels(ctx.device, cfg.hidden_size, cfg.moe_intermediate_size)
    ctx.progress("building dense weights")
    engine = Engine(ctx, source, source.dense(ctx.device, getattr(torch, a["dtype"])), get_kernels(kernel_name, ctx.device, a["act_quant"]))
    options = strategy_options(a)
    lead = ctx.rank == 0
    out = Path(a["out"])
    writer = RowWriter(out, COLUMNS) if lead else None
    rows, samples, reference = [], {}, None
    # replicated twice: the first run is the reference, the second measures how far two runs of the
    # same strategy agree on this machine (GPU kernels need not be bitwise reproducible).
    order = ["replicated"] + (["replicated-rerun"] if a["rerun_reference"] else []) + [s for s in a["strategies"] if s != "replicated"]
    for label in order:
        name = label.removesuffix("-rerun")
        ctx.progress(f"{label}: building expert weights")
        model = engine.model(name, options, timing=False)
        text = TextEngine(ctx, model, tokenizer.decode, lockstep=name.startswith("ep"), batch_size=a["batch_size"])
        if lead:
            start = time.perf_counter()
            lm = make_lm(ctx, text, tokenizer, a["max_gen_toks"])
            results = _evaluate(lm, a)  # on an error the launcher stops every rank: no "stop" to send
            lm.stop()
            seconds = time.perf_counter() - start
            if label == "replicated":
                reference = lm.generations
            scores = results["results"][TASK]
            n = results["n-samples"][TASK]["effective"]
            metric = a["metric"]
            score = 100 * float(scores[f"exact_match,{metric}"])
            threshold = pass_threshold(a["reference"], n) if a["reference"] is not None else None
            row = {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "task": "gsm8k",
                "model": a["model"],
                "strategy": label,
                "world_size": ctx.world_size,
                "device": a["device_name"],
                "kernels": kernel_name,
                "questions": n,
                "num_fewshot": results["n-shot"][TASK],
                "max_gen_toks": a["max_gen_toks"],
                "strict_match": 100 * float(scores["exact_match,strict-match"]),
                "flexible_extract": 100 * float(scores["exact_match,flexible-extract"]),
                "metric": metric,
                "reference_score": a["reference"],
                "pass_threshold": threshold,
                "passed": None if threshold is None else score >= threshold,
                "seconds": seconds,
                **agreement(lm.generations, reference),
            }
            writer.write(row)
            rows.append(row)
            samples[label] = [{"prompt_tail": k[-120:], "text": g.text, "tokens": g.tokens} for k, g in lm.generations.items()]
        else:
            serve(ctx, text)
        model.experts.close()
        del model, text
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    if lead:
        write_json(sidecar(out, "samples"), samples)
        Console().print(summary_table(rows))
        Console().print(f"rows: {out}")


def summary_table(rows: list[dict]) -> Table:
    table = Table(title="GSM8K through lm-eval, per strategy (agreement: against replicated)")
    for col in ("strategy", "questions", "strict %", "flexible %", "pass", "identical", "1st diverge", "logit rel err", "s"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        verdict = "" if r["passed"] is None else ("yes" if r["passed"] else f"NO (< {r['pass_threshold']:.2f})")
        table.add_row(
            r["strategy"], str(r["questions"]), fmt(r["strict_match"], ".2f"), fmt(r["flexible_extract"], ".2f"), verdict,
            fmt(r["identical_fraction"], ".3f"), fmt(r["first_divergence_median"], "g"), fmt(r["prefill_logit_rel"], ".2e"), fmt(r["seconds"], ".1f"),
        )
    return table
