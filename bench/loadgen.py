"""Open-loop load generator: sends at a fixed rate whatever the answers, like a
fleet of independent workers, and reports what the clients saw.

    python -m bench.loadgen --target http://127.0.0.1:8080 --rate 40 --duration 30

Open loop matters: a closed loop (wait for an answer before sending the next)
slows down when the gateway does, hiding overload. Several processes can share
one load; each writes its own JSON report (`--out`), merged with `merge`.

`--operation responses` sends the same mix as Responses API calls (`POST /v1/responses`,
`input` and `max_output_tokens`); the report is the same: its `usage.input_tokens` /
`output_tokens` count as prompt / completion tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

# --operation: the path after /v1/ each one is sent to
OPERATIONS = {"chat": "chat/completions", "responses": "responses"}
# The last event of a Responses API stream: it carries the response, usage included.
RESPONSE_FINAL = ("response.completed", "response.incomplete", "response.failed")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


@dataclass
class Mix:
    """The request mix: token ranges are inclusive; a prompt token is ~4 characters.
    `operation` (chat | responses) only shapes the bodies: one seed draws the same
    prompts, budgets and streams, hence the same estimated costs, for both."""

    model: str = "gpt-4"
    prompt_tokens: tuple[int, int] = (200, 3000)
    max_tokens: tuple[int, int] = (50, 1000)
    stream_fraction: float = 0.2
    operation: str = "chat"

    @property
    def path(self) -> str:
        return f"/v1/{OPERATIONS[self.operation]}"

    def body(self, rng: random.Random) -> dict[str, Any]:
        n = rng.randint(*self.prompt_tokens)
        # ~4 chars per token; a word of the list plus a space is ~6 chars
        text = " ".join(rng.choice(WORDS) for _ in range(max(1, n * 4 // 6)))
        budget = rng.randint(*self.max_tokens)
        body: dict[str, Any] = {"model": self.model}
        if self.operation == "responses":  # one user message, as a plain string
            body |= {"input": text, "max_output_tokens": budget}
        else:
            body |= {"messages": [{"role": "user", "content": text}], "max_tokens": budget}
        if rng.random() < self.stream_fraction:
            body["stream"] = True
        return body


def span(text: str) -> tuple[int, int]:
    """An inclusive token range of the command line: "200:3000" -> (200, 3000)."""
    low, high = (int(x) for x in text.split(":"))
    return low, high


@dataclass
class Report:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "429", "error:<kind>"
    regions: Counter[str] = field(default_factory=Counter)  # successes per serving region
    tokens: Counter[str] = field(default_factory=Counter)  # prompt / completion, from usage
    latencies: list[float] = field(default_factory=list)  # seconds, successes only
    errors: list[str] = field(default_factory=list)  # first few client-visible failures
    timeline: list[tuple[float, str, str, int]] = field(default_factory=list)

    def record_error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text[:300])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"], out["regions"] = dict(self.statuses), dict(self.regions)
        out["tokens"] = dict(self.tokens)
        return out


class Failed(Exception):
    """A 200 whose answer failed: an error event in a stream, a Responses API stream cut
    before its final event, or a response whose status is `failed`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


async def chat_stream(r: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """`data:` chunks; the usage rides the last one when asked for."""
    usage = None
    async for line in r.content:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                raise Failed("stream", json.dumps(event))
            usage = event.get("usage") or usage
    return usage


async def response_stream(r: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """Named events; the stream ends with response.completed (or .incomplete, like chat's
    finish_reason "length", a success) whose `response.usage` is the usage; .failed, an
    error event or an end without a final event is a failure. There is no [DONE]: read on
    to the end of the body, as for chat (leaving at the final event would close the
    connection under the server's last write)."""
    final: dict[str, Any] | None = None
    async for line in r.content:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        kind = event.get("type")
        if kind == "error" or "error" in event:  # the API's error event, or the gateway's
            raise Failed("stream", json.dumps(event))
        if kind in RESPONSE_FINAL:
            final = event.get("response") or {}
            if kind == "response.failed":
                raise Failed("failed", json.dumps(final.get("error")))
    if final is None:
        raise Failed("truncated", "the stream ended without response.completed")
    return response_usage(final)


def response_usage(response: dict[str, Any]) -> dict[str, Any] | None:
    """A response's usage in chat's terms, so that the report reads the same."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": usage.get("total_tokens", prompt + completion)}


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], report: Report,
              started: float, headers: dict[str, str], operation: str = "chat") -> None:
    t0 = time.perf_counter()
    responses = operation == "responses"
    try:
        async with session.post(url, json=body, headers=headers) as r:
            region = r.headers.get("x-balancer-region", "none")
            usage = None
            if body.get("stream") and r.status == 200:
                usage = await (response_stream(r) if responses else chat_stream(r))
            else:
                payload = await r.read()
                if r.status == 200:
                    answer = json.loads(payload)
                    if not responses:
                        usage = answer.get("usage")
                    elif answer.get("status") == "failed":
                        raise Failed("failed", json.dumps(answer.get("error")))
                    else:
                        usage = response_usage(answer)
                elif r.status != 429:
                    report.record_error(f"{r.status} {payload[:200]!r}")
            status = str(r.status)
    except Failed as exc:
        report.statuses[f"error:{exc.kind}"] += 1
        report.record_error(f"{exc.kind}: {exc}")
        return
    except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as exc:
        report.statuses[f"error:{type(exc).__name__}"] += 1
        report.record_error(repr(exc))
        return
    report.statuses[status] += 1
    tokens = 0
    if status == "200":
        report.regions[region] += 1
        report.latencies.append(time.perf_counter() - t0)
        if usage:
            report.tokens["prompt"] += usage.get("prompt_tokens", 0)
            report.tokens["completion"] += usage.get("completion_tokens", 0)
            tokens = usage.get("total_tokens", 0)
    report.timeline.append((round(time.perf_counter() - started, 3), status, region, tokens))


async def run(targets: list[str], rate: float, duration: float, mix: Mix, *, seed: int = 0,
              api_key: str | None = None, path: str | None = None,
              max_in_flight: int = 2000) -> Report:
    """Send `rate` requests per second for `duration` seconds, round-robin over targets,
    to `path` (default: the mix's operation's)."""
    path = path or mix.path
    rng = random.Random(seed)
    report = Report()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        interval = 1.0 / rate
        while True:
            due = started + report.sent * interval
            now = time.perf_counter()
            if due - started >= duration:
                break
            if due > now:
                await asyncio.sleep(due - now)
            url = targets[report.sent % len(targets)] + path
            task = asyncio.create_task(one(session, url, mix.body(rng), report, started, headers,
                                           mix.operation))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            report.sent += 1
        if tasks:
            await asyncio.gather(*tasks)
    return report


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sent": 0, "statuses": Counter(), "regions": Counter(),
                           "tokens": Counter(), "latencies": [], "errors": [], "timeline": []}
    for r in reports:
        out["sent"] += r["sent"]
        for key in ("statuses", "regions", "tokens"):
            out[key].update(r[key])
        out["latencies"] += r["latencies"]
        out["errors"] += r["errors"]
        out["timeline"] += r["timeline"]
    for key in ("statuses", "regions", "tokens"):
        out[key] = dict(out[key])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--target", action="append", required=True, help="gateway base URL (repeat)")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--prompt-tokens", default="200:3000")
    p.add_argument("--max-tokens", default="50:1000")
    p.add_argument("--stream-fraction", type=float, default=0.2)
    p.add_argument("--operation", choices=list(OPERATIONS), default="chat",
                   help="chat: /v1/chat/completions; responses: /v1/responses (chat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--start-at", type=float, default=0.0,
                   help="wall-clock time (time.time()) to start sending at, so that several "
                        "processes can be spawned early and start on schedule")
    p.add_argument("--out", help="write the JSON report here (default stdout)")
    args = p.parse_args(argv)
    mix = Mix(args.model, span(args.prompt_tokens), span(args.max_tokens), args.stream_fraction,
              args.operation)
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    report = asyncio.run(run(args.target, args.rate, args.duration, mix, seed=args.seed,
                             api_key=args.api_key))
    text = json.dumps(report.to_json())
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
