"""A tiny HTTP/1.1 client over a plain socket: sends exactly the bytes it is given (CR,
LF, NUL, bad framing and all) and parses whatever comes back. Every call is bounded by
a timeout; only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int  # 0: the connection closed (or timed out) without an answer
    headers: dict[str, list[str]] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def request_bytes(method: str, target: str, headers: Iterable[tuple[bytes, bytes]],
                  body: bytes = b"", *, content_length: bool = True) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    lines = [b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_length and body and not any(n.lower() in (b"content-length",
                                                         b"transfer-encoding")
                                           for n, _ in headers):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return head + b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(port: int, data: bytes, *, timeout: float = 10.0) -> Reply:
    """Send `data`, read one response (Content-Length or until the server closes)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        buf = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                chunk = b""
            if not chunk:
                break
            buf += chunk
            reply = parse(buf)
            if reply is not None and reply.status:
                return reply
            if time.monotonic() > deadline:
                break
    return parse(buf, final=True) or Reply(0)


def parse(buf: bytes, *, final: bool = False) -> Reply | None:
    """A complete response in `buf`, or None while it is incomplete."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return Reply(0, raw_head=buf) if final else None
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Reply(0, raw_head=head)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(
            value.strip().decode("latin-1"))
    reply = Reply(status, headers, rest, head)
    length = headers.get("content-length")
    if length is not None:
        if len(rest) >= int(length[0]):
            reply.body = rest[:int(length[0])]
            return reply
        return reply if final else None
    if headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        body, done = _dechunk(rest)
        reply.body = body
        return reply if done or final else None
    return reply if final else None


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            return out, False
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            return out, True
        if len(data) < size + 2:
            return out, False
        out, data = out + data[:size], data[size + 2:]
