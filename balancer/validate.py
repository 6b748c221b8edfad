"""Parse and check a client's request body: only what the gateway needs.

The body is forwarded as the client sent it (the upstream validates the rest),
so this checks just the fields that drive routing and cost, and refuses with
a precise 400 anything that would make the estimate meaningless. The checks of
one operation's own fields are in `balancer.bodies`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from balancer.bodies import bad, check_budget, is_int
from balancer.errors import ClientError
from balancer.operations import Operation

# Deepest JSON nesting accepted. Real requests, tool schemas included, stay far below;
# deeper bodies only serve to exhaust recursion in whatever parses them next (ours:
# the cost estimate; the upstream's), so they are refused here, before any region.
MAX_DEPTH = 64


@dataclass(slots=True)
class ClientRequest:
    op: Operation
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk itself


def parse(op: Operation, raw: bytes, path_model: str | None) -> ClientRequest:
    """The client's body checked: JSON, its model, the fields every operation shares,
    then the operation's own (`op.check`)."""
    if not raw:
        raise bad("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        body = _DECODER.decode(text)
    except _DuplicateKey:
        raise _duplicate(text) from None
    except ValueError:
        raise bad("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    # Counting brackets (strings included) over-estimates the depth: the walk runs
    # only for the rare body that might be too deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise _too_deep()

    model = path_model if path_model is not None else body.get("model")
    if path_model is None:
        if model is None:
            raise bad("you must provide a model parameter", "model", "missing_required_parameter")
        if not isinstance(model, str) or not model:
            raise bad("'model' must be a non-empty string.", "model", "invalid_type")

    op.check(body)

    for name in ("max_tokens", "max_completion_tokens"):
        check_budget(body, name)
    n = body.get("n")
    if n is not None and (not is_int(n) or not 1 <= n <= 128):
        raise bad("'n' must be an integer between 1 and 128.", "n")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean.", "stream", "invalid_type")
    if stream and op.stream is None:
        raise bad(f"{op.title} cannot be streamed.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage") is True)
    return ClientRequest(op, model, body, raw, stream, include_usage)


# --------------------------------------------------------------------------- helpers


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, refused when a key repeats: Python's json keeps the last value, other
    parsers (the region's) may keep the first, so the gateway would route, check and
    charge one request while the region serves another."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise _DuplicateKey
    return obj


# json.loads, minus NaN and Infinity (Python accepts them, JSON and so the upstream do
# not) and duplicate keys. One decoder for all: json.loads with a keyword builds one per
# call.
_DECODER = json.JSONDecoder(parse_constant=_not_json, object_pairs_hook=_unique)


class _Pairs(list[tuple[str, Any]]):
    """An object's (key, value) pairs, every one kept."""


def _duplicate(text: str) -> ClientError:
    """The 400 for a body with a repeated key, naming where it is (`messages[0].content`):
    only then is the body parsed again, keeping every pair."""
    try:
        path = _duplicate_path(json.JSONDecoder(object_pairs_hook=_Pairs).decode(text))
    except (ValueError, RecursionError):  # past the duplicate, it was not JSON anyway
        path = ""
    where = f"the key '{path}'" if path else "a key"
    return bad(f"The request body has {where} more than once: send each key once (the "
               "gateway and the region could read different values).", path or None,
               "duplicate_key")


def _duplicate_path(tree: Any) -> str:
    """The path of the first repeated key (depth first, in document order; iterative: no
    recursion). Paths are cut at 256 characters as they are built, so a body of long keys
    cannot make them large."""
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for key, _ in node:
                if key in seen:
                    return _child(path, key)
                seen.add(key)
            stack.extend(reversed([(value, _child(path, key)) for key, value in node]))
        elif isinstance(node, list):
            stack.extend(reversed([(v, f"{path}[{i}]"[:256]) for i, v in enumerate(node)]))
    return ""


def _child(path: str, key: str) -> str:
    return (f"{path}.{key}" if path else key)[:256]


def _too_deep() -> ClientError:
    return bad(f"The request body nests JSON deeper than {MAX_DEPTH} levels.",
                code="invalid_json")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iterative: no recursion).
    Level by level, one list comprehension each: ~4x faster on a 200 KB body than a
    stack of (node, depth) pairs (BENCHMARKS.md 2 (b)). Parsed JSON holds only exact
    dicts and lists."""
    level = [value]
    for _ in range(limit):
        level = [c for node in level for c in (node.values() if type(node) is dict else node)
                 if type(c) is dict or type(c) is list]
        if not level:
            return False
    return True
