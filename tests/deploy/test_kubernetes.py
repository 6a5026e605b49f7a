"""The Kubernetes bundle renders with kustomize, validates against a pinned Kubernetes
version's schemas (built-in kinds) and the bundle's own schemas (KEDA, Prometheus Operator),
passes checkov and yamllint, and says what an operator must know in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, tool

# The deploy extra's validators: without them (the default test run) the module is skipped.
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

KUBERNETES = "1.32.0"
OVERLAYS = ["cpu", "gpu", "baked", "hpa"]
SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh.v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.monitoring.coreos.com.v1.json",
}


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        files[overlay] = folder / f"{overlay}.yaml"
        files[overlay].write_text(yaml.safe_dump_all(render(overlay), sort_keys=False))
    return files


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_against_pinned_kubernetes(
    rendered: dict[str, Path], overlay: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "-k",
            KUBERNETES,
            "--strict",
            str(rendered[overlay]),
        ],
        capture_output=True,
        text=True,
    )
    failures = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert result.returncode == 0 and not failures, result.stdout + result.stderr
    unknown = [
        line
        for line in result.stdout.splitlines()
        if "Couldn't find schema" in line and not any(kind in line for _, kind in SCHEMAS)
    ]
    assert unknown == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_their_schemas(overlay: str) -> None:
    checked = 0
    for document in render(overlay):
        schema_file = SCHEMAS.get((document["apiVersion"], document["kind"]))
        if schema_file is None:
            continue
        schema = json.loads((DEPLOY / "kubernetes" / "schemas" / schema_file).read_text())
        jsonschema.validate(document, schema)
        checked += 1
    assert checked == (1 if overlay == "hpa" else 2)


def test_schemas_refuse_what_a_cluster_would() -> None:
    scaled = next(d for d in render("cpu") if d["kind"] == "ScaledObject")
    schema = json.loads(
        (
            DEPLOY / "kubernetes" / "schemas" / SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]
        ).read_text()
    )
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 20000  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(scaled))
    del broken["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_checkov_passes(rendered: dict[str, Path], tmp_path: Path) -> None:
    args = [tool("checkov"), "--framework", "kubernetes", "--compact", "--quiet", "--skip-download"]
    for path in rendered.values():
        args += ["-f", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Failed checks: 0" in result.stdout


def test_yamllint_passes() -> None:
    config = "{extends: default, rules: {line-length: {max: 140}, document-start: disable, truthy: {check-keys: false}}}"
    result = subprocess.run(
        [tool("yamllint"), "-d", config, str(DEPLOY / "kubernetes"), str(DEPLOY / "prometheus")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_an_operator_relies_on(overlay: str) -> None:
    objects = render(overlay)
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    resources = server["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    exit_timeout = next(
        int(a.split("=")[1]) for a in server["args"] if a.startswith("--exit-timeout-secs")
    )
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > exit_timeout + pre_stop
    context = server["securityContext"]
    assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert {p["name"] for p in server["ports"]} == {"http", "grpc", "metrics"}
    assert all(o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace")
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    if overlay == "baked":
        assert not by_kind(objects, "PersistentVolumeClaim")
        assert "--model-control-mode=poll" not in server["args"]
    else:
        (claim,) = by_kind(objects, "PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert claim["spec"]["storageClassName"] == "nfs-client"  # the documented default
        assert "--model-control-mode=poll" in server["args"]
    scalers = by_kind(objects, "ScaledObject") + by_kind(objects, "HorizontalPodAutoscaler")
    assert len(scalers) == 1
    (policy,) = by_kind(objects, "NetworkPolicy")
    metrics_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 8002)
    assert metrics_rule["from"]  # the metrics port is not open to everyone
    assert by_kind(objects, "PodDisruptionBudget") and by_kind(objects, "PodMonitor")
