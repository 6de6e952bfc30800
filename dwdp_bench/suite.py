"""Suites: TOML files of command options, one table per command (`[e2e]`, `[accuracy]`, ...).

Keys are the command's long option names (`max-tokens`, `strategies`, ...); lists stand for the
comma-separated options. Options given on the command line override the suite. Relative paths in a
suite are relative to the suite file. `--suite NAME` looks for NAME.toml among the suites shipped in
`suites/`; anything else is a path.
"""

from __future__ import annotations

import tomllib
import types
import typing
from importlib import resources
from pathlib import Path



class SuiteError(ValueError):
    pass


def builtin_suites() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("dwdp_bench.suites").iterdir() if p.name.endswith(".toml"))


def find_suite(name: str) -> Path:
    builtin = resources.files("dwdp_bench.suites") / f"{name}.toml"
    if builtin.is_file():
        return Path(str(builtin))
    path = Path(name)
    if path.is_file():
        return path
    raise SuiteError(f"no suite {name!r}: not a file, and not one of the shipped suites ({', '.join(builtin_suites())})")


def apply_suite(ctx, command, suite: str | None, section: str, values: dict) -> dict:
    """`values` (the parameters of `command`, a Typer command function) with the suite's entries
    filled in where the command line left an option at its default. Raises SuiteError naming the
    file, the key and what was expected. Types come from the function's annotations."""
    if suite is None:
        return values
    path = find_suite(suite)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: not valid TOML: {e}") from e
    if section not in data or not isinstance(data[section], dict):
        raise SuiteError(f"{path}: has no [{section}] table (tables: {', '.join(data) or 'none'})")
    hints = {k: v for k, v in typing.get_type_hints(command).items() if k in values and k not in ("ctx", "suite", "return")}
    out = dict(values)
    for key, value in data[section].items():
        name = key.replace("-", "_")
        if name not in hints:
            options = ", ".join(sorted(n.replace("_", "-") for n in hints))
            raise SuiteError(f"{path}: [{section}] unknown key {key!r}; expected one of: {options}")
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            continue
        out[name] = _convert(value, hints[name], f"{path}: [{section}] {key}", path.parent)
    return out


def _convert(value, hint, where: str, base: Path):
    """A TOML value as the option's type (Optional[X] is X; text options also take lists)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if kind is str and isinstance(value, (list, int, float)) and not isinstance(value, bool):
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if kind is Path and isinstance(value, str):
        return Path(value) if Path(value).is_absolute() else (base / value).resolve()
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = {str: "text (or a list, for comma-separated options)", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(kind, str(kind))
    raise SuiteError(f"{where} expects {expected}, got {value!r}")
