"""Token cost of a request, estimated before it is sent.

Azure admits a request by its *estimated* cost: prompt tokens plus the
completion budget (`max_tokens`). We reserve the same figure and settle it
against the real `usage` afterwards, so a fast estimate is enough: about four
characters per token plus a small per-message overhead (the same rule of thumb
OpenAI documents). Pure functions, no I/O; `balancer.operations` says which
estimator each API operation uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # role and separators per chat message
REPLY_PRIMING = 3  # every chat reply is primed with <|start|>assistant<|message|>

@dataclass(frozen=True, slots=True)
class Estimate:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def text_tokens(text: str) -> int:
    """Tokens in a piece of text: ceil(chars / 4), and at least one for non-empty text."""
    n = len(text)
    return (n + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):  # multi-part content: [{"type": "text", "text": ...}, ...]
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += text_tokens(text)
                elif part.get("type") in ("image_url", "input_image"):
                    total += 85  # OpenAI's flat cost of a low-detail image
            elif isinstance(part, str):
                total += text_tokens(part)
        return total
    return 0


def _input_tokens(value: Any) -> int:
    """`prompt` (completions) or `input` (embeddings): a string, a list of strings,
    a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += text_tokens(item)
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


def chat_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat request: every message with its overhead, names,
    tool calls and the tools offered."""
    total = REPLY_PRIMING
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += MESSAGE_OVERHEAD + _content_tokens(message.get("content"))
        name = message.get("name")
        if isinstance(name, str):
            total += text_tokens(name)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            total += text_tokens(str(tool_calls))
    tools = body.get("tools") or body.get("functions")
    if tools:
        total += text_tokens(str(tools))
    return total


def prompt_field_tokens(body: dict[str, Any]) -> int:
    """Completions: the `prompt`."""
    return _input_tokens(body.get("prompt"))


def input_field_tokens(body: dict[str, Any]) -> int:
    """Embeddings: the `input`."""
    return _input_tokens(body.get("input"))


def completion_budget(body: dict[str, Any], default_max_tokens: int) -> int:
    """The completion tokens the upstream will reserve: `max_completion_tokens`,
    else `max_tokens`, else the deployment's default. `n` choices each get the budget."""
    budget = body.get("max_completion_tokens")
    if budget is None:
        budget = body.get("max_tokens")
    if budget is None:
        budget = default_max_tokens
    n = body.get("n")
    choices = n if isinstance(n, int) and n > 0 else 1
    return int(budget) * choices


def no_completion(body: dict[str, Any], default_max_tokens: int) -> int:
    """Embeddings generate nothing: the input is the whole cost."""
    return 0


def response_input_tokens(body: dict[str, Any]) -> int:
    """Responses API: `instructions`, then `input`: a string (one user message) or a
    list of items (messages with string or multi-part content; function calls and their
    outputs, counted by their text), and the tools offered."""
    total = REPLY_PRIMING
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += MESSAGE_OVERHEAD + text_tokens(instructions)
    items = body.get("input")
    if isinstance(items, str):
        items = [{"content": items}]
    for item in items if isinstance(items, list) else ():
        if isinstance(item, str):
            total += MESSAGE_OVERHEAD + text_tokens(item)
        elif isinstance(item, dict):
            total += MESSAGE_OVERHEAD
            if "content" in item:
                total += _content_tokens(item["content"])
            for name in ("arguments", "output"):  # function_call / function_call_output
                value = item.get(name)
                if isinstance(value, str):
                    total += text_tokens(value)
    tools = body.get("tools")
    if tools:
        total += text_tokens(str(tools))
    return total


def output_budget(body: dict[str, Any], default_max_tokens: int) -> int:
    """Responses API: `max_output_tokens`, else the deployment's default."""
    budget = body.get("max_output_tokens")
    return int(budget) if budget is not None else default_max_tokens
