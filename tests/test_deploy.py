"""The Kubernetes examples (deploy/) cannot run here; this checks the fields the README and the
client rely on: the gRPC health probe, the GPU request, the headless Service; the RayJob's
entrypoint (parsed by pretag's own parser) against its cluster's GPUs, CPUs and mounts."""

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


def test_rayjob_runs_pretag_with_one_actor_per_gpu():
    import shlex

    from pretag.cli import build_parser

    job = yaml.safe_load((ROOT / "deploy" / "pretag-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["pretag", "run"]
    args = build_parser().parse_args(argv[1:])  # every flag is one pretag run knows
    assert args.ray == "auto"  # the entrypoint runs inside the cluster KubeRay made
    assert str(args.input).startswith("s3://") and str(args.output_dir).startswith("s3://")
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(w["replicas"] * w["template"]["spec"]["containers"][0]["resources"]["limits"]
               ["nvidia.com/gpu"] for w in workers)
    assert args.ray_actors * args.ray_gpus_per_actor == gpus
    cpus = sum(w["replicas"] * int(w["template"]["spec"]["containers"][0]["resources"]
                                   ["limits"]["cpu"]) for w in workers)
    assert cpus > args.ray_actors * args.ray_cpus_per_actor  # CPUs left to read and write
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for m in head["containers"][0]["volumeMounts"]]
    assert any(str(args.model).startswith(m + "/") for m in mounts)  # the driver reads it
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
