"""``pretag run --ray [ADDRESS]``: the Ray flags of ``pretag run`` over :class:`RaySettings`."""

from __future__ import annotations

import argparse

from pretag.job.cluster import DEFAULT_ENV
from pretag.job.stream import RunError
from pretag.runtime.backend import BackendConfig, BackendError, parse_provider_options
from pretag.scale.ray_job import RaySettings

_D = RaySettings  # defaults are set on the dataclass, once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray", "run the job as a Ray Data pipeline instead of "
                                             "streaming to gRPC servers")
    add = group.add_argument
    add("--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS (HOST:PORT of its head, ray://HOST:PORT, or "
             "auto); without ADDRESS, on a local cluster started for the job")
    add("--ray-actors", type=int, default=_D.actors,
        help=f"detector actors, one ONNX Runtime session each (default {_D.actors})")
    add("--ray-cpus-per-actor", type=float, default=_D.cpus_per_actor,
        help=f"Ray CPUs each actor holds (default {_D.cpus_per_actor:g})")
    add("--ray-gpus-per-actor", type=float, default=_D.gpus_per_actor,
        help="GPUs each actor holds: 1 on GPU nodes (default 0)")
    add("--ray-threads", type=int, help="ONNX Runtime threads per actor (default: its CPUs)")
    add("--ray-batch-size", type=int, default=_D.batch_size,
        help=f"images per model call (default {_D.batch_size})")
    add("--ray-read-images", type=int, default=_D.read_images,
        help=f"images per read-and-decode task (default {_D.read_images})")
    add("--ray-providers", nargs="+", metavar="NAME",
        help="ONNX Runtime execution providers of the actors (cpu, cuda, tensorrt; default: "
             "TensorRT, CUDA, CPU as the workers have them)")
    add("--ray-provider-option", action="append", default=[], metavar="P:KEY=VALUE",
        help="an ONNX Runtime provider option of the actors' sessions, e.g. "
             "tensorrt:trt_engine_cache_enable=True (repeatable)")
    add("--ray-env", action="append", default=[], metavar="NAME",
        help=f"pass this variable of the driver's environment to the workers (repeatable; "
             f"{', '.join(DEFAULT_ENV)} always are, credentials only when named)")


def settings_from_args(args: argparse.Namespace) -> RaySettings:
    try:
        options = parse_provider_options(args.ray_provider_option)
    except BackendError as exc:
        raise RunError(f"--ray-provider-option: {exc}") from None
    return RaySettings(address=None if args.ray == "local" else args.ray,
                       actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                       gpus_per_actor=args.ray_gpus_per_actor,
                       batch_size=args.ray_batch_size, read_images=args.ray_read_images,
                       env=tuple(args.ray_env),
                       backend=BackendConfig(
                           providers=tuple(args.ray_providers) if args.ray_providers else None,
                           threads=args.ray_threads,
                           provider_options=options))
