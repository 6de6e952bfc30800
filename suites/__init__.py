"""Declarative benchmark suites (TOML), shipped with the package: `--suite NAME` finds NAME.toml here."""
