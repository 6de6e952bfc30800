"""The `dwdp-bench` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help=(
        "Benchmark DWDP (distributed weight data parallelism) against expert parallelism for MoE prefill, "
        "on the same model and the same kernels.\n\n"
        "Start with `dwdp-bench env`, then `dwdp-bench e2e` (defaults: synthetic DeepSeek-V3-Lite NVFP4 on "
        "every GPU here, or the tiny model on 2 CPU ranks without GPUs). Results go to results/*.csv, one row "
        "per measurement, written as soon as it is measured."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
accuracy_app = typer.Typer(help="Accuracy of every strategy: GSM8K through lm-eval, or agreement with the single-GPU reference.", no_args_is_help=True)
app.add_typer(accuracy_app, name="accuracy")
console = Console(stderr=True)
STRATEGIES = ("replicated", "dwdp", "ep", "ep-overlap")  # what runtime.engine.build_strategy builds


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/bold red] {escape(message)}")
    raise typer.Exit(code)


def _csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{what} takes comma-separated numbers, got {text!r}")


def _csv_names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        _fail(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def resolve_ranks(gpus: Optional[int], device: Optional[str], ranks: Optional[int]) -> tuple[str, int, str]:
    """(device type, number of ranks, device name) from --gpus / --device / --ranks; inside mpirun /
    srun the number of ranks is the MPI world's."""
    import torch

    from .launcher import mpi_world

    if device not in (None, "cuda", "cpu"):
        _fail(f"--device must be cuda or cpu, got {device!r}")
    world = mpi_world()
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        device = "cuda" if (gpus or available) else "cpu"
    if device == "cpu":
        if gpus:
            _fail("--gpus asks for GPUs but --device cpu was given; use --ranks N for CPU ranks")
        n = world[1] if world else ranks or 2
        return "cpu", n, f"{n} CPU ranks"
    if world:
        return "cuda", world[1], f"{world[1]} x {torch.cuda.get_device_name(0)} (MPI world)"
    n = gpus or ranks or available
    if available == 0:
        _fail("no CUDA GPU is visible here; run on CPU ranks with --device cpu --ranks N")
    if n > available:
        _fail(f"{n} GPUs asked for but only {available} are visible here")
    return "cuda", n, f"{n} x {torch.cuda.get_device_name(0)}"


@app.command()
def env(json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this file.")) -> None:
    """Report GPUs, NVLink / P2P topology, MPI and the versions of every dependency (Rich table + JSON)."""
    from .envinfo import collect, table
    from .results import write_json

    info = collect()
    Console().print(table(info))
    if json_out:
        write_json(json_out, info)
        console.print(f"wrote {json_out}")
    else:
        print(json.dumps({k: v for k, v in info.items() if k != "topology"}, default=str))


SUITE_HELP = "A suite file or the name of a shipped suite (suites/*.toml); options given here override it."


def _lead_process() -> bool:
    """False on the MPI ranks other than 0, which must not write the run's files too."""
    from .launcher import mpi_world

    world = mpi_world()
    return world is None or world[0] == 0


def _new_out(command: str, out: Optional[Path]) -> str:
    from .results import check_new, default_path

    try:
        return str(check_new(default_path(command, out)) if _lead_process() else default_path(command, out))
    except ValueError as e:
        _fail(str(e))


def _suite_values(ctx: typer.Context, command, suite: Optional[str], section: str, values: dict) -> dict:
    from .suite import SuiteError, apply_suite

    try:
        return apply_suite(ctx, command, suite, section, values)
    except SuiteError as e:
        _fail(str(e))


@app.command()
def e2e(
    ctx: typer.Context,
    suite: Optional[str] = typer.Option(None, help=SUITE_HELP),
    gpus: Optional[int] = typer.Option(None, help="GPUs (one rank each) on this host. Default: all visible GPUs."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu. Default: cuda when a GPU is visible."),
    ranks: Optional[int] = typer.Option(None, help="Number of CPU ranks with --device cpu (default 2)."),
    model: Optional[str] = typer.Option(None, help="`synthetic:<config>` (deepseek-v3-lite, deepseek-v3, tiny) or a checkpoint directory. Default: synthetic:deepseek-v3-lite on GPU, synthetic:tiny on CPU."),
    layers: Optional[int] = typer.Option(None, help="Override the number of layers of a synthetic model."),
    strategies: str = typer.Option("replicated,dwdp,ep,ep-overlap", help="Comma-separated: replicated, dwdp, ep, ep-overlap."),
    cv: str = typer.Option("0,0.2,0.4", help="Input-length spreads to run (coefficient of variation), comma-separated."),
    isl: Optional[int] = typer.Option(None, help="Mean input length. Default 8192 on GPU, 48 on CPU."),
    max_tokens: Optional[int] = typer.Option(None, help="Max tokens per batch. Default 32768 on GPU, 192 on CPU."),
    requests_per_rank: int = typer.Option(16, help="Requests per rank (assigned round-robin)."),
    repeats: int = typer.Option(3, help="Measured passes per (strategy, spread); the table shows medians."),
    warmup: int = typer.Option(1, help="Unmeasured passes first (compilation, NCCL setup). The first one's logits are compared across strategies."),
    kernels: Optional[str] = typer.Option(None, help="MoE kernels: torch (any device), grouped (CUDA: Triton decode + torch._grouped_mm), cute (Hopper: fused CuTe DSL FC1 and FC2; FC2 adds with asynchronous fp32 reductions, so not bit-reproducible), cute-det (both fused; FC2 writes each routed row and a fixed-order finalize adds them: bit-reproducible) or cute-fc1 (the fused FC1 with grouped's FC2). Default: cute-det on Hopper where the model's shapes fit its tiles, else grouped on CUDA, torch on CPU."),
    dtype: str = typer.Option("bfloat16", help="Compute dtype: bfloat16 or float32."),
    act_quant: str = typer.Option("none", help="none, or nvfp4: quantise-dequantise expert activations (W4A4 numerics)."),
    align: int = typer.Option(1, help="Pad each expert's rows to a multiple of this in the permuted layout."),
    dwdp_size: Optional[int] = typer.Option(None, help="Ranks per DWDP group (N). Default: all ranks."),
    dwdp_local: Optional[int] = typer.Option(None, "--dwdp-local", help="L: experts stored per rank. Must satisfy E = L + (N-1) x P."),
    dwdp_prefetch: Optional[int] = typer.Option(None, "--dwdp-prefetch", help="P: experts pulled from every peer per layer."),
    slice_mib: float = typer.Option(0.0, help="Split prefetch copies into slices of this many MiB, peers round-robin (the contention fix for groups > 2). 0: whole copies."),
    seed: int = typer.Option(0, help="Seed of the synthetic weights and of the workload."),
    timeout: float = typer.Option(300.0, help="Seconds a rank may go without progress before the run is declared hung and stopped."),
    out: Optional[Path] = typer.Option(None, help="CSV to append rows to. Default: `results/e2e-<UTC time>.csv`."),
    master_addr: str = typer.Option("127.0.0.1", help="Rendezvous address (loopback unless told otherwise)."),
    fault_delay_prefetch: float = typer.Option(0.0, help="Fault injection: delay every DWDP prefetch by this many seconds (logits must not change)."),
    fault_skip_prefetch_wait: bool = typer.Option(False, help="Fault injection: compute does not wait for prefetches (must be caught as a logit mismatch)."),
    progress: bool = typer.Option(True, help="Progress bar on rank 0."),
) -> None:
    """Prefill throughput of DWDP vs EP vs replicated on one workload, measured side by side.

    Every rank builds the same model (synthetic weights from a seed, or a checkpoint); each strategy
    runs the same requests on the same ranks: DWDP and replicated ranks run their queues
    independently, EP ranks step in lockstep. Per (strategy, spread, repeat) one CSV row: tokens/s
    per GPU, TTFT p50/p90/max, busy vs waiting time (EP: collectives; DWDP: exposed prefetch), bytes
    moved and GB/s, peak memory and routed-expert bytes per rank, and the last-token logit error
    against replicated. A per-rank timeline of the last repeat goes to `<out>.timeline.json`.
    """
    from dataclasses import asdict

    from .e2e import validate
    from .runtime.strategies import StrategyOptions
    from .launcher import LaunchError, launch
    from .results import sidecar, write_json

    p = _suite_values(ctx, e2e, suite, "e2e", locals())
    dev, n, device_name = resolve_ranks(p["gpus"], p["device"], p["ranks"])
    on_gpu = dev == "cuda"
    if p["act_quant"] not in ("none", "nvfp4"):
        _fail(f"--act-quant must be none or nvfp4, got {p['act_quant']!r}")
    args = {
        "model": p["model"] or ("synthetic:deepseek-v3-lite" if on_gpu else "synthetic:tiny"),
        "layers": p["layers"],
        "strategies": _csv_names(p["strategies"], STRATEGIES, "strategy"),
        "cvs": _csv_floats(p["cv"], "--cv"),
        "isl": p["isl"] or (8192 if on_gpu else 48),
        "max_tokens": p["max_tokens"] or (32768 if on_gpu else 192),
        "requests_per_rank": p["requests_per_rank"],
        "repeats": p["repeats"],
        "warmup": p["warmup"],
        "kernels": p["kernels"],
        "dtype": p["dtype"],
        "act_quant": p["act_quant"] == "nvfp4",
        "options": asdict(
            StrategyOptions(
                align=p["align"],
                dwdp_size=p["dwdp_size"],
                dwdp_local=p["dwdp_local"],
                dwdp_prefetch=p["dwdp_prefetch"],
                slice_bytes=int(p["slice_mib"] * 2**20),
                fault_delay_prefetch_s=p["fault_delay_prefetch"],
                fault_skip_prefetch_wait=p["fault_skip_prefetch_wait"],
            )
        ),
        "seed": p["seed"],
        "progress": p["progress"],
        "device": dev,
        "device_name": device_name,
        "out": _new_out("e2e", p["out"]),
    }
    try:
        validate(args, n)
    except ValueError as e:
        _fail(str(e))
    from .envinfo import collect

    if _lead_process():
        write_json(sidecar(Path(args["out"]), "env"), {"command": "e2e", "args": args, "env": collect()})
    try:
        launch("e2e", args, n, dev, p["timeout"], p["master_addr"])
    except LaunchError as e:
        _fail(str(e), code=1)


@accuracy_app.command("gsm8k")
def gsm8k(
    ctx: typer.Context,
    suite: Optional[str] = typer.Option(None, help=SUITE_HELP),
    model: Optional[str] = typer.Option(None, help="`synthetic:<config>` or a checkpoint directory (tokenizer from the same directory). Default: synthetic:deepseek-v3-lite on GPU, synthetic:tiny on CPU."),
    data: Optional[Path] = typer.Option(None, help="GSM8K test file: .jsonl or .parquet with question/answer (upstream format). Required; nothing is downloaded."),
    train: Optional[Path] = typer.Option(None, help="File to draw few-shot examples from. Default: the test file, never the question itself."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N questions only."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per prompt. Default: lm-eval's gsm8k (5)."),
    max_gen_toks: int = typer.Option(256, help="Most tokens generated per question."),
    batch_size: int = typer.Option(16, help="Questions per batch on each rank."),
    strategies: str = typer.Option("replicated,dwdp,ep", help="Comma-separated; replicated always runs (first) as the agreement reference."),
    gpus: Optional[int] = typer.Option(None, help="GPUs (one rank each). Default: all visible."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu."),
    ranks: Optional[int] = typer.Option(None, help="CPU ranks with --device cpu (default 2)."),
    layers: Optional[int] = typer.Option(None, help="Override the number of layers of a synthetic model."),
    reference: Optional[float] = typer.Option(None, help="Published score (points) to test against, e.g. 63.71 for DeepSeek-V3-Lite NVFP4: pass when the score is not significantly lower (one-sided, sigma 50, alpha 0.05)."),
    metric: str = typer.Option("flexible-extract", help="The score --reference is compared with: strict-match or flexible-extract."),
    kernels: Optional[str] = typer.Option(None, help="MoE kernels: torch, grouped, cute, cute-det or cute-fc1 (see e2e --help); the same default as e2e."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 or float32."),
    act_quant: str = typer.Option("none", help="none or nvfp4 (W4A4 numerics)."),
    seed: int = typer.Option(0, help="Seed of synthetic weights."),
    timeout: float = typer.Option(300.0, help="Seconds without progress before a rank is declared hung."),
    out: Optional[Path] = typer.Option(None, help="CSV to append rows to. Default: `results/accuracy-<UTC time>.csv`."),
    master_addr: str = typer.Option("127.0.0.1", help="Rendezvous address."),
    rerun_reference: bool = typer.Option(True, help="Run replicated a second time: how well two runs of one strategy agree is the floor the others are judged against."),
) -> None:
    """GSM8K through lm-eval's own task and filters, under each strategy, fully offline.

    With a real checkpoint: strict-match and flexible-extract scores per strategy, and pass/fail
    against --reference. With synthetic weights the scores are meaningless, so the report is
    agreement with replicated: the fraction of questions with identical generated tokens, the first
    position where they differ, and the prefill's last-token logit error. DWDP with the same kernels
    must be identical. Generation decodes token by token with a KV cache; under DWDP every decode
    step prefetches every routed expert (correct, slow: DWDP is a prefill technique).
    """
    from .accuracy import check_data
    from dataclasses import asdict

    from .runtime.strategies import StrategyOptions
    from .launcher import LaunchError, launch
    from .results import sidecar, write_json

    p = _suite_values(ctx, gsm8k, suite, "accuracy", locals())
    dev, n, device_name = resolve_ranks(p["gpus"], p["device"], p["ranks"])
    names = _csv_names(p["strategies"], STRATEGIES, "strategy")
    if "ep-overlap" in names:
        _fail("accuracy runs replicated, dwdp and ep; ep-overlap computes the same as ep")
    if p["metric"] not in ("strict-match", "flexible-extract"):
        _fail(f"--metric must be strict-match or flexible-extract, got {p['metric']!r}")
    try:
        data = check_data(p["data"])
        if p["train"] is not None:
            check_data(p["train"])
    except ValueError as e:
        _fail(str(e))
    args = {
        "model": p["model"] or ("synthetic:deepseek-v3-lite" if dev == "cuda" else "synthetic:tiny"),
        "layers": p["layers"], "data": str(data), "train": str(p["train"]) if p["train"] else None, "limit": p["limit"],
        "num_fewshot": p["num_fewshot"], "max_gen_toks": p["max_gen_toks"], "batch_size": p["batch_size"], "strategies": names,
        "rerun_reference": p["rerun_reference"], "reference": p["reference"], "metric": p["metric"], "kernels": p["kernels"],
        "dtype": p["dtype"], "act_quant": p["act_quant"] == "nvfp4", "seed": p["seed"], "device": dev, "device_name": device_name,
        "options": asdict(StrategyOptions()),
        "out": _new_out("accuracy", p["out"]),
    }
    from .envinfo import collect

    if _lead_process():
        write_json(sidecar(Path(args["out"]), "env"), {"command": "accuracy gsm8k", "args": args, "env": collect()})
    try:
        launch("accuracy", args, n, dev, p["timeout"], p["master_addr"])
    except LaunchError as e:
        _fail(str(e), code=1)


@app.command()
def kernels(
    ctx: typer.Context,
    suite: Optional[str] = typer.Option(None, help=SUITE_HELP),
    device: Optional[str] = typer.Option(None, help="cuda or cpu. Default: cuda when a GPU is visible."),
    models: Optional[str] = typer.Option(None, help="Model shapes, comma-separated. Default: deepseek-v3-lite,deepseek-v3 on GPU, tiny on CPU."),
    tokens: Optional[str] = typer.Option(None, help="Tokens per case (routed rows = tokens x top-k), comma-separated; for the transport cases, tokens per rank. Default: 1024,8192,32768,65536 on GPU, 64,256 on CPU."),
    skew: str = typer.Option("0,2", help="Routing skew per case: 0 = uniform expert load; 2 = the first experts get far more tokens."),
    impls: Optional[str] = typer.Option(None, help="Kernel implementations to time. Default: every one that runs on the device (torch; on GPU also grouped, cute, cute-det), but not cute-fc1, whose FC1 is cute's and FC2 grouped's."),
    transport: Optional[bool] = typer.Option(
        None, "--transport/--no-transport",
        help="Also run the transport cases on N ranks (started and watched like e2e's): for one MoE layer, DWDP's prefetch "
        "(bytes, ms, GB/s) next to a plain peer copy of the same bytes, the FC1-shaped bf16 GEMM alone and while the prefetch "
        "runs (slowdown), and EP's dispatch + combine all-to-alls. Rows go to `<out>.transport.csv`. "
        "Default: on when this host has 2 or more GPUs and --device is cuda.",
    ),
    ranks: Optional[int] = typer.Option(None, help="Ranks of the transport cases: GPUs (one rank each), or CPU ranks with --device cpu. Default: every visible GPU; 2 CPU ranks."),
    out: Optional[Path] = typer.Option(None, help="CSV to append rows to. Default: `results/kernels-<UTC time>.csv`."),
    seed: int = typer.Option(0, help="Seed of the random inputs and weights."),
    rounds: int = typer.Option(1, help="Timings of each implementation per case and stage, taken round-robin across the implementations (each round starting one later); a row's ms is their median and its `spread` column (max - min) / median. dense-bf16 is timed in the same rounds (every ratio to it at comparable clocks), the other baselines once."),
    timeout: float = typer.Option(300.0, help="Seconds a transport rank may go without progress before the run is declared hung and stopped."),
) -> None:
    """MoE kernel microbenchmarks on one device: FC1 (gather + grouped GEMM + SwiGLU) and FC2 (grouped
    GEMM + finalize) per implementation, with time, TFLOP/s and the fraction of a dense bf16 matmul's
    speed with the same FLOPs (the ceiling), next to the GEMM alone on pre-decoded weights
    (torch._grouped_mm) and, on Hopper, quack's dense NVFP4 x bf16 GEMM (quack-w4a16) with the same
    M, N, K, all measured in the same run. One CSV row per (case, stage, implementation); the machine,
    versions and arguments go to `<out>.env.json`.

    With --transport (default with >= 2 GPUs), what moves between ranks for one MoE layer: DWDP's
    prefetch as the forward pass issues it vs a plain peer copy, the GEMM slowdown it causes, and EP's
    all-to-all dispatch + combine; one row per (case, measurement) in `<out>.transport.csv`.
    """
    import torch

    from .kernelbench import COLUMNS, Case, run_case, table
    from .kernels import KERNEL_NAMES, available_kernels
    from .launcher import LaunchError, launch
    from .envinfo import collect
    from .results import RowWriter, check_new, sidecar, write_json
    from .transportbench import validate

    p = _suite_values(ctx, kernels, suite, "kernels", locals())
    dev = torch.device(p["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail("no CUDA GPU is visible here; use --device cpu")
    gpu = dev.type == "cuda"
    model_names = [m.strip() for m in (p["models"] or ("deepseek-v3-lite,deepseek-v3" if gpu else "tiny")).split(",") if m.strip()]
    token_counts = [int(t) for t in _csv_floats(p["tokens"] or ("1024,8192,32768,65536" if gpu else "64,256"), "--tokens")]
    skews = _csv_floats(p["skew"], "--skew")
    if p["rounds"] < 1:
        _fail(f"--rounds must be at least 1, got {p['rounds']}")
    runnable = available_kernels(dev)
    names = [n for n in runnable if n != "cute-fc1"]  # its FC1 and FC2 are timed as cute's and grouped's
    if p["impls"]:
        asked = _csv_names(p["impls"], list(KERNEL_NAMES), "kernel implementation")
        if missing := [n for n in asked if n not in runnable]:
            _fail(f"kernels {', '.join(missing)} do not run on {dev} here (runs: {', '.join(runnable)}); 'grouped' needs CUDA + Triton, "
                  "'cute', 'cute-det' and 'cute-fc1' a Hopper (sm_90) GPU with CuTe DSL and quack")
        names = asked
    if "torch" not in names:
        names = ["torch", *names]  # the reference every ratio is taken against
    from .runtime.config import get_config

    try:
        for m in model_names:
            get_config(m)
    except ValueError as e:
        _fail(str(e))
    out_path = Path(_new_out("kernels", p["out"]))
    run_transport = p["transport"] if p["transport"] is not None else gpu and torch.cuda.device_count() >= 2
    if run_transport:
        _, n, _ = resolve_ranks(None, dev.type, p["ranks"])
        try:
            validate(model_names, n)
            transport_out = check_new(sidecar(out_path, "transport", ".csv"))
        except ValueError as e:
            if p["transport"]:  # asked for: an error; on by default: a note, and the kernel cases run
                _fail(str(e))
            console.print(f"no transport cases: {e}")
            run_transport = False
    writer = RowWriter(out_path, COLUMNS)
    args = {"models": model_names, "tokens": token_counts, "skew": skews, "impls": names, "device": str(dev), "seed": p["seed"], "rounds": p["rounds"], "transport": run_transport}
    write_json(sidecar(out_path, "env"), {"command": "kernels", "args": args, "env": collect()})
    rows = []
    cases = [Case(m, t, s) for m in model_names for t in token_counts for s in skews]
    for i, case in enumerate(cases):
        console.print(f"[{i + 1}/{len(cases)}] {case.model} tokens={case.tokens} skew={case.skew:g}")
        case_rows, refused = run_case(case, dev, names, p["seed"], p["rounds"])
        for row in case_rows:
            writer.write(row)
            rows.append(row)
        for line in refused:
            console.print(f"  not measured: {line}")
    Console().print(table(rows))
    Console().print(f"rows: {writer.path}")
    if run_transport:
        if gpu:
            torch.cuda.empty_cache()  # the ranks need the memory the kernel cases cached
        console.print(f"transport cases on {n} {'GPUs' if gpu else 'CPU ranks'}")
        args = {"models": model_names, "tokens": token_counts, "skew": skews, "seed": p["seed"], "out": str(transport_out)}
        try:
            launch("transport", args, n, dev.type, p["timeout"])
        except LaunchError as e:
            _fail(str(e), code=1)


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="Results CSVs (e2e, accuracy); an e2e CSV's .timeline.json is read too."),
    out: Optional[Path] = typer.Option(None, help="Directory for the PNGs and summary.md. Default: `results/report-<UTC time>/`."),
) -> None:
    """Plots and a Markdown summary: tokens/s per GPU vs length spread per strategy, a per-rank
    timeline of one pass (computing vs waiting on collectives vs waiting on prefetches), the medians
    per (strategy, spread), and accuracy rows."""
    import time

    from .gate import Unusable
    from .report import build

    out = out or Path("results") / f"report-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    try:
        summary = build(results, out)
    except Unusable as e:
        _fail(str(e))
    Console().print(f"wrote {summary} and its plots in {out}")


@app.command()
def gate(
    results: list[Path] = typer.Argument(..., help="Results CSVs to judge (e2e and/or accuracy)."),
    reference: Path = typer.Option(..., help="Checks with bounds and tolerances, e.g. results/reference/cpu-tiny.toml."),
) -> None:
    """CI gate: judge results against committed references. Exit 0 when every check passes, 1 on a
    regression, 2 when the input cannot be judged (unknown file, missing column, a check that
    matches no row, a row no check covers). Prints each check with its value, bound and delta."""
    from .gate import Unusable, evaluate, load_checks, load_results, table

    try:
        outcomes = evaluate(load_results(results), load_checks(reference))
    except Unusable as e:
        _fail(str(e), code=2)
    Console().print(table(outcomes))
    failed = [o.name for o in outcomes if not o.passed]
    if failed:
        _fail(f"{len(failed)} of {len(outcomes)} checks failed: {'; '.join(failed)}", code=1)
    Console().print(f"all {len(outcomes)} checks passed")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
