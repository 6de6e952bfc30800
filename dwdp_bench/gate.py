"""`dwdp-bench gate`: compare result rows with committed references; exit 1 on a regression.

A reference file (TOML, kept in results/reference/) is a list of checks:

    [[check]]
    name = "DWDP beats the better EP form at CV 0.2"
    kind = "e2e"                                  # which result rows: e2e, accuracy, kernels or transport
    where = { strategy = "dwdp", cv = 0.2 }        # rows whose columns equal these values
    metric = "tps_per_gpu"                         # the median over those rows (repeats)...
    relative_to = { strategy = ["ep", "ep-overlap"] }  # ...over the best median of these (optional;
                                                   # a column set to "any" drops where's condition on it)
    min = 1.10                                     # bounds: min, max, and/or
    # reference = 42700, tolerance = 0.05, direction = "higher"   (fail below 42700 x 0.95)
    # gsm8k_reference = 63.71                      (fail below the one-sided test's threshold)

`where` values may be lists (any of them). Exit codes: 0 all checks pass, 1 a regression, 2 the input
cannot be judged (a file of unknown kind, a missing column, a check that matches no row, a row that no
check covers).
"""

from __future__ import annotations

import math
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import pandas as pd
from rich.table import Table


# kind -> a column only its CSVs have (transport: the `<out>.transport.csv` of `dwdp-bench kernels`)
KINDS = {"e2e": "tps_per_gpu", "accuracy": "identical_fraction", "kernels": "frac_ceiling", "transport": "x_peer_copy"}


def pass_threshold(reference: float, n: int, sigma: float = 50.0, alpha: float = 0.05) -> float:
    """Lowest score (points) that is not a regression from `reference` at level alpha, one-sided.

    Both the reference and the new run carry sampling noise of sigma / sqrt(n) points (a Bernoulli
    score has sigma <= 50), so their difference has sqrt(2 sigma^2 / n); a run fails when it lies more
    than z_(1-alpha) of those below the reference: 63.71 - 3.20 for n = 1319."""
    return reference - NormalDist().inv_cdf(1 - alpha) * (2 * sigma**2 / n) ** 0.5


def detectable_drop(n: int, sigma: float = 50.0, alpha: float = 0.05, beta: float = 0.2) -> float:
    """The regression (points) the test catches with probability 1 - beta: 4.84 for n = 1319."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha) + z(1 - beta)) * (2 * sigma**2 / n) ** 0.5


class Unusable(ValueError):
    """The results or the reference cannot be judged (exit 2)."""


@dataclass
class Outcome:
    name: str
    value: float
    bound: str
    delta: str
    passed: bool


def load_results(paths: list[Path]) -> dict[str, pd.DataFrame]:
    frames: dict[str, list[pd.DataFrame]] = {}
    for path in paths:
        if not path.is_file():
            raise Unusable(f"{path}: no such results file")
        df = pd.read_csv(path)
        kinds = [k for k, col in KINDS.items() if col in df.columns]
        if len(kinds) != 1:
            raise Unusable(f"{path}: not an e2e, accuracy, kernels or transport results CSV (columns: {', '.join(df.columns[:8])}...)")
        df["_source"] = str(path)
        frames.setdefault(kinds[0], []).append(df)
    return {k: pd.concat(v, ignore_index=True) for k, v in frames.items()}


def load_checks(path: Path) -> list[dict]:
    if not path.is_file():
        raise Unusable(f"reference file {path} does not exist")
    try:
        checks = tomllib.loads(path.read_text()).get("check", [])
    except tomllib.TOMLDecodeError as e:
        raise Unusable(f"{path}: not valid TOML: {e}") from e
    if not checks:
        raise Unusable(f"{path}: no [[check]] entries")
    for c in checks:
        missing = {"name", "kind", "where", "metric"} - set(c)
        if missing:
            raise Unusable(f"{path}: check {c.get('name', c)!r} lacks {sorted(missing)}")
        if c["kind"] not in KINDS:
            raise Unusable(f"{path}: check {c['name']!r}: kind must be one of {sorted(KINDS)}")
        if not {"min", "max", "reference", "gsm8k_reference"} & set(c):
            raise Unusable(f"{path}: check {c['name']!r} has no bound (min, max, reference or gsm8k_reference)")
    return checks


def _mask(df: pd.DataFrame, where: dict, name: str) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for col, want in where.items():
        if col not in df.columns:
            raise Unusable(f"check {name!r}: results have no column {col!r}")
        wants = want if isinstance(want, list) else [want]
        mask &= df[col].apply(lambda v: any(_equal(v, w) for w in wants))
    return mask


def _equal(value, want) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return str(value) == str(want)


def _median(df: pd.DataFrame, mask: pd.Series, metric: str, name: str) -> float:
    if metric not in df.columns:
        raise Unusable(f"check {name!r}: results have no column {metric!r}")
    values = pd.to_numeric(df.loc[mask, metric], errors="coerce").dropna()
    if values.empty:
        raise Unusable(f"check {name!r}: the matching rows have no {metric!r} values")
    return float(statistics.median(values))


def evaluate(results: dict[str, pd.DataFrame], checks: list[dict]) -> list[Outcome]:
    covered = {kind: pd.Series(False, index=df.index) for kind, df in results.items()}
    outcomes = []
    for c in checks:
        name, kind = c["name"], c["kind"]
        if kind not in results:
            raise Unusable(f"check {name!r} needs {kind} results; none were given")
        df = results[kind]
        mask = _mask(df, c["where"], name)
        if not mask.any():
            raise Unusable(f"check {name!r}: no {kind} row matches {c['where']}")
        covered[kind] |= mask
        value = _median(df, mask, c["metric"], name)
        if "relative_to" in c:
            # the same selection with relative_to's columns replaced ("any": not selected on): the best
            # median among those
            base = {col: want for col, want in {**c["where"], **c["relative_to"]}.items() if want != "any"}
            others = []
            for col, want in c["relative_to"].items():
                if want == "any":
                    continue
                for w in want if isinstance(want, list) else [want]:
                    m = _mask(df, {**base, col: w}, name)
                    if m.any():
                        others.append(_median(df, m, c["metric"], name))
            if not others:
                raise Unusable(f"check {name!r}: no row matches relative_to {c['relative_to']}")
            value = value / max(others)
        outcomes.append(_judge(c, value, int(df.loc[mask, "questions"].iloc[0]) if "gsm8k_reference" in c else 0))
    for kind, mask in covered.items():
        if not mask.all():
            rows = results[kind].loc[~mask]
            keys = [c for c in ("strategy", "cv", "model", "_source") if c in rows.columns]
            raise Unusable(f"{len(rows)} {kind} row(s) match no reference check, e.g. " + ", ".join(f"{k}={rows.iloc[0][k]}" for k in keys))
    return outcomes


def _judge(c: dict, value: float, questions: int) -> Outcome:
    bounds, ok, deltas = [], True, []
    if math.isnan(value):
        return Outcome(c["name"], value, "not NaN", "", False)
    if "min" in c:
        bounds.append(f">= {c['min']:g}")
        ok &= value >= c["min"]
        deltas.append(f"{value - c['min']:+.4g}")
    if "max" in c:
        bounds.append(f"<= {c['max']:g}")
        ok &= value <= c["max"]
        deltas.append(f"{value - c['max']:+.4g}")
    if "reference" in c:
        ref, tol, direction = c["reference"], c.get("tolerance", 0.05), c.get("direction", "higher")
        if direction not in ("higher", "lower"):
            raise Unusable(f"check {c['name']!r}: direction must be higher or lower")
        limit = ref * (1 - tol) if direction == "higher" else ref * (1 + tol)
        bounds.append(f"{'>=' if direction == 'higher' else '<='} {limit:.4g} (ref {ref:g} {'-' if direction == 'higher' else '+'}{tol:.0%})")
        ok &= value >= limit if direction == "higher" else value <= limit
        deltas.append(f"{(value - ref) / ref:+.2%} vs ref" if ref else f"{value - ref:+.4g}")
    if "gsm8k_reference" in c:
        threshold = pass_threshold(c["gsm8k_reference"], questions)
        bounds.append(f">= {threshold:.2f} (ref {c['gsm8k_reference']:g}, n={questions})")
        ok &= value >= threshold
        deltas.append(f"{value - c['gsm8k_reference']:+.2f} pts")
    return Outcome(c["name"], value, " and ".join(bounds), ", ".join(deltas), bool(ok))


def table(outcomes: list[Outcome]) -> Table:
    t = Table(title="dwdp-bench gate")
    for col in ("check", "value", "bound", "delta", "result"):
        t.add_column(col, justify="right" if col in ("value",) else "left")
    for o in outcomes:
        t.add_row(o.name, f"{o.value:.6g}", o.bound, o.delta, "[green]pass[/green]" if o.passed else "[bold red]FAIL[/bold red]")
    return t
