"""Peer gateways for side-by-side rows (`balancer bench overhead --peers litellm`).

Each peer lives in a virtual environment of its own under bench/.peers/<name>/ (git
ignores it), installed once at a pinned version and reused while that version is the one
installed, so its dependencies never touch the project's.

LiteLLM is pinned to 1.106.12 with its proxy extra: 1.107.0 was a compromised release
(never install it) and the 1.110 series does not install here. Its proxy runs with one
worker, no database, no callbacks or telemetry, the cost map from the package
(LITELLM_LOCAL_MODEL_COST_MAP: no download at start), a master key, and the simulator's
Azure route as its only deployment: the same upstream as every other path.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import API_VERSION, SIM_KEY
from bench.procs import PYTHON, Procs

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
PEERS = ("litellm",)

LITELLM_VERSION = "1.106.12"
LITELLM_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
LITELLM_KEY = "sk-bench-master"
INSTALL_TIMEOUT = 900.0  # seconds: a cold install downloads ~100 MB of wheels

LITELLM_CONFIG = """
model_list:
  - model_name: gpt-4
    litellm_params:
      model: azure/gpt-4
      api_base: {sim}/bench
      api_key: {key}
      api_version: "{version}"
litellm_settings:
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
  set_verbose: false
  json_logs: false
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  disable_spend_logs: true
  disable_error_logs: true
"""


@dataclass
class Installed:
    """A peer's console script, its version, and how long installing it took (None when
    an existing installation was reused)."""

    binary: Path
    version: str
    install_seconds: float | None


def installed_version(venv: Path, package: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                          f"print(m.version({package!r}))"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_litellm(log: Path, venv: Path | None = None) -> Installed:
    """LiteLLM's proxy at the pinned version in bench/.peers/litellm, installed when missing
    or at another version (pip's output goes to `log`); RuntimeError with the reason when
    that fails (no network to PyPI, a build error)."""
    venv = venv or PEERS_DIR / "litellm"
    binary = venv / "bin" / "litellm"
    version = installed_version(venv, "litellm")
    if version == LITELLM_VERSION and binary.exists():
        return Installed(binary, version, None)
    started = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        steps = [[PYTHON, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                  "--disable-pip-version-check", LITELLM_REQUIREMENT]]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=INSTALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{cmd[-1]} took over {INSTALL_TIMEOUT:.0f} s") from None
            if done.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"`pip install '{LITELLM_REQUIREMENT}'` failed: "
                                   + " / ".join(tail)[:400])
    version = installed_version(venv, "litellm")
    if version != LITELLM_VERSION or not binary.exists():
        raise RuntimeError(f"installed litellm {version}, not {LITELLM_VERSION}")
    return Installed(binary, version, time.monotonic() - started)


def start_litellm(procs: Procs, workdir: Path, sim: str, binary: Path,
                  timeout: float = 120.0) -> tuple[str, dict[str, str]]:
    """LiteLLM's proxy (1 worker) in front of the simulator at `sim`; its base URL and the
    headers a client sends. Its start takes ~10-30 s (imports)."""
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(sim=sim, key=SIM_KEY, version=API_VERSION))
    env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "STORE_MODEL_IN_DB": "False",
           "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True", "NO_REDOC": "True"}
    server = procs.launch("litellm", [str(binary), "--config", str(config), "--host",
                                      "127.0.0.1", "--port", "{port}", "--num_workers", "1"],
                          "/health/liveliness", env)
    procs.ready(server, timeout=timeout)
    return server.url, {"Authorization": f"Bearer {LITELLM_KEY}"}
