"""deploy/: the Kubernetes manifests and the KServe InferenceService.

The core objects are validated against the Kubernetes OpenAPI schemas that
`kubernetes-validate` ships inside its package (strict: unknown fields are errors); the
custom resources (ServiceMonitor, InferenceService) and the fields that must agree with
the server (ports, probes, image, GPU, volumes, selectors) are checked by parsing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.oip import OIP_SERVICE
from server.settings import DEFAULT_HTTP_PORT, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S = REPO_ROOT / "deploy" / "k8s"
KSERVE = REPO_ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
IMAGE = "protoserve:0.1.0"
DEFAULTS = Settings(model_store=Path("/models"))
GRPC_PORT, HTTP_PORT, METRICS_PORT = DEFAULTS.port, DEFAULT_HTTP_PORT, DEFAULTS.metrics_port
# Kubernetes versions the core manifests must validate against.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, for every manifest the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for doc in _documents(K8S / resource):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(objects, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the `test` extra) is not installed")
    checked = 0
    for (kind, name), obj in objects.items():
        if kind in CORE_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
    assert checked == 5


def test_a_schema_violation_is_caught(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = yaml.safe_load(yaml.safe_dump(objects[("Deployment", "protoserve")]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(objects[("Deployment", "protoserve")]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def test_deployment_runs_the_image_on_a_gpu_with_grpc_probes(objects):
    deployment = objects[("Deployment", "protoserve")]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = _container(pod["spec"], "protoserve")
    assert container["image"] == IMAGE
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    # The server marks this service SERVING in grpc.health.v1 (and NOT_SERVING while draining).
    assert container["readinessProbe"]["grpc"]["service"] == OIP_SERVICE
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    store = mounts["model-store"]
    assert store["mountPath"] == "/models" and store["readOnly"]
    assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] in {
        name for kind, name in objects if kind == "PersistentVolumeClaim"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > DEFAULTS.shutdown_grace_s
    assert pod["spec"]["securityContext"]["runAsNonRoot"]


def test_dockerfile_agrees_with_the_manifests(objects):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    # numba's cache of the compiled CPU solvers goes where the read-only pod can write: its /tmp emptyDir.
    assert "NUMBA_CACHE_DIR=/tmp/" in dockerfile
    container = objects[("Deployment", "protoserve")]["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}
    assert "FROM nvidia/cuda" in dockerfile
    assert f"EXPOSE {GRPC_PORT} {HTTP_PORT} {METRICS_PORT}" in dockerfile
    for flag in ("--model-store\", \"/models", f"--port\", \"{GRPC_PORT}", f"--metrics-port\", \"{METRICS_PORT}",
                 f"--http-port\", \"{HTTP_PORT}",
                 "--host\", \"0.0.0.0", "--metrics-host\", \"0.0.0.0"):
        assert flag in dockerfile, flag


def test_service_selects_the_pods_and_names_the_ports(objects):
    deployment = objects[("Deployment", "protoserve")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "protoserve")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"grpc": (GRPC_PORT, "grpc"), "http": (HTTP_PORT, "http"), "metrics": (METRICS_PORT, "metrics")}
    headless = objects[("Service", "protoserve-headless")]
    assert headless["spec"]["clusterIP"] == "None"


def test_hpa_scales_the_deployment(objects):
    hpa = objects[("HorizontalPodAutoscaler", "protoserve")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "protoserve")
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "protoserve_queue_depth"
    assert metrics["Resource"]["resource"]["name"] == "cpu"


def test_servicemonitor_selects_the_service_and_its_metrics_port(objects):
    monitor = objects[("ServiceMonitor", "protoserve")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = objects[("Service", "protoserve")]
    headless = objects[("Service", "protoserve-headless")]
    selector = monitor["spec"]["selector"]

    def selects(svc: dict) -> bool:
        labels = svc["metadata"]["labels"]
        if not selector["matchLabels"].items() <= labels.items():
            return False
        for expression in selector.get("matchExpressions", []):
            value = labels.get(expression["key"])
            if expression["operator"] == "NotIn" and value in expression["values"]:
                return False
            if expression["operator"] == "In" and value not in expression["values"]:
                return False
        return True

    assert selects(service) and not selects(headless)  # each pod scraped once
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"


def test_kserve_inferenceservice_runs_the_image_on_its_oip_port():
    [isvc] = _documents(KSERVE)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"concurrency", "rps", "cpu", "memory"}
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == IMAGE
    # A port named h2c makes KServe/Knative route HTTP/2 (gRPC) to it; one port only.
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == str(METRICS_PORT)
    [mount] = container["volumeMounts"]
    [volume] = predictor["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/models"
    # The container spec itself is a core Container: validate it inside a Pod.
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-predictor"},
           "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
