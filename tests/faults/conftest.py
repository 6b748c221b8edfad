"""Fixtures of the fault, hostile-input, security and soak suites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Rig
from tests.procs import Procs


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Real processes, stopped at the end whatever happens (SIGTERM, then SIGKILL)."""
    procs = Procs(tmp_path)
    try:
        yield Rig(procs, tmp_path)
    finally:
        procs.close()
