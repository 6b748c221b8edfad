"""regions.yaml validation: every error names the file, the field path and the reason."""

from __future__ import annotations

import textwrap

import pytest

from balancer import config
from balancer.cli import main as cli_main
from balancer.config import ConfigError

ENV = {"EP": "https://eastus2.openai.azure.com", "KEY": "s3cret-key-value"}

GOOD = """
listen: {host: 127.0.0.1, port: 9000}
store: {url: "memory://"}
regions:
  - name: eastus2
    kind: azure
    endpoint: ${EP}
    api_key: ${KEY}
    api_version: "2024-06-01"
    priority: 0
    deployments:
      gpt-4: {deployment: gpt4-dep, tpm: 100000}
  - name: fallback
    kind: openai
    endpoint: ${OPENAI_URL:-https://api.openai.com/v1}
    api_key: ${KEY}
    priority: 1
    deployments:
      gpt-4: {deployment: gpt-4o, tpm: 30000, rpm: 50, weight: 2, default_max_tokens: 500}
"""


def parse(text: str, env: dict[str, str] | None = None) -> config.Config:
    return config.parse(textwrap.dedent(text), "regions.yaml", ENV if env is None else env)


def problems(text: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.problems


def test_good_file_parses_with_defaults_and_env() -> None:
    cfg = parse(GOOD)
    assert cfg.listen.port == 9000
    east, fallback = cfg.regions
    assert east.endpoint == "https://eastus2.openai.azure.com"
    assert east.api_key is not None and east.api_key.reveal() == "s3cret-key-value"
    assert east.deployments["gpt-4"].rpm == 600  # tpm * 6 / 1000
    assert fallback.endpoint == "https://api.openai.com/v1"  # ${VAR:-default}
    assert fallback.deployments["gpt-4"].weight == 2.0
    assert [t.region.name for t in cfg.models["gpt-4"]] == ["eastus2", "fallback"]


def test_secrets_never_show_in_repr() -> None:
    cfg = parse(GOOD)
    assert "s3cret" not in repr(cfg)
    assert "s3cret" not in str(cfg.regions[0].api_key)


def test_unknown_key_is_an_error_with_a_hint() -> None:
    bad = GOOD.replace("tpm: 100000}", "tpm: 100000, wieght: 2}")
    assert problems(bad) == [
        ("regions[0].deployments.gpt-4.wieght", "unknown key (did you mean 'weight'?)")]


def test_every_problem_is_reported_with_its_path() -> None:
    bad = GOOD.replace("tpm: 100000", "tpm: -5").replace("kind: openai", "kind: aws")
    bad = bad.replace("port: 9000", "port: nine")
    found = dict(problems(bad))
    assert found["regions[0].deployments.gpt-4.tpm"] == "must be >= 1, got -5"
    assert found["regions[1].kind"].startswith("must be one of azure, openai")
    assert found["listen.port"] == "must be a number, got 'nine'"


def test_missing_environment_variable_is_named() -> None:
    assert problems(GOOD, {"EP": "https://x.example"}) == [
        ("regions[0].api_key", "environment variable KEY is not set"),
        ("regions[1].api_key", "environment variable KEY is not set")]


def test_simulate_tolerates_unset_endpoint_and_key() -> None:
    cfg = config.parse(textwrap.dedent(GOOD), "regions.yaml", {}, simulate=True)
    assert cfg.regions[0].api_key is None


def test_semantic_errors() -> None:
    dup = GOOD.replace("name: fallback", "name: eastus2")
    assert ("regions[1].name", "duplicate region name 'eastus2'") in problems(dup)
    no_version = GOOD.replace('api_version: "2024-06-01"', "")
    assert ("regions[0].api_version", "is required for kind azure (v1, or a dated version "
            "such as 2024-10-21)") in problems(no_version)
    for bad in ('""', "v2", "2024-6-1", "latest", "2024-06-01-beta"):
        wrong = GOOD.replace('api_version: "2024-06-01"', f"api_version: {bad}")
        assert problems(wrong)[0][0] == "regions[0].api_version", bad
    for good in ("v1", '"2025-04-01-preview"'):
        text = textwrap.dedent(GOOD.replace('api_version: "2024-06-01"', f"api_version: {good}"))
        assert config.parse(text, "r.yaml", ENV).regions[0].api_version == good.strip('"')
    bad_url = GOOD.replace("endpoint: ${EP}", "endpoint: ftp://x")
    assert problems(bad_url)[0][0] == "regions[0].endpoint"
    no_tpm = GOOD.replace("tpm: 100000", "rpm: 5")
    assert ("regions[0].deployments.gpt-4.tpm", "is required") in problems(no_tpm)


@pytest.mark.parametrize("text, path", [
    ("", ""),
    ("regions: []", "regions"),
    ("regions: {a: 1}", "regions"),
    ("[1, 2]", ""),
    ("listen: {host: x, port: 1}\nlisten2: 3\nregions: []", "listen2"),
    ("regions:\n  - name: a\n    kind: azure\n", "regions[0].endpoint"),
    ("gateway: {max_attempts: 0}\nregions: []", "gateway.max_attempts"),
    ("store: {url: 'mongodb://x'}\nregions: []", "store.url"),
    ("regions: [\n", "line 2, column 1"),
])
def test_broken_files_are_refused(text: str, path: str) -> None:
    assert path in [p for p, _ in problems(text)]


def test_redis_url_env_overrides_store(tmp_path) -> None:
    cfg = config.parse(textwrap.dedent(GOOD), "r.yaml", {**ENV, "REDIS_URL": "redis://h:1/0"})
    assert cfg.store.url == "redis://h:1/0"


def test_shipped_regions_yaml_is_valid() -> None:
    cfg = config.load("regions.yaml", {}, simulate=True)
    azure = [t for t in cfg.models["gpt-4"] if t.region.kind == "azure"]
    # DESIGN.md says 480K in all, but its own table adds up to 520K; the table wins.
    assert sum(t.deployment.tpm for t in azure) == 520_000
    assert {t.region.priority for t in cfg.models["gpt-4"]} == {0, 1}


def test_check_command(tmp_path, capsys, monkeypatch) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    monkeypatch.setenv("EP", ENV["EP"])
    monkeypatch.setenv("KEY", ENV["KEY"])
    assert cli_main(["check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("tpm: 100000", "tpm: lots"))
    assert cli_main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: regions[0].deployments.gpt-4.tpm: must be a number" in err
    assert "s3cret" not in err
    monkeypatch.setenv("BALANCER_CONFIG", str(good))
    assert cli_main(["check"]) == 0
