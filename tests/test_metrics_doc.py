"""The README's metric table is the contract with dashboards: it lists every metric,
exactly as `python -m balancer.metrics` renders the definitions."""

from __future__ import annotations

from pathlib import Path

from balancer.metrics import markdown


def test_readme_metric_table_matches_the_definitions() -> None:
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    assert markdown() in readme, "regenerate the table: python -m balancer.metrics"
    for line in markdown().splitlines()[2:]:
        assert line.startswith("| `balancer_")
