"""The event loop `balancer serve` and `balancer simulate` run on (balancer/eventloop.py):
uvloop by default, asyncio's own loop on request, a wrong choice refused with a clear
message. End to end on real processes: the gateway serves on either loop."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from balancer import eventloop
from bench.procs import post_json
from tests.procs import PYTHON, ROOT, Procs

CHAT = {"model": "gpt-4", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.mark.parametrize("value,expected", [(None, "uvloop"), ("auto", "uvloop"),
                                            ("uvloop", "uvloop"), ("ASYNCIO", "asyncio"),
                                            ("", "uvloop")])
def test_the_default_is_uvloop_and_asyncio_can_be_asked_for(
        monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str) -> None:
    if value is None:
        monkeypatch.delenv("BALANCER_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("BALANCER_EVENT_LOOP", value)
    assert eventloop.name() == expected


def test_run_runs_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def kind() -> type:
        return type(asyncio.get_running_loop())

    monkeypatch.setenv("BALANCER_EVENT_LOOP", "uvloop")
    assert eventloop.run(kind()) is uvloop.Loop
    monkeypatch.setenv("BALANCER_EVENT_LOOP", "asyncio")
    assert not issubclass(eventloop.run(kind()), uvloop.Loop)


def test_a_wrong_choice_is_refused_before_serving(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-m", "balancer.cli", "serve", "--simulate", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "BALANCER_EVENT_LOOP": "trio"})
    assert out.returncode == 2
    assert "BALANCER_EVENT_LOOP='trio'" in out.stderr and "auto, uvloop, asyncio" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_the_gateway_serves_on_either_loop(procs: Procs, choice: str) -> None:
    url = procs.server("gateway", [PYTHON, "-m", "balancer.cli", "serve", "--simulate",
                                   "--host", "127.0.0.1", "--port", "{port}"], "/healthz",
                       {"BALANCER_EVENT_LOOP": choice})
    answer = post_json(f"{url}/v1/chat/completions", CHAT)
    assert answer["object"] == "chat.completion"
    started = [json.loads(line)["message"] for line in procs.log("gateway").splitlines()
               if "balancer listening" in line]
    expected = "uvloop" if choice == "auto" else "asyncio"
    assert len(started) == 1 and started[0].endswith(f"loop {expected})"), started
