"""The store's URL and TLS settings: rediss:// with ca_file / cert_file / key_file (read
and checked at config load, refused with file, field and reason like every config
error), ACL credentials in the URL or its ${VARS}, REDIS_URL, redis+sentinel:// URLs,
and a password that never shows: not in a config error, a repr, nor `balancer check`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from balancer import config
from balancer.capacity.connection import connect, tls_options
from balancer.cli import main as cli_main
from balancer.config import ConfigError, StoreConfig
from balancer.config.store import SentinelURL, redact_url, sentinel_url
from tests.store.conftest import TLSFiles, make_tls_files

PASSWORD = "pw-Zq81-not-in-any-log"
REGIONS = """
regions:
  - name: eastus2
    kind: azure
    endpoint: https://eastus2.openai.azure.com
    api_key: k
    api_version: v1
    deployments:
      gpt-4: {deployment: gpt-4, tpm: 1000}
"""


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("certs"))


def parse(store: str, env: dict[str, str] | None = None) -> config.Config:
    text = f"store: {store}\n" + textwrap.dedent(REGIONS)
    return config.parse(text, "regions.yaml", env or {})


def problems(store: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(store, env)
    assert PASSWORD not in str(info.value)  # what `balancer check` and reloads print
    return info.value.problems


# --------------------------------------------------------------------------- TLS files


def test_tls_files_load(tls: TLSFiles) -> None:
    store = parse(f'{{url: "rediss://u:{PASSWORD}@h:6380/0", ca_file: {tls.ca}, '
                  f"cert_file: {tls.client_cert}, key_file: {tls.client_key}}}").store
    assert (store.ca_file, store.cert_file, store.key_file) == (
        tls.ca, tls.client_cert, tls.client_key)
    assert tls_options(store) == {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.client_cert,
                                  "ssl_keyfile": tls.client_key}
    # One-way TLS needs only the CA (none: the system's CAs), and blank ${VAR:-}s are unset.
    assert parse(f"{{url: 'rediss://h:6380', ca_file: {tls.ca}}}").store.cert_file is None
    blank = parse("{url: 'rediss://h:6380', ca_file: '${CA:-}', cert_file: '${C:-}'}").store
    assert (blank.ca_file, blank.cert_file, blank.key_file) == (None, None, None)
    # A certificate file that holds its key too needs no key_file.
    both = Path(tls.client_cert).with_name("both.pem")
    both.write_text(Path(tls.client_cert).read_text() + Path(tls.client_key).read_text())
    assert parse(f"{{url: 'rediss://h', cert_file: {both}}}").store.key_file is None


def test_broken_tls_files_are_refused_with_file_field_and_reason(tls: TLSFiles,
                                                                 tmp_path: Path) -> None:
    url = f"url: 'rediss://u:{PASSWORD}@h:6380/0'"
    missing = tmp_path / "nope.crt"
    assert problems(f"{{{url}, ca_file: {missing}}}") == [
        ("store.ca_file", f"cannot read '{missing}': No such file or directory")]
    assert problems(f"{{{url}, ca_file: {tmp_path}}}") == [
        ("store.ca_file", f"cannot read '{tmp_path}': Is a directory")]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert problems(f"{{{url}, ca_file: {junk}}}") == [
        ("store.ca_file", f"'{junk}' is not a PEM file (no -----BEGIN line)")]
    # A PEM that is not a certificate (a key) is no CA.
    [(path, reason)] = problems(f"{{{url}, ca_file: {tls.client_key}}}")
    assert path == "store.ca_file" and "holds no CA certificate" in reason
    # cert_file without its key, a key without a certificate, a key of another cert.
    [(path, reason)] = problems(f"{{{url}, cert_file: {tls.client_cert}}}")
    assert path == "store.key_file" and reason.startswith("is required unless cert_file")
    assert problems(f"{{{url}, key_file: {tls.client_key}}}") == [
        ("store.key_file", "is only for mutual TLS: give cert_file too")]
    [(path, reason)] = problems(f"{{{url}, cert_file: {tls.client_cert}, "
                                f"key_file: {tls.server_key}}}")
    assert path == "store.key_file" and reason.startswith("cert_file and key_file are not")
    # A broken cert_file is reported once, on cert_file.
    assert problems(f"{{{url}, cert_file: {missing}, key_file: {tls.client_key}}}") == [
        ("store.cert_file", f"cannot read '{missing}': No such file or directory")]


def test_tls_files_only_with_a_tls_scheme(tls: TLSFiles) -> None:
    assert problems(f"{{url: 'redis://h:6379/0', ca_file: {tls.ca}}}") == [
        ("store.ca_file", "is only for TLS store URLs (rediss://, rediss+cluster://, "
                          "rediss+sentinel://); store.url is redis://")]
    for scheme in ("rediss", "rediss+cluster", "rediss+sentinel"):
        assert parse(f"{{url: '{scheme}://h:1/mymaster', ca_file: {tls.ca}}}")
    # The URL in effect decides: REDIS_URL's, when set.
    tls_yaml = f"{{url: 'memory://', ca_file: {tls.ca}}}"
    assert parse(tls_yaml, {"REDIS_URL": "rediss://h:6380/0"}).store.url == "rediss://h:6380/0"
    assert problems(tls_yaml, {"REDIS_URL": f"redis://:{PASSWORD}@h:6379/0"}) == [
        ("store.ca_file", "is only for TLS store URLs (rediss://, rediss+cluster://, "
                          "rediss+sentinel://); REDIS_URL is redis://")]


# --------------------------------------------------------------------------- credentials


def test_credentials_from_variables_in_the_url_and_from_redis_url() -> None:
    env = {"REDIS_USER": "balancer", "REDIS_PASSWORD": PASSWORD}
    cfg = parse('{url: "rediss://${REDIS_USER}:${REDIS_PASSWORD}@redis.example:6380/0"}', env)
    assert cfg.store.url == f"rediss://balancer:{PASSWORD}@redis.example:6380/0"
    assert cfg.store.redacted_url == "rediss://balancer:***@redis.example:6380/0"
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg.store)
    assert problems('{url: "rediss://u:${REDIS_PASSWORD}@h:6380/0"}', {}) == [
        ("store.url", "environment variable REDIS_PASSWORD is not set")]
    # REDIS_URL replaces store.url whole (no ${VAR} in it: it is a variable already).
    cfg = parse("{url: 'memory://'}", {"REDIS_URL": f"rediss://u:{PASSWORD}@h:6380/1"})
    assert cfg.store.url == f"rediss://u:{PASSWORD}@h:6380/1"
    client = connect(cfg.store)  # redis-py takes user and password from the URL
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("u", PASSWORD, 1)
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


@pytest.mark.parametrize("url, shown", [
    (f"rediss://user:{PASSWORD}@h:6380/0", "rediss://user:***@h:6380/0"),
    (f"redis://:{PASSWORD}@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://user@h:6379", "redis://user@h:6379"),
    ("memory://", "memory://"),
    (f"redis+sentinel://:{PASSWORD}@s1:26379,s2/mymaster/2",
     "redis+sentinel://:***@s1:26379,s2/mymaster/2"),
    (f"redis+sentinel://s1/m?sentinel_password={PASSWORD}",
     "redis+sentinel://s1/m?sentinel_password=***"),
    (f"rediss://h/0?password={PASSWORD}&ssl_check_hostname=false",
     "rediss://h/0?password=***&ssl_check_hostname=false"),
])
def test_redacted_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_check_command_shows_no_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    bad = tmp_path / "regions.yaml"
    bad.write_text(f"store: {{url: 'redis://:{PASSWORD}@h:1/0', ca_file: /nope.pem}}\n"
                   + textwrap.dedent(REGIONS))
    assert cli_main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: store.ca_file: cannot read '/nope.pem'" in err
    assert f"{bad}: store.ca_file: is only for TLS store URLs" in err
    assert PASSWORD not in err


# --------------------------------------------------------------------------- Sentinel


def test_sentinel_urls() -> None:
    s = sentinel_url(f"redis+sentinel://u:{PASSWORD}@10.0.0.1:26380,s2,[::1]:26381/mymaster/3")
    assert s == SentinelURL(sentinels=(("10.0.0.1", 26380), ("s2", 26379), ("::1", 26381)),
                            service="mymaster", db=3, tls=False, username="u",
                            password=PASSWORD, sentinel_username="u",
                            sentinel_password=PASSWORD)
    assert PASSWORD not in repr(s)
    tls = sentinel_url("rediss+sentinel://s1:26379/mymaster")
    assert (tls.tls, tls.db, tls.password, tls.sentinel_password) == (True, 0, None, None)
    # Sentinels with other credentials than the data nodes, or none.
    other = sentinel_url(f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_password=spw")
    assert (other.password, other.sentinel_password) == (PASSWORD, "spw")
    none = sentinel_url(f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_password=")
    assert (none.password, none.sentinel_password) == (PASSWORD, None)


@pytest.mark.parametrize("url, reason", [
    ("redis+sentinel://s1:26379", "names the primary"),
    ("redis+sentinel://s1:26379/", "names the primary"),
    ("redis+sentinel://s1/m/0/1", "names the primary"),
    ("redis+sentinel://s1/m/zero", "db after the primary's name must be a number"),
    ("redis+sentinel://s1:port/m", "port must be a number"),
    ("redis+sentinel://s1,,s2/m", "lists its sentinels as host:port"),
    ("redis+sentinel://s1/m?db=2", "unknown sentinel URL parameter(s) db"),
])
def test_broken_sentinel_urls_are_refused(url: str, reason: str) -> None:
    secret = url.replace("://", f"://:{PASSWORD}@")
    [(path, text)] = problems(f"{{url: '{secret}'}}")
    assert path == "store.url" and reason in text
    [(path, text)] = problems("{url: 'memory://'}", {"REDIS_URL": secret})
    assert path == "REDIS_URL" and reason in text


def test_sentinel_is_no_cluster() -> None:
    assert problems("{url: 'redis+sentinel://s1/m', cluster: true}") == [
        ("store.cluster", "a Sentinel-managed primary is not a cluster (store.url is "
                          "redis+sentinel://)")]


def test_unknown_scheme_names_the_sentinel_ones() -> None:
    [(path, reason)] = problems("{url: 'sentinel://s1/m'}")
    assert path == "store.url" and "redis+sentinel:// or rediss+sentinel://" in reason


def test_store_config_repr_hides_the_password() -> None:
    store = StoreConfig(url=f"rediss://u:{PASSWORD}@h:6380/0")
    assert PASSWORD not in repr(store) and "rediss://u:***@h:6380/0" in repr(store)
