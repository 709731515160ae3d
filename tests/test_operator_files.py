"""deploy/: Kubernetes manifests valid against the Kubernetes schemas (offline, kubernetes-validate), Prometheus
alert rules and the Grafana dashboard well formed and using only metrics a real running service exports."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.app_client import running_app
from tests.deploy_files import Dockerfile

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "nextact-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "nextact-dashboard.json"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # oldest with preStop sleep, newest shipped
DURATION = re.compile(r"^\d+[smhdw]$")
SELECTOR = re.compile(r"\b(nextact_[a-z0-9_]+)(\{[^}]*\})?")
PROMQL_WORDS = {"sum", "rate", "increase", "histogram_quantile", "by", "count", "le"}
REQUIRED_ALERTS = {
    "NextactHighErrorRate",
    "NextactHighLatencyP99",
    "NextactRedisUnavailable",
    "NextactModelReloadFailed",
}


def manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> resource, for every YAML document in deploy/kubernetes (the Kustomization aside)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") != "Kustomization":
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    resources = manifests()
    assert {
        "Deployment/nextact",
        "Service/nextact",
        "PodDisruptionBudget/nextact",
        "Secret/nextact-redis",
    } <= set(resources)
    for name, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name} is not valid Kubernetes {version}: {e}") from e


def test_the_validator_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(manifests()["Deployment/nextact"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "redis-secret.example.yaml",
    }


def test_deployment_probes_resources_secret_and_image_contract() -> None:
    resources = manifests()
    deployment = resources["Deployment/nextact"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["NEXTACT_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = resources[f"Secret/{secret_ref['name']}"]
    assert secret_ref["key"] in secret["stringData"], "the Redis URL key must exist in the example Secret"
    image = Dockerfile.parse()
    port = int(image.env("serve")["NEXTACT_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert pod["securityContext"]["runAsUser"] == int(image.last("serve", "USER").args.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert env["NEXTACT_ARTIFACT_DIR"]["value"] == image.env("serve")["NEXTACT_ARTIFACT_DIR"]
    assert env["NEXTACT_WORKERS"]["value"] == "1", "one worker per pod: each scrape sees one whole process"
    assert pod["terminationGracePeriodSeconds"] > 10 + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_and_budget_select_the_deployment_pods() -> None:
    resources = manifests()
    labels = resources["Deployment/nextact"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        resources["Service/nextact"]["spec"]["selector"],
        resources["PodDisruptionBudget/nextact"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), (selector, labels)
    assert (
        resources["PodDisruptionBudget/nextact"]["spec"]["minAvailable"]
        < (resources["Deployment/nextact"]["spec"]["replicas"])
    ), "a budget as large as the replica count blocks every node drain"


# --- metrics: what a real service exports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(behavior_artifact: Path, redis_server: Any) -> dict[str, set[str]]:
    """sample name -> label names, from /metrics of the real app after a few real requests."""

    async def scrape() -> str:
        async with running_app(behavior_artifact, redis_server.url) as (_, client):
            assert (
                await client.post("/v1/users/u-1/events", json={"action": "pv", "event_id": "e1"})
            ).status_code == 200
            assert (
                await client.post("/v1/users/u-1/events", json={"action": "pv", "event_id": "e1"})
            ).status_code == 200
            assert (await client.get("/v1/users/u-1/predictions")).status_code == 200
            assert (await client.get("/v1/no-such-route")).status_code == 404
            response = await client.get("/metrics")
            assert response.status_code == 200
            return response.text

    samples: dict[str, set[str]] = {}
    for line in asyncio.run(scrape()).splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            labels = {kv.split("=", 1)[0] for kv in re.findall(r'(\w+)="', m.group(2) or "")}
            samples.setdefault(m.group(1), set()).update(labels)
    return samples


def check_expression(expr: str, exported: dict[str, set[str]], where: str) -> None:
    """Brackets balance, and every nextact_* series (with its label names) is one the service exports."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"{where}: unbalanced {ch!r} in {expr!r}"
    assert not stack, f"{where}: unclosed {stack} in {expr!r}"
    names = SELECTOR.findall(expr)
    assert names, f"{where}: no nextact metric in {expr!r}"
    for name, selector in names:
        assert name in exported, f"{where}: {name} is not on /metrics (exported: {sorted(exported)})"
        for label in re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector):
            assert label in exported[name], f"{where}: {name} has no label {label!r}"
    for word in re.findall(r"\b([a-z_]+)\s*\(", expr):
        assert word in PROMQL_WORDS, f"{where}: unexpected function {word!r} in {expr!r}"
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert DURATION.match(window) or window == "$__rate_interval", f"{where}: bad range [{window}]"


def test_alert_rules_are_well_formed_and_use_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(rules) == {"groups"}
    seen: set[str] = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            name = rule["alert"]
            assert name not in seen, f"duplicate alert {name}"
            seen.add(name)
            assert "for" not in rule or DURATION.match(rule["for"]), f"{name}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in {"page", "ticket"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            check_expression(rule["expr"], exported, f"alert {name}")
            assert re.search(r"[<>]=?\s*[\d.]+\s*$", rule["expr"].strip()), f"{name}: no threshold"
    assert REQUIRED_ALERTS <= seen


def test_grafana_dashboard_is_well_formed_and_uses_exported_metrics(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs))
        for target in panel["targets"]:
            check_expression(target["expr"], exported, f"panel {panel['title']!r}")
            used |= {name for name, _ in SELECTOR.findall(target["expr"])}
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    for needed in (
        "nextact_http_requests",
        "nextact_http_request_duration_seconds",
        "nextact_redis_errors",
        "nextact_model_info",
        "nextact_inference_duration_seconds",
    ):
        assert needed in families, f"the dashboard does not show {needed}"
