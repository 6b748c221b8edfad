"""Reading a config file: the file, its YAML, the REDIS_URL override, the problems."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import yaml

from balancer.config.model import Config, store_url
from balancer.config.schema import Walker

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
    redis_url = env.get("REDIS_URL")
    if redis_url:
        config = replace(config, store=replace(config.store, url=redis_url))
        if reason := store_url(redis_url):
            walker.fail("REDIS_URL", reason)
    if walker.problems:
        raise ConfigError(file, walker.problems)
    return config
