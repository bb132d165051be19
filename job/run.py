"""``pretag run INPUT --output-dir DIR``: the pretagging job, as a function tests can call.

One job, two executors: :func:`plan_job` (settings, task files, resume), :func:`execute`
(progress, errors.jsonl) and :func:`report` (histograms, debug images, summary) are shared;
the executor in between predicts the images left. Here it streams to gRPC servers, by
address only (:mod:`pretag.local` starts one locally when the command names none);
:mod:`pretag.scale` runs a Ray Data pipeline instead. Outputs: DIR/.lightly/predictions/...
(see :mod:`pretag.job.outputs`) and DIR/report/{class_histogram.json,
class_histogram.png, errors.jsonl, debug/}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretag.client.api import AsyncClient, Connection, PretagError
from pretag.contract import threshold_problem
from pretag.job.errors import Code, record
from pretag.job.health import Health
from pretag.job.lock import hold
from pretag.job.neardup import DEFAULT_DISTANCE, write_near_duplicates
from pretag.job.outputs import (
    name_problem,
    prediction_path,
    read_prediction,
    read_settings,
    write_atomic,
    write_settings,
    write_task_files,
    written_name,
    written_predictions,
)
from pretag.job.relevant import is_relevant
from pretag.job.report import draw_debug_image, spread, write_histogram
from pretag.job.sources import ImageItem, InputError, Listing, list_images
from pretag.job.stats import Histogram
from pretag.job.storage import (
    DEFAULT_TIMEOUT_S,
    AnyPath,
    check_reachable,
    remove_tree,
    storage_outage,
)
from pretag.job.stream import (
    Ask,
    Job,
    JobState,
    RunError,
    StoreOutage,
    StreamSettings,
    Target,
)
from pretag.job.vectors import VectorError, VectorStore, embeddings_dir, load_embeddings
from pretag.job.video import FrameSettings, VideoError, expand, read_frame
from pretag.model import ModelDescription
from pretag.preprocess import DEFAULT_MAX_PIXELS
from pretag.v1 import pretag_pb2 as pb

log = logging.getLogger(__name__)

_RESUME_READERS = 16  # predictions read at once when resuming (I/O bound)


@dataclass(frozen=True)
class ConnectSettings:
    """How the job reaches every server: credentials and the first call's patience."""

    token: str | None = None
    root_cert: Path | None = None  # enables TLS
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    timeout_s: float = 30.0  # for each server to answer ModelInfo at the start

    def to(self, address: str) -> Connection:
        return Connection(address, token=self.token, root_cert=self.root_cert,
                          client_cert=self.client_cert, client_key=self.client_key)


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run: what the job does, with how it streams and connects nested
    (the Ray executor's own settings are :class:`pretag.scale.ray_job.RaySettings`)."""

    input: AnyPath  # a local path or an object-storage URL (pretag.job.storage)
    output_dir: AnyPath
    servers: tuple[str, ...] = ()  # addresses; run_job needs at least one
    score_threshold: float = 0.5
    debug_images: int = 0
    quiet: bool = False
    overwrite: bool = False  # predict every image again, whatever is in output_dir
    embeddings: str | None = None  # none|image|objects|all; None: image if the model has them
    shard_images: int = 1024  # images per Parquet shard of vectors
    storage_timeout_s: float = DEFAULT_TIMEOUT_S  # per object-storage request (storage.py)
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest video frame decoded (images: the server's)
    frames: FrameSettings = field(default_factory=FrameSettings)  # which frames of videos
    relevant: tuple[str, ...] = ()  # relevant_filenames_file entries (job/relevant.py)
    #: ask the servers for each image's pixel metadata (data health: job/health.py)
    pixel_metadata: bool = True
    #: store each detection's class distribution when the model gives one (SCORES
    #: uncertainty_* inputs of pretag select)
    class_probabilities: bool = True
    #: near duplicates among the stored image vectors (job/neardup.py); 0: not searched
    near_duplicate_distance: float = DEFAULT_DISTANCE
    stream: StreamSettings = field(default_factory=StreamSettings)
    connection: ConnectSettings = field(default_factory=ConnectSettings)

    def with_servers(self, servers: tuple[str, ...]) -> RunConfig:
        return dataclasses.replace(self, servers=servers)


@dataclass(frozen=True)
class RunSummary:
    images: int
    skipped: int
    written: int
    failed: int
    seconds: float
    servers: tuple[str, ...]
    videos: int = 0  # video files read (their frames are among ``images``)
    frames: int = 0  # video frames among ``images`` (each frame counts as a sample)
    unlisted: int = 0  # inputs among ``images`` that could not be listed or probed

    @property
    def images_per_second(self) -> float:
        return (self.written + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0


def _resume(config: RunConfig, items: list[ImageItem], hist: Histogram, health: Health,
            vectors: VectorStore | None, written: set[str]
            ) -> tuple[list[ImageItem], list[dict[str, Any]]]:
    """Images still to do; those with a readable prediction (and their vectors, when
    vectors are stored) are counted and skipped. The output is listed once and only the
    predictions found are read, several at a time (on object storage, one GET each).
    ``written``: :func:`written_predictions` of the output."""
    errors: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    unique, found = [], []
    for item in items:
        problem = name_problem(item.name)
        if problem is not None:
            errors.append(record(item.path, item.name, Code.NAME, problem))
            continue
        target = str(prediction_path(config.output_dir, item.name))
        if target in seen:
            errors.append(record(item.path, item.name, Code.NAME,
                                 f"its prediction file {target.rsplit('/', 1)[-1]} would "
                                 f"overwrite that of {seen[target]}"))
            continue
        seen[target] = item.name
        unique.append(item)
        if written_name(item.name) in written:
            found.append(item)
    with ThreadPoolExecutor(_RESUME_READERS, thread_name_prefix="pretag-resume") as pool:
        entries = dict(zip((i.name for i in found),
                           pool.map(lambda i: read_prediction(config.output_dir, i.name), found),
                           strict=True))
    todo: list[ImageItem] = []
    for item in unique:
        entry = entries.get(item.name)
        if entry is None or (vectors is not None and vectors.needs(item.name)):
            todo.append(item)
        else:
            hist.add(entry)
            health.add(entry)
    return todo, errors


def vector_mode(config: RunConfig, info: ModelDescription) -> str:
    """The vectors to store: as asked, or by default the image vectors when the model
    gives them. Asking for vectors the model does not give is an error."""
    if config.embeddings is None:
        return "image" if info.embedding_dim else "none"
    if config.embeddings in ("image", "all") and not info.embedding_dim:
        raise RunError(f"--embeddings {config.embeddings}: model {info.name} gives no image "
                       f"vectors")
    if config.embeddings in ("objects", "all") and not info.object_embedding_dim:
        raise RunError(f"--embeddings {config.embeddings}: model {info.name} gives no object "
                       f"vectors (re-export it with this version of pretag)")
    return config.embeddings


async def check_servers(connections: list[Connection], timeout_s: float
                        ) -> list[pb.ModelInfoResponse]:
    """Each server's model info; RunError if one cannot be reached or classes differ."""
    async def info(connection: Connection) -> pb.ModelInfoResponse:
        async with AsyncClient(connection) as client:
            try:
                return await client.model_info(timeout=timeout_s)
            except PretagError as exc:
                raise RunError(f"server {connection.address} is unreachable: "
                               f"{str(exc).splitlines()[0]}") from None

    infos = await asyncio.gather(*(info(c) for c in connections))
    names = {tuple(i.class_names) for i in infos}
    if len(names) > 1:
        raise RunError(f"servers disagree on class names: {sorted(names)}")
    models = {(i.name, i.source_sha256, i.precision) for i in infos}
    if len(models) > 1:
        log.warning("servers run different models (name, weights sha256, precision): %s",
                    sorted(models))
    return list(infos)


def write_errors(path: AnyPath, errors: list[dict[str, Any]]) -> None:
    """errors.jsonl, written whole or not at all (a full disk leaves the old one)."""
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in errors))


def run_settings(config: RunConfig, info: ModelDescription) -> dict[str, Any]:
    """What decides the predictions' content: the model and the threshold."""
    return info.run_settings(config.score_threshold)


def _check_settings(config: RunConfig, settings: dict[str, Any], items: list[ImageItem],
                    written: set[str]) -> None:
    """Refuse to resume over predictions made otherwise; with --overwrite, clear them.
    ``written``: :func:`written_predictions` of the output."""
    previous = read_settings(config.output_dir)
    mine = [i for i in items if written_name(i.name) in written]
    if previous not in (None, settings) and not config.overwrite and mine:
        changes = "; ".join(f"{key} {previous.get(key)!r} -> {settings.get(key)!r}"
                            for key in sorted(settings.keys() | previous.keys())
                            if previous.get(key) != settings.get(key))
        raise RunError(f"{config.output_dir} holds predictions made with other settings "
                       f"({changes}). Use another --output-dir, or --overwrite to predict "
                       f"every image again")
    if config.overwrite:
        for item in mine:
            prediction_path(config.output_dir, item.name).unlink(missing_ok=True)
        remove_tree(embeddings_dir(config.output_dir))
    write_settings(config.output_dir, settings)


def _connections(config: RunConfig) -> list[Connection]:
    return [config.connection.to(a) for a in config.servers]


def _effective_threshold(config: RunConfig, info: ModelDescription) -> RunConfig:
    """The threshold the model can honour: its in-graph floor drops lower scores."""
    floor = round(float(info.min_score_threshold), 6)
    if config.score_threshold < floor:
        log.warning("--score-threshold %g is below the lowest score %s outputs (%g, set at "
                    "export): using %g", config.score_threshold, info.name, floor, floor)
        return dataclasses.replace(config, score_threshold=floor)
    return config


@dataclass
class Plan:
    """A job ready for an executor: settings checked, task files written, resume done.

    Both executors (gRPC streaming here, Ray Data in :mod:`pretag.scale`) take a plan,
    predict ``todo`` and record each image in ``state``; listing, resume, the output
    files and the report are this module's, shared by both.
    """

    config: RunConfig  # with the threshold the model can honour
    info: ModelDescription  # the model, as the executor described it
    todo: list[ImageItem]
    state: JobState
    mode: str  # vectors stored: none|image|objects|all
    vectors: VectorStore | None
    total: int  # images listed, problems included
    skipped: int  # already done by an earlier run


#: Predicts ``plan.todo``: writes each prediction (and its vectors) and records every
#: image in ``plan.state``, updating the progress bar; RunError stops the job (exit 2).
Executor = Callable[[Plan, tqdm, Callable[[str, bool], None] | None], None]


def plan_job(config: RunConfig, listing: Listing, info: ModelDescription) -> Plan:
    """Check the output's settings against the model's, write the task files and find
    what is left to do. The caller has checked that the output can be reached."""
    config = _effective_threshold(config, info)
    items = listing.items
    class_names = tuple(info.class_names)
    written = written_predictions(config.output_dir)  # listed once
    _check_settings(config, run_settings(config, info), items, written)
    if config.overwrite:  # _check_settings deleted every listed image's prediction
        written = set()
    write_task_files(config.output_dir, class_names)
    hist = Histogram(class_names)
    mode = vector_mode(config, info)
    vectors = (None if mode == "none"
               else VectorStore(config.output_dir, mode, config.shard_images,
                                info.object_embedding_dim))
    health = Health()
    todo, name_errors = _resume(config, items, hist, health, vectors, written)
    state = JobState(hist, errors=listing.problems + name_errors, health=health)
    plan = Plan(config, info, todo, state, mode, vectors, len(items) + len(listing.problems),
                len(items) - len(todo) - len(name_errors))
    if plan.skipped:
        log.info("resuming: %d of %d images already have predictions", plan.skipped,
                 len(items))
    return plan


def execute(plan: Plan, executor: Executor,
            on_result: Callable[[str, bool], None] | None = None) -> float:
    """Run ``executor`` over the plan with a progress bar; errors.jsonl is written
    however it ends. Returns the seconds it took."""
    config = plan.config
    start = time.monotonic()
    with tqdm(total=plan.total, initial=plan.total - len(plan.todo), unit="img",
              desc="pretag", disable=config.quiet, smoothing=0.1,
              postfix={"failed": len(plan.state.errors)}) as progress:
        down = False
        try:
            executor(plan, progress, on_result)
        except StoreOutage:
            down = True  # errors.jsonl cannot reach the store; the re-run lists them again
            raise
        finally:
            try:
                if not down:
                    write_errors(config.output_dir / "report" / "errors.jsonl",
                                 plan.state.errors)
            except Exception as exc:
                if storage_outage(exc) is None and not isinstance(exc, OSError):
                    raise
                log.error("cannot write errors.jsonl: %s", storage_outage(exc) or exc)
    return time.monotonic() - start


def report(plan: Plan, listing: Listing, seconds: float, where: tuple[str, ...]
           ) -> RunSummary:
    """The histograms and debug images of a finished job, and its summary."""
    config, state = plan.config, plan.state
    write_histogram(config.output_dir / "report", state.hist, config.score_threshold)
    state.health.write(config.output_dir / "report", state.errors)
    if plan.mode in ("image", "all") and config.near_duplicate_distance > 0:
        try:
            names, vectors = load_embeddings(config.output_dir)
        except VectorError as exc:  # the predictions stand; the search needs every vector
            log.error("no near-duplicate search: %s", exc)
        else:
            write_near_duplicates(config.output_dir / "report", names, vectors,
                                  config.near_duplicate_distance)
    if config.debug_images:
        _debug_images(config, listing.items, state.hist.class_names)
    frames = sum(1 for item in listing.items if item.video is not None)
    return RunSummary(plan.total, plan.skipped, state.written, len(state.errors), seconds,
                      where, listing.videos, frames, len(listing.problems))


def _grpc_executor(connections: list[Connection], infos: list[pb.ModelInfoResponse]
                   ) -> Executor:
    def stream(plan: Plan, progress: tqdm,
               on_result: Callable[[str, bool], None] | None) -> None:
        config = plan.config
        window = config.stream.window
        targets = [Target.of(c, i, window) for c, i in zip(connections, infos, strict=True)]
        job = Job(targets, plan.todo, config.output_dir, plan.state, config.stream,
                  Ask(config.score_threshold, plan.mode, plan.info.resize,
                      config.pixel_metadata,
                      config.class_probabilities and plan.info.class_probabilities),
                  progress,
                  on_result, vectors=plan.vectors)
        asyncio.run(job.run())

    return stream


def _debug_images(config: RunConfig, items: list[ImageItem], class_names: Any) -> None:
    written = 0
    for index in spread(config.debug_images, len(items)):
        item = items[index]
        entry = read_prediction(config.output_dir, item.name)
        if entry is None:
            continue
        flat = Path(item.name.replace("/", "__")).with_suffix(".jpg").name
        out = config.output_dir / "report" / "debug" / flat
        try:
            draw_debug_image(read_frame(item.video, item.frame) if item.video else item.path,
                             entry, out, class_names)
            written += 1
        except (OSError, ValueError, VideoError) as exc:
            log.warning("no debug image for %s: %s", item.name, exc)
    log.info("wrote %d debug images to %s", written, config.output_dir / "report" / "debug")


def load_listing(config: RunConfig) -> Listing:
    """The inputs of the job; RunError when there is nothing to do or a setting is wrong."""
    problem = threshold_problem(config.score_threshold, "--score-threshold")
    if problem:
        raise RunError(problem)
    problem = config.frames.problem()
    if problem:
        raise RunError(problem)
    try:
        listing = list_images(config.input)
    except InputError as exc:
        raise RunError(str(exc)) from None
    if config.relevant:
        listing = dataclasses.replace(
            listing, items=[i for i in listing.items if is_relevant(i.name, config.relevant)],
            problems=[p for p in listing.problems
                      if is_relevant(str(p["filename"]), config.relevant)])
        if not listing.items and not listing.problems:
            raise RunError(f"none of the inputs in {config.input} is named in the "
                           f"relevant_filenames_file ({len(config.relevant)} entries, e.g. "
                           f"{config.relevant[0]})")
    listing = expand(listing, config.frames, config.max_pixels)
    if not listing.items and not listing.problems:
        raise RunError(f"no images found in {config.input}")
    return listing


def expand_servers(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """``dns:///name:port`` (as a Kubernetes headless Service gives it) becomes one address
    per IP the name resolves to, so that every pod behind it gets a stream of its own (a
    gRPC channel balances calls, but a stream stays on the pod it started on); the job's
    failover then works pod by pod. Other addresses are kept as they are."""
    out: list[str] = []
    for address in addresses:
        if not address.startswith("dns:"):
            out.append(address)
            continue
        target = address[len("dns:"):].lstrip("/")
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise RunError(f"--server {address}: expected dns:///NAME:PORT")
        try:
            found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RunError(f"--server {address}: {host} does not resolve ({exc})") from None
        ips = list(dict.fromkeys(str(info[4][0]) for info in found))
        log.info("%s resolves to %d addresses: %s", address, len(ips), ", ".join(ips))
        out.extend(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips)
    return tuple(dict.fromkeys(out))


def run_job(config: RunConfig, on_result: Callable[[str, bool], None] | None = None,
            listing: Listing | None = None) -> RunSummary:
    """Run the whole job against ``config.servers``; raises :class:`RunError` for the
    exit-code-2 cases. ``listing``: the inputs, when the caller already listed them."""
    if not config.servers:
        raise RunError("no server address given")
    config = config.with_servers(expand_servers(config.servers))
    if listing is None:
        listing = load_listing(config)
    connections = _connections(config)
    check_reachable(config.output_dir)
    infos = asyncio.run(check_servers(connections, config.connection.timeout_s))
    with hold(config.output_dir):
        plan = plan_job(config, listing, ModelDescription.from_info(infos[0]))
        seconds = execute(plan, _grpc_executor(connections, infos), on_result)
        return report(plan, listing, seconds, config.servers)
