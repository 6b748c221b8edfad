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
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0) or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def response_usage(payload: Any) -> Usage | None:
    """The Responses API: `usage.input_tokens` / `usage.output_tokens` of a response
    object, or of the `response` a stream's final event carries."""
    if isinstance(payload, dict) and isinstance(payload.get("response"), dict):
        payload = payload["response"]  # response.completed / .incomplete / .failed
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("input_tokens")
    completion = usage.get("output_tokens", 0) or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion
