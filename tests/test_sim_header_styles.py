"""The simulator's rate-limit header styles (`throttle_headers`): what successes and
429s say in each, and the CLI option that sets it for every region."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from balancer.sim import cli
from balancer.sim.ratelimit import whole_seconds
from tests.test_simulator import AZURE_CHAT, CHAT, FakeClock, config, headers, make_client, region

__all__ = ["make_client"]  # the fixture, used by name

REMAINING = ("x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests")


async def exchange(make_client: Any, style: str, time_scale: float = 1.0
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """The headers of a success and of the 429 right after it (RPM 60: one request)."""
    client = await make_client(config(region(rpm=60, throttle_headers=style),
                                      time_scale=time_scale), FakeClock())
    ok = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    refused = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert (ok.status, refused.status) == (200, 429)
    return ({k.lower(): v for k, v in ok.headers.items()},
            {k.lower(): v for k, v in refused.headers.items()})


async def test_precise_reports_remaining_only_on_successes(make_client: Any) -> None:
    """The tester's Azure look-alike: a precise retry-after-ms, no counts on a 429."""
    ok, refused = await exchange(make_client, "precise")
    assert all(int(ok[h]) >= 0 for h in REMAINING)
    assert not any(h in refused for h in REMAINING)
    assert int(refused["retry-after-ms"]) > 0 and refused["retry-after"] == "1"


@pytest.mark.parametrize("style", ["seconds", "retry-after-only"])
async def test_whole_seconds_only(make_client: Any, style: str) -> None:
    """Azure's Responses API, aoai-api-simulator: a whole-second retry-after, remaining
    -1 (`seconds`) or no x-ratelimit-* header at all (`retry-after-only`)."""
    ok, refused = await exchange(make_client, style)
    assert "retry-after-ms" not in refused and refused["retry-after"] == "1"
    for resp in (ok, refused):
        if style == "seconds":
            assert all(resp[h] == "-1" for h in REMAINING)
        else:
            assert not any(h.startswith("x-ratelimit") for h in resp)
    _, compressed = await exchange(make_client, style, time_scale=10)
    assert compressed["retry-after"] == "0.1"  # a whole simulated second, in real ones


def test_whole_seconds_round_up_to_simulated_seconds() -> None:
    assert [whole_seconds(w, 1) for w in (0.001, 1.0, 2.5)] == ["1", "1", "3"]
    assert [whole_seconds(w, 10) for w in (0.001, 0.3, 0.31)] == ["0.1", "0.3", "0.4"]
    assert whole_seconds(0.001, 20) == "0.1"  # no finer than a simulated second
    assert whole_seconds(0.5, 0.5) == "1"  # slowed-down time: real whole seconds


def test_cli_sets_every_region_style() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.config_from_args(parser.parse_args(["--throttle-headers", "seconds"]))
    assert {r.throttle_headers for r in cfg.regions} == {"seconds"}
    default = cli.config_from_args(parser.parse_args([]))
    assert {r.throttle_headers for r in default.regions} == {"normal"}
