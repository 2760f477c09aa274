"""The Dockerfile, the Kubernetes manifests and the Grafana dashboard agree with the code: ports and paths
match the config and the admin routes, and the dashboard only queries metrics raftlb exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from raftlb.config.load import load_config, parse_config
from raftlb.config.model import Config
from raftlb.errors import ConfigError
from raftlb.ops.admin import Admin
from raftlb.ops.metrics import SPECS, metric_names
from tests.support.offline import get, offline_server

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
CONFIG_PATH = "/etc/raftlb/raftlb.yaml"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}


ADMIN_TOKEN_ENV = "RAFTLB_ADMIN_TOKEN"


def kustomize(directory: Path, kind: str = "Kustomization") -> list[dict[str, Any]]:
    """What `kubectl kustomize DIRECTORY` puts together, for the plain cases used here: every file in
    `resources` (a directory: its own kustomization) and every `components` entry, each parsed; no patches."""
    [kustomization] = yaml.safe_load_all((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == kind, directory
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "components"}, "patches: not modelled"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml: {entry} does not exist"
        if path.is_dir():
            objects += kustomize(path)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            assert doc["metadata"]["name"], path
            objects.append(doc)
    for entry in kustomization.get("components", []):
        objects += kustomize((directory / entry).resolve(), kind="Component")
    return objects


def manifests(directory: Path = K8S) -> dict[str, dict[str, Any]]:
    """The Kubernetes objects `kubectl apply -k DIRECTORY` creates, by kind (one object of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for doc in kustomize(directory):
        assert doc["kind"] not in objects, f"two {doc['kind']} objects"
        objects[doc["kind"]] = doc
    return objects


def k8s_config(objects: dict[str, dict[str, Any]], token: str | None = "t" * 24) -> Config:
    environ = {ADMIN_TOKEN_ENV: token} if token is not None else {}
    return parse_config(objects["ConfigMap"]["data"]["raftlb.yaml"], source="configmap raftlb.yaml",
                        environ=environ)


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any]
    [c] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_every_manifest_is_in_the_kustomization_and_the_base_needs_no_operator() -> None:
    listed = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    [base] = yaml.safe_load_all((K8S / "kustomization.yaml").read_text())
    assert set(base["resources"]) == listed
    # `kubectl apply -k deploy/kubernetes/` on a cluster without the Prometheus Operator: core kinds only.
    assert {doc["apiVersion"].split("/")[0] for doc in kustomize(K8S)} <= {"v1", "apps", "policy"}
    # The PodMonitor is the optional component, which the prometheus-operator overlay adds.
    with_operator = manifests(K8S / "overlays" / "prometheus-operator")
    assert set(with_operator) - set(manifests()) == {"PodMonitor"}


def test_manifests_parse_and_the_deployment_runs_at_least_two_replicas() -> None:
    objects = manifests(K8S / "overlays" / "prometheus-operator")
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
    objects = manifests(K8S / "overlays" / "prometheus-operator")
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
    scrape = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert (scrape["prometheus.io/scrape"], scrape["prometheus.io/path"]) == ("true", "/metrics")
    assert int(scrape["prometheus.io/port"]) == ports["admin"]
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


def test_the_pod_meets_the_restricted_pod_security_standard() -> None:
    # https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted, field by field.
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, c["name"]
        assert sc.get("runAsUser", pod.get("runAsUser")) != 0, c["name"]
        assert sc.get("seccompProfile", pod["seccompProfile"])["type"] in ("RuntimeDefault", "Localhost")
        assert not sc.get("privileged") and not c.get("ports", [{}])[0].get("hostPort"), c["name"]
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    assert all(set(v) <= {"name", "configMap", "secret", "emptyDir", "projected", "persistentVolumeClaim"}
               for v in spec.get("volumes", []))


def test_the_admin_token_comes_from_a_secret_and_the_config_needs_it() -> None:
    objects = manifests()
    [env] = [e for e in container(objects)["env"] if e["name"] == ADMIN_TOKEN_ENV]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional")
    assert k8s_config(objects, token="s" * 32).admin.token == "s" * 32
    # No Secret, no token: the config does not load (raftlb refuses to start) rather than run without one.
    with pytest.raises(ConfigError, match=ADMIN_TOKEN_ENV):
        k8s_config(objects, token=None)


def test_the_shipped_configmap_fences_its_reads() -> None:
    cfg = k8s_config(manifests())
    reads = [r for c in cfg.clusters for r in c.routes if r.kind == "read"]
    assert reads and all(r.policy == "fenced" for r in reads)


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), stage by stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # The base image is one exact Python release on one Debian release, in every stage.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base[1]), base
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}"] * 2
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


def test_the_image_installs_the_runtime_dependencies_in_a_layer_before_the_source() -> None:
    final = dockerfile_stages()[-1]
    [deps] = [i for i, line in enumerate(final) if line.startswith("RUN") and "-r " in line]
    # Nothing from the source tree reaches the final stage before the dependencies are installed.
    copies = [i for i, line in enumerate(final) if line.startswith("COPY")]
    assert [final[i] for i in copies if i < deps] == ["COPY pyproject.toml /tmp/raftlb/"]
    assert any("--from=build" in final[i] for i in copies if i > deps)
    assert re.search(r"pip install .*--no-deps", " ".join(final[deps + 1:]))
    # The requirements it installs are exactly project.dependencies: the runtime, no demo or test extras.
    script = re.search(r'python -c "([^"]+)"', final[deps])
    assert script
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
        out = subprocess.run([sys.executable, "-c", script[1].replace("/tmp/raftlb/", tmp + "/")],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out.splitlines() == project["dependencies"]
    assert not any("pysyncobj" in r for r in project["dependencies"])


def test_the_container_config_binds_every_address_and_the_readme_mounts_it() -> None:
    path = ROOT / "configs" / "container.yaml"
    cfg = load_config(str(path), environ={ADMIN_TOKEN_ENV: "c" * 20})
    assert cfg.admin.host == "0.0.0.0" and cfg.admin.token == "c" * 20
    assert all(listener.host == "0.0.0.0" for listener in cfg.listeners)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
               for p in line.split()}
    assert exposed == {cfg.admin.port, *(listener.port for listener in cfg.listeners)}
    assert all(r.policy == "fenced" for c in cfg.clusters for r in c.routes if r.kind == "read")
    with pytest.raises(ConfigError, match=ADMIN_TOKEN_ENV):
        load_config(str(path), environ={})
    operations = (ROOT / "docs" / "operations.md").read_text()  # where the README's container section went
    [run] = re.findall(r"^docker run .*$", operations, re.M)
    assert f"-v $PWD/configs/container.yaml:{CONFIG_PATH}:ro" in run and f"-e {ADMIN_TOKEN_ENV}=" in run


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
    assert used <= known, f"not exported by raftlb/ops/metrics.py: {sorted(used - known)}"
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
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in SPECS if f"`{name}`" not in doc]
    assert not missing, f"docs/metrics.md does not describe {missing}"
