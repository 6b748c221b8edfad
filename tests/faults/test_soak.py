"""The soak's 60-second CI variant (15 s warm-up + 45 s measured): `bench/soak.py` runs
a gateway, the simulator and Redis as real processes under a mixed, slightly hostile
load; RSS must grow less than 10% after warm-up and idle descriptors must not grow.
The full run is `python -m bench.soak` (10 minutes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.faults.harness import Row, record
from tests.procs import PYTHON, ROOT

pytestmark = pytest.mark.slow


def test_soak_60_seconds(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([PYTHON, "-m", "bench.soak", "--minutes", "0.75", "--warmup", "15",
                           "--out", str(out), "--workdir", str(tmp_path), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    after = [s for s in report["samples"] if s["t"] >= report["warmup"]]
    lags = sorted(s["loop_lag_ms"] for s in after)
    outcomes = report["outcomes"]
    failed = sum(n for k, n in outcomes.items() if k.startswith(("5", "client error",
                                                                "stream error", "gateway")))
    record(Row("soak", "Soak, CI variant (60 s: 15 s warm-up + 45 s)",
               "40 rps, 1 replica + Redis, mixed and hostile", sum(outcomes.values()), failed,
               "0; RSS +<10%, no descriptor growth", 0, report["verdict"],
               {"outcomes": outcomes, "lag_ms_max": lags[-1] if lags else None}))
    assert proc.returncode == 0 and report["passed"], report["verdict"]
    assert failed == 0, outcomes
    assert lags and lags[-1] < 250, lags[-5:]  # nothing blocks the loop for long
