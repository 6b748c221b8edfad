"""Azure-like simulated regions: real HTTP upstreams with TPM/RPM limits, 429s and SSE.

One aiohttp app serves many regions, each under a path prefix (`http://HOST:PORT/eastus2`),
in each wire shape (`balancer.sim.routes`):

- Azure:    POST /{region}/openai/deployments/{deployment}/{op}?api-version=...  (`api-key`),
            op one of chat/completions, completions, embeddings;
- Azure:    POST /{region}/openai/responses?api-version=..., the deployment in body["model"];
- Azure v1: POST /{region}/openai/v1/{op}, body["model"], `api-key` or Bearer, no api-version;
- OpenAI:   POST /{region}/v1/{op}, body["model"]  (`Authorization: Bearer`)

with op in the last two one of chat/completions, completions, embeddings, responses. A
Responses API response is stored in the region that made it (unless `store` is false);
GET and DELETE .../responses/{id}, POST .../responses/{id}/cancel and
GET .../responses/{id}/input_items reach it under each of the three responses prefixes, and
a `previous_response_id` must name one this region holds. Admission copies Azure: the
*estimated* cost (the operation's `prompt_tokens` + `completion_budget` from
`balancer.operations`, the gateway's own estimate; for a continuation, plus the context of
the response it follows) is charged to a token bucket holding
`token_window_seconds` of the TPM quota, beside a request bucket for RPM, and nothing is
refunded after the answer. A refused request gets 429 with
`retry-after` / `retry-after-ms` in real seconds, except on Azure's Responses API routes
with the region's `responses_headers` "azure" (the default): as Azure does there, remaining
counts are "-1" and a 429 says when to retry only in its message. A deployment with
`sku="provisioned"` is a PTU (`buckets`): it admits while its utilization is under 100%,
corrects each request's estimate to its real cost when it ends, has no RPM limit, answers
429 with a precise `retry-after-ms` (until it is under 100% again) and `retry-after` when
full, and sends `azure-openai-deployment-utilization` instead of remaining counts.

Fault knobs live on `SimRegion` and change at run time with POST /_sim/regions/{region};
GET /_sim/stats and POST /_sim/reset serve tests and benchmarks; the stats' "responses"
part counts, per region, stored responses, calls naming an id and those whose id the
region does not hold (a gateway's affinity should keep that at zero).

Choices the brief left open:
- a missing api-version answers 404 "Resource not found", as Azure does;
- `fail_rate` is drawn before admission and charges nothing (the backend refused the call);
  `hang`, `malformed` and `reset_after_chunks` strike after admission, so they are charged;
  all four count in the `failed` stat;
- a stream with `reset_after_chunks` set never completes: it is cut after N chunks (events),
  or just before `data: [DONE]` (the final response event) when it is shorter; the knob does
  not affect non-stream answers;
- `pad_bytes` makes answers that much larger, still well formed (a gateway's cap on
  upstream bodies): spaces after a whole JSON body, SSE comment events (`: xxx`) after a
  stream's first event; error answers are not padded;
- a background response is answered at once, "queued", and completes on `sim.clock` once the
  latency it would have taken has passed; a streamed one is stored as soon as it starts;
- `prompt + completion budget` above CONTEXT_TOKENS is refused with 400, which also bounds the
  size of the text we generate;
- `create_app` deep-copies the regions, so apps built from one config never share knobs.

Modules, each with one job:

- `config`:    SimConfig, SimRegion, SimDeployment, the reference regions, knob validation;
- `buckets`:   the admission state of one (region, deployment): buckets, windows, stats;
- `store`:     one region's stored responses and its id-lookup counters;
- `state`:     `Simulator`, the whole state of one app;
- `errors`:    OpenAI-shaped error answers;
- `ratelimit`: remaining-quota headers and 429s;
- `answers`:   completion and embedding bodies, stream chunks;
- `response_objects`: Responses API objects, input items and stream events;
- `streaming`: latency, SSE streams and their cut, hangs;
- `routes`:    the URL families: auth, api-version, where the deployment is named;
- `handlers`:  a create request's path: estimate, faults, admission, answer;
- `response_create`: POST responses: its estimate and its answer (whole, stream, background);
- `id_routes`: retrieve, delete, cancel and input_items of a stored response;
- `control`:   the /_sim endpoints;
- `app`:       `create_app` and `start`;
- `twin`:      the simulated twin of a gateway Config (`serve --simulate`);
- `identity`:  Entra ID: a managed identity endpoint (tests) and the token check of a
               region with `auth: "entra"` (key auth disabled);
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
