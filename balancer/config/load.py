"""Reading a config file: the file, its YAML, the REDIS_URL override, the problems."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from balancer.config.model import Config, one_of_the_classes
from balancer.config.schema import Walker, _closest
from balancer.config.store import (
    SENTINEL_SCHEMES,
    STORE_SCHEMES,
    TLS_SCHEMES,
    StoreConfig,
    store_url,
)

DEFAULT_PATH = "regions.yaml"


class ConfigError(Exception):
    """Every problem found in one config file, each naming file, field and reason."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        lines = [f"{file}: {path or '<root>'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


def config_path(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    return explicit or env.get("BALANCER_CONFIG") or DEFAULT_PATH


def load(
    path: str | os.PathLike[str],
    env: Mapping[str, str] = os.environ,
    *,
    simulate: bool = False,
) -> Config:
    """Read and validate a config file. `simulate` tolerates unset endpoint and key
    variables, because `serve --simulate` replaces them with local simulated regions."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    return parse(text, file, env, simulate=simulate)


def parse(
    text: str,
    file: str = "<string>",
    env: Mapping[str, str] = os.environ,
    *,
    simulate: bool = False,
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, [(where, f"invalid YAML: {reason}")]) from None
    walker = Walker(env, simulate)
    if raw is None:
        walker.fail("", "the file is empty")
    config = walker.build(Config, raw, "", {"source": file})
    check_clients(config, raw, walker)
    redis_url = env.get("REDIS_URL")
    if redis_url:
        config = replace(config, store=replace(config.store, url=redis_url))
        if reason := store_url(redis_url):
            walker.fail("REDIS_URL", reason)
    check_store(config.store, walker, "REDIS_URL" if redis_url else "store.url")
    if walker.problems:
        raise ConfigError(file, walker.problems)
    return config


def check_store(store: StoreConfig, walker: Walker, source: str) -> None:
    """What depends on the store URL in effect (REDIS_URL's, when set): TLS files only
    with a TLS scheme, and no `cluster: true` with Sentinel."""
    scheme = urlsplit(store.url).scheme
    if scheme not in STORE_SCHEMES:
        return  # already reported
    if scheme not in TLS_SCHEMES:
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(store, name):
                walker.fail(f"store.{name}", "is only for TLS store URLs (rediss://, "
                            f"rediss+cluster://, rediss+sentinel://); {source} is {scheme}://")
    if scheme in SENTINEL_SCHEMES and store.cluster:
        walker.fail("store.cluster", f"a Sentinel-managed primary is not a cluster ({source} "
                                     f"is {scheme}://)")


def check_clients(config: Config, raw: Any, walker: Walker) -> None:
    """What spans clients, or clients and other sections: no two share a key, a client's
    `class` is one of the admission queue's, and its budgets name configured models."""
    # A region with problems may lack models it names: no knock-on errors about them.
    regions_ok = not any(path.startswith("regions") for path, _ in walker.problems)
    models = set(config.models) if regions_ok else set()
    classes = {"classes": config.admission_queue.classes}
    seen: dict[str, str] = {}  # key digest (hex) -> the client holding it
    for path, client in zip(item_paths(raw, "clients"), config.clients, strict=False):
        if client.priority_class is not None and \
                (reason := one_of_the_classes(client.priority_class, classes)):
            walker.fail(f"{path}.class", reason)
        for model in client.budgets:
            if regions_ok and model not in models:
                hint = _closest(model, models)
                suffix = f" (did you mean {hint!r}?)" if hint else ""
                walker.fail(f"{path}.budgets.{model}",
                            "unknown model: no region deploys it" + suffix)
        if client.key is not None:
            field, digest = "key", hashlib.sha256(client.key.reveal().encode()).hexdigest()
        elif client.key_sha256 is not None:
            field, digest = "key_sha256", client.key_sha256
        else:
            continue  # already reported
        if digest in seen:  # never the key itself: whose it is
            walker.fail(f"{path}.{field}", f"the same key as client {seen[digest]!r}")
        else:
            seen[digest] = client.name


def item_paths(raw: Any, key: str) -> list[str]:
    """The paths of the items the walker built from the list `raw[key]`, in order (it
    skips a bare `-` and items that are not mappings, so the i-th built item is not
    always `key[i]`)."""
    items = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(items, list):
        return []
    return [f"{key}[{i}]" for i, item in enumerate(items) if isinstance(item, dict) and item]
