"""Reading a region's rate-limit headers."""

from __future__ import annotations

import math

from balancer import upstream
from balancer.config import Deployment, Region, Target
from balancer.operations import OPERATIONS


def test_throttle_prefers_milliseconds_and_knows_its_precision() -> None:
    h = {"retry-after-ms": "250", "retry-after": "1"}
    assert upstream.throttle(h, 5.0) == (0.25, 0.001)
    assert upstream.throttle({"retry-after": "3"}, 5.0) == (3.0, 1.0)  # whole seconds
    assert upstream.throttle({"retry-after": "0.5"}, 5.0) == (0.5, 0.1)  # to its last digit
    assert upstream.throttle({"x-ratelimit-reset-tokens": "6m0s"}, 5.0) == (360.0, 1.0)
    assert upstream.throttle({"x-ratelimit-reset-tokens": "120ms"}, 5.0).seconds == 0.12
    assert upstream.throttle({"retry-after": "-1"}, 5.0) == (5.0, math.inf)  # our default


def test_remaining_headers_ignore_missing_malformed_and_minus_one() -> None:
    h = {"x-ratelimit-remaining-tokens": "1200", "x-ratelimit-remaining-requests": "0"}
    assert upstream.remaining_tokens(h) == 1200
    assert upstream.remaining_requests(h) == 0
    for bad in ({}, {"x-ratelimit-remaining-tokens": "-1"},
                {"x-ratelimit-remaining-tokens": "lots"}):
        assert upstream.remaining_tokens(bad) is None


def test_throttle_reads_the_wait_from_the_message_when_no_header_names_it() -> None:
    """Azure's Responses API: 429 with remaining -1 and no retry-after, only the text."""
    body = (b'{"error": {"code": "429", "message": "Requests to the Responses_Create '
            b'Operation ... have exceeded token rate limit. Please retry after 7 seconds."}}')
    minus_one = {"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-reset-tokens": "-1"}
    assert upstream.throttle(minus_one, 10.0, body) == (7.0, 1.0)
    assert upstream.throttle({"retry-after": "2"}, 10.0, body) == (2.0, 1.0)  # header first
    assert upstream.throttle(minus_one, 10.0, b"slow down") == (10.0, math.inf)
    assert upstream.throttle({}, 10.0, b"retry after 99999999999 seconds") == (10.0, math.inf)


def _target(kind: str, api_version: str | None) -> Target:
    region = Region(name="r", kind=kind, endpoint="https://r.example", api_version=api_version,
                    deployments={})
    return Target(region, Deployment(model="gpt-4", tpm=1, rpm=1, deployment="gpt-4-dep",
                                     weight=1.0, default_max_tokens=16))


def test_urls_for_every_route_style() -> None:
    chat, responses = OPERATIONS["chat/completions"], OPERATIONS["responses"]
    dated, v1, oai = _target("azure", "2025-04-01-preview"), _target("azure", "v1"), \
        _target("openai", None)
    assert upstream.url(dated, chat) == ("https://r.example/openai/deployments/gpt-4-dep/"
                                         "chat/completions?api-version=2025-04-01-preview")
    assert upstream.url(dated, responses) == ("https://r.example/openai/responses"
                                              "?api-version=2025-04-01-preview")
    assert upstream.url(v1, chat) == "https://r.example/openai/v1/chat/completions"
    assert upstream.url(v1, responses) == "https://r.example/openai/v1/responses"
    assert upstream.url(oai, responses) == "https://r.example/responses"
    query = {"api-version": "1999-01-01", "limit": "5", "after": "msg_1"}
    assert upstream.stored_url(dated, "responses/resp_1/input_items", query) == (
        "https://r.example/openai/responses/resp_1/input_items?api-version=2025-04-01-preview"
        "&limit=5&after=msg_1")
    assert upstream.stored_url(v1, "responses/resp_1", {}) == \
        "https://r.example/openai/v1/responses/resp_1"
    assert upstream.stored_url(oai, "responses/resp_1/cancel", {}) == \
        "https://r.example/responses/resp_1/cancel"
    # Where the route does not name the deployment, the body's model must.
    assert not upstream.model_in_body(dated, chat)
    assert all(upstream.model_in_body(t, responses) for t in (dated, v1, oai))
    assert upstream.model_in_body(v1, chat) and upstream.model_in_body(oai, chat)
