"""The ``pretag`` command: one parser per subcommand, each built beside its layer.

    export -> pretag.export.cli     serve -> pretag.server.cli
    run, embeddings -> pretag.job.cli (--ray: pretag.scale.cli)
    bench -> pretag.bench.cli     select -> pretag.selection.cli

Each subcommand's handler is set on its parser; ``run`` is given the local server
of :mod:`pretag.local` for when no ``--server`` is named, and the Ray executor
of :mod:`pretag.scale` with ``--ray``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pretag import local
from pretag.bench import cli as bench_cli
from pretag.export import cli as export_cli
from pretag.job import cli as run_cli
from pretag.job.run import RunConfig, RunSummary
from pretag.job.sources import Listing
from pretag.job.stream import RunError
from pretag.scale import cli as scale_cli
from pretag.scale.ray_job import run_on_ray
from pretag.selection import cli as select_cli
from pretag.selection.config import SelectionConfigError, load
from pretag.selection.run import run_selection
from pretag.server import cli as serve_cli

log = logging.getLogger("pretag")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretag", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("export", "write a contract ONNX model", export_cli.add_arguments, export_cli.run),
        ("serve", "run the gRPC inference server", serve_cli.add_arguments, serve_cli.run),
        ("run", "pretag a folder of images", _run_arguments, _run_then_select),
        ("embeddings", "a run's stored vectors (export)", run_cli.add_embeddings_arguments,
         run_cli.run_embeddings),
        ("select", "choose what to label from a finished run (Lightly's selection_config)",
         select_cli.add_arguments, select_cli.run),
        ("bench", "benchmarks (model, server, job)", bench_cli.add_arguments, bench_cli.run),
    )
    for name, help_text, add_arguments, handler in commands:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    run_cli.add_arguments(parser)
    scale_cli.add_arguments(parser)
    parser.add_argument("--selection-config", type=Path,
                        help="then select over the run (as pretag select --config FILE; "
                             "checked before any image is predicted)")
    parser.add_argument("--n-samples", type=int, help="with --selection-config: overrides "
                                                      "its n_samples / proportion_samples")


def _run_then_select(args: argparse.Namespace) -> int:
    """``pretag run``, then ``pretag select`` over its output when a config is given."""
    config = None
    if args.selection_config is not None:
        try:
            config = load(args.selection_config, args.n_samples)
            if not isinstance(args.output_dir, Path):
                raise SelectionConfigError("--selection-config needs a local --output-dir "
                                           "(selection reads the run from disk)")
        except SelectionConfigError as exc:
            log.error("%s", exc)
            return 2
        if config.process_all:  # worker_config.datasource.process_all
            args.overwrite = True
        if config.relevant_filenames_file and args.relevant_filenames_file is None:
            args.relevant_filenames_file = Path(config.relevant_filenames_file)
    code = run_cli.run(args, local_server=local.local_server, runner=_ray_runner(args))
    if config is None or code not in (0, 3):
        return int(code)
    try:
        images = args.input if isinstance(args.input, Path) and args.input.is_dir() else None
        run_selection(args.output_dir, config, images=images)
    except (SelectionConfigError, RunError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return int(code)


def _ray_runner(args: argparse.Namespace) -> run_cli.Runner | None:
    """With ``--ray``: the job on Ray."""
    if args.ray is None:
        return None
    def runner(config: RunConfig, listing: Listing) -> RunSummary:
        settings = scale_cli.settings_from_args(args)
        if config.servers:
            raise RunError("--ray and --server are two ways to run the job: give one")
        model = args.model if args.model is not None else local.default_model()
        return run_on_ray(config, model, settings, listing)

    return runner


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried
    args.argv = argv[1:]  # recorded by the benchmarks beside their figures
    return int(args.handler(args))
