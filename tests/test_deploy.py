"""The Dockerfile, the Kubernetes manifests and the Grafana dashboard agree with the code: ports and paths
match the config and the admin routes, and the dashboard only queries metrics raftlb exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_admin import get
from test_metrics import offline_server

from raftlb.admin import Admin
from raftlb.config import Config, parse_config
from raftlb.metrics import SPECS, metric_names

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
CONFIG_PATH = "/etc/raftlb/raftlb.yaml"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes, by kind (one object of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] == "Kustomization":
                listed = set(doc["resources"])
                assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
                continue
            assert doc["metadata"]["name"], path
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def k8s_config(objects: dict[str, dict[str, Any]]) -> Config:
    return parse_config(objects["ConfigMap"]["data"]["raftlb.yaml"], source="configmap raftlb.yaml")


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [c] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_manifests_parse_and_the_deployment_runs_at_least_two_replicas() -> None:
    objects = manifests()
    assert set(objects) >= {"ConfigMap", "Deployment", "Service", "PodMonitor", "PodDisruptionBudget"}
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodMonitor", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind


def test_ports_and_paths_match_the_config_and_the_admin_routes() -> None:
    objects = manifests()
    cfg = k8s_config(objects)
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["admin"] == cfg.admin.port and cfg.admin.host == "0.0.0.0"
    [listener] = cfg.listeners
    assert ports["http"] == listener.port and listener.host == "0.0.0.0"
    ready, alive = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/readyz", "admin")
    assert (alive["path"], alive["port"]) == ("/healthz", "admin")
    [endpoint] = objects["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
    assert {p["targetPort"] for p in objects["Service"]["spec"]["ports"]} <= set(ports)
    # The config is mounted where the args (and the Dockerfile) expect it.
    [mount] = c["volumeMounts"]
    assert f"{mount['mountPath']}/raftlb.yaml" == CONFIG_PATH
    assert c["args"] == ["run", "-c", CONFIG_PATH]
    [volume] = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]


async def test_probe_and_scrape_paths_are_admin_routes() -> None:
    admin = Admin(offline_server())
    for path in ("/readyz", "/healthz", "/metrics"):
        assert (await get(admin, path)).status in (200, 503), path


def test_the_grace_period_covers_the_pre_stop_pause_and_the_drain() -> None:
    objects = manifests()
    cfg = k8s_config(objects)
    pre_stop = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + cfg.drain_timeout + 5


def test_the_pod_runs_as_the_images_non_root_user() -> None:
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+)", dockerfile, re.M)
    assert uid and pod["runAsNonRoot"] and pod["runAsUser"] == int(uid[1]) != 0


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    cfg = k8s_config(manifests())
    assert exposed == {cfg.admin.port, cfg.listeners[0].port}
    assert re.search(r'^CMD \["run", "-c", "' + re.escape(CONFIG_PATH) + r'"\]$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["raftlb"\]$', text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n?.*CMD (\[.*\])$", text, re.M)
    assert health, "no HEALTHCHECK"
    command = json.loads(health[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")  # the one-liner is valid Python
    assert re.search(r"RAFTLB_HEALTH_URL=http://127\.0\.0\.1:" + str(cfg.admin.port) + "/healthz", text)


# -- the Grafana dashboard -----------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "raftlb.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    assert exprs
    return exprs


def metrics_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...}, [...] and "..." that are not
    functions, keywords or label names in by (...)."""
    expr = re.sub(r"label_values\(\s*([^,]+),[^)]*\)", r"\1", expr)  # Grafana's template query
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        if m[2] or m[1] in PROMQL_WORDS or m[1].startswith("__"):
            continue
        names.add(m[1])
    return names


def test_the_dashboard_queries_only_metrics_raftlb_exports() -> None:
    known = set(metric_names())
    used = set().union(*(metrics_in(e) for e in dashboard_exprs()))
    assert used, "no metric found in the dashboard"
    assert used <= known, f"not exported by raftlb/metrics.py: {sorted(used - known)}"
    # The dashboard covers the leadership story at least.
    assert {"raftlb_leader", "raftlb_failover_seconds_bucket", "raftlb_node_lag_entries"} <= used


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (cluster, node) (rate(raftlb_requests_total{code="5xx"}[5m]))', {"raftlb_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(raftlb_failover_seconds_bucket[1m])))",
     {"raftlb_failover_seconds_bucket"}),
    ("count by (cluster) (count by (cluster, node) (raftlb_leader == 1)) - 1", {"raftlb_leader"}),
    ("label_values(raftlb_cluster_term, cluster)", {"raftlb_cluster_term"}),
])
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metrics_in(expr) == names


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "README.md").read_text()
    missing = [name for name in SPECS if f"`{name}`" not in doc]
    assert not missing, f"README.md does not describe {missing}"
