"""Azure-like simulated regions: real HTTP upstreams with TPM/RPM limits, 429s and SSE.

One aiohttp app serves many regions, each under a path prefix (`http://HOST:PORT/eastus2`),
in both wire shapes:

- Azure:  POST /{region}/openai/deployments/{deployment}/{op}?api-version=...  (`api-key` header)
- OpenAI: POST /{region}/v1/{op}, the deployment named by body["model"]  (`Authorization: Bearer`)

with op one of chat/completions, completions, embeddings. Admission copies Azure: the
*estimated* cost (the operation's `prompt_tokens` + `completion_budget` from
`balancer.operations`, the gateway's own estimate) is charged to a token bucket holding
`token_window_seconds` of the TPM quota, beside a request bucket for RPM, and nothing is
refunded after the answer. A refused request gets 429 with
`retry-after` / `retry-after-ms` in real seconds.

Fault knobs live on `SimRegion` and change at run time with POST /_sim/regions/{region};
GET /_sim/stats and POST /_sim/reset serve tests and benchmarks.

Choices the brief left open:
- a missing api-version answers 404 "Resource not found", as Azure does;
- `fail_rate` is drawn before admission and charges nothing (the backend refused the call);
  `hang`, `malformed` and `reset_after_chunks` strike after admission, so they are charged;
  all four count in the `failed` stat;
- a stream with `reset_after_chunks` set never completes: it is cut after N chunks, or just
  before `data: [DONE]` when it is shorter; the knob does not affect non-stream answers;
- `prompt + completion budget` above CONTEXT_TOKENS is refused with 400, which also bounds the
  size of the text we generate;
- `create_app` deep-copies the regions, so apps built from one config never share knobs.

Modules, each with one job:

- `config`:    SimConfig, SimRegion, SimDeployment, the reference regions, knob validation;
- `buckets`:   the admission state of one (region, deployment): buckets, windows, stats;
- `state`:     `Simulator`, the whole state of one app;
- `errors`:    OpenAI-shaped error answers;
- `responses`: completion and embedding bodies, stream chunks;
- `handlers`:  the Azure and OpenAI routes: auth, estimate, admission, faults, answer;
- `control`:   the /_sim endpoints;
- `app`:       `create_app` and `start`;
- `twin`:      the simulated twin of a gateway Config (`serve --simulate`);
- `cli`:       `balancer simulate` and `python -m balancer.sim`.
"""

from balancer.sim.app import create_app, start
from balancer.sim.cli import add_arguments, config_from_args, main_async, run
from balancer.sim.config import (
    REFERENCE_TPM,
    SimConfig,
    SimDeployment,
    SimRegion,
    reference_regions,
    region_knobs,
)
from balancer.sim.state import SIMULATOR, Clock, Simulator
from balancer.sim.twin import sim_key, simulator_config, with_simulated_endpoints

__all__ = [
    "REFERENCE_TPM",
    "SIMULATOR",
    "Clock",
    "SimConfig",
    "SimDeployment",
    "SimRegion",
    "Simulator",
    "add_arguments",
    "config_from_args",
    "create_app",
    "main_async",
    "reference_regions",
    "region_knobs",
    "run",
    "sim_key",
    "simulator_config",
    "start",
    "with_simulated_endpoints",
]
