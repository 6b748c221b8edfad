"""The README's metric table is the contract with dashboards: it lists every metric."""

from __future__ import annotations

from pathlib import Path

from balancer.metrics import Metrics


def test_every_metric_is_documented_in_the_readme() -> None:
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    metrics = Metrics()
    for name, metric in vars(metrics).items():
        if name == "registry":
            continue
        kind = type(metric).__name__.lower()
        full = metric._name + ("_total" if kind == "counter" else "")
        assert f"| `{full}` | {kind} |" in readme, f"{full} is missing from README.md"
        assert full.startswith("balancer_")
