"""Dockerfiles and Kubernetes manifests, checked strictly: kustomize renders every overlay, which must
validate against Kubernetes 1.30 and 1.37 (`--strict`), yamllint, checkov and hadolint.

The linters live in .venv-tools (``make test`` creates it). The Kubeflow PyTorchJob is a CRD without a
bundled schema (k8s/ddp): its pod templates are validated as core/v1 PodTemplates, the CRD envelope
is skipped.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

TOOLS = ROOT / ".venv-tools" / "bin"
OVERLAYS = ("cpu", "gpu")
KUSTOMIZATIONS = ("overlays/cpu", "overlays/gpu", "ddp")
K8S_VERSIONS = ("1.30", "1.37")


def tool(name: str) -> str:
    path = TOOLS / name
    if path.exists():
        return str(path)
    if os.environ.get("CNNSERVE_REQUIRE_TOOLS"):
        pytest.fail(f"{path} is missing: `make test` installs requirements-tools.txt into .venv-tools")
    pytest.skip(f"{path} not installed (make test installs it)")


def run(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "PATH": f"{TOOLS}:{os.environ['PATH']}"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def render(path: str) -> list[dict]:
    done = run(tool("kubectl"), "kustomize", f"k8s/{path}")
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_everything_the_deployment_needs(overlay):
    docs = render(f"overlays/{overlay}")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy",
                            "NetworkPolicy", "Job", "Job"])
    assert all(d["metadata"].get("namespace") == "cnnserve" for d in docs if d["kind"] != "Namespace")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # not the gRPC probe: grpc refuses a health check like any call once the worker's call limit is reached
    # and on the probe port, answered by a process beside each worker (serving/health.py), which the config turns on
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    health_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "CNNSERVE_HEALTH_PORT" in d.get("data", {}))
    assert config["data"]["CNNSERVE_HEALTH_PORT"] == str(health_port)
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == 1) == (overlay == "gpu")
    assert container["image"].endswith("-gpu" if overlay == "gpu" else "-cpu")


def test_ddp_pytorchjob_uses_torchrun_elastic_with_gpu_limits():
    (job,) = render("ddp")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["command"][0] == "torchrun" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "nvidia.com/gpu" not in container["resources"]["requests"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_manifests_validate_strictly(path, version):
    docs = render(path)
    checked = [d for d in docs if d["kind"] != "PyTorchJob"]
    for job in (d for d in docs if d["kind"] == "PyTorchJob"):
        for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
            checked.append({"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
                            "template": spec["template"]})
    done = run(tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", "-",
               stdin=yaml.safe_dump_all(checked))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "did not validate" not in done.stdout + done.stderr


def test_yamllint():
    done = run(tool("yamllint"), "-s", "-c", ".yamllint.yaml", "k8s")
    assert done.returncode == 0, done.stdout


def test_checkov_kubernetes_kustomize_and_dockerfiles():
    done = run(tool("checkov"), "--config-file", ".checkov.yaml", "-d", "k8s", "--framework", "kubernetes",
               "kustomize", "--compact", "--quiet")
    assert done.returncode == 0, done.stdout[-4000:]
    done = run(tool("checkov"), "--config-file", ".checkov.yaml", "-f", "Dockerfile.serve", "-f", "Dockerfile.train",
               "--framework", "dockerfile", "--compact", "--quiet")
    assert done.returncode == 0, done.stdout[-4000:]


def test_hadolint():
    done = run(tool("hadolint"), "Dockerfile.serve", "Dockerfile.train")
    assert done.returncode == 0, done.stdout


def test_the_serve_image_installs_the_serve_extra_only_and_no_training_code():
    text = (ROOT / "Dockerfile.serve").read_text()
    assert "optional-dependencies']['serve']" in text and "COPY training" not in text
    assert "COPY serving/" in text and "USER 10001" in text and "HEALTHCHECK" in text
