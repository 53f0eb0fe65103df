"""deploy/k8s, statically (no cluster here): every document is valid for Kubernetes 1.33 (the
strict JSON schemas of kubernetes-validate, no unknown fields), the kustomization names every
file, selectors match their pods, Services reach named ports, every Secret, ConfigMap, key and
command exists, every RP_* variable is one the services read, and the NATS ConfigMap carries
exactly the configs of deploy/nats."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from runplane_testing.natscluster import ROLES, password_variable

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def resources() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for name, doc in documents() if name != "kustomization.yaml"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def secret_keys() -> set[str]:
    """The keys of the generated Secret: what deploy/compose-env prints (secrets.env)."""
    out = subprocess.run([str(ROOT / "deploy" / "compose-env")], capture_output=True, text=True, check=True).stdout
    return {line.split("=", 1)[0] for line in out.splitlines()}


def variables_read_by_services() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("libs/runplane_service/*.py"),
                 *ROOT.glob("libs/runplane_bus/*.py")]:
        text = path.read_text()
        names |= set(re.findall(r'"(RP_[A-Z0-9_]+)"', text))
        names |= {f"{name}_FILE" for name in re.findall(r'_secret\("(RP_[A-Z0-9_]+)"\)', text)}
    return names


@pytest.mark.parametrize("source,doc", documents(), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_every_document_is_valid_kubernetes(source, doc):
    if doc["kind"] == "Kustomization":
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        return
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert doc["metadata"].get("namespace", "runplane") == "runplane"
    assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "runplane"


def test_the_kustomization_lists_every_manifest_and_generates_the_secret():
    k = kustomization()
    assert set(k["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert k["namespace"] == "runplane"
    (generator,) = k["secretGenerator"]
    assert generator["name"] == "runplane-secrets" and generator["envs"] == ["secrets.env"]
    assert k["generatorOptions"]["disableNameSuffixHash"] is True
    assert "deploy/k8s/secrets.env" in (ROOT / ".gitignore").read_text().split()
    images = {c["image"].split(":")[0] for (kind, _), doc in resources().items() if kind in WORKLOADS
              for c in containers(doc)}
    assert {i["name"] for i in k["images"]} == images - {"nats"}


def test_the_control_plane_has_its_replicas_and_the_nats_cluster_three_servers():
    res = resources()
    assert res[("Deployment", "gateway")]["spec"]["replicas"] == 2
    assert res[("Deployment", "scheduler")]["spec"]["replicas"] == 2
    assert res[("Deployment", "autoscaler")]["spec"]["replicas"] == 2
    nats = res[("StatefulSet", "nats")]
    assert nats["spec"]["replicas"] == 3 and nats["spec"]["podManagementPolicy"] == "Parallel"
    headless = res[("Service", nats["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    # Routes and the services' URL name exactly the StatefulSet's pods through that Service.
    cluster_conf = (ROOT / "deploy" / "nats" / "cluster.conf").read_text()
    pods = [f"nats-{i}.{nats['spec']['serviceName']}" for i in range(3)]
    assert re.findall(r"nats://([\w.-]+):6222", cluster_conf) == pods
    config = res[("ConfigMap", "runplane-config")]["data"]
    assert config["RP_NATS_URL"] == ",".join(f"nats://{pod}:4222" for pod in pods)
    assert config["RP_NATS_REPLICAS"] == "3"


def test_selectors_match_pods_and_services_reach_named_ports():
    res = resources()
    pods = {}
    for (kind, name), doc in res.items():
        if kind in WORKLOADS:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), name
            ports = {p["name"] for c in containers(doc) for p in c.get("ports", [])}
            pods[name] = (labels, ports)
    for (kind, name), doc in res.items():
        if kind == "Service":
            matched = [ports for labels, ports in pods.values() if doc["spec"]["selector"].items() <= labels.items()]
            assert matched, f"Service {name} selects no pods"
            for port in doc["spec"]["ports"]:
                assert all(port["targetPort"] in ports for ports in matched), (name, port)
        if kind == "PodDisruptionBudget":
            assert any(doc["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels, _ in pods.values())
    for (kind, name), doc in res.items():
        if kind in WORKLOADS:
            for c in containers(doc):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in c:
                        assert c[probe]["httpGet"]["port"] in pods[name][1], (name, probe)


def test_every_reference_exists_and_every_variable_is_read():
    res = resources()
    keys = secret_keys()
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    read = variables_read_by_services()
    for (kind, name), doc in res.items():
        if kind not in WORKLOADS:
            continue
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "runplane-secrets"
                assert {i["key"] for i in volume["secret"]["items"]} <= keys, name
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in res
        for c in containers(doc):
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in res
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "runplane-secrets" and ref["key"] in keys, (name, var)
            if c["image"].startswith("runplane/"):
                assert c["command"][0] in scripts, (name, c["command"])
                names = {v["name"] for v in c.get("env", [])} | set(res[("ConfigMap", "runplane-config")]["data"])
                unknown = {n for n in names if n.startswith("RP_")} - read
                assert not unknown, f"{name} sets variables no service reads: {unknown}"
                assert {"RP_NATS_USER", "RP_NATS_PASSWORD_FILE"} <= names, name
                user = next(v["value"] for v in c["env"] if v["name"] == "RP_NATS_USER")
                assert user in ROLES and c["command"][0] == f"runplane-{user}", name
                password = next(i["key"] for v in spec["volumes"] if "secret" in v for i in v["secret"]["items"])
                assert password == password_variable(user), name


def test_nats_gets_every_password_and_the_configs_of_deploy_nats():
    res = resources()
    nats = containers(res[("StatefulSet", "nats")])[0]
    env = {v["name"]: v for v in nats["env"]}
    for user in (*ROLES, "admin"):
        assert env[password_variable(user)]["valueFrom"]["secretKeyRef"]["key"] == password_variable(user)
    assert env["RP_NATS_SERVER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    data = res[("ConfigMap", "nats-config")]["data"]
    for name in ("cluster.conf", "accounts.conf"):
        copy = "".join(line + "\n" for line in data[name].splitlines() if not line.startswith("# --- "))
        assert copy == (ROOT / "deploy" / "nats" / name).read_text(), \
            f"{name}: run .venv/bin/python deploy/nats/accounts.py --write"
    assert nats["args"] == ["-c", "/etc/nats/cluster.conf"]


def test_the_node_agent_runs_on_gpu_nodes_with_docker():
    agent = resources()[("DaemonSet", "node-agent")]
    spec = agent["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia" and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    (c,) = spec["containers"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    assert env["RP_RUNTIME"] == "docker" and env["RP_AGENT_PORT"] == "8100"
    assert c["image"] == "runplane/node-agent" and "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]
    sock = next(v for v in spec["volumes"] if v["name"] == "docker-sock")
    assert sock["hostPath"] == {"path": "/var/run/docker.sock", "type": "Socket"}
    assert {"name": "docker-sock", "mountPath": "/var/run/docker.sock"} in c["volumeMounts"]
