"""scripts/deploy: the Kubernetes manifests validate against the Kubernetes schemas, and they and
the container recipe agree with the commands they run (ports, flags, probes, drain time)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dsv4.scripts.serve import parse_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "scripts" / "deploy"
# the oldest Kubernetes still commonly run, and the newest the schemas know
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def resources() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in resources() if doc["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    found = resources()
    assert {doc["kind"] for _, doc in found} >= {"Deployment", "Service", "PersistentVolumeClaim"}
    for name, doc in found:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {error}")


def _container() -> dict:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _serve_args(container: dict):
    env = {e["name"]: e.get("value", "secret") for e in container["env"]}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert argv[0] == "dsv4-serve"
    return parse_args(argv[1:])


def test_deployment_runs_dsv4_serve_on_the_ports_it_declares():
    container = _container()
    args = _serve_args(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "openai": args.openai_port}
    assert args.device == "cuda" and args.host == "0.0.0.0" and args.openai_api_key_file is not None
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the key file the OpenAI API reads is the mounted Secret
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.openai_api_key_file).startswith(mounts["keys"])


def test_probes_use_the_health_canary_and_termination_outlasts_the_drain():
    container = _container()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "dsv4-health" and command[0] in scripts
        assert container[probe]["timeoutSeconds"] > float(command[command.index("--timeout") + 1])
    assert "--openai-url" in container["readinessProbe"]["exec"]["command"]
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # dsv4-serve stops within exit-timeout + 15 s of SIGTERM (tests/reliability/test_shutdown.py)
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + _serve_args(container).exit_timeout + 15
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _serve_args(container).metrics_port


def test_services_select_the_pod_and_name_its_ports():
    container = _container()
    (deployment,) = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    names = {p["name"] for p in container["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert {p["targetPort"] for p in services["dsv4-openai"]["spec"]["ports"]} == {"openai"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_dockerfile_copies_what_exists_and_serves_what_the_manifests_expect():
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), item
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == {p["containerPort"] for p in _container()["ports"]}
    cmd = shlex.split(" ".join(re.search(r"^CMD \[(.+)\]$", text, re.M).group(1).replace(",", " ").split()))
    assert cmd[0] == "dsv4-serve" and parse_args(cmd[1:]).openai_port in exposed
    assert "ENV TRITONSERVER=/opt/tritonserver/bin/tritonserver" in text
    assert "DSV4_MODEL_REPOSITORY=/opt/dsv4/model_repository" in text and "COPY model_repository model_repository" in text
