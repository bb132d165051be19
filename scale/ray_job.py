"""``pretag run INPUT --ray [ADDRESS]``: the pretagging job as a Ray Data pipeline.

The driver lists the inputs and resumes exactly as the gRPC path does
(:func:`pretag.job.run.plan_job`); the pipeline (:mod:`pretag.scale.stages`) reads
and decodes in CPU tasks, detects in a pool of actors with one ONNX Runtime session
each, and writes each block's prediction files and vector shard from CPU tasks; the
driver records what comes back and writes the same report and errors.jsonl.

Faults: Ray Data restarts an actor that dies (``max_restarts=-1``) and retries the
tasks it held (``max_task_retries=-1``), so a killed actor costs its batch, not the job.
A killed driver loses what was not yet written; running the same command again resumes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretag.contract import ContractError, read_model_spec
from pretag.job.cluster import Needs
from pretag.job.cluster import connected as cluster_connected
from pretag.job.errors import Code
from pretag.job.lock import hold
from pretag.job.run import (
    Executor,
    Plan,
    RunConfig,
    RunSummary,
    execute,
    load_listing,
    plan_job,
    report,
)
from pretag.job.sources import Listing
from pretag.job.storage import check_reachable
from pretag.job.stream import RunError, read_units
from pretag.job.video import to_row
from pretag.model import ModelDescription
from pretag.preprocess import DEFAULT_MAX_PIXELS
from pretag.runtime.backend import DEFAULT_MAX_BATCH_SIZE, BackendConfig
from pretag.scale.stages import (
    SKIP,
    STOP,
    Detector,
    DetectorConfig,
    WriteConfig,
    read_images,
    read_video,
    write_block,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RaySettings:
    """How the job runs on Ray; the defaults fit one machine."""

    address: str | None = None  # None: start a local cluster for this job
    actors: int = 1  # detector actors, one ONNX Runtime session each
    cpus_per_actor: float = 1.0  # Ray CPUs each actor holds
    gpus_per_actor: float = 0.0  # 1 on GPU nodes
    batch_size: int = DEFAULT_MAX_BATCH_SIZE  # images per model call
    read_images: int = 16  # images per read-and-decode task
    # Ray CPUs of a read task; None: the actors' own, so that on CPU-only actors Ray Data
    # fuses reading into them (decoded images then skip the object store: faster on one
    # small node, see benchmarks/RESULTS.md); GPU actors never fuse, their nodes' CPUs decode
    read_cpus: float | None = None
    # each actor's session; threads None: cpus_per_actor
    backend: BackendConfig = field(default_factory=BackendConfig)
    env: tuple[str, ...] = ()  # more driver variables for the workers (e.g. credentials)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def problem(self) -> str | None:
        if self.actors < 1 or self.batch_size < 1 or self.read_images < 1:
            return "--ray-actors, --ray-batch-size and --ray-read-images must be at least 1"
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            return "--ray-cpus-per-actor and --ray-gpus-per-actor cannot be negative"
        if self.backend.problem():
            return f"--ray-{self.backend.problem()}"
        return None

    def actor_backend(self) -> BackendConfig:
        """The actors' session settings, threads defaulting to each actor's Ray CPUs."""
        threads = self.backend.threads or max(1, round(self.cpus_per_actor))
        return replace(self.backend, threads=threads)


@contextmanager
def connected(settings: RaySettings) -> Iterator[str]:
    """A Ray connection for the job (:func:`pretag.job.cluster.connected`): the detector
    actors' CPUs and GPUs, with a CPU left for reading and writing."""
    need = Needs(settings.actors * settings.cpus_per_actor + 1,
                 settings.actors * settings.gpus_per_actor, f"{settings.actors} detector actors",
                 " (one for reading and writing)")
    with cluster_connected(settings.address, settings.env, need) as where:
        yield where


def _record(plan: Plan, batches: Iterable[dict[str, Any]], progress: tqdm,
            on_result: Callable[[str, bool], None] | None) -> None:
    """Count each image the write stage reports (once: its block is reported once)."""
    items = {item.name: item for item in plan.todo}
    for batch in batches:
        for name, entry, code, reason in zip(batch["name"], batch["entry"], batch["code"],
                                             batch["reason"], strict=True):
            if code == STOP:
                raise RunError(f"{reason}. Stopped with {plan.state.written} of "
                               f"{len(plan.todo)} images written; run the same command "
                               f"again to resume")
            if code in (SKIP, Code.VIDEO):  # a video that failed: one line, from the read
                plan.state.finished += 1
                if code == Code.VIDEO:
                    plan.state.errors.append(json.loads(reason))
            else:
                plan.state.record(items[str(name)], json.loads(entry) if not code else None,
                                  str(reason) or None, str(code))
            if code:
                progress.set_postfix(failed=len(plan.state.errors), refresh=False)
            progress.update(1)
            if on_result is not None:
                on_result(str(name), not code)


def _rows(plan: Plan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The read stages' rows: one per image, one per video (its frames still to do)."""
    images: list[dict[str, Any]] = []
    videos: list[dict[str, Any]] = []
    index = 0
    for unit in read_units(plan.todo):
        video = unit[0].video
        if video is None:
            images.append({"index": index, "name": unit[0].name, "path": str(unit[0].path)})
        else:
            videos.append({**to_row(video), "index": index,
                           "indices": list(range(index, index + len(unit))),
                           "names": [item.name for item in unit],
                           "frames": [item.frame for item in unit]})
        index += len(unit)
    return images, videos


def _read(plan: Plan, settings: RaySettings) -> Any:
    """The dataset of decoded images and video frames (read_images / read_video rows)."""
    import ray.data

    config, resize = plan.config, plan.info.resize
    cpus = settings.read_cpus if settings.read_cpus is not None else settings.cpus_per_actor
    images, videos = _rows(plan)
    parts = []
    if images:
        parts.append(ray.data.from_items(images).map_batches(
            partial(read_images, resize=resize, max_pixels=settings.max_pixels,
                    timeout_s=config.storage_timeout_s, pixel_metadata=config.pixel_metadata),
            batch_size=settings.read_images, batch_format="numpy", num_cpus=cpus))
    if videos:  # one task decodes a video in order, giving frames out as it goes
        parts.append(ray.data.from_items(videos).map_batches(
            partial(read_video, resize=resize, frames_per_batch=settings.read_images,
                    timeout_s=config.storage_timeout_s, pixel_metadata=config.pixel_metadata),
            batch_size=1, batch_format="numpy", num_cpus=cpus))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def ray_executor(model: bytes, settings: RaySettings) -> Executor:
    """The job's :data:`~pretag.job.run.Executor` on the connected Ray cluster."""

    def run(plan: Plan, progress: tqdm, on_result: Callable[[str, bool], None] | None
            ) -> None:
        import ray.data
        import ray.exceptions

        if not plan.todo:
            return
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar counts the images
        config = plan.config
        detector = DetectorConfig(config.score_threshold, settings.batch_size,
                                  settings.actor_backend())
        writing = WriteConfig(str(config.output_dir), tuple(plan.info.class_names), plan.mode,
                              plan.vectors.pending.number if plan.vectors else 1,
                              plan.info.object_embedding_dim, config.storage_timeout_s,
                              config.class_probabilities and plan.info.class_probabilities)
        data = (_read(plan, settings)
                .map_batches(Detector, fn_constructor_kwargs={"model": model,
                                                              "config": detector},
                             compute=ray.data.ActorPoolStrategy(size=settings.actors),
                             batch_size=settings.batch_size, batch_format="numpy",
                             num_cpus=settings.cpus_per_actor,
                             num_gpus=settings.gpus_per_actor or None)
                .map_batches(partial(write_block, config=writing),
                             batch_size=config.shard_images, batch_format="numpy"))
        try:
            _record(plan, data.iter_batches(batch_size=None, batch_format="numpy"), progress,
                    on_result)
        except ray.exceptions.RayError as exc:  # a bug or a broken node, not an image
            log.debug("the Ray pipeline failed", exc_info=True)
            detail = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1]
            raise RunError(f"the Ray pipeline failed: {detail}. What was written is kept: "
                           f"run the same command again to resume") from None

    return run


def run_on_ray(config: RunConfig, model: Path, settings: RaySettings,
               listing: Listing | None = None,
               on_result: Callable[[str, bool], None] | None = None) -> RunSummary:
    """Run the whole job on Ray; raises :class:`RunError` for the exit-code-2 cases."""
    problem = settings.problem()
    if problem:
        raise RunError(problem)
    if listing is None:
        listing = load_listing(config)
    try:
        spec = read_model_spec(model)  # the actors build the sessions
        data = model.read_bytes()
    except (ContractError, OSError) as exc:
        raise RunError(f"--model {model}: {exc}") from None
    info = ModelDescription.from_spec(spec)
    check_reachable(config.output_dir)  # before a cluster is started or joined
    with connected(settings) as where, hold(config.output_dir):
        plan = plan_job(config, listing, info)
        seconds = execute(plan, ray_executor(data, settings), on_result)
    return report(plan, listing, seconds, (where,))
