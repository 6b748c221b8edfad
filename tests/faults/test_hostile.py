"""Hostile input: thousands of generated bad requests against every route of a real
gateway process (raw bytes over a socket, so even unparseable HTTP gets through).

Every bad request must get a 4xx whose body is an OpenAI-shaped JSON error: zero 5xx,
zero tracebacks in the log, and none may reach a region (nor, for the calls on a stored
response, the region holding it). The classes the gateway forwards on purpose
(`FORWARDED`) are what it does not read: unknown fields (and unchecked types of fields
it does not read), an api-version on a route that takes none, and surrogates encoded
in UTF-8 (Python's JSON reads them): the upstream validates those (the real Azure API
answers 400; SECURITY.md), so they must only never cause a 5xx. Slow headers must get
the connection closed within `header_timeout_seconds`. Afterwards the gateway must
still be healthy.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.harness import Rig, Row, config_text, is_problem, record
from tests.faults.rawhttp import Reply, exchange, request_bytes
from tests.procs import Procs, get_json

pytestmark = pytest.mark.slow

CLIENT_KEY = "client-key-hostile-0123456789"
MAX_BODY = 65_536
BODY_TIMEOUT = 1.0
HEADER_TIMEOUT = 1.0  # gateway.header_timeout_seconds
EXAMPLES = 1000  # per API route: 500+ of them bad (the rest: forwarded by design)
ID_EXAMPLES = 150  # per route on a stored response's id
AZURE = "/openai/deployments/{model}/{op}?api-version=2024-06-01"
DATED = "?api-version=2025-03-01-preview"
POST_ROUTES = {
    "POST /v1/chat/completions": ("chat/completions", "/v1/chat/completions"),
    "POST /v1/completions": ("completions", "/v1/completions"),
    "POST /v1/embeddings": ("embeddings", "/v1/embeddings"),
    "POST /openai/deployments/{d}/chat/completions": ("chat/completions", AZURE),
    "POST /openai/deployments/{d}/completions": ("completions", AZURE),
    "POST /openai/deployments/{d}/embeddings": ("embeddings", AZURE),
    "POST /v1/responses": ("responses", "/v1/responses"),
    "POST /openai/v1/responses": ("responses", "/openai/v1/responses"),
    "POST /openai/responses?api-version": ("responses", "/openai/responses" + DATED),
}
# The calls on a stored response: route -> (method, prefix, suffix, needs an api-version).
ID_ROUTES = {
    "GET /v1/responses/{id}": ("GET", "/v1/responses", "", False),
    "DELETE /v1/responses/{id}": ("DELETE", "/v1/responses", "", False),
    "POST /v1/responses/{id}/cancel": ("POST", "/v1/responses", "/cancel", False),
    "GET /v1/responses/{id}/input_items": ("GET", "/v1/responses", "/input_items", False),
    "GET /openai/v1/responses/{id}": ("GET", "/openai/v1/responses", "", False),
    "GET /openai/responses/{id}?api-version": ("GET", "/openai/responses", "", True),
    "POST /openai/responses/{id}/cancel?api-version": ("POST", "/openai/responses",
                                                       "/cancel", True),
}
ALLOWED = {"": {"GET", "DELETE"}, "/cancel": {"POST"}, "/input_items": {"GET"}}
# GET /clients: added with the client budgets; the tests skip it in a build without it.
GET_ROUTES = ["/v1/models", "/regions", "/healthz", "/readyz", "/metrics", "/clients"]
KEYED = {"/v1/models", "/regions", "/clients"}
# Classes sent on purpose to a region: valid requests with something the gateway does not
# read (the region's to judge), so they must only never cause a 5xx.
FORWARDED = {"unknown_fields", "encoded_surrogates", "extra_api_version"}

SEEN: Counter[tuple[str, str, str]] = Counter()  # (route, kind, outcome)


class Target:
    def __init__(self, rig: Rig):
        self.rig = rig
        self.url = rig.gateways[0].url
        self.port = int(self.url.rsplit(":", 1)[1])
        self.pid = rig.gateways[0].proc.pid
        self.fds = len(os.listdir(f"/proc/{self.pid}/fd"))  # before any hostile request
        # A response stored in a region: hostile calls naming it must not reach it either.
        created = exchange(self.port, request_bytes("POST", "/v1/responses", [
            (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode())],
            json.dumps(valid_body("responses", False)).encode()))
        assert created.status == 200, created
        self.known_id: str = json.loads(created.body)["id"]
        clients = exchange(self.port, request_bytes("GET", "/clients", [
            (b"api-key", CLIENT_KEY.encode())]))
        self.has_clients = clients.status != 404  # GET /clients is in this build


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("hostile")
    procs = Procs(workdir)
    try:
        rig = Rig(procs, workdir).start(
            config_text(models=("gpt-4", "emb"), max_body_bytes=MAX_BODY,
                        body_timeout_seconds=BODY_TIMEOUT,
                        header_timeout_seconds=HEADER_TIMEOUT),
            replicas=1, redis=False, env={"BALANCER_API_KEYS": CLIENT_KEY})
        yield Target(rig)
    finally:
        procs.close()


# --------------------------------------------------------------------------- generation

def valid_body(op: str, azure: bool) -> dict[str, Any]:
    model = "emb" if op == "embeddings" else "gpt-4"
    body: dict[str, Any] = {} if azure else {"model": model}
    if op == "chat/completions":
        body.update(messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    elif op == "completions":
        body.update(prompt="hello", max_tokens=5)
    elif op == "responses":
        body.update(input="hello", max_output_tokens=16)
    else:
        body.update(input="hello")
    return body


def target_for(op: str, path: str, model: str | None = None) -> str:
    if path != AZURE:
        return path
    return AZURE.format(model=model or ("emb" if op == "embeddings" else "gpt-4"), op=op)


FIELD_CHECKS: dict[str, dict[str, list[Any]]] = {
    # Values of the fields the gateway reads, each wrong for that field.
    "chat/completions": {
        "messages": ["hi", 5, {}, [], [1], ["x"], [{"content": "x"}], [{"role": 1}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": {}}],
                     [{"role": None}], None],
    },
    "completions": {"prompt": [None, 5, {}, [{}], [[1, "a"]], [None], True, [1.5]]},
    "embeddings": {"input": [None, "", [], 5, {}, [{}], [[1, "a"]], [None], True]},
    "responses": {
        "input": [None, 5, 1.5, True, {}, [1], [None], [[1]], [True]],
        "instructions": [5, [], {}, True, 1.5],
        "max_output_tokens": ["10", 1.5, -1, 0, True, 2 ** 40, [], {}, -2 ** 63],
        "previous_response_id": [5, "", [], {}, True, "resp_unknown", "../../regions",
                                 "resp_\u0000\r\n", "r" * 300, "\uff52\uff45\uff53\uff50_\uff11"],
    },
}
# Fields the gateway reads: never drawn as "unknown" ones.
READ_FIELDS = {"model", "stream", "n", "max_tokens", "input", "max_completion_tokens",
               "stream_options", "messages", "prompt", "instructions", "max_output_tokens",
               "previous_response_id", "conversation", "store"}
COMMON_CHECKS: dict[str, list[Any]] = {
    "max_tokens": ["10", 1.5, -1, 0, True, 2 ** 40, [], {}, 1e3],
    "max_completion_tokens": ["10", 1.5, -1, 0, False, 10 ** 7, [], {}],
    "n": [0, 129, "2", 1.0, True, -3, [], 2 ** 64, -2 ** 63],
    "stream": ["yes", 1, [], {}, "true", 0],
    "stream_options": ["x", 1, [], True],
    "model": [1, 1.5, [], {}, True, "", None, "no-such-model", "gpt-4 ", "GPT-4"],
}

MALFORMED = [
    b"{", b"}", b"{]", b"[", b"nul", b"{'model': 'gpt-4'}", b'{"model": "gpt-4",}',
    b'{"model": "gpt-4" "messages": []}', b'{model: "gpt-4"}', b'{"a": 1} {"b": 2}',
    b'{"model": "gpt-4", /* c */ "x": 1}', b'{"model": "gpt-4", "max_tokens": NaN}',
    b'{"model": "gpt-4", "max_tokens": Infinity}', b'{"model": "gpt-4", "x": -Infinity}',
    b'{"model": "gpt-4", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    b'\x00\x01\x02', b"true", b"42", b'"string"', b"[]", b"null", b"{}",
    b'{"model": "gpt-4", "x": 01}', b'{"model": "gpt-4", "x": "\\x41"}',
    b'{"model": "gpt-4", "x": tru}', b"\xef\xbb\xbf", b"   ", b"\n\n",
]

CONTENT_TYPES = [b"text/plain", b"multipart/form-data; boundary=x",
                 b"application/x-www-form-urlencoded", b"application/xml", b"text/html",
                 b"image/png", b"application/jsonp", b"json", b"*/*", b"application/json5"]

API_VERSIONS = [None, "", "latest", "2024-6-1", "2024-06-01x", "v1", "2024-06-01-beta",
                "2024-06-01%0d%0aX-Injected:%20yes", "2024-06-01%26api-key%3Dattacker",
                "2024-06-01%00", "%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%94-%EF%BC%90%EF%BC%96-"
                "%EF%BC%90%EF%BC%91", "%D9%A2%D9%A0%D9%A2%D9%A4-%D9%A0%D9%A6-%D9%A0%D9%A1",
                "../../etc/passwd", "2024-06-01/../../x", "9" * 5000]

TRAVERSALS = ["..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e%2fregions",
              "..%5c..%5cwindows", "..\\..\\x", "gpt-4%2F..%2F..%2Fadmin", "gpt-4%00",
              "%00", "..;", "~root", "http:%2F%2F127.0.0.1:1%2Fx", "@127.0.0.1:1",
              "gpt-4@127.0.0.1:1", "gpt-4%3Fapi-version%3Dx", "gpt-4%23frag",
              "%EF%BD%87%EF%BD%90%EF%BD%94-4", "GPT-4", "gpt-4%20", "x" * 3000,
              "gpt-4%2F..%2Fgpt-4", ".%2e/.%2e/regions", "%252e%252e%252f"]

BAD_AUTH: list[list[tuple[bytes, bytes]]] = [
    [], [(b"api-key", b"")], [(b"api-key", b"wrong")], [(b"Authorization", b"Bearer")],
    [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"Basic " + b"Zm9vOmJhcg==")],
    [(b"api-key", CLIENT_KEY.encode()[:-1])], [(b"api-key", CLIENT_KEY.encode() + b"x")],
    [(b"api-key", b"\xff\xfe\xfd")], [(b"Authorization", b"Bearer \xc3\x28")],
    [(b"api-key", b"k" * 7000)], [(b"Authorization", b"bearer  " + CLIENT_KEY.encode()[1:])],
]

# Raw header bytes no HTTP/1.1 parser may accept; each case replaces one header.
INJECTIONS: list[tuple[bytes, bytes]] = [
    (b"x-request-id", b"a\rSet-Cookie: injected=1"), (b"x-request-id", b"a\x00b"),
    (b"x-test", b"a\r\nX-Injected: yes\r"), (b"x-te\x01st", b"1"), (b"x test", b"1"),
    (b"x-test\x7f", b"1"), (b"", b"nameless"), (b"x-long", b"a" * 9000),
    (b"Content-Length", b"12, 13"), (b"Content-Length", b"-1"), (b"Content-Length", b"abc"),
    (b"Transfer-Encoding", b"xchunked"), (b"Transfer-Encoding", b"chunked, identity"),
    (b"Content-Length", b"5\r\nTransfer-Encoding: chunked"),
    (b"Host", b"a\rb"), (b" x-folded", b"continuation"),
]
# Values an HTTP parser accepts but the gateway must never reflect or act on.
REFLECTIONS: list[tuple[bytes, bytes]] = [
    (b"x-request-id", b"%0d%0aSet-Cookie:%20injected=1"), (b"x-request-id", b"<script>"),
    (b"x-request-id", b"a" * 200), (b"x-request-id", "é".encode()),
    (b"x-forwarded-host", b"127.0.0.1:1"), (b"Forwarded", b"host=127.0.0.1:1"),
    (b"x-ms-useragent", b"\xc3\x28"),
]


@st.composite
def bad_post(draw: st.DrawFn, op: str, path: str) -> dict[str, Any]:
    """One bad request for a POST route: method, target, headers, body, and the class."""
    azure = path == AZURE  # the deployment in the path, none in the body
    dated = "api-version=" in path
    kinds = ["truncated_json", "malformed_json", "random_bytes", "wrong_type", "huge",
             "deep", "unknown_fields", "content_type", "oversized", "header_injection",
             "reflection", "bad_auth", "wrong_method", "duplicate_key", "invalid_utf8",
             "encoded_surrogates"]
    kinds += ["api_version"] if dated else ["extra_api_version"]
    if azure:
        kinds += ["traversal"]
    kind = draw(st.sampled_from(kinds))
    body = valid_body(op, azure)
    raw = json.dumps(body).encode()
    auth = [(b"api-key", CLIENT_KEY.encode())]
    ctype = [(b"Content-Type", b"application/json")]
    method, tgt, extra, expect = "POST", target_for(op, path), [], "rejected"

    if kind == "truncated_json":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "malformed_json":
        raw = draw(st.sampled_from([
            *MALFORMED,
            # otherwise valid bodies with what JSON does not allow (Python's json does)
            raw[:-1] + b', "temperature": NaN}', raw[:-1] + b', "top_p": Infinity}',
            raw[:-1] + b', "seed": -Infinity}', raw[:-1] + b', "x": [1, 2,]}',
            raw[:-1] + b"} trailing", raw[:-1] + b', "x": "\\ud8"}',  # bad escape
            raw.replace(b'"hello"', rb'"hel\lo"'), raw.replace(b'"hello"', b"'hello'")]))
    elif kind == "random_bytes":
        raw = draw(st.binary(min_size=1, max_size=300))
    elif kind == "wrong_type":
        checks = {**COMMON_CHECKS, **FIELD_CHECKS[op]}
        if azure:
            checks.pop("model")
        if op == "embeddings":
            for name in ("max_tokens", "max_completion_tokens", "n", "stream_options"):
                checks.pop(name)  # not read for embeddings: forwarded as they are
            checks["stream"] = [*checks["stream"], True]
        name = draw(st.sampled_from(sorted(checks)))
        body[name] = draw(st.sampled_from(checks[name]))
        raw = json.dumps(body).encode()
    elif kind == "huge":
        size = draw(st.integers(MAX_BODY // 2, MAX_BODY - 200))
        if azure:  # the deployment segment: beyond aiohttp's 8 KiB request line
            tgt = target_for(op, path, "m" * draw(st.integers(9000, 20_000)))
        else:
            body["model"] = "m" * size
            raw = json.dumps(body).encode()
    elif kind == "deep":
        depth = draw(st.one_of(st.integers(65, 1200), st.sampled_from(
            [65, 500, 950, 975, 990, 999, 1000, 1001, 5000, 30_000])))
        nest = draw(st.sampled_from(["[]", "{}"]))
        inner = ("[" * depth + "]" * depth) if nest == "[]" else \
            ('{"a":' * depth + "1" + "}" * depth)
        where = draw(st.sampled_from(["x", "tools", "stream_options", "content", "metadata"]))
        text = json.dumps(body)
        if where == "content" and op == "chat/completions":
            text = text.replace('"content": "hello"', f'"content": [{inner}]')
        elif where == "stream_options":
            text = text[:-1] + f', "stream_options": {{"a": {inner}}}}}'
        else:
            text = text[:-1] + f', "{where}": {inner}}}'
        raw = text.encode()
    elif kind == "unknown_fields":
        names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
        values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                           st.lists(st.integers(), max_size=3),
                           st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
        for n in names:
            if n not in body and n not in READ_FIELDS:
                body[n] = draw(values)
        raw = json.dumps(body).encode()
        expect = "forwarded"
    elif kind == "duplicate_key":
        text = json.dumps(body)[:-1]
        key = draw(st.sampled_from(sorted(body)))
        again = draw(st.sampled_from([body[key], "other", 1, None]))
        raw = draw(st.sampled_from([
            f'{text}, "{key}": {json.dumps(again)}}}',  # a key the gateway reads, again
            f'{{"{key}": {json.dumps(again)}, {text[1:]}}}',  # first, then overridden
            f'{text}, "metadata": {{"a": "1", "a": "2"}}}}',  # deeper, in what it forwards
            f'{text}, "x": [[{{"k": 1}}, {{"k": 1, "k": 1}}]]}}',
            f'{text}, "{key[:2]}\\u00{ord(key[2]):02x}{key[3:]}": {json.dumps(again)}}}',
        ])).encode()
    elif kind in ("invalid_utf8", "encoded_surrogates"):
        bad_bytes = draw(st.sampled_from(
            # surrogates encoded as UTF-8 (CESU-8): not UTF-8, yet Python's json (like the
            # gateway's parser) reads them as lone surrogates, so they are forwarded
            [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80"]
            if kind == "encoded_surrogates" else
            [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xc1\xbf", b"\x80", b"\xbf\xbf",
             b"\xe2\x82", b"\xf0\x9f\x98", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80",
             b"\xc3", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80"]))
        raw = json.dumps(body).encode()
        if draw(st.booleans()) or kind == "encoded_surrogates":
            raw = raw.replace(b'"hello"', b'"hel' + bad_bytes + b'lo"')  # in a value
        else:
            raw = raw.replace(b'{"', b'{"x' + bad_bytes + b'": 1, "', 1)  # in a key
        expect = "forwarded" if kind == "encoded_surrogates" else expect
    elif kind == "extra_api_version":  # ignored where the route takes none: forwarded
        version = draw(st.sampled_from([v for v in API_VERSIONS if v is not None]))
        tgt = f"{tgt}?api-version={version}"
        expect = "forwarded"
    elif kind == "content_type":
        ctype = [(b"Content-Type", draw(st.sampled_from(CONTENT_TYPES)))]
    elif kind == "oversized":
        pad = b" " * (MAX_BODY + draw(st.integers(1, 50_000)))
        raw = raw[:-1] + pad + b"}"
        if draw(st.booleans()):  # no Content-Length: chunked, the limit applies as it reads
            extra = [(b"Transfer-Encoding", b"chunked")]
            raw = b"%x\r\n" % len(raw) + raw + b"\r\n0\r\n\r\n"
    elif kind == "header_injection":
        extra = [draw(st.sampled_from(INJECTIONS))]
        raw = b"{bad"  # the request is rejected whichever part is looked at first
    elif kind == "reflection":
        extra = [draw(st.sampled_from(REFLECTIONS))]
        raw = b'{"model": 5}'
    elif kind == "bad_auth":
        auth = draw(st.sampled_from(BAD_AUTH))
    elif kind == "wrong_method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]))
    elif kind == "api_version":
        version = draw(st.sampled_from(API_VERSIONS))
        base = tgt.split("?")[0]
        tgt = base if version is None else f"{base}?api-version={version}"
    elif kind == "traversal":
        segment = draw(st.sampled_from(TRAVERSALS))
        tgt = f"/openai/deployments/{segment}/{op}?api-version=2024-06-01"
    return {"kind": kind, "method": method, "target": tgt, "headers": ctype + auth + extra,
            "body": raw, "expect": expect}


METHODS = st.one_of(st.sampled_from(["POST", "PUT", "DELETE", "PATCH"]),
                    st.from_regex(r"\A[A-Z]{3,10}\Z").filter(
                        lambda m: m not in ("GET", "HEAD", "CONNECT", "PRI")))
# Bytes a header value may not hold (tab may: it is whitespace).
CONTROL = st.sampled_from([c for c in range(32) if c != 9] + [127])


@st.composite
def bad_get(draw: st.DrawFn, path: str) -> dict[str, Any]:
    kinds = ["wrong_method", "header_injection", "control_char", "path_suffix"]
    if path in KEYED:
        kinds.append("bad_auth")
    kind = draw(st.sampled_from(kinds))
    method, tgt, headers = "GET", path, [(b"api-key", CLIENT_KEY.encode())]
    if kind == "wrong_method":
        method = draw(METHODS)
    elif kind == "header_injection":
        headers.append(draw(st.sampled_from(INJECTIONS)))
    elif kind == "control_char":
        name = draw(st.sampled_from([b"x-request-id", b"api-key", b"user-agent", b"x-a"]))
        headers.append((name, b"a" + bytes([draw(CONTROL)]) + draw(st.binary(max_size=8))))
    elif kind == "path_suffix":
        tgt = path + draw(st.one_of(
            st.sampled_from(["/", "/..%2f..%2fetc%2fpasswd", "%00", "/x",
                             "/../../../_sim/stats", ".json", "%2f..", "/%2e%2e/%2e%2e/",
                             "/" + "a" * 2000]),
            st.text(min_size=1, max_size=30).map(lambda t: "/" + quote(t, safe=""))))
    elif kind == "bad_auth":
        headers = draw(st.one_of(st.sampled_from(BAD_AUTH), st.text(max_size=40).filter(
            lambda k: k.strip() != CLIENT_KEY).map(lambda k: [(b"api-key", k.encode())])))
    return {"kind": kind, "method": method, "target": tgt, "headers": headers, "body": b"",
            "expect": "rejected"}


UNKNOWN_ID = "resp_" + "0" * 48  # well formed, held by no region
ID_UNICODE = ["résumé", "resp_\u202egnp.exe", "resp_😀", "resp_\u0301", "resp_\ufeff",
              "\uff52\uff45\uff53\uff50_\uff11\uff12", "\u0000", "resp_\U0010ffff",
              "résp_" + "é" * 200]
ID_CONTROL = ["%00", "resp_%00x", "%0d%0aX-Injected:%20yes", "resp_%0aSet-Cookie:%20a=1",
              "%1b%5b31m", "%7f", "resp_%09", "resp_\x01", "resp_\x7f", "resp_\xff", "%ff%fe"]
ID_TRAVERSAL = ["..", "%2e%2e", ".%2e", "..%2F..%2Fregions", "%2e%2e%2f%2e%2e%2f_sim%2fstats",
                "resp_1%2F..%2F..%2Fadmin", "..%5c..%5cwindows", "..;", "%252e%252e%252f",
                "../../../_sim/stats", "../../etc/passwd", "resp_1/..%2F..%2F", "~root",
                "http:%2F%2F127.0.0.1:1%2Fx", "@127.0.0.1:1", "resp_1%3Fapi-version%3Dx",
                "resp_1%23frag"]
QUERY_JUNK = ["limit=-1", "limit=999999999999999999999", "limit=1e3", "order=sideways",
              "after=%00", "after=..%2F..", "api-version=latest", "api-version=%0d%0a",
              "stream=true", "include[]=x" * 50, "%ff=%fe", "a=" + "b" * 4000,
              "limit=1&limit=2", "api-version=2024-06-01&api-version=2025-03-01-preview"]


@st.composite
def bad_id_call(draw: st.DrawFn, route: str, known_id: str) -> dict[str, Any]:
    """One bad call on a stored response: a hostile id (never a region's), or the id of a
    response a region holds with something else wrong."""
    method, prefix, suffix, dated = ID_ROUTES[route]
    kinds = ["id_unicode", "id_control", "id_traversal", "id_oversized", "bad_auth",
             "wrong_method", "header_injection", "query_junk"]
    kinds += ["api_version"] if dated else []
    kinds += ["content_type", "oversized", "body_junk"] if method == "POST" else []
    kind = draw(st.sampled_from(kinds))
    ident = draw(st.sampled_from([known_id, UNKNOWN_ID]))
    headers: list[tuple[bytes, bytes]] = [(b"api-key", CLIENT_KEY.encode())]
    query, body = DATED[1:] if dated else "", b""
    if kind == "id_unicode":
        ident = quote(draw(st.one_of(st.sampled_from(ID_UNICODE),
                                     st.text(min_size=1, max_size=40))), safe="")
    elif kind == "id_control":
        ident = draw(st.sampled_from(ID_CONTROL))
    elif kind == "id_traversal":
        ident = draw(st.sampled_from(ID_TRAVERSAL))
    elif kind == "id_oversized":
        ident = draw(st.sampled_from(["resp_" + "a" * 251, "resp_" + "a" * 252, "r" * 4000,
                                      "x" * 9000, "resp_" + "%41" * 2000]))
    elif kind == "bad_auth":
        headers = draw(st.sampled_from(BAD_AUTH))
    elif kind == "wrong_method":
        method = draw(METHODS.filter(lambda m: m not in ALLOWED[suffix]))
    elif kind == "header_injection":
        headers.append(draw(st.sampled_from(INJECTIONS)))
    elif kind == "query_junk":
        ident = UNKNOWN_ID  # with the real id, the region would judge its own query
        query = "&".join(filter(None, [query, draw(st.sampled_from(QUERY_JUNK))]))
    elif kind == "api_version":
        version = draw(st.sampled_from(API_VERSIONS))
        query = "" if version is None else f"api-version={version}"
    elif kind == "content_type":
        headers.append((b"Content-Type", draw(st.sampled_from(CONTENT_TYPES))))
        body = b"{}"
    elif kind == "oversized":
        headers.append((b"Content-Type", b"application/json"))
        body = b"{" + b" " * (MAX_BODY + draw(st.integers(1, 50_000))) + b"}"
    elif kind == "body_junk":  # the gateway does not read it: the id alone decides
        ident = UNKNOWN_ID
        headers.append((b"Content-Type", b"application/json"))
        body = draw(st.one_of(st.binary(min_size=1, max_size=200), st.sampled_from(
            [b'{"a": 1, "a": 2}', b"[" * 5000 + b"]" * 5000, b'{"x": "\xff"}', b"null"])))
    target = f"{prefix}/{ident}{suffix}" + (f"?{query}" if query else "")
    return {"kind": kind, "method": method, "target": target, "headers": headers,
            "body": body, "expect": "rejected"}


# --------------------------------------------------------------------------- checks


def send(t: Target, case: dict[str, Any]) -> Reply:
    data = request_bytes(case["method"], case["target"], case["headers"], case["body"])
    return exchange(t.port, data, timeout=BODY_TIMEOUT + 5)


def check(route: str, case: dict[str, Any], reply: Reply) -> None:
    kind, where = case["kind"], f"{case['method']} {case['target'][:120]} ({case['kind']})"
    SEEN[(route, kind, "5xx" if reply.status >= 500 else str(reply.status // 100) + "xx")] += 1
    assert reply.status != 0, f"no answer to {where}"
    assert reply.status < 500, f"{reply.status} for {where}: {reply.body[:300]!r}"
    for name in ("set-cookie", "x-injected"):
        assert name not in reply.headers, f"{name} reflected for {where}"
    rid = reply.header("x-request-id")
    assert rid is None or all(c.isalnum() or c in "._:-" for c in rid), rid
    if case["expect"] == "forwarded":
        return  # the upstream's verdict, relayed: only never a 5xx
    assert 400 <= reply.status < 500, f"{reply.status} for {where}"
    assert (reply.header("content-type") or "").startswith("application/json"), where
    if case["method"] == "HEAD":
        return
    error = json.loads(reply.body)["error"]
    assert isinstance(error["message"], str) and error["message"], where
    assert {"type", "param", "code"} <= set(error), where
    if kind == "duplicate_key":
        assert error["code"] == "duplicate_key", where


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.mark.parametrize("route", list(POST_ROUTES))
def test_bad_requests_to_api_routes(target: Target, route: str) -> None:
    op, path = POST_ROUTES[route]

    @SETTINGS
    @given(case=bad_post(op, path))
    def run(case: dict[str, Any]) -> None:
        check(route, case, send(target, case))

    run()


@pytest.mark.parametrize("route", list(ID_ROUTES))
def test_bad_calls_on_stored_responses(target: Target, route: str) -> None:
    @settings(SETTINGS, max_examples=ID_EXAMPLES)
    @given(case=bad_id_call(route, target.known_id))
    def run(case: dict[str, Any]) -> None:
        check(route, case, send(target, case))

    run()


@pytest.mark.parametrize("path", GET_ROUTES)
def test_bad_requests_to_other_routes(target: Target, path: str) -> None:
    if path == "/clients" and not target.has_clients:
        pytest.skip("GET /clients is not in this build")

    @settings(SETTINGS, max_examples=110)
    @given(case=bad_get(path))
    def run(case: dict[str, Any]) -> None:
        check(f"GET {path}", case, send(target, case))

    run()


def served_meanwhile(target: Target, slow: list[threading.Thread], join: float
                     ) -> list[tuple[float, int]]:
    """Start the `slow` clients, then send 5 ordinary requests one after the other: how
    long each took and its status, once the slow clients are done (or `join` s each)."""
    for t in slow:
        t.start()
    time.sleep(0.3)
    body = json.dumps(valid_body("chat/completions", False)).encode()
    fast = []
    for _ in range(5):
        t0 = time.monotonic()
        reply = exchange(target.port, request_bytes("POST", "/v1/chat/completions", [
            (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode())], body))
        fast.append((time.monotonic() - t0, reply.status))
    for t in slow:
        t.join(join)
    return fast


def test_slow_bodies_get_408_and_others_are_served(target: Target) -> None:
    """Slowloris: 20 clients trickle their bodies one byte every 0.2 s. Each gets a 408
    after body_timeout_seconds, and meanwhile ordinary requests are served at once."""
    body = json.dumps(valid_body("chat/completions", False)).encode()
    head = request_bytes("POST", "/v1/chat/completions", [
        (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode()),
        (b"Content-Length", str(len(body)).encode())], b"")
    replies: list[tuple[float, Reply]] = []

    def slow_client() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
            sock.sendall(head)
            data = b""
            for byte in body:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # closed by the gateway: read what it said
                sock.settimeout(0.2)
                try:
                    data += sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if b"\r\n\r\n" in data:
                    break
            sock.settimeout(5)
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        from tests.faults.rawhttp import parse

        replies.append((time.monotonic() - started, parse(data, final=True) or Reply(0)))

    fast = served_meanwhile(target, [threading.Thread(target=slow_client) for _ in range(20)],
                            join=15)
    for took, status in fast:
        assert status == 200 and took < 0.5, fast
    assert len(replies) == 20
    for took, reply in replies:
        SEEN[("POST /v1/chat/completions", "slow_body", str(reply.status // 100) + "xx")] += 1
        assert reply.status == 408, reply
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
        assert BODY_TIMEOUT - 0.1 < took < BODY_TIMEOUT + 1.5, took


def test_slow_headers_are_cut_and_others_are_served(target: Target) -> None:
    """Slowloris on the head: 20 clients trickle a request line or headers one byte every
    0.2 s and never finish them. Each connection is closed header_timeout_seconds after
    it opened (aiohttp's keepalive_timeout, set from it), and meanwhile ordinary
    requests are served at once."""
    heads = [b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
             b"application/json\r\nX-Slow: " + b"a" * 40,
             b"POST /v1/chat/completions?x=" + b"a" * 60]  # the request line never ends
    outcomes: list[tuple[float, bytes, bool]] = []  # (seconds, what came back, closed)

    def slow_client(head: bytes) -> None:
        started, data, closed = time.monotonic(), b"", False
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
            sock.settimeout(0.2)
            for byte in head:  # at most ~17 s: bounded even if nothing closes it
                try:
                    sock.sendall(bytes([byte]))
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # reset or broken pipe: closed by the gateway
                    closed = True
                    break
                data += chunk
                if not chunk:
                    closed = True
                    break
        outcomes.append((time.monotonic() - started, data, closed))

    fast = served_meanwhile(target, [threading.Thread(target=slow_client, args=(heads[i % 2],))
                                     for i in range(20)], join=30)
    for took, status in fast:
        assert status == 200 and took < 1.0, fast
    assert len(outcomes) == 20
    for took, data, closed in outcomes:
        SEEN[("POST /v1/chat/completions", "slow_headers",
              "closed" if closed and not data else "answered" if data else "open")] += 1
        assert closed and not data, (took, data)  # closed, nothing said: it sent no request
        assert HEADER_TIMEOUT - 0.1 < took < HEADER_TIMEOUT + 1.5, took


def test_gateway_is_healthy_afterwards(target: Target) -> None:
    """Run last: every route got its bad requests, nothing bad reached a region, nothing
    was logged as an error, and the gateway serves as before, with no leaked
    descriptors."""
    url = target.url
    assert get_json(f"{url}/healthz") == {"status": "ok"}
    ready = get_json(f"{url}/readyz")
    assert ready["status"] == "ready" and not ready["degraded"]
    ok = exchange(target.port, request_bytes("POST", "/v1/chat/completions", [
        (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode())],
        json.dumps(valid_body("chat/completions", False)).encode()))
    assert ok.status == 200, ok
    kept = exchange(target.port, request_bytes("GET", f"/v1/responses/{target.known_id}", [
        (b"api-key", CLIENT_KEY.encode())]))
    assert kept.status == 200, kept  # no hostile call deleted or cancelled it
    regions = json.loads(exchange(target.port, request_bytes(
        "GET", "/regions", [(b"api-key", CLIENT_KEY.encode())])).body)
    assert all(r["circuit"] == "closed" for rows in regions["models"].values() for r in rows)
    metrics = exchange(target.port, request_bytes("GET", "/metrics", [])).body.decode()
    in_flight = [line for line in metrics.splitlines()
                 if line.startswith("balancer_in_flight_requests ")]
    assert in_flight and float(in_flight[0].split()[1]) <= 1
    assert "no-such-model" not in metrics and "mmmm" not in metrics  # no client-made labels
    fds = len(os.listdir(f"/proc/{target.pid}/fd"))
    assert fds <= target.fds + 4, (fds, target.fds)  # every ended connection released

    problems = [line for line in target.rig.log(target.rig.gateways[0]).splitlines()
                if is_problem(line)]
    assert not problems, problems[:5]
    # Nothing but the forwarded classes (and the checks above) reached a region.
    sim = get_json(f"{target.rig.sim_url}/_sim/stats")
    calls = sum(d["requests"] for deps in sim["regions"].values() for d in deps.values())
    forwarded = sum(n for (route, kind, _), n in SEEN.items() if kind in FORWARDED)
    # + the stored response made first, this test, and the slow-body and slow-header tests
    assert calls <= forwarded + 1 + 2 + 5 + 5, (calls, forwarded)
    id_calls = sum(r["id_calls"] for r in sim["responses"].values())
    assert id_calls == 1, sim["responses"]  # this test's own retrieve, nothing hostile

    per_route, bad = Counter[str](), Counter[str]()
    for (route, kind, _), n in SEEN.items():
        per_route[route] += n
        bad[route] += 0 if kind in FORWARDED else n
    for route in POST_ROUTES:
        assert bad[route] >= 500, bad  # bad ones only: the forwarded are not counted
    for route in ID_ROUTES:
        assert bad[route] >= 100, bad
    for path in GET_ROUTES:
        assert bad[f"GET {path}"] >= 100 or (path == "/clients" and not target.has_clients)
    _record(bad)


CLASSES = {
    "truncated_json": "Truncated JSON", "malformed_json": "Malformed JSON (NaN, comments, "
    "bad escapes, trailing data...)", "random_bytes": "Random bytes as the body",
    "wrong_type": "Wrong types in the fields the gateway reads",
    "huge": "Huge strings (model name, deployment segment)",
    "deep": "Deeply nested JSON (65 to 30,000 levels)",
    "unknown_fields": "Unknown fields (forwarded by design)",
    "content_type": "Wrong content types", "oversized": "Oversized bodies (with and "
    "without Content-Length)", "header_injection": "Header injection: CR, LF, NUL, bad "
    "names, smuggling framing", "control_char": "Control bytes in header values",
    "reflection": "Parseable but hostile headers (never reflected, never acted on)",
    "bad_auth": "Missing, wrong, non-UTF-8 or oversized keys", "wrong_method": "Wrong "
    "methods", "api_version": "Bad api-version (incl. non-ASCII digits, injection)",
    "traversal": "Path traversal in the Azure deployment segment",
    "path_suffix": "Garbage and traversal after the other routes",
    "slow_body": "Slow bodies (slowloris, 1 byte / 0.2 s)",
    "duplicate_key": "Duplicate keys (top level, nested, escaped)",
    "invalid_utf8": "Invalid UTF-8 (overlong, truncated, stray bytes) in keys and values",
    "encoded_surrogates": "Surrogates encoded in UTF-8 (read as JSON does: forwarded)",
    "extra_api_version": "An api-version where none is taken (ignored: forwarded)",
    "id_unicode": "Unicode in response ids (RTL override, emoji, fullwidth, BOM...)",
    "id_control": "Control characters in response ids (NUL, CR/LF, ESC)",
    "id_traversal": "Path traversal in response ids",
    "id_oversized": "Oversized response ids (257 to 9,000 characters)",
    "query_junk": "Hostile query strings (limits, order, repeated api-version)",
    "body_junk": "Hostile bodies on cancel (not read: the id decides)",
    "slow_headers": "Slow headers (slowloris on the head, 1 byte / 0.2 s)",
}
EXPECTED = {
    "slow_headers": "0 5xx; each connection closed within header_timeout_seconds "
                    "(+1.5 s), others served at once",
}


def _where(routes: set[str], everywhere: set[str]) -> str:
    """The largest family of routes a class covered whole, and the rest by name."""
    api = set(POST_ROUTES) | set(ID_ROUTES)
    families = [
        ("every route", everywhere),
        ("every API route", api),
        ("every Azure dated route", {r for r in api if "deployments" in r or "api-version=" in
                                     _path(r)}),
        ("every create route", set(POST_ROUTES)),
        ("every call on a stored response", set(ID_ROUTES)),
        ("every undated create route", {r for r in POST_ROUTES if "api-version=" not in
                                        POST_ROUTES[r][1]}),
        ("Azure deployment routes", {r for r in POST_ROUTES if "deployments" in r}),
    ]
    for name, family in families:
        if family <= routes:
            rest = sorted(routes - family)
            return ", ".join([name, *rest]) if len(rest) < 4 else f"{name} and {len(rest)} more"
    return ", ".join(sorted(routes))


def _path(route: str) -> str:
    if route in POST_ROUTES:
        return POST_ROUTES[route][1]
    if route in ID_ROUTES:
        return "api-version=" if ID_ROUTES[route][3] else ""
    return route


def _record(per_route: Counter[str]) -> None:
    """One row per input class, and a total; `per_route` counts the bad requests."""
    kinds: dict[str, Counter[str]] = {}
    routes: dict[str, set[str]] = {}
    for (route, kind, outcome), n in SEEN.items():
        kinds.setdefault(kind, Counter())[outcome] += n
        routes.setdefault(kind, set()).add(route)
    for kind, outcomes in kinds.items():
        expected = EXPECTED.get(kind, "0 5xx; the region's answer relayed" if kind in
                                FORWARDED else "0 5xx; all 4xx, OpenAI-shaped, none "
                                "reached a region")
        record(Row("input", CLASSES.get(kind, kind), _where(routes[kind], set(per_route)),
                   sum(outcomes.values()), outcomes["5xx"], expected, 0,
                   ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))))
    total = sum(sum(c.values()) for c in kinds.values())
    record(Row("input", "All hostile input (hypothesis, derandomized)",
               f"{len(per_route)} routes", total, sum(c["5xx"] for c in kinds.values()),
               "0 5xx, 0 tracebacks, healthy after", 0,
               "bad requests per route (the forwarded classes not counted): " +
               ", ".join(f"{r}: {n}" for r, n in per_route.items()),
               {"per_route": dict(per_route)}))
