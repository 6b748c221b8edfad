"""Parse and check a client's request body: only what the gateway needs.

The body is forwarded as the client sent it (the upstream validates the rest),
so this checks just the fields that drive routing and cost, and refuses with
a precise 400 anything that would make the estimate meaningless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from balancer.errors import ClientError

MAX_TOKENS_LIMIT = 1_000_000  # above any model's context; bounds the debt one request can make
# Deepest JSON nesting accepted. Real requests, tool schemas included, stay far below;
# deeper bodies only serve to exhaust recursion in whatever parses them next (ours:
# the cost estimate; the upstream's), so they are refused here, before any region.
MAX_DEPTH = 64


@dataclass(slots=True)
class ClientRequest:
    operation: str  # "chat/completions" | "completions" | "embeddings"
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk itself


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ClientError:
    return ClientError(400, message, code, param=param)


def parse(operation: str, raw: bytes, path_model: str | None) -> ClientRequest:
    if not raw:
        raise _bad("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except ValueError:
        raise _bad("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", code="invalid_json")
    # Counting brackets (strings included) over-estimates the depth: the walk runs
    # only for the rare body that might be too deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise _too_deep()

    model = path_model if path_model is not None else body.get("model")
    if path_model is None:
        if model is None:
            raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
        if not isinstance(model, str) or not model:
            raise _bad("'model' must be a non-empty string.", "model", "invalid_type")

    if operation == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array.", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"'messages[{i}]' must be an object with a string 'role'.",
                           f"messages[{i}]")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _bad(f"'messages[{i}].content' must be a string or an array.",
                           f"messages[{i}].content")
    elif operation == "completions":
        if not _text_input(body.get("prompt")):
            raise _bad("'prompt' must be a string or an array of strings or tokens.", "prompt")
    elif operation == "embeddings":
        if not _text_input(body.get("input")) or body.get("input") in ("", []):
            raise _bad("'input' must be a non-empty string or array.", "input")

    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT):
            raise _bad(f"'{name}' must be an integer between 1 and {MAX_TOKENS_LIMIT}.", name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise _bad("'n' must be an integer between 1 and 128.", "n")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    if stream and operation == "embeddings":
        raise _bad("Embeddings cannot be streamed.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage") is True)
    return ClientRequest(operation, model, body, raw, stream, include_usage)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# json.loads, minus NaN and Infinity: Python accepts them, JSON (and so the upstream)
# does not. One decoder for all: json.loads with a keyword builds one per call.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _too_deep() -> ClientError:
    return _bad(f"The request body nests JSON deeper than {MAX_DEPTH} levels.",
                code="invalid_json")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_input(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) or _is_int(v) or
                   (isinstance(v, list) and all(_is_int(t) for t in v)) for v in value)
    return False
