"""A TLS Redis killed under load: two gateway replicas on `rediss://` with mutual TLS
and an ACL user whose password comes from a ${VAR} in store.url, the simulator as the
regions, a steady open-loop load; the TLS-only redis-server is killed (SIGKILL) and
restarted on its port. As with plain Redis (test_faults.py): no client request fails,
both replicas degrade and resync by themselves, no reservation leaks; and the password
shows in no log line (DEBUG) and no admin answer, the redacted URL does."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.faults.harness import Rig, config_text, get_json, get_text, run_load
from tests.faults.test_faults import _all, _none, _replicas, degraded, finish, wait_for
from tests.store.conftest import RedisServer, free_port, make_tls_files, need_redis_binary

pytestmark = pytest.mark.slow

RATE = 30.0
USER, PASSWORD = "balancer", "tls-fault-pw-Vb73"
ACL = ("--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all", "--user", "default", "off")


async def test_tls_redis_killed_then_restarted(rig: Rig, tmp_path: Path) -> None:
    need_redis_binary()
    tls = make_tls_files(tmp_path / "certs")
    server = RedisServer(free_port(), str(tmp_path), *ACL, username=USER, password=PASSWORD,
                         tls=tls, tls_auth_clients=True).start()
    try:
        store = {"url": f"rediss://{USER}:${{REDIS_PASSWORD}}@127.0.0.1:{server.port}/0",
                 "ca_file": tls.ca, "cert_file": tls.client_cert, "key_file": tls.client_key}
        rig.start(config_text(store=store), redis=False, log_level="DEBUG",
                  env={"REDIS_PASSWORD": PASSWORD})
        assert not any(await degraded(rig))  # on the TLS Redis from the start
        load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=9, seed=31))
        await asyncio.sleep(2)
        await asyncio.to_thread(server.kill)
        to_degrade = await wait_for(lambda: _all(degraded(rig)), 5, "both replicas degraded")
        await asyncio.sleep(2.5)
        await asyncio.to_thread(server.start)  # the same port, TLS, certificates and user
        to_resync = await wait_for(lambda: _none(degraded(rig)), 5, "both replicas resynced")
        outcomes = await load
        await wait_for(lambda: _replicas(rig, 2), 6, "two live replicas after the restart")
        with server.client() as c:
            assert c.keys("bal:{gpt-4}:*"), "no bucket in the restarted Redis"

        outputs = []
        for url in rig.urls:
            outputs += [await get_text(f"{url}/readyz"), await get_text(f"{url}/metrics"),
                        json.dumps(await get_json(f"{url}/regions"))]
        logs = {g.name: rig.log(g) for g in rig.gateways}
        lines = sum(text.count("\n") for text in logs.values())
        leaks = [where for where, text in [*logs.items(), ("admin answers", "\n".join(outputs))]
                 if PASSWORD in text]
        redacted = f"rediss://{USER}:***@127.0.0.1:{server.port}/0"
        await finish(rig, "Redis over mutual TLS (ACL user) killed (SIGKILL) for 2.5 s, then "
                          "restarted", outcomes, load=f"{RATE:.0f} rps for 9 s, 2 replicas",
                     expected_failed=0, expected="0",
                     notes=f"both replicas degraded within {to_degrade + 0.05:.2f} s of the "
                           f"kill and resynced {to_resync:.2f} s after the restart; the Redis "
                           f"password in 0 of {lines} DEBUG log lines and admin answers",
                     degrade_s=round(to_degrade, 2), resync_s=round(to_resync, 2),
                     password_found=leaks, log_lines=lines)
        assert not leaks, leaks
        assert lines > 50
        assert all(redacted in text for text in logs.values()), "no redacted URL at startup"
    finally:
        server.stop()
