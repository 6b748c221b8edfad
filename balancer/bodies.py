"""Each API operation's own body fields, checked before any region sees them.

`balancer.operations` names the check of each operation; `balancer.validate` runs it
after the checks every operation shares.
"""

from __future__ import annotations

from typing import Any

from balancer.errors import ClientError


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ClientError:
    """A 400 naming the offending parameter."""
    return ClientError(400, message, code, param=param)


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
