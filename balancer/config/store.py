"""The store's section of the configuration: its URL (plain, TLS, cluster, Sentinel), the
TLS files, and the URL's password kept out of every log and repr."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from balancer.config.schema import NAME, setting

# The one list of store URL schemes: validated here, dispatched on by capacity.factory.
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster",
                 "redis+sentinel", "rediss+sentinel")


def store_url(url: str, _: Any = None) -> str | None:
    """The scheme is one of STORE_SCHEMES; a sentinel URL names its sentinels and primary.
    The reason never quotes the URL: it may hold a password."""
    scheme = urlsplit(url).scheme
    if scheme not in STORE_SCHEMES:
        return (f"unsupported store URL scheme {scheme!r} (use memory://, redis://, "
                "rediss://, redis+cluster://, rediss+cluster://, redis+sentinel:// or "
                "rediss+sentinel://)")
    if scheme in SENTINEL_SCHEMES:
        try:
            sentinel_url(url)
        except ValueError as exc:
            return str(exc)
    return None


# -- the store's URL and TLS files (StoreConfig) -------------------------------------------

TLS_SCHEMES = ("rediss", "rediss+cluster", "rediss+sentinel")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """`redis[s]+sentinel://[user:password@]host[:port],host[:port]/<primary>[/<db>]`
    taken apart. The userinfo authenticates to the primary (and its replicas) and, unless
    the query's `sentinel_username` / `sentinel_password` say otherwise (an empty
    `sentinel_password=`: none), to the sentinels too."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def sentinel_url(url: str) -> SentinelURL:
    """Raises ValueError with a reason that never quotes the URL (it may hold a password)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for host in hosts.split(","):
        name, port = _host_port(host.strip())
        if not name:
            raise ValueError("a sentinel URL lists its sentinels as host:port, separated by "
                             "',' (redis+sentinel://s1:26379,s2:26379/mymaster)")
        sentinels.append((name, port))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a sentinel URL names the primary, and optionally a db: "
                         "redis+sentinel://s1:26379,s2:26379/mymaster[/0]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError("the db after the primary's name must be a number")
        db = int(path[1])
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"unknown sentinel URL parameter(s) {', '.join(sorted(unknown))} "
                         "(sentinel_username and sentinel_password are known)")
    s_user = query.get("sentinel_username", username) or None
    s_pass = query.get("sentinel_password", password) or None
    return SentinelURL(tuple(sentinels), unquote(path[0]), db,
                       parts.scheme.startswith("rediss"), username, password, s_user, s_pass)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if port and not port.isdigit():
        raise ValueError("a sentinel's port must be a number")
    return host, int(port) if port else SENTINEL_PORT


def redact_url(url: str) -> str:
    """The URL with its password (userinfo, or a `*password=` parameter) as `***`, for
    logs: `rediss://user:***@host:6380/0`."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}")
    if "password" in parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query="&".join(
            f"{k}={'***' if 'password' in k and v else v}" for k, v in pairs))
    return parts.geturl() if parts != urlsplit(url) else url


def pem_file(path: str | None, _: Any = None) -> str | None:
    """A file that exists, can be read, and holds PEM."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if b"-----BEGIN " not in head:
        return f"{path!r} is not a PEM file (no -----BEGIN line)"
    return None


def ca_pem(path: str | None, _: Any) -> str | None:
    if reason := pem_file(path):
        return reason
    if path:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            return f"{path!r} holds no CA certificate OpenSSL can load ({exc.reason or exc})"
    return None


def client_key(path: str | None, store: Mapping[str, Any]) -> str | None:
    """With cert_file: the two load as a certificate and its private key (key_file may be
    left out when cert_file holds both). Encrypted keys are not supported."""
    cert = store["cert_file"]
    if path and not cert:
        return "is only for mutual TLS: give cert_file too"
    if path and (reason := pem_file(path)):
        return reason
    if not cert or pem_file(cert):  # no mutual TLS, or already reported on cert_file
        return None
    try:  # a password callback: an encrypted key fails here instead of prompting
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, path or None,
                                                                password=lambda: b"")
    except ssl.SSLError as exc:
        what = "cert_file and key_file are not" if path else \
            "is required unless cert_file holds the private key too; cert_file is not"
        return f"{what} a certificate and its unencrypted private key ({exc.reason or exc})"
    return None


def _prefix(prefix: str, _: Any) -> str | None:
    return None if NAME.match(prefix) else "must be letters, digits, '.', '_' or '-'"


def _blank_is_none(path: str | None) -> str | None:
    return path or None  # `${VAR:-}` unset: no file


@dataclass(frozen=True)
class StoreConfig:
    url: str = setting("memory://", "capacity store; REDIS_URL overrides", check=store_url)
    key_prefix: str = setting("bal", "prefix of every store key",
                              check=_prefix)
    cluster: bool = setting(False, "Redis Cluster even without a +cluster URL scheme")
    timeout_seconds: float = setting(  # a slow store must not slow requests: degrade instead
        0.25, "per store call", exclusive=True)
    key_ttl_seconds: int = setting(3600, "removed regions' keys expire after this",
                                   minimum=1)
    # TLS (rediss://, rediss+cluster://, rediss+sentinel://); load.check_store refuses them
    # with any other scheme, REDIS_URL's included. Paths are read at config load.
    ca_file: str | None = setting(None, "CA certificate(s), PEM, that the Redis server's "
                                        "certificate must chain to (default: the system's)",
                                  check=ca_pem, normalize=_blank_is_none)
    cert_file: str | None = setting(None, "client certificate, PEM, for mutual TLS",
                                    check=pem_file, normalize=_blank_is_none)
    key_file: str | None = setting(None, "cert_file's private key, PEM, unencrypted",
                                   check=client_key, normalize=_blank_is_none)

    @property
    def redacted_url(self) -> str:
        """`url` as logs may show it: the password replaced by `***`."""
        return redact_url(self.url)

    def __repr__(self) -> str:  # the dataclass's would show the URL's password
        return (f"StoreConfig(url={self.redacted_url!r}, key_prefix={self.key_prefix!r}, "
                f"cluster={self.cluster!r}, timeout_seconds={self.timeout_seconds!r}, "
                f"key_ttl_seconds={self.key_ttl_seconds!r}, ca_file={self.ca_file!r}, "
                f"cert_file={self.cert_file!r}, key_file={self.key_file!r})")
