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
from balancer.sse import StreamFormat, StreamTap, UsageTap
from balancer.usage import Usage, completion_usage


def _completion_stream(strip_usage_chunk: bool) -> StreamTap:
    return UsageTap(strip_usage_chunk, completion_usage)


# Chat and completions stream `data:` chunks ending with `[DONE]`; the usage comes only
# when the request asks for it.
COMPLETION_STREAM = StreamFormat(tap=_completion_stream, ask_usage=True)


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # the path after /v1/ and after the Azure deployment; also a metric label
    title: str  # for error messages
    check: Callable[[dict[str, Any]], None]  # the operation's own fields; raises ClientError
    prompt_tokens: Callable[[dict[str, Any]], int]  # estimated input tokens
    completion_budget: Callable[[dict[str, Any], int], int]  # tokens the region reserves
    usage: Callable[[Any], Usage | None]  # from the region's JSON answer
    stream: StreamFormat | None = None  # None: cannot be streamed

    @property
    def openai_path(self) -> str:
        return f"/v1/{self.name}"

    def estimate(self, body: dict[str, Any], default_max_tokens: int) -> cost.Estimate:
        return cost.Estimate(self.prompt_tokens(body),
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
)}

NAMES = tuple(OPERATIONS)
