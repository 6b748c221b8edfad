"""regions.yaml `clients:` and `fair_share:`: a valid file loads; every broken case names
the file, the field path and the reason; no key ever shows in a repr or an error."""

from __future__ import annotations

import hashlib
import textwrap

import pytest

from balancer import config
from balancer.config import ConfigError

TEAM_A_KEY = "ck-team-a-0123456789abcdef"
TEAM_B_KEY = "ck-team-b-fedcba9876543210"
TEAM_B_SHA = hashlib.sha256(TEAM_B_KEY.encode()).hexdigest()
ENV = {"TEAM_A_KEY": TEAM_A_KEY}

REGIONS = """
regions:
  - name: eastus2
    kind: openai
    endpoint: https://example.invalid/v1
    api_key: region-key
    deployments:
      gpt-4: {tpm: 100000}
      text-embedding-3-small: {tpm: 350000}
"""

GOOD = REGIONS + f"""
clients:
  - name: team-a
    key: ${{TEAM_A_KEY}}
    class: high
    weight: 2
    budgets:
      gpt-4: {{tpm: 120000, rpm: 600, tokens_per_day: 5e7, tokens_per_month: 1000000000}}
  - name: team-b
    key_sha256: {TEAM_B_SHA.upper()}
    budgets:
      text-embedding-3-small: {{tpm: 50000}}
fair_share: {{enabled: true, window_seconds: 20, headroom: 0.1}}
"""


def parse(text: str, env: dict[str, str] | None = None) -> config.Config:
    return config.parse(textwrap.dedent(text), "regions.yaml", ENV if env is None else env)


def problems(text: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.problems


def clients(*entries: str) -> str:
    """A file with `entries` (YAML mappings, one per client) under `clients:`."""
    return REGIONS + "clients:\n" + "".join(f"  - {e}\n" for e in entries)


def test_a_valid_file_loads() -> None:
    cfg = parse(GOOD)
    a, b = cfg.clients
    assert (a.name, a.priority_class, a.weight) == ("team-a", "high", 2.0)
    assert a.key is not None and a.key.reveal() == TEAM_A_KEY and a.key_sha256 is None
    assert a.budgets["gpt-4"] == config.ClientBudget(
        tpm=120_000, rpm=600, tokens_per_day=50_000_000, tokens_per_month=1_000_000_000)
    assert b.key is None and b.key_sha256 == TEAM_B_SHA  # normalised to lowercase
    assert (b.priority_class, b.weight) == (None, 1.0)
    assert b.budgets == {"text-embedding-3-small": config.ClientBudget(tpm=50_000)}
    assert cfg.fair_share == config.FairShare(enabled=True, window_seconds=20.0, headroom=0.1)


def test_defaults_without_clients() -> None:
    cfg = parse(REGIONS)
    assert cfg.clients == ()
    assert cfg.fair_share == config.FairShare(enabled=True, window_seconds=10.0, headroom=0.05)
    assert parse(clients("{name: x, key: k}")).clients[0].budgets == {}


def test_keys_never_show_in_repr_or_errors() -> None:
    cfg = parse(GOOD)
    for text in (repr(cfg), str(cfg), repr(cfg.clients), repr(cfg.clients[0].key)):
        assert TEAM_A_KEY not in text and TEAM_B_SHA not in text
    assert "team-a" in repr(cfg.clients[0])
    # A duplicate key names whose it is, never the key.
    dup = clients(f"{{name: a, key: {TEAM_A_KEY}}}", f"{{name: b, key: {TEAM_A_KEY}}}")
    with pytest.raises(ConfigError) as info:
        parse(dup)
    assert TEAM_A_KEY not in str(info.value)


@pytest.mark.parametrize("entries, env, path, reason", [
    (["{name: a}"], ENV, "clients[0].key",
     "is required, and must not be empty: the client's API key (usually ${VAR}), "
     "or key_sha256"),
    (["{name: a, key: '${EMPTY}'}"], {"EMPTY": ""}, "clients[0].key",
     "is required, and must not be empty: the client's API key (usually ${VAR}), "
     "or key_sha256"),
    (["{name: a, key: '${UNSET_KEY}'}"], {}, "clients[0].key",
     "environment variable UNSET_KEY is not set"),
    ([f"{{name: a, key: k, key_sha256: {TEAM_B_SHA}}}"], ENV, "clients[0].key",
     "give key or key_sha256, not both"),
    (["{name: a, key_sha256: abc123}"], ENV, "clients[0].key_sha256",
     "must be 64 hex digits (the SHA-256 of the key, e.g. from sha256sum)"),
    (["{name: a, key_sha256: " + "g" * 64 + "}"], ENV, "clients[0].key_sha256",
     "must be 64 hex digits (the SHA-256 of the key, e.g. from sha256sum)"),
    (["{name: a, key: k, budgets: {gpt4: {tpm: 10}}}"], ENV, "clients[0].budgets.gpt4",
     "unknown model: no region deploys it (did you mean 'gpt-4'?)"),
    (["{name: a, key: k, budgets: {llama: {tpm: 10}}}"], ENV, "clients[0].budgets.llama",
     "unknown model: no region deploys it"),
    (["{name: a, key: k, class: urgent}"], ENV, "clients[0].class",
     "must be one of the classes (low, normal, high), got 'urgent'"),
    (["{name: a, key: k1}", "{name: a, key: k2}"], ENV, "clients[1].name",
     "duplicate client name 'a'"),
    (["{name: a, key: k1}", "{name: b, key: k1}"], ENV, "clients[1].key",
     "the same key as client 'a'"),
    (["{name: a, key: " + TEAM_B_KEY + "}", "{name: b, key_sha256: " + TEAM_B_SHA + "}"],
     ENV, "clients[1].key_sha256", "the same key as client 'a'"),
    (["{name: a, key: k, weight: 0}"], ENV, "clients[0].weight", "must be > 0, got 0"),
    (["{name: a, key: k, weight: -1}"], ENV, "clients[0].weight", "must be > 0, got -1"),
    (["{name: a, key: k, budgets: {gpt-4: {tpm: 0}}}"], ENV,
     "clients[0].budgets.gpt-4.tpm", "must be >= 1, got 0"),
    (["{name: a, key: k, budgets: {gpt-4: {rpm: 1.5}}}"], ENV,
     "clients[0].budgets.gpt-4.rpm", "must be a whole number, got 1.5"),
    (["{name: a, key: k, budgets: {gpt-4: {tokens_per_day: 0}}}"], ENV,
     "clients[0].budgets.gpt-4.tokens_per_day", "must be >= 1, got 0"),
    (["{name: a, key: k, budgets: {gpt-4: {tpmm: 5}}}"], ENV,
     "clients[0].budgets.gpt-4.tpmm", "unknown key (did you mean 'tpm'?)"),
    (["{name: a, key: k, budgets: []}"], ENV, "clients[0].budgets",
     "must be a non-empty mapping of model name to budget"),
    (["{name: 'bad name', key: k}"], ENV, "clients[0].name",
     "must be 1-64 letters, digits, '.', '_' or '-'"),
    (["{key: k}"], ENV, "clients[0].name", "is required"),
    (["{name: a, key: k, klass: high}"], ENV, "clients[0].klass",
     "unknown key (did you mean 'class'?)"),
    # A bare `-` is skipped (as in regions): paths still name the item as written.
    (["", "{name: a, key: k, class: urgent}"], ENV, "clients[1].class",
     "must be one of the classes (low, normal, high), got 'urgent'"),
])
def test_broken_clients_name_field_and_reason(entries: list[str], env: dict[str, str],
                                              path: str, reason: str) -> None:
    found = problems(clients(*entries), env)
    assert (path, reason) in found, found
    assert len(found) == 1, found  # one mistake, one error: no knock-on


def test_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "regions.yaml"
    path.write_text(textwrap.dedent(clients("{name: a, key: k, weight: 0}")))
    with pytest.raises(ConfigError) as info:
        config.load(path, {})
    assert str(info.value) == f"{path}: clients[0].weight: must be > 0, got 0"


def test_class_follows_the_configured_classes() -> None:
    custom = clients("{name: a, key: k, class: gold}") + \
        "admission_queue: {classes: {bronze: 0, gold: 1}, default_class: bronze}\n"
    assert parse(custom).clients[0].priority_class == "gold"
    assert ("clients[0].class", "must be one of the classes (bronze, gold), got 'high'") in \
        problems(custom.replace("class: gold", "class: high"))


@pytest.mark.parametrize("block, path, reason", [
    ("{window_seconds: 0}", "fair_share.window_seconds", "must be > 0, got 0"),
    ("{headroom: 0.5}", "fair_share.headroom", "must be < 0.5, got 0.5"),
    ("{headroom: -0.1}", "fair_share.headroom", "must be >= 0, got -0.1"),
    ("{enabled: maybe}", "fair_share.enabled", "must be true or false, got a string"),
    ("{window_second: 5}", "fair_share.window_second",
     "unknown key (did you mean 'window_seconds'?)"),
])
def test_broken_fair_share(block: str, path: str, reason: str) -> None:
    assert problems(REGIONS + f"fair_share: {block}\n") == [(path, reason)]


def test_fair_share_off_and_zero_headroom() -> None:
    fair = parse(REGIONS + "fair_share: {enabled: false, headroom: 0}\n").fair_share
    assert (fair.enabled, fair.headroom) == (False, 0.0)


def test_unknown_budget_models_wait_for_regions_to_be_valid() -> None:
    """A broken region may lose the models it names: no knock-on unknown-model errors."""
    text = clients("{name: a, key: k, budgets: {gpt-4: {tpm: 5}}}").replace(
        "gpt-4: {tpm: 100000}", "gpt-4: {tpm: -1}")
    assert [p for p, _ in problems(text)] == ["regions[0].deployments.gpt-4.tpm"]


def test_shipped_example_parses_when_uncommented() -> None:
    """regions.yaml's commented `clients:` and `fair_share:` example is a valid file."""
    from pathlib import Path

    lines = Path(__file__).resolve().parents[1].joinpath("regions.yaml").read_text()
    lines_out, inside = [], False
    for line in lines.splitlines():
        if line.startswith(("# clients:", "# fair_share:")):
            inside = True
        elif inside and not line.startswith("#  ") and not line.startswith("# -"):
            inside = False
        lines_out.append(line[2:] if inside else line)
    text = "\n".join(lines_out)
    assert "\nclients:" in text and "\nfair_share:" in text
    env = {"CLIENT_SEARCH_KEY": "a-search-key"}
    cfg = config.parse(text, "regions.yaml", env, simulate=True)
    assert len(cfg.clients) == 2
    assert {c.name for c in cfg.clients} == {"search", "batch-reports"}
