"""deploy/: the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate
bundles them offline), the compose file against the Compose Specification schema (vendored by
check-jsonschema), the KEDA ScaledObject against the CRD's fields we use, and every embedded
SpecEdge configuration through the real commands' parsers. Nothing here runs docker or a
cluster."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from specedge import subjects
from specedge.edge import serve
from workers.verifier.__main__ import parse as verifier_parse

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.37.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(path)}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("SPECEDGE_") and k != "SPECEDGE_MODELS":
            monkeypatch.delenv(k)


def test_verifier_manifests_match_kubernetes_schemas_and_the_cli(tmp_path):
    objs = docs(DEPLOY / "k8s" / "verifier.yaml")
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any error
    kinds = {o["kind"]: o for o in objs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "workers.verifier"]
    assert pod["terminationGracePeriodSeconds"] >= 30  # room for the SIGTERM drain
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    # The ConfigMap's file is a valid verifier configuration whose metrics port is the
    # container's probed port.
    cfg = tmp_path / "specedge.toml"
    cfg.write_text(kinds["ConfigMap"]["data"]["specedge.toml"])
    a = verifier_parse(["--config", str(cfg)])
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert a.metrics_port == port == kinds["Service"]["spec"]["ports"][0]["port"]
    env = {e["name"] for e in c["env"]}
    assert {"SPECEDGE_NATS", "SPECEDGE_CONFIG"} <= env
    assert "SPECEDGE_VERIFIER_NAME" in env  # reaches --name through the env rule
    sel = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert kinds["Service"]["spec"]["selector"] == sel
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == sel


def test_a_broken_manifest_is_caught():
    """The validator is not a no-op: a probe port of the wrong type fails."""
    dep = by_kind(DEPLOY / "k8s" / "verifier.yaml")["Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


# The fields of KEDA's ScaledObject CRD (keda.sh/v1alpha1, KEDA 2.12+) that the manifest uses,
# and the nats-jetstream scaler's metadata keys, with their types.
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef",
                                                                         "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "additionalProperties": False, "properties": {
                                       "apiVersion": {"type": "string"},
                                       "kind": {"type": "string"}, "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "idleReplicaCount": {"type": "integer"},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "horizontalPodAutoscalerConfig": {"type": "object"},
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "scalingModifiers": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"formula": {"type": "string"},
                                       "target": {"type": "string"},
                                       "activationTarget": {"type": "string"},
                                       "metricType": {"enum": ["AverageValue", "Value"]}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "additionalProperties": False, "properties": {
                        "type": {"type": "string"}, "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {"type": "object"},
                        "metadata": {"type": "object",
                                     "additionalProperties": {"type": "string"}}}}},
            }},
    }}
NATS_JETSTREAM_KEYS = {"natsServerMonitoringEndpoint", "account", "stream", "consumer",
                       "lagThreshold", "activationLagThreshold", "useHttps"}


def test_keda_scales_on_every_partition_consumer_lag():
    so = docs(DEPLOY / "k8s" / "keda-scaledobject.yaml")[0]
    jsonschema.validate(so, SCALED_OBJECT)
    dep = by_kind(DEPLOY / "k8s" / "verifier.yaml")["Deployment"]
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    trig = so["spec"]["triggers"]
    assert all(t["type"] == "nats-jetstream" for t in trig)
    assert all(set(t["metadata"]) <= NATS_JETSTREAM_KEYS for t in trig)
    assert {t["metadata"]["stream"] for t in trig} == {subjects.STREAM}
    assert sorted(t["metadata"]["consumer"] for t in trig) == sorted(
        subjects.partition_durable(p) for p in range(subjects.PARTITIONS))
    # the formula adds up every trigger, so lag anywhere counts
    terms = {x.strip() for x in so["spec"]["advanced"]["scalingModifiers"]["formula"].split("+")}
    assert terms == {t["name"] for t in trig}
    assert so["spec"]["maxReplicaCount"] <= subjects.PARTITIONS
    nats = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    endpoint_port = {t["metadata"]["natsServerMonitoringEndpoint"].rsplit(":", 1)[1]
                     for t in trig}
    assert endpoint_port == {str(nats["config"]["monitor"]["port"])}


def test_nats_helm_values_make_a_three_node_jetstream_cluster():
    """The chart publishes no values schema we can reach offline: check the keys the
    chart's templates read (config.cluster, config.jetstream.fileStore, config.monitor)."""
    v = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    assert v["config"]["cluster"] == {"enabled": True, "replicas": 3}
    js = v["config"]["jetstream"]
    assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
    assert js["fileStore"]["pvc"]["size"].endswith("Gi")
    assert v["config"]["monitor"]["enabled"]
    assert set(v) <= {"config", "container", "podTemplate", "podDisruptionBudget",
                      "promExporter", "natsBox", "service", "headlessService", "statefulSet",
                      "reloader", "global"}


def compose_schema() -> dict:
    ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(ref.read_text())


def test_compose_file_matches_the_compose_spec(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    svc = compose["services"]
    nats = sorted(k for k in svc if k.startswith("nats-"))
    assert nats == ["nats-1", "nats-2", "nats-3"]
    for name in nats:  # each node routes to the two others
        cmd = svc[name]["command"]
        routes = cmd[cmd.index("--routes") + 1].split(",")
        assert sorted(r.split("//")[1].split(":")[0] for r in routes) == [
            n for n in nats if n != name]
        assert "-js" in cmd
    assert svc["verifier"]["command"][:3] == ["python", "-m", "workers.verifier"]
    assert svc["verifier"]["deploy"]["replicas"] >= 2
    assert svc["edge"]["command"][:4] == ["python", "-m", "specedge.edge", "serve"]
    url = svc["verifier"]["environment"]["SPECEDGE_NATS"]
    assert sorted(u.split("//")[1].split(":")[0] for u in url.split(",")) == nats
    # The mounted configuration works for both commands and matches the published port.
    cfg = str(DEPLOY / "specedge.toml")
    v = verifier_parse(["--config", cfg])
    e = serve.parse(["--config", cfg, "--host", "0.0.0.0"])
    assert v.metrics_port == 9100 and v.max_batch == 8
    assert svc["edge"]["ports"] == [f"{e.port}:{e.port}"]


def test_compose_validation_is_not_a_no_op():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["verifier"]["stop_grace_periods"] = "60s"  # a misspelt key
    schema = compose_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(compose)
