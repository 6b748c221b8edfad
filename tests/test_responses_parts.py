"""The Responses API's pure parts, ahead of its routes (issue 13): body checks, cost,
usage of a response and of its stream's final event, and the stream tap."""

from __future__ import annotations

import json

import pytest

from balancer import bodies, cost
from balancer.errors import ClientError
from balancer.sse import ResponseEventTap
from balancer.usage import response_usage

USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
         "total_tokens": 19}


def event(kind: str, **data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def test_usage_of_a_response_and_of_its_final_event() -> None:
    response = {"id": "resp_1", "object": "response", "status": "completed", "usage": USAGE}
    assert response_usage(response) == (12, 7)
    assert response_usage({"type": "response.completed", "response": response}) == (12, 7)
    assert response_usage({"usage": {"prompt_tokens": 3}}) is None  # chat-shaped: not ours
    assert response_usage({"response": {"usage": None}}) is None


def test_stream_tap_forwards_every_event_and_settles_from_the_final_one() -> None:
    tap = ResponseEventTap(True, response_usage)
    stream = (event("response.created", response={"id": "resp_1", "usage": None})
              + event("response.output_text.delta", delta="response.completed is a word")
              + event("response.completed", response={"id": "resp_1", "usage": USAGE}))
    out = tap.feed(stream[:50]) + tap.feed(stream[50:]) + tap.flush()
    assert out == stream  # nothing stripped, nothing reordered
    assert tap.done and tap.usage == (12, 7)


@pytest.mark.parametrize("final", ["response.incomplete", "response.failed"])
def test_other_final_events_end_the_stream_too(final: str) -> None:
    tap = ResponseEventTap(False, response_usage)
    tap.feed(event(final, response={"usage": USAGE}))
    assert tap.done and tap.usage == (12, 7)


def test_a_stream_cut_before_its_final_event_is_not_done() -> None:
    tap = ResponseEventTap(False, response_usage)
    tap.feed(event("response.output_text.delta", delta="response.completed"))
    assert not tap.done and tap.usage is None


def test_input_cost_counts_instructions_items_and_tools() -> None:
    base = cost.response_input_tokens({"input": "abcdefgh"})
    assert base == cost.REPLY_PRIMING + cost.MESSAGE_OVERHEAD + 2
    body = {"instructions": "x" * 40, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "y" * 8},
                                     {"type": "input_image", "image_url": "data:..."}]},
        {"type": "function_call_output", "call_id": "c1", "output": "z" * 12}]}
    assert cost.response_input_tokens(body) == (cost.REPLY_PRIMING + (4 + 10) + (4 + 2 + 85)
                                                + (4 + 3))
    assert cost.output_budget({"max_output_tokens": 50}, 1024) == 50
    assert cost.output_budget({}, 1024) == 1024


@pytest.mark.parametrize("body", [
    {"input": "hi"}, {"input": [{"role": "user", "content": "hi"}], "max_output_tokens": 5},
    {"previous_response_id": "resp_1"}, {"prompt": {"id": "pmpt_1"}},
])
def test_valid_bodies(body: dict[str, object]) -> None:
    bodies.check_response(body)


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"), ({"input": 5}, "input"), ({"input": [1]}, "input"),
    ({"input": "hi", "instructions": 3}, "instructions"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ({"input": "hi", "previous_response_id": ""}, "previous_response_id"),
])
def test_invalid_bodies_name_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(ClientError) as info:
        bodies.check_response(body)
    assert info.value.status == 400 and info.value.param == param


def _chat_stream(usage_nulls: bool) -> list[bytes]:
    null = {"usage": None} if usage_nulls else {}
    chunks = [b"data: " + json.dumps({"choices": [{"delta": {"content": f"t{i}"}}], **null}
                                     ).encode() + b"\n\n" for i in range(3)]
    chunks.append(b"data: " + json.dumps({"choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 3}}).encode() + b"\n\n")
    return [*chunks, b"data: [DONE]\n\n"]


@pytest.mark.parametrize("usage_nulls", [False, True])
@pytest.mark.parametrize("strip", [False, True])
def test_whole_event_chunks_pass_as_they_are_split_anywhere_the_same(
        usage_nulls: bool, strip: bool) -> None:
    """The tap's fast path (a chunk of whole events it keeps as they are) gives the same
    bytes, usage and end as splitting every event, for any chunking of the stream."""
    from balancer.sse import UsageTap
    from balancer.usage import completion_usage

    events = _chat_stream(usage_nulls)
    stream = b"".join(events)
    expected = b"".join(e for e in events if not (strip and b'"choices": []' in e))
    for chunks in (events, [stream], [stream[:i] for i in (7,)] + [stream[7:]],
                   [events[0] + events[1][:5], events[1][5:] + b"".join(events[2:])]):
        tap = UsageTap(strip, completion_usage)
        out = b"".join(tap.feed(c) for c in chunks) + tap.flush()
        assert out == expected and tap.usage == (5, 3) and tap.done


def test_response_tap_reads_the_id_from_a_whole_event_chunk() -> None:
    tap = ResponseEventTap(False, response_usage)
    created = event("response.created", response={"id": "resp_9", "usage": None})
    delta = event("response.output_text.delta", delta="hi")
    assert tap.feed(created) == created and tap.object_id == "resp_9"
    assert tap.feed(delta) == delta and not tap.done


@pytest.mark.parametrize("depth", [63, 64, 65, 66])
def test_depth_check_is_exact_at_the_limit(depth: int) -> None:
    from balancer.validate import MAX_DEPTH, _deeper_than

    value: object = 1
    for _ in range(depth - 1):
        value = [value] if depth % 2 else {"k": value}
    body = {"a": [{"b": 1}, {"c": "x"}], "deep": value}  # `depth` levels in all
    assert _deeper_than(body, MAX_DEPTH) == (depth > MAX_DEPTH)
