"""`dwdp-bench report`: PNG plots and a Markdown summary of results CSVs.

    e2e-throughput-<n>.png   tokens/s per GPU vs length spread, per strategy (median, min-max bars)
    e2e-timeline-<n>.png     one pass per strategy and rank: computing vs waiting on collectives or
                             on prefetches (from the CSV's .timeline.json)
    kernels-<model>.png      TFLOP/s vs routed rows per implementation, FC1 and FC2, with the GEMM-alone
                             baseline and the dense bf16 ceiling
    summary.md               the medians per (strategy, spread), accuracy rows, and the plots
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .gate import load_results  # noqa: E402
from .results import e2e_medians, fmt, sidecar  # noqa: E402

STRATEGY_COLORS = {"replicated": "#7f7f7f", "dwdp": "#1f77b4", "ep": "#d62728", "ep-overlap": "#ff7f0e"}
WAIT_COLORS = {"wait:collective": "#d62728", "wait:prefetch": "#ff7f0e"}
COMPUTE_COLOR = "#4c9f70"


def plot_throughput(med: pd.DataFrame, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, rows in med.groupby("strategy"):
        rows = rows.sort_values("cv")
        ax.errorbar(
            rows.cv, rows["median"], yerr=[rows["median"] - rows["min"], rows["max"] - rows["median"]],
            marker="o", capsize=3, label=strategy, color=STRATEGY_COLORS.get(strategy),
        )
    ax.set_xlabel("input length spread (coefficient of variation)")
    ax.set_ylabel("prefill tokens / s / GPU")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(timeline: dict, path: Path) -> str | None:
    """One pass per strategy (at the largest spread in the file): a row per rank, computing in green,
    waiting on collectives in red, waiting on prefetches in orange. Returns the spread shown."""
    runs = timeline.get("runs", [])
    if not runs:
        return None
    cv = max(r["cv"] for r in runs)
    runs = [r for r in runs if r["cv"] == cv]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.6 * sum(len(r["ranks"]) for r in runs)), sharex=True)
    axes = axes if len(runs) > 1 else [axes]
    for ax, run in zip(axes, runs):
        for rank, intervals in enumerate(run["ranks"]):
            compute = [(s, d) for what, _, s, d in intervals if what not in WAIT_COLORS and what not in ("start", "batch_done", "end")]
            ax.broken_barh(compute, (rank - 0.4, 0.8), color=COMPUTE_COLOR, linewidth=0)
            for kind, color in WAIT_COLORS.items():
                ax.broken_barh([(s, d) for what, _, s, d in intervals if what == kind], (rank - 0.4, 0.8), color=color, linewidth=0)
        ax.set_yticks(range(len(run["ranks"])), [f"rank {r}" for r in range(len(run["ranks"]))])
        ax.set_ylabel(run["strategy"], rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("ms since the pass started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (COMPUTE_COLOR, *WAIT_COLORS.values())]
    fig.legend(handles, ["computing", "waiting: collectives", "waiting: prefetch"], loc="upper right", ncol=3, fontsize=8)
    fig.suptitle(f"one pass per strategy, CV {cv:g}: where each rank's time goes", fontsize=10, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{cv:g}"


# baselines dashed / dotted, implementations solid; fixed colours so that no two lines share one
KERNEL_STYLES = {
    "dense-bf16": dict(color="black", linestyle="--"), "bf16-grouped-gemm": dict(color="#7f7f7f", linestyle=":"),
    "quack-w4a16": dict(color="#9467bd", linestyle="-."), "torch": dict(color="#d62728"), "grouped": dict(color="#ff7f0e"),
    "cute": dict(color="#1f77b4"), "cute-det": dict(color="#2ca02c"), "cute-fc1": dict(color="#17becf"),
}


def plot_kernels(df: pd.DataFrame, path: Path, model: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, stage in zip(axes, ("fc1", "fc2")):
        part = df[(df.stage == stage) & (df["skew"] == df["skew"].min())]
        for impl, rows in part.groupby("impl"):
            rows = rows.sort_values("routed_rows")
            style = KERNEL_STYLES.get(impl, {})
            ax.plot(rows.routed_rows, rows.tflops, marker="o", label=impl, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("routed rows (tokens x top-k)")
        ax.set_title(f"{stage.upper()}, uniform routing", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MoE kernels, {model} shapes on {df.device.iloc[0]} (dense-bf16: the ceiling)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build(paths: list[Path], out_dir: Path) -> Path:
    results = load_results(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# dwdp-bench report", "", "Sources: " + ", ".join(f"`{p}`" for p in paths), ""]
    if "e2e" in results:
        df = results["e2e"]
        for i, (source, part) in enumerate(df.groupby("_source")):
            med = e2e_medians(part)
            name = f"e2e-throughput-{i}.png"
            plot_throughput(med, out_dir / name, f"{part.model.iloc[0]} on {part.device.iloc[0]}")
            lines += [f"## e2e: `{source}`", "", f"![throughput]({name})", ""]
            lines += ["| CV | strategy | tok/s/GPU (median) | min-max | x best EP | x replicated | TTFT p90 s | wait ms/rank | exposed prefetch % MoE | peak GiB | expert GiB/rank | logit rel err |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for _, r in med.sort_values(["cv", "strategy"]).iterrows():
                wait = (r.wait_collective_ms_mean or 0) + (r.wait_prefetch_ms_mean or 0)
                lines.append(
                    f"| {r.cv:g} | {r.strategy} | {r['median']:.0f} | {r['min']:.0f}-{r['max']:.0f} | {fmt(r.x_best_ep, '.3f')} | {fmt(r.x_replicated, '.3f')} | "
                    f"{fmt(r.ttft_p90_s, '.2f')} | {wait:.1f} | {fmt(r.exposed_prefetch_pct, '.2f')} | {fmt(r.peak_mem_gib_max, '.1f')} | "
                    f"{fmt(r.expert_gib_per_rank, '.2f')} | {fmt(r.logit_rel_diff, '.1e')} |"
                )
            timeline_file = sidecar(Path(source), "timeline")
            if timeline_file.is_file():
                tname = f"e2e-timeline-{i}.png"
                cv = plot_timeline(json.loads(timeline_file.read_text()), out_dir / tname)
                if cv is not None:
                    lines += ["", f"Per-rank timeline of the last repeat at CV {cv} (green: computing; red: waiting on collectives; orange: waiting on prefetches):", "", f"![timeline]({tname})"]
            lines.append("")
    if "accuracy" in results:
        df = results["accuracy"]
        lines += ["## accuracy", "", "| source | strategy | questions | strict % | flexible % | passed | identical | first divergence | prefill logit rel err |", "|---|---|---|---|---|---|---|---|---|"]
        for _, r in df.iterrows():
            lines.append(
                f"| `{Path(r._source).name}` | {r.strategy} | {r.questions} | {r.strict_match:.2f} | {r.flexible_extract:.2f} | {fmt(r.passed, '')} | "
                f"{fmt(r.identical_fraction, '.3f')} | {fmt(r.first_divergence_median, 'g')} | {fmt(r.prefill_logit_rel, '.2e')} |"
            )
        lines.append("")
    if "kernels" in results:
        df = results["kernels"]
        lines += ["## kernels", ""]
        for model, part in df.groupby("model"):
            name = f"kernels-{model}.png"
            plot_kernels(part, out_dir / name, model)
            lines += [f"![{model}]({name})", "", "| tokens | skew | stage | impl | work tile | ms | spread | TFLOP/s | x ceiling | x torch |", "|---|---|---|---|---|---|---|---|---|---|"]
            for _, r in part.sort_values(["tokens", "skew", "stage", "impl"]).iterrows():
                tile = r.get("tile")  # fused stages only; CSVs from before the column have none
                lines.append(
                    f"| {r.tokens} | {r['skew']:g} | {r.stage} | {r.impl} | {tile if isinstance(tile, str) else ''} | {r.ms:.3f} | {fmt(r.get('spread'), '.1%')} | "
                    f"{r.tflops:.1f} | {r.frac_ceiling:.2f} | {fmt(r.x_vs_torch, '.2f')} |"
                )
            lines.append("")
    if "transport" in results:
        lines += ["## transport per MoE layer and rank", "", "| model | ranks | tokens | skew | measure | MB | ms | GB/s | x peer copy | slowdown |", "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in results["transport"].iterrows():
            lines.append(
                f"| {r.model} | {r.ranks} | {r.tokens} | {r['skew']:g} | {r.measure} | {fmt(r.bytes / 1e6, '.1f')} | {r.ms:.3f} | {fmt(r.gbps, '.1f')} | "
                f"{fmt(r.x_peer_copy, '.2f')} | {fmt(r.slowdown, '.3f')} |"
            )
        lines.append("")
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
