"""Answers of admitted chat, completions and embeddings requests: bodies and stream chunks."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from balancer.sim.buckets import DeploymentState
from balancer.sim.config import SimRegion
from balancer.sim.state import Simulator

STREAM_CHUNK_TOKENS = 4  # completion tokens per SSE content delta
EMBEDDING_DIMS = 8
WORD = "lorem "  # one completion token


@dataclass
class Call:
    """One admitted request, as the answer builders need it."""

    sim: Simulator
    region: SimRegion
    dep: DeploymentState
    op: str
    model: str
    prompt: int
    per_choice: int  # completion budget of each choice
    lengths: list[int] = field(default_factory=list)  # completion tokens of each choice

    @property
    def chat(self) -> bool:
        return self.op == "chat/completions"

    @property
    def completion_tokens(self) -> int:
        return sum(self.lengths)

    def usage(self) -> dict[str, int]:
        total = self.prompt + self.completion_tokens
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def finish_reason(self, length: int) -> str:
        return "length" if length >= self.per_choice else "stop"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def completion_body(call: Call) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for index, length in enumerate(call.lengths):
        choice: dict[str, Any] = {"index": index, "logprobs": None}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": WORD * length}
        else:
            choice["text"] = WORD * length
        choices.append({**choice, "finish_reason": call.finish_reason(length)})
    return {
        "id": call.sim.new_id("chatcmpl" if call.chat else "cmpl"),
        "object": "chat.completion" if call.chat else "text_completion",
        "created": int(time.time()),
        "model": call.model,
        "choices": choices,
        "usage": call.usage(),
    }


def embeddings_body(call: Call, body: dict[str, Any]) -> dict[str, Any]:
    value = body["input"]
    # a list of strings or of token lists is a batch; a string or one token list is one input
    batch = isinstance(value, list) and not all(isinstance(x, int) for x in value)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index in range(len(value) if batch else 1):
        vector = [round(call.sim.rng.uniform(-1, 1), 6) for _ in range(EMBEDDING_DIMS)]
        embedding: Any = vector
        if as_base64:  # some SDK versions ask for packed little-endian float32 by default
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": call.prompt, "total_tokens": call.prompt}
    return {"object": "list", "data": data, "model": call.model, "usage": usage}


def stream_events(call: Call, include_usage: bool) -> Iterator[tuple[dict[str, Any], int]]:
    """The SSE chunks of a stream, each with the completion tokens it carries."""
    ident, created = call.sim.new_id("chatcmpl" if call.chat else "cmpl"), int(time.time())
    obj = "chat.completion.chunk" if call.chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
        if call.chat:  # text None: the opening chunk that names the role
            choice["delta"] = {"role": "assistant", "content": ""} if text is None else {}
            if text:
                choice["delta"]["content"] = text
        else:
            choice["text"] = text or ""
        body = {"id": ident, "object": obj, "created": created, "model": call.model}
        body["choices"] = [choice]
        if include_usage:  # OpenAI's documented shape: usage null on every chunk but the last
            body["usage"] = None
        return body

    for index, length in enumerate(call.lengths):
        if call.chat:
            yield chunk(index, None), 0
        for start in range(0, length, STREAM_CHUNK_TOKENS):
            tokens = min(STREAM_CHUNK_TOKENS, length - start)
            yield chunk(index, WORD * tokens), tokens
        yield chunk(index, "", call.finish_reason(length)), 0
    if include_usage:
        yield {**chunk(0, ""), "choices": [], "usage": call.usage()}, 0
