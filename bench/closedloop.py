"""Closed-loop HTTP load in Python, for machines without `wrk`: `concurrency` loops per
process, each sending the next request as soon as the previous one is answered.

    python -m bench.closedloop --url URL --body-file F --concurrency 16 --duration 5

The overhead benchmark runs several of these processes when wrk is missing; one Python
process tops out at a few thousand requests per second, so its own ceiling (the direct
row) is reported beside the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def run(url: str, body: bytes, headers: dict[str, str], concurrency: int,
              duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        started = time.perf_counter()
        end = started + duration

        async def loop() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    errors["connect"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors["status"] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": elapsed, "errors": errors,
            "latencies": latencies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.closedloop", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--header", action="append", default=[], help="NAME=VALUE")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    headers = {"Content-Type": "application/json", **dict(h.split("=", 1) for h in args.header)}
    with open(args.body_file, "rb") as f:
        body = f.read()
    result = asyncio.run(run(args.url, body, headers, args.concurrency, args.duration))
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
