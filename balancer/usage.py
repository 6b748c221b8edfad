"""The token usage a region reports, read from a response body or a stream event.

Each API operation names its reader in `balancer.operations`; the reservation is
settled with what it returns.
"""

from __future__ import annotations

from typing import Any

Usage = tuple[int, int]  # (prompt or input tokens, completion or output tokens)


def completion_usage(payload: Any) -> Usage | None:
    """`usage.prompt_tokens` / `usage.completion_tokens` (chat, completions, embeddings;
    also the final chunk of a stream that asked for `include_usage`)."""
    return _read(payload, "prompt_tokens", "completion_tokens")


def response_usage(payload: Any) -> Usage | None:
    """The Responses API: `usage.input_tokens` / `usage.output_tokens` of a response
    object, or of the `response` a stream's final event carries."""
    if isinstance(payload, dict) and isinstance(payload.get("response"), dict):
        payload = payload["response"]  # response.completed / .incomplete / .failed
    return _read(payload, "input_tokens", "output_tokens")


def response_deferred(payload: Any) -> bool:
    """A background response answers at once, queued, and reports its usage only when
    retrieved later: no usage now is not a broken answer."""
    return isinstance(payload, dict) and payload.get("status") in ("queued", "in_progress")


def never_deferred(payload: Any) -> bool:
    return False


def _read(payload: Any, prompt_key: str, completion_key: str) -> Usage | None:
    """The two counts of `payload["usage"]`; a missing completion count is 0
    (embeddings have none)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get(prompt_key)
    completion = usage.get(completion_key, 0) or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion
