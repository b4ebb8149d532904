"""launch/k8s/serve.yaml read into Kubernetes API objects (the kubernetes client's models, no cluster): the
Deployment's command is a valid ``recsys serve``, its probes ask the routes the server has on the port it
listens on, the Service and the HorizontalPodAutoscaler point at them."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from kubernetes import client

from recsys.cli import build_parser
from recsys.serving.server import ServeConfig, create_app
from tests.helpers import REPO

MANIFEST = REPO / "launch" / "k8s" / "serve.yaml"
KINDS = {"Deployment": "V1Deployment", "Service": "V1Service", "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler"}


class _Body:
    """What ApiClient.deserialize reads: a response's JSON text."""

    def __init__(self, document: dict) -> None:
        self.data = json.dumps(document)


@pytest.fixture(scope="module")
def objects() -> dict:
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    api = client.ApiClient()
    parsed = {}
    for document in documents:
        assert document["kind"] in KINDS, document["kind"]
        obj = api.deserialize(_Body(document), KINDS[document["kind"]])
        # The model keeps every field it knows; any field it dropped is a typo or a misplaced key.
        assert api.sanitize_for_serialization(obj) == document
        parsed[document["kind"]] = obj
    assert set(parsed) == set(KINDS)
    return parsed


def test_probes_and_ports_are_the_servers(objects) -> None:
    deployment = objects["Deployment"]
    (container,) = deployment.spec.template.spec.containers
    assert container.command[:2] == ["recsys", "serve"]
    args = build_parser().parse_args(container.command[1:])
    assert args.host == "0.0.0.0" and args.workers >= 1
    ports = {p.name: p.container_port for p in container.ports}
    assert ports == {"http": args.port}
    routes = {route.path: route.methods for route in create_app(ServeConfig(args.export)).routes}
    probes = {"liveness": container.liveness_probe, "readiness": container.readiness_probe, "startup": container.startup_probe}
    for name, probe in probes.items():
        assert probe.http_get.path in routes and "GET" in routes[probe.http_get.path], name
        assert ports.get(probe.http_get.port, probe.http_get.port) == args.port, name
    assert container.readiness_probe.http_get.path == "/readyz" and container.liveness_probe.http_get.path == "/healthz"
    # The export comes from a volume mounted where the command reads it.
    (mount,) = container.volume_mounts
    assert args.export.startswith(mount.mount_path + "/")
    assert {v.name for v in deployment.spec.template.spec.volumes} == {mount.name}
    assert container.resources.requests["cpu"] and container.resources.limits["memory"]
    annotations = deployment.spec.template.metadata.annotations
    assert annotations["prometheus.io/path"] in routes and int(annotations["prometheus.io/port"]) == args.port
    # SIGTERM's drain fits in the grace period (uvicorn's graceful timeout: 30 s, plus preStop's sleep).
    assert deployment.spec.template.spec.termination_grace_period_seconds > 30 + 5


def test_service_and_autoscaler_target_the_deployment(objects) -> None:
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    labels = deployment.spec.template.metadata.labels
    assert deployment.spec.selector.match_labels.items() <= labels.items()
    assert service.spec.selector.items() <= labels.items()
    (container,) = deployment.spec.template.spec.containers
    assert {p.target_port for p in service.spec.ports} <= {p.name for p in container.ports}
    target = hpa.spec.scale_target_ref
    assert (target.kind, target.name) == ("Deployment", deployment.metadata.name)
    assert 1 <= hpa.spec.min_replicas <= hpa.spec.max_replicas


def test_the_image_is_the_projects() -> None:
    (image,) = re.findall(r'^DEFAULT_IMAGE = "(.+)"$', (REPO / "launch" / "components.py").read_text(), re.M)
    deployment = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image
