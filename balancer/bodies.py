"""Each API operation's own body fields, checked before any region sees them.

`balancer.operations` names the check of each operation; `balancer.validate` runs it
after the checks every operation shares.
"""

from __future__ import annotations

from typing import Any

from balancer.errors import ClientError

MAX_TOKENS_LIMIT = 1_000_000  # above any model's context; bounds the debt one request can make


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ClientError:
    """A 400 naming the offending parameter."""
    return ClientError(400, message, code, param=param)


def check_budget(body: dict[str, Any], name: str) -> None:
    """A completion budget (`max_tokens`, `max_output_tokens`...), reserved in full: an
    integer from 1 to MAX_TOKENS_LIMIT when present."""
    value = body.get(name)
    if value is not None and (not is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT):
        raise bad(f"'{name}' must be an integer between 1 and {MAX_TOKENS_LIMIT}.", name)


def check_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array.", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"'messages[{i}]' must be an object with a string 'role'.",
                      f"messages[{i}]")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad(f"'messages[{i}].content' must be a string or an array.",
                      f"messages[{i}].content")


def check_completion(body: dict[str, Any]) -> None:
    if not text_input(body.get("prompt")):
        raise bad("'prompt' must be a string or an array of strings or tokens.", "prompt")


def check_embedding(body: dict[str, Any]) -> None:
    if not text_input(body.get("input")) or body.get("input") in ("", []):
        raise bad("'input' must be a non-empty string or array.", "input")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_input(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) or is_int(v) or
                   (isinstance(v, list) and all(is_int(t) for t in v)) for v in value)
    return False


def check_response(body: dict[str, Any]) -> None:
    """Responses API: `input` is a string or a list of items (it may be left out when a
    stored prompt, conversation or previous response supplies the context);
    `instructions` a string; `max_output_tokens` bounded like `max_tokens` (it is
    reserved in full); `previous_response_id` a non-empty string."""
    items = body.get("input")
    if items is None:
        if not any(body.get(k) is not None for k in ("prompt", "conversation",
                                                      "previous_response_id")):
            raise bad("you must provide an input", "input", "missing_required_parameter")
    elif not isinstance(items, str | list) or not all(
            isinstance(i, str | dict) for i in (items if isinstance(items, list) else ())):
        raise bad("'input' must be a string or an array of items.", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("'instructions' must be a string.", "instructions", "invalid_type")
    check_budget(body, "max_output_tokens")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise bad("'previous_response_id' must be a non-empty string.",
                  "previous_response_id", "invalid_type")
