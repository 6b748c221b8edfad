"""The API operations the gateway serves, each declared once.

An operation is everything the request path needs to know about one kind of call:
the client routes that reach it (OpenAI shape `/v1/{name}`, Azure shape
`/openai/deployments/{deployment}/{name}`), the checks of its own body fields, how
its cost is estimated, where the region reports its usage, and how it streams.
The request path (`balancer.gateway.proxy`) reads these fields and nothing else, so
a new operation is one entry in `OPERATIONS` (and the functions it names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from balancer import bodies, cost
from balancer.sse import ResponseEventTap, StreamFormat, StreamTap, UsageTap
from balancer.usage import (
    Usage,
    completion_usage,
    never_deferred,
    response_deferred,
    response_usage,
)


def _completion_stream(strip_usage_chunk: bool) -> StreamTap:
    return UsageTap(strip_usage_chunk, completion_usage)


# Chat and completions stream `data:` chunks ending with `[DONE]`; the usage comes only
# when the request asks for it.
COMPLETION_STREAM = StreamFormat(tap=_completion_stream, ask_usage=True)


def _response_stream(strip_usage_chunk: bool) -> StreamTap:
    return ResponseEventTap(strip_usage_chunk, response_usage)


# Responses API streams always end with an event carrying the whole response, usage
# included: nothing to ask for.
RESPONSE_STREAM = StreamFormat(tap=_response_stream, ask_usage=False)


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # the path after /v1/ and after the Azure deployment; also a metric label
    title: str  # for error messages
    check: Callable[[dict[str, Any]], None]  # the operation's own fields; raises ClientError
    prompt_tokens: Callable[[dict[str, Any]], int]  # estimated input tokens
    completion_budget: Callable[[dict[str, Any], int], int]  # tokens the region reserves
    usage: Callable[[Any], Usage | None]  # from the region's JSON answer
    stream: StreamFormat | None = None  # None: cannot be streamed
    # Azure serves it under /openai/deployments/{deployment}/{name}; False: only with the
    # deployment as the body's `model` (/openai/{name}?api-version=, /openai/v1/{name}).
    deployment_route: bool = True
    # It creates an object stored in the region that served it (a response): follow-ups
    # naming its id must go to that region (balancer.gateway.affinity).
    stateful: bool = False
    # An answer without usage that is not broken: it reports usage later (a background
    # response); the reservation stands.
    deferred: Callable[[Any], bool] = never_deferred

    @property
    def openai_path(self) -> str:
        return f"/v1/{self.name}"

    def estimate(self, body: dict[str, Any], default_max_tokens: int, context: int = 0
                 ) -> cost.Estimate:
        """`context`: tokens the region adds to the input (a previous response's)."""
        return cost.Estimate(self.prompt_tokens(body) + context,
                             self.completion_budget(body, default_max_tokens))


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("chat/completions", "Chat completions", bodies.check_chat,
              cost.chat_prompt_tokens, cost.completion_budget, completion_usage,
              COMPLETION_STREAM),
    Operation("completions", "Completions", bodies.check_completion,
              cost.prompt_field_tokens, cost.completion_budget, completion_usage,
              COMPLETION_STREAM),
    Operation("embeddings", "Embeddings", bodies.check_embedding,
              cost.input_field_tokens, cost.no_completion, completion_usage),
    Operation("responses", "Responses", bodies.check_response,
              cost.response_input_tokens, cost.output_budget, response_usage,
              RESPONSE_STREAM, deployment_route=False, stateful=True,
              deferred=response_deferred),
)}

NAMES = tuple(OPERATIONS)
