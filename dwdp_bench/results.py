"""Result rows: appended to CSV one at a time as they are measured, so a later failure loses nothing."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence


def default_path(command: str, out: Path | None) -> Path:
    """`--out` as given, or results/<command>-<UTC time>.csv."""
    if out is not None:
        return out
    return Path("results") / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.csv"


def sidecar(csv_path: Path, kind: str, suffix: str = ".json") -> Path:
    """A file beside a results CSV: results/e2e-x.csv -> results/e2e-x.<kind>.json (or <kind><suffix>)."""
    return csv_path.with_name(f"{csv_path.stem}.{kind}{suffix}")


def check_new(path: Path) -> Path:
    """Results go to a new file per run, so a CSV and its .env/.timeline sidecars always belong together."""
    if path.exists():
        raise ValueError(f"{path} exists; choose another --out (each run writes its own file)")
    return path


class RowWriter:
    """Writes rows with a fixed set of columns to a new CSV, appending and flushing after each row."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("x", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"row has columns the CSV does not: {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def fmt(v: Any, spec: str) -> str:
    """A table cell: empty for a missing value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec)


def e2e_medians(rows):
    """Medians over repeats per (model, world, spread, strategy), with min/max tokens/s per GPU and the
    ratios to the better EP form and to replicated at the same spread. `rows`: a DataFrame or dicts;
    returns a DataFrame."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    g = df.groupby(["model", "world_size", "cv", "strategy"])
    out = g["tps_per_gpu"].agg(["median", "min", "max", "count"]).reset_index()
    for col in ("ttft_p90_s", "wait_collective_ms_mean", "wait_prefetch_ms_mean", "exposed_prefetch_pct", "transport_gbps",
                "peak_mem_gib_max", "expert_gib_per_rank", "logit_rel_diff"):
        out[col] = pd.to_numeric(g[col].median(), errors="coerce").values if col in df else None
    keys = ["model", "world_size", "cv"]
    best_ep = out[out.strategy.isin(["ep", "ep-overlap"])].groupby(keys)["median"].max().rename("best_ep")
    repl = out[out.strategy == "replicated"].set_index(keys)["median"].rename("replicated")
    out = out.join(best_ep, on=keys).join(repl, on=keys)
    out["x_best_ep"] = out["median"] / out["best_ep"]
    out["x_replicated"] = out["median"] / out["replicated"]
    return out


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
