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


def sidecar(csv_path: Path, kind: str) -> Path:
    """A file beside a results CSV: results/e2e-x.csv -> results/e2e-x.<kind>.json."""
    return csv_path.with_name(f"{csv_path.stem}.{kind}.json")


class RowWriter:
    """Appends rows with a fixed set of columns to a CSV, flushing after each row."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise ValueError(f"{self.path} exists with other columns; choose another --out or move it away")
        else:
            with self.path.open("w", newline="") as f:
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


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
