"""``pretag run``: flags over :class:`RunConfig`.

Without ``--server``, the handler opens a local server through the ``local_server``
function it is given (the CLI passes :func:`pretag.local.local_server`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from pretag.job.relevant import RelevantError, read_relevant
from pretag.job.report import summary_table
from pretag.job.run import (
    ConnectSettings,
    RunConfig,
    RunError,
    RunSummary,
    load_listing,
    run_job,
)
from pretag.job.sources import Listing
from pretag.job.storage import ATTEMPTS, AnyPath, location, storage_outage
from pretag.job.stream import StreamSettings
from pretag.job.vectors import MODES, embeddings_dir, write_csv
from pretag.job.video import FrameSettings
from pretag.token_file import TokenFileError, read_token_file

log = logging.getLogger("pretag")

_D = RunConfig  # defaults are set on the dataclasses, once
_S = StreamSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("input", type=location, help="folder of images (searched recursively) or a text "
                                     "file listing image paths; or an object-storage URL "
                                     "(s3://bucket/prefix/, gs://...) of either")
    add("--output-dir", type=location, required=True,
        help="where predictions and reports go: a folder or an object-storage URL")
    add("--server", action="append", default=[], metavar="HOST:PORT",
        help="pretag server to stream to (repeatable; default: start one in-process)")
    add("--model", type=Path, help="contract model for the in-process server (default: "
                                   "Faster R-CNN exported once into ~/.cache/pretag)")
    add("--score-threshold", type=float, default=_D.score_threshold,
        help=f"default {_D.score_threshold:g}")
    add("--window", type=int, default=_S.window,
        help=f"images in flight per server (default {_S.window}; held within each server's "
             f"--max-queue)")
    add("--read-threads", type=int, default=_S.read_threads,
        help=f"file reading threads (default {_S.read_threads})")
    add("--debug-images", type=int, default=0, metavar="N",
        help="draw boxes on N images spread over the run, under DIR/report/debug")
    add("--embeddings", choices=MODES,
        help="vectors to store beside the predictions, from the same pass, as Parquet under "
             "DIR/.lightly/embeddings (default: image vectors when the model has them)")
    add("--shard-images", type=int, default=_D.shard_images,
        help=f"images per Parquet shard of vectors; a kill loses at most one shard's worth "
             f"(default {_D.shard_images})")
    add("--frame-stride", type=int, default=FrameSettings.stride, metavar="N",
        help="videos: predict every N-th frame (names keep the frame numbers; default 1)")
    add("--fps", type=float, metavar="F",
        help="videos: predict about F frames a second, by timestamp (instead of a stride)")
    add("--max-pixels", type=int, default=_D.max_pixels,
        help=f"videos: refuse frames larger than this before decoding (default "
             f"{_D.max_pixels:,}; images are checked by the server's own)")
    add("--relevant-filenames-file", type=Path, metavar="FILE",
        help="only the inputs named in FILE (one path or folder a line, relative to INPUT; "
             "Lightly's relevant_filenames_file)")
    add("--no-pixel-metadata", dest="pixel_metadata", action="store_false",
        help="skip the data-health values (Lightly's pixel metadata: uniformRowRatio, "
             "sharpness, ...) the servers compute per image (about 2-4 ms of a decoding "
             "thread each); corrupt.json then lists only inputs that fail to decode")
    add("--no-class-probabilities", dest="class_probabilities", action="store_false",
        help="do not store each detection's class distribution (stored by default when "
             "the model gives one: the uncertainty_* scores of pretag select read it)")
    add("--near-duplicate-distance", type=float, default=_D.near_duplicate_distance,
        metavar="D", help=f"list image pairs whose vectors are within cosine distance D in "
                          f"DIR/report/near_duplicates.json (default "
                          f"{_D.near_duplicate_distance:g}, chosen on re-encoded, resized and "
                          f"shifted copies with YOLOX's vectors; 0: no search)")
    add("--overwrite", action="store_true",
        help="predict every image again (default: resume, keeping existing predictions "
             "if they were made with the same model and threshold)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--token-file", type=Path, help="file holding the servers' bearer token")
    add("--tls-ca", type=Path, help="CA bundle of the servers' certificates; enables TLS")
    add("--tls-cert", type=Path, help="client certificate for mutual TLS")
    add("--tls-key", type=Path, help="client key for mutual TLS")
    add("--server-timeout-s", type=float, default=_S.server_timeout_s,
        help=f"give up on a server after this long failing, or answering nothing while "
             f"images are in flight; its images go to the other servers (default "
             f"{_S.server_timeout_s:g})")
    add("--storage-timeout-s", type=float, default=_D.storage_timeout_s,
        help=f"object storage: seconds one request may wait for an answer; each is tried "
             f"{ATTEMPTS} times, then the run stops with exit 2 (default "
             f"{_D.storage_timeout_s:g})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    token = read_token_file(args.token_file) if args.token_file else None
    timeout = args.storage_timeout_s
    return RunConfig(input=location(str(args.input), timeout),
                     output_dir=location(str(args.output_dir), timeout),
                     servers=tuple(args.server), storage_timeout_s=timeout,
                     score_threshold=args.score_threshold,
                     debug_images=args.debug_images, quiet=args.quiet,
                     overwrite=args.overwrite, embeddings=args.embeddings,
                     pixel_metadata=args.pixel_metadata,
                     class_probabilities=args.class_probabilities,
                     near_duplicate_distance=args.near_duplicate_distance,
                     shard_images=args.shard_images, max_pixels=args.max_pixels,
                     frames=FrameSettings(stride=args.frame_stride, fps=args.fps),
                     relevant=(read_relevant(args.relevant_filenames_file)
                               if args.relevant_filenames_file else ()),
                     stream=StreamSettings(window=args.window, read_threads=args.read_threads,
                                           server_timeout_s=args.server_timeout_s),
                     connection=ConnectSettings(token=token, root_cert=args.tls_ca,
                                                client_cert=args.tls_cert,
                                                client_key=args.tls_key))


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def format_summary(summary: RunSummary, output_dir: AnyPath) -> str:
    inputs = str(summary.images)
    if summary.videos or summary.frames:
        images = summary.images - summary.frames - summary.unlisted
        unread = f", {summary.unlisted} not readable in full" if summary.unlisted else ""
        inputs += (f" ({_count(images, 'image')}, {summary.frames} frames of "
                   f"{_count(summary.videos, 'video')}{unread})")
    return summary_table([
        ("images", inputs),
        ("already done (skipped)", str(summary.skipped)),
        ("predicted now", str(summary.written)),
        ("failed", f"{summary.failed}" + (f" (see {output_dir / 'report' / 'errors.jsonl'})"
                                          if summary.failed else "")),
        ("time", f"{summary.seconds:.1f} s"),
        ("throughput", f"{summary.images_per_second:.1f} images/s"),
        ("ran on", ", ".join(summary.servers)),
        ("predictions", str(output_dir / ".lightly" / "predictions")),
    ])


LocalServer = Callable[..., AbstractContextManager[str]]
#: Runs the job some other way than over gRPC (``--ray``): config and listing to summary.
Runner = Callable[[RunConfig, Listing], RunSummary]


def run(args: argparse.Namespace, local_server: LocalServer | None = None,
        runner: Runner | None = None) -> int:
    try:
        if args.window < 1 or args.read_threads < 1:
            raise RunError("--window and --read-threads must be at least 1")
        if not (args.server_timeout_s > 0 and args.storage_timeout_s > 0) or \
                args.shard_images < 1:
            raise RunError("--server-timeout-s, --storage-timeout-s and --shard-images must "
                           "be positive")
        if not 0 <= args.near_duplicate_distance < 1:  # NaN fails this too
            raise RunError(f"--near-duplicate-distance must be in [0, 1), not "
                           f"{args.near_duplicate_distance}")
        config = config_from_args(args)
        listing = load_listing(config)  # before any server is started for it
        if runner is not None:
            summary = runner(config, listing)
        elif config.servers:
            summary = run_job(config, listing=listing)
        elif local_server is None:
            raise RunError("no --server given")
        else:
            with local_server(args.model, window=config.stream.window) as address:
                summary = run_job(config.with_servers((address,)), listing=listing)
    except (RunError, TokenFileError, OSError, RelevantError) as exc:
        log.error("%s", storage_outage(exc) or exc)
        return 2
    except Exception as exc:  # a store that stopped answering, met outside the job's loop
        problem = storage_outage(exc)
        if problem is None:
            raise
        log.error("%s; what was written is kept: run the same command again to resume",
                  problem)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return 130
    sys.stdout.write(format_summary(summary, args.output_dir))
    return summary.exit_code


def add_embeddings_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write a run's image vectors in another format")
    export.add_argument("dir", type=Path, help="the --output-dir of a pretag run")
    export.add_argument("--format", choices=["csv"], default="csv",
                        help="csv: Lightly's embeddings.csv (filenames, embedding_0.., labels)")
    export.add_argument("--output", type=Path,
                        help="default DIR/.lightly/embeddings/lightly_pretagging/embeddings.csv")


def run_embeddings(args: argparse.Namespace) -> int:
    output = args.output or Path(str(embeddings_dir(args.dir))) / "embeddings.csv"
    if not embeddings_dir(args.dir).is_dir():
        log.error("%s holds no vectors (run pretag run --embeddings image first)", args.dir)
        return 2
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with tmp.open("w", newline="") as out:
            rows = write_csv(args.dir, out)
        tmp.replace(output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.error("cannot write %s: %s", output, exc)
        return 2
    log.info("wrote %d rows to %s", rows, output)
    return 0 if rows else 3
