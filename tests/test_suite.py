"""Suites: shipped files parse for their commands, options override them, malformed ones are rejected
with the file, the key and what was expected."""

import csv
import inspect

import pytest

from dwdp_bench import cli as cli_module
from dwdp_bench.suite import SuiteError, apply_suite, builtin_suites, find_suite
from e2e_helpers import cli

COMMANDS = {"e2e": cli_module.e2e, "accuracy": cli_module.gsm8k, "kernels": cli_module.kernels}


class NoCommandLine:
    """A click context in which no option came from the command line."""

    def get_parameter_source(self, name):
        return None


def _defaults(command) -> dict:
    return {n: p.default for n, p in inspect.signature(command).parameters.items() if n != "ctx"}


@pytest.mark.parametrize("name", builtin_suites())
def test_shipped_suites_parse_for_their_commands(name):
    import tomllib

    tables = tomllib.loads(find_suite(name).read_text())
    assert tables, name
    for section in tables:
        command = COMMANDS[section]
        values = apply_suite(NoCommandLine(), command, name, section, _defaults(command))
        for key in tables[section]:
            assert values[key.replace("-", "_")] is not None


def test_ci_suite_paths_are_relative_to_the_suite_file():
    values = apply_suite(NoCommandLine(), cli_module.gsm8k, "ci-cpu", "accuracy", _defaults(cli_module.gsm8k))
    assert values["data"].is_file() and values["data"].name == "gsm8k-style-64.jsonl"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[e2e]\nbogus = 1\n", "[e2e] unknown key 'bogus'; expected one of:"),
        ("[e2e]\nrepeats = 'many'\n", "[e2e] repeats expects an integer, got 'many'"),
        ("[e2e]\nprogress = 3\n", "[e2e] progress expects true or false, got 3"),
        ("[e2e]\nisl = { a = 1 }\n", "[e2e] isl expects an integer"),
        ("[kernels]\ntokens = [1]\n", "has no [e2e] table (tables: kernels)"),
        ("[e2e\n", "not valid TOML"),
    ],
)
def test_malformed_suites_are_rejected_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(SuiteError) as info:
        apply_suite(NoCommandLine(), cli_module.e2e, str(path), "e2e", _defaults(cli_module.e2e))
    assert str(path) in str(info.value) and message in str(info.value)
    done = cli("e2e", "--suite", str(path), timeout=60)
    assert done.returncode == 2 and message in " ".join(done.stderr.split())


def test_unknown_suite_names_the_shipped_ones():
    done = cli("e2e", "--suite", "no-such-suite", timeout=60)
    assert done.returncode == 2 and "ci-cpu" in done.stderr


def test_options_on_the_command_line_override_the_suite(tmp_path):
    out = tmp_path / "e2e.csv"
    done = cli("e2e", "--suite", "ci-cpu", "--cv", "0.25", "--repeats", "1", "--strategies", "replicated,dwdp", "--no-progress", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["cv"] for r in rows} == {"0.25"} and {r["strategy"] for r in rows} == {"replicated", "dwdp"}
    assert {r["isl"] for r in rows} == {"48"} and {r["world_size"] for r in rows} == {"2"}  # from the suite
