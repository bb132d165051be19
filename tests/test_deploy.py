"""The Kubernetes example (deploy/) cannot run here; this checks the fields the README and the
client rely on: the gRPC health probe, the GPU request, the headless Service."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_serve_deployment_and_headless_service():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "pretag-serve.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert args[0] == "serve" and args[args.index("--providers") + 1] == "cuda"
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    grace = float(args[args.index("--grace-s") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace  # drained before SIGKILL
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["port"] == port
