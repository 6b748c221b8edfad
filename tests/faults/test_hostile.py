"""Hostile input: thousands of generated bad requests against every route of a real
gateway process (raw bytes over a socket, so even unparseable HTTP gets through).

Every bad request must get a 4xx whose body is an OpenAI-shaped JSON error: zero 5xx,
zero tracebacks in the log, and none may reach a region. The one class the gateway
forwards on purpose is unknown fields (and unchecked types of fields it does not
read): the upstream validates those (the real Azure API answers 400; SECURITY.md),
so they must only never cause a 5xx. Afterwards the gateway must still be healthy.
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
EXAMPLES = 1000  # per API route: 500+ of them bad (the rest: unknown fields, forwarded)
AZURE = "/openai/deployments/{model}/{op}?api-version=2024-06-01"
POST_ROUTES = {
    "POST /v1/chat/completions": ("chat/completions", "/v1/chat/completions"),
    "POST /v1/completions": ("completions", "/v1/completions"),
    "POST /v1/embeddings": ("embeddings", "/v1/embeddings"),
    "POST /openai/deployments/{d}/chat/completions": ("chat/completions", AZURE),
    "POST /openai/deployments/{d}/completions": ("completions", AZURE),
    "POST /openai/deployments/{d}/embeddings": ("embeddings", AZURE),
}
GET_ROUTES = ["/v1/models", "/regions", "/healthz", "/readyz", "/metrics"]
KEYED = {"/v1/models", "/regions"}

SEEN: Counter[tuple[str, str, str]] = Counter()  # (route, kind, outcome)


class Target:
    def __init__(self, rig: Rig):
        self.rig = rig
        self.url = rig.gateways[0].url
        self.port = int(self.url.rsplit(":", 1)[1])
        self.pid = rig.gateways[0].proc.pid
        self.fds = len(os.listdir(f"/proc/{self.pid}/fd"))  # before any hostile request


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("hostile")
    procs = Procs(workdir)
    try:
        rig = Rig(procs, workdir).start(
            config_text(models=("gpt-4", "emb"), max_body_bytes=MAX_BODY,
                        body_timeout_seconds=BODY_TIMEOUT),
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
}
COMMON_CHECKS: dict[str, list[Any]] = {
    "max_tokens": ["10", 1.5, -1, 0, True, 2 ** 40, [], {}, 1e3],
    "max_completion_tokens": ["10", 1.5, -1, 0, False, 10 ** 7, [], {}],
    "n": [0, 129, "2", 1.0, True, -3, []],
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
    azure = path == AZURE
    kinds = ["truncated_json", "malformed_json", "random_bytes", "wrong_type", "huge",
             "deep", "unknown_fields", "content_type", "oversized", "header_injection",
             "reflection", "bad_auth", "wrong_method"]
    if azure:
        kinds += ["api_version", "traversal"]
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
            if n not in body and n not in ("model", "stream", "n", "max_tokens", "input",
                                           "max_completion_tokens", "stream_options",
                                           "messages", "prompt"):
                body[n] = draw(values)
        raw = json.dumps(body).encode()
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


@pytest.mark.parametrize("path", GET_ROUTES)
def test_bad_requests_to_other_routes(target: Target, path: str) -> None:
    @settings(SETTINGS, max_examples=110)
    @given(case=bad_get(path))
    def run(case: dict[str, Any]) -> None:
        check(f"GET {path}", case, send(target, case))

    run()


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

    threads = [threading.Thread(target=slow_client) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    fast = []
    for _ in range(5):
        t0 = time.monotonic()
        reply = exchange(target.port, request_bytes("POST", "/v1/chat/completions", [
            (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode())], body))
        fast.append((time.monotonic() - t0, reply.status))
    for t in threads:
        t.join(15)
    for took, status in fast:
        assert status == 200 and took < 0.5, fast
    assert len(replies) == 20
    for took, reply in replies:
        SEEN[("POST /v1/chat/completions", "slow_body", str(reply.status // 100) + "xx")] += 1
        assert reply.status == 408, reply
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
        assert BODY_TIMEOUT - 0.1 < took < BODY_TIMEOUT + 1.5, took


def test_gateway_is_healthy_afterwards(target: Target) -> None:
    """Run last: every route got its 500+, nothing bad reached a region, nothing was
    logged as an error, and the gateway serves as before, with no leaked descriptors."""
    url = target.url
    assert get_json(f"{url}/healthz") == {"status": "ok"}
    ready = get_json(f"{url}/readyz")
    assert ready["status"] == "ready" and not ready["degraded"]
    ok = exchange(target.port, request_bytes("POST", "/v1/chat/completions", [
        (b"Content-Type", b"application/json"), (b"api-key", CLIENT_KEY.encode())],
        json.dumps(valid_body("chat/completions", False)).encode()))
    assert ok.status == 200, ok
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
    # Nothing but the forwarded class (and the two checks above) reached a region.
    stats = get_json(f"{target.rig.sim_url}/_sim/stats")["regions"]
    calls = sum(d["requests"] for deps in stats.values() for d in deps.values())
    forwarded = sum(n for (route, kind, _), n in SEEN.items() if kind == "unknown_fields")
    assert calls <= forwarded + 2 + 5, (calls, forwarded)  # + this test + the slow test

    per_route, bad = Counter[str](), Counter[str]()
    for (route, kind, _), n in SEEN.items():
        per_route[route] += n
        bad[route] += 0 if kind == "unknown_fields" else n
    for route in POST_ROUTES:
        assert bad[route] >= 500, bad  # bad ones only: forwarded unknown fields not counted
    for path in GET_ROUTES:
        assert bad[f"GET {path}"] >= 100, bad
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
}


def _record(per_route: Counter[str]) -> None:
    """One row per input class, and a total; `per_route` counts the bad requests."""
    kinds: dict[str, Counter[str]] = {}
    routes: dict[str, set[str]] = {}
    for (route, kind, outcome), n in SEEN.items():
        kinds.setdefault(kind, Counter())[outcome] += n
        routes.setdefault(kind, set()).add(route)
    for kind, outcomes in kinds.items():
        forwarded = kind == "unknown_fields"
        where = "every route" if len(routes[kind]) == len(per_route) else \
            "every API route" if routes[kind] >= set(POST_ROUTES) else \
            "Azure routes" if all("deployments" in r for r in routes[kind]) else \
            ", ".join(sorted(routes[kind]))
        record(Row("input", CLASSES.get(kind, kind), where, sum(outcomes.values()),
                   outcomes["5xx"], "0 5xx; relayed upstream answer" if forwarded else
                   "0 5xx; all 4xx, OpenAI-shaped, none reached a region", 0,
                   ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))))
    total = sum(sum(c.values()) for c in kinds.values())
    record(Row("input", "All hostile input (hypothesis, derandomized)",
               f"{len(per_route)} routes", total, sum(c["5xx"] for c in kinds.values()),
               "0 5xx, 0 tracebacks, healthy after", 0,
               "bad requests per route (unknown fields not counted): " +
               ", ".join(f"{r}: {n}" for r, n in per_route.items()),
               {"per_route": dict(per_route)}))
