"""deploy/: the Dockerfile, docker-compose.yml, Kubernetes manifests, Prometheus scrape
config and alerts, and the Grafana dashboard.

Tools: promtool/prometheus (Debian `prometheus`) and docker-compose (Debian
`docker-compose`), installed by .ci/run. Without CI they are optional (the test skips);
with CI set, a missing one fails. There is no Docker daemon: compose files are
validated, images are not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from balancer import config as config_mod
from tests.conftest import StackFactory, free_port, gateway_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
COMPOSE = DEPLOY / "docker-compose.yml"

METRIC = re.compile(r"balancer_[a-z_]+")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(binary: str) -> str:
    """The binary's path; if it is missing, skip, except in CI where that is a failure."""
    path = shutil.which(binary)
    if path:
        return path
    if in_ci():
        pytest.fail(f"{binary} is missing: .ci/run installs it (Debian package) in CI")
    pytest.skip(f"{binary} not installed (CI=true makes this a failure)")


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return yaml_docs(path.read_text())


# --------------------------------------------------------------------------- Prometheus


def test_promtool_checks_config_rules_and_rule_unit_tests() -> None:
    promtool = require("promtool")
    out = run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    assert "SUCCESS" in out.stdout + out.stderr
    run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    # alerts.test.yml feeds series to the rules and asserts which alerts fire.
    run([promtool, "test", "rules", str(PROM / "alerts.test.yml")])


def test_alerts_have_for_severity_and_annotations() -> None:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"BalancerRegionThrottled", "BalancerModelCapacityLow", "BalancerStoreDegraded",
            "BalancerUpstreamLatencyHigh", "BalancerNoHealthyRegion"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if rule["alert"] != "BalancerConfigReloadFailed":  # increase() over 10 m suffices
            assert "for" in rule, f"{rule['alert']} has no `for:`"


def test_prometheus_scrapes_the_compose_replicas() -> None:
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "balancer")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert targets == {f"{name}:8080" for name in services if name.startswith("gateway-")}
    assert len(targets) == 3


# --------------------------------------------------------------------------- metric names


def referenced_metrics() -> dict[str, set[str]]:
    files = [DASHBOARD, PROM / "alerts.yml", PROM / "alerts.test.yml"]
    return {f.name: set(METRIC.findall(f.read_text())) for f in files}


def exposed_metrics(text: str) -> tuple[set[str], set[str]]:
    """(every name a query may use for a declared family, names that have samples)."""
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            declared |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            declared |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            declared.add(family.name)
        sampled |= {s.name for s in family.samples}
    return declared | sampled, sampled


async def test_dashboard_and_alert_metrics_exist_in_the_gateway(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{s.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status == 200
            await r.read()  # a stream, so time-to-first-token has a sample
        async with http.get(f"{s.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    exposed, sampled = exposed_metrics(text)
    for source, names in referenced_metrics().items():
        assert names, f"{source} references no balancer_* metric"
        missing = sorted(names - exposed)
        assert not missing, f"{source} uses metrics the gateway does not export: {missing}"
    # After one plain and one streamed request these have real series, with labels.
    for name in ("balancer_requests_total", "balancer_tokens_total", "balancer_selections_total",
                 "balancer_upstream_latency_seconds_bucket",
                 "balancer_time_to_first_token_seconds_bucket", "balancer_remaining_tokens",
                 "balancer_capacity_tokens", "balancer_region_cooldown_seconds",
                 "balancer_circuit_open", "balancer_store_degraded", "balancer_live_replicas"):
        assert name in sampled, f"{name} has no sample after a request"
    assert re.search(r'balancer_tokens_total\{[^}]*model="gpt-4"[^}]*region="a"', text)


# --------------------------------------------------------------------------- a real Prometheus


async def test_a_real_prometheus_scrapes_the_gateway(stack: StackFactory, tmp_path: Path
                                                     ) -> None:
    prometheus = require("prometheus")
    s = await stack(gateway_config({"a": 60_000}))
    target = s.url.removeprefix("http://")
    port = free_port()
    (tmp_path / "prom.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "balancer",
                            "static_configs": [{"targets": [target]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: ASYNC230 - closed below
    proc = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={tmp_path / 'prom.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn", stdout=log, stderr=subprocess.STDOUT)
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    query = f"http://127.0.0.1:{port}/api/v1/query"
    value = 0.0
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{s.url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and value == 0:
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError, KeyError, IndexError):
                    async with http.get(query, params={
                            "query": "sum(balancer_requests_total)"}) as r:
                        result = (await r.json())["data"]["result"]
                        value = float(result[0]["value"][1]) if result else 0.0
                if value == 0:
                    await asyncio.sleep(0.3)
            async with http.get(query, params={"query": 'up{job="balancer"}'}) as r:
                up = (await r.json())["data"]["result"]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
    assert value >= 3, f"Prometheus saw {value} requests:\n" + \
        (tmp_path / "prometheus.log").read_text()
    assert up and up[0]["value"][1] == "1"


# --------------------------------------------------------------------------- docker compose


def compose_commands() -> list[list[str]]:
    commands = []
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=20).returncode == 0:
        commands.append([docker, "compose"])
    if not commands:
        require("docker-compose")  # skips, or fails in CI
    return commands


def test_compose_file_is_valid() -> None:
    for command in compose_commands():
        run([*command, "-f", str(COMPOSE), "config", "-q"], timeout=60)


def test_compose_gateways_get_every_variable_regions_yaml_needs() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"redis", "simulator", "gateway-1", "gateway-2", "gateway-3", "prometheus",
            "grafana"} <= set(services)
    required = set(re.findall(r"\$\{([A-Z0-9_]+)\}", (ROOT / "regions.yaml").read_text()))
    assert required, "regions.yaml names no variables?"
    for name in ("gateway-1", "gateway-2", "gateway-3"):
        gw = services[name]
        env = gw["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["BALANCER_CONFIG"] == "/etc/balancer/regions.yaml"
        missing = sorted(v for v in required if not str(env.get(v, "")).strip())
        assert not missing, f"{name} lacks {missing}"
        for var, value in env.items():
            if var.endswith("_ENDPOINT") or var == "OPENAI_BASE_URL":
                assert str(value).startswith("http://simulator:8100/"), (var, value)
        assert gw["build"]["dockerfile"] == "deploy/Dockerfile"
    sim = services["simulator"]
    assert [*sim["entrypoint"], *sim["command"]] == [
        "balancer", "simulate", "--config", "/etc/balancer/regions.yaml", "--host", "0.0.0.0",
        "--port", "8100"]
    # Every file the compose stack mounts exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{volume}: no such file"


# --------------------------------------------------------------------------- Grafana


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert "label_values(" in json.dumps(variables["model"]["query"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"] and t["refId"]
            exprs.append(t["expr"])
    joined = "\n".join(exprs)
    for metric in ("balancer_tokens_total", "balancer_remaining_tokens",
                   "balancer_upstream_throttled_total",
                   "balancer_upstream_latency_seconds_bucket",
                   "balancer_time_to_first_token_seconds_bucket", "balancer_store_degraded",
                   "balancer_live_replicas", "balancer_requests_total"):
        assert metric in joined, f"the dashboard does not chart {metric}"
    assert 'model=~"$model"' in joined
    provisioning = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((provisioning / "dashboards" / "balancer.yml").read_text())
    assert boards["providers"][0]["type"] == "file"


# --------------------------------------------------------------------------- Kubernetes


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        objects += load_yaml_docs(K8S / resource)
    return objects


def test_k8s_manifests_parse_and_have_the_expected_kinds() -> None:
    for path in K8S.glob("*.yaml"):
        load_yaml_docs(path)  # every file parses
    kinds = {o["kind"]: o for o in k8s_objects()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(
        kinds)
    assert kinds["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    hpa_metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]
    assert hpa_metric["name"] == "cpu"
    assert kinds["PodDisruptionBudget"]["apiVersion"] == "policy/v1"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]  # never applied as is
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == "balancer-config"
    assert generator["files"] == ["regions.yaml"]
    # kustomize reads no file outside its directory, hence a copy; keep it identical.
    assert (K8S / "regions.yaml").read_text() == (ROOT / "regions.yaml").read_text(), \
        "deploy/k8s/regions.yaml differs from regions.yaml: cp regions.yaml deploy/k8s/"


def test_k8s_deployment_probes_drain_resources_and_security() -> None:
    deployment = next(o for o in k8s_objects() if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # Shutdown: preStop sleep, then SIGTERM and the gateway's drain, all inside the grace.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    gw = config_mod.load(str(K8S / "regions.yaml"), simulate=True).gateway
    needed = float(command[1]) + gw.shutdown_delay_seconds + gw.drain_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] > needed

    # Config from the generated ConfigMap, secrets from the Secret, by name.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BALANCER_CONFIG"] == "/etc/balancer/regions.yaml"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/balancer")
    assert volumes[mount["name"]]["configMap"]["name"] == "balancer-config"
    [secret] = load_yaml_docs(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    needed_vars = set(re.findall(r"\$\{([A-Z0-9_]+)\}", (K8S / "regions.yaml").read_text()))
    assert needed_vars | {"REDIS_URL", "BALANCER_API_KEYS"} <= set(secret["stringData"])

    service = next(o for o in k8s_objects() if o["kind"] == "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


REAL_KEY = [
    re.compile(r"\b[0-9a-f]{32}\b"),  # Azure OpenAI keys: 32 hex digits
    re.compile(r"\b[A-Za-z0-9]{84}\b"),  # newer Azure keys
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI keys
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_manifest_contains_a_real_key() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != ".env":  # deploy/.env is git-ignored, local
            text = path.read_text(errors="replace")
            for pattern in REAL_KEY:
                assert not pattern.search(text), f"{path}: looks like a real key ({pattern})"
    [secret] = load_yaml_docs(K8S / "secret.example.yaml")
    assert "data" not in secret  # base64 would hide what is in it
    for name, value in secret["stringData"].items():
        if name.endswith("_ENDPOINT"):
            assert "my-resource-" in value, name
        else:
            assert "REPLACE" in value, f"{name} is not a placeholder"


def test_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (optional)")
    out = run([kubectl, "kustomize", str(K8S)])
    rendered = yaml_docs(out.stdout)
    kinds = {o["kind"] for o in rendered}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget"}
    configmap = next(o for o in rendered if o["kind"] == "ConfigMap")
    deployment = next(o for o in rendered if o["kind"] == "Deployment")
    assert configmap["data"]["regions.yaml"] == (K8S / "regions.yaml").read_text()
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": configmap["metadata"]["name"]} in [v.get("configMap") for v in volumes]
    assert all(o["metadata"]["namespace"] == "balancer" for o in rendered)


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert any(line.startswith("FROM python:3.11-slim") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    healthcheck = " ".join(lines[lines.index(next(
        line for line in lines if line.startswith("HEALTHCHECK"))):][:2])
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    assert "EXPOSE 8080" in lines
    assert 'ENTRYPOINT ["balancer", "serve"]' in lines
    assert "BALANCER_CONFIG=/etc/balancer/regions.yaml" in text
    assert re.search(r"pip install (--[a-z-]+ )*\.(\s|$)", text)
