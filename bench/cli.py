"""``pretag bench {model,server,job,ray,select,read}``: thin flags over the benchmark functions.

Every command writes its figures as JSON (``--output``) and a markdown table
(``--markdown``), with the machine, the model and the commit they were taken on.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from pretag.bench.stats import Stability, git_commit, machine, markdown_table
from pretag.server.config import BatchingConfig

log = logging.getLogger("pretag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, required=True, help="contract ONNX model")
    common.add_argument("--images", type=Path, required=True, help="folder of images")
    common.add_argument("--output", type=Path, help="write the results as JSON here")
    common.add_argument("--markdown", type=Path, help="write a markdown table here")
    m = sub.add_parser("model", parents=[common], help="ONNX Runtime (and torch eager) only")
    m.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    m.add_argument("--iterations", type=int, default=3)
    m.add_argument("--torch-weights", help="also time torchvision eager Faster R-CNN with "
                                           "these weights (random, default or a file)")
    m.add_argument("--threads", type=int, help="threads for both engines (default: all cores)")
    m.add_argument("--providers", nargs="+", default=["cpu"],
                   help="ONNX Runtime execution providers (default: cpu; e.g. cuda)")
    m.add_argument("--torch-device", default="cpu", help="device for torch eager (e.g. cuda)")
    m.add_argument("--gflops-per-image", type=float,
                   help="the model's GFLOPs per image at the canvas used (Faster R-CNN "
                        "R50-FPN: about 134 at 800x1333): adds achieved TFLOP/s")
    m.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s at the measured precision: adds the "
                        "fraction of peak")
    s = sub.add_parser("server", parents=[common], help="pretag serve end to end")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    s.add_argument("--modes", nargs="+", choices=["stream", "unary"],
                   default=["stream", "unary"])
    s.add_argument("--window-s", type=float, default=5.0, help="measurement window")
    s.add_argument("--max-windows", type=int, default=10)
    s.add_argument("--warmup-s", type=float, default=2.0)
    s.add_argument("--max-batch-size", type=int, default=BatchingConfig.max_batch_size)
    s.add_argument("--image-limit", type=int, default=64)
    s.add_argument("--embeddings", choices=["none", "image", "objects", "all"], default="none",
                   help="vectors asked for with every image (default none)")
    s.add_argument("--memory-requests", type=int, nargs="*", default=[],
                   help="also report server RSS after these cumulative request counts")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--output", type=Path, help="write the results as JSON here")
    out.add_argument("--markdown", type=Path, help="write a markdown table here")
    sel = sub.add_parser("select", parents=[out], help="selection (DIVERSITY + BALANCE) on "
                                                       "synthetic vectors at scale")
    sel.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    sel.add_argument("--picks", type=int, default=10_000)
    sel.add_argument("--dim", type=int, default=1280)
    sel.add_argument("--baseline-size", type=int, default=20_000,
                     help="also run the plain loop at this size (0: not at all)")
    sel.add_argument("--earlier", type=int, default=0,
                     help="also this many earlier picks (a datapool's) beside each size's "
                          "candidates: centres and counts from the start")
    sel.add_argument("--spread", action="store_true",
                     help="vectors spread evenly over the sphere (the worst case) instead of "
                          "the structured synthetic set")
    sel.add_argument("--shape", choices=("scenes", "drives", "mixture"), default="scenes",
                     help="the synthetic set: scenes of frames (default), drives (each a "
                          "trajectory through the latent space) or a mixture of clusters of "
                          "heavy-tailed sizes")
    sel.add_argument("--latent", type=int, default=24, help="its intrinsic dimension")
    sel.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                     help="the vectors' type (default float16, as a run stores them)")
    sel.add_argument("--stream", action="store_true",
                     help="write the vectors as a run's Parquet shards and select from "
                          "there, as pretag select does (the peak memory is the selection's)")
    sel.add_argument("--noise", type=float, default=0.05,
                     help="its uniform noise, of the signal's norm (default 0.05)")
    rd = sub.add_parser("read", parents=[out], help="the read path alone: read, decode, "
                                                    "resize (reduced JPEG decode vs plain)")
    rd.add_argument("--images", type=Path, required=True, help="folder of images")
    rd.add_argument("--input-size", type=int, default=640,
                    help="letterbox canvas side, as YOLOX's (default 640)")
    rd.add_argument("--model", type=Path, help="take the canvas from this contract model "
                                               "instead of --input-size")
    rd.add_argument("--threads", type=int, default=1, help="reading threads (default 1)")
    rd.add_argument("--rounds", type=int, default=5, help="alternated rounds (median)")
    j = sub.add_parser("job", parents=[common], help="pretag run vs in-process ONNX Runtime")
    j.add_argument("--batch-size", type=int, default=BatchingConfig.max_batch_size)
    j.add_argument("--repeats", type=int, default=2)
    j.add_argument("--layouts", nargs="+", default=["auto"],
                   help="embedded server session layouts, alternated: auto or SESSIONSxTHREADS, "
                        "+full for full-size JPEG decoding (e.g. --layouts 1x2+full auto)")
    r = sub.add_parser("ray", parents=[common], help="pretag run --ray vs the embedded gRPC "
                                                    "path, alternated")
    r.add_argument("--copies", type=int, default=8,
                   help="link the folder's images this many times (coco128 x 8 = 1,024)")
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    r.add_argument("--shard-images", type=int, default=128)
    r.add_argument("--stages-only", action="store_true",
                   help="only each pipeline stage's images/s alone (read, detect, write)")


def _model(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.model import ModelBench, bench_model

    r = bench_model(ModelBench(
        args.model, args.images, tuple(args.batch_sizes), args.iterations, args.torch_weights,
        args.threads, providers=tuple(args.providers), torch_device=args.torch_device,
        gflops_per_image=args.gflops_per_image, peak_tflops=args.peak_tflops))
    columns = ["engine", "batch_size", "canvas", "ms_per_batch", "p99_ms", "images_per_s"]
    columns += [c for c in ("tflops", "fraction_of_peak") if c in r["rows"][0]]
    table = markdown_table(r["rows"], columns)
    table += f"\nModel {r['model']} ({r['precision']}) on {', '.join(r['providers'])}\n"
    if "ort_over_torch" in r:
        table += f"\nONNX Runtime / torch eager at their best batch sizes: " \
                 f"{r['ort_over_torch']:.2f}x\n"
    return r, table


def _server(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.job import inprocess_ort
    from pretag.bench.server import ServerBench, bench_server
    from pretag.job.sources import list_images
    from pretag.runtime.backend import OrtBackend

    cfg = ServerBench(args.model, args.images, tuple(args.concurrency), tuple(args.modes),
                      Stability(window_s=args.window_s, max_windows=args.max_windows),
                      args.warmup_s, args.max_batch_size, args.image_limit,
                      tuple(args.memory_requests), args.embeddings)
    data = [i.path.read_bytes() for i in list_images(args.images).items[:args.image_limit]]
    backend = OrtBackend(args.model)  # the same default providers as the server

    def baseline() -> float:
        """The better of batch 1 and the server's largest batch, run back to back."""
        rates = []
        for size in sorted({1, args.max_batch_size}):
            inprocess_ort(backend, data[:size], size)
            rates.append(inprocess_ort(backend, data * 2, size)["images_per_s"])
        return max(rates)

    before = baseline()
    r = bench_server(cfg)
    r["inprocess_images_per_s"] = statistics.mean([before, baseline()])
    for mode, best in r["best"].items():
        r[f"{mode}_over_inprocess"] = best["images_per_s"] / r["inprocess_images_per_s"]
    table = markdown_table(r["rows"], ["mode", "concurrency", "images_per_s", "p50_ms",
                                       "p90_ms", "p99_ms", "mean_batch_size",
                                       "server_cpu_percent", "peak_rss_mb", "stable"])
    table += (f"\nIn-process ONNX Runtime (decode + resize + run, one after another, the "
              f"better of batch 1 and {args.max_batch_size}, same images): "
              f"{r['inprocess_images_per_s']:.2f} images/s\n")
    for mode in r["best"]:
        table += f"Best {mode} / in-process: {r[f'{mode}_over_inprocess']:.2f}x\n"
    for count, mem in r["memory"].items():
        table += f"RSS after {count} requests: {mem['rss_mb']:.0f} MB " \
                 f"(peak {mem['peak_rss_mb']:.0f} MB)\n"
    return r, table


def _job(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.job import JobBench, bench_job

    r = bench_job(JobBench(args.model, args.images, args.batch_size, args.repeats,
                           layouts=tuple(args.layouts)))
    table = markdown_table(r["rows"], ["layout", "images", "run_images_per_s",
                                       "run_over_inprocess", "run_over_model_only",
                                       "run_wall_s_with_startup"])
    table += (f"\nIn-process loop (read, decode, resize, run; one session on every core): "
              f"{r['inprocess_images_per_s']:.1f} images/s; model only (batches prepared "
              f"beforehand): {r['model_only_images_per_s']:.1f} images/s\n")
    for layout, ratio in r.get("over_first_layout", {}).items():
        table += f"{layout} / {args.layouts[0]}: {ratio:.2f}x\n"
    return r, table


def _ray(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.ray import RayBench, bench_ray

    r = bench_ray(RayBench(args.model, args.images, args.copies, args.repeats,
                           tuple(args.actors), args.shard_images, args.stages_only))
    table = markdown_table(r["rows"], ["executor", "images", "wall_s", "job_s", "images_per_s",
                                       "over_grpc", "steady_images_per_s", "steady_over_grpc"]
                           ) if r["rows"] else ""
    stages = [{"stage": k, "images_per_s": v} for k, v in r["stages"].items()]
    return r, table + "\n" + markdown_table(stages, ["stage", "images_per_s"])


def _select(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.select import SelectBench, bench_select

    r = bench_select(SelectBench(tuple(args.sizes), args.picks, args.dim, args.baseline_size,
                                 args.spread, args.earlier, args.shape, args.latent,
                                 args.noise, args.dtype, args.stream))
    columns = ["images", "earlier", "picks", "select_s", "setup_s", "peak_rss_mb",
               "start_rss_mb", "vectors_mb", "peak_over_vectors", "distances", "dropped",
               "l1_gap_input", "l1_gap_after"]
    columns += [c for c in ("plain_s", "speedup_over_plain", "same_picks_as_plain")
                if any(c in row for row in r["rows"])]
    return r, markdown_table(r["rows"], columns)


def _read(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pretag.bench.read import ReadBench, bench_read

    r = bench_read(ReadBench(args.images, args.input_size, args.threads, args.rounds,
                             model=args.model))
    table = markdown_table(r["rows"], ["images", "files", "threads", "images_per_s",
                                       "images_per_s_per_thread", "plain_images_per_s",
                                       "over_plain"])
    scales = ", ".join(f"{k}: {v}" for k, v in r["decode_scales"].items())
    return r, table + f"\nDecode scales used ({r['resize']} {r['max_size']}): {scales}\n"


def _problem(args: argparse.Namespace) -> str | None:
    if args.bench == "select":
        return None
    if args.bench == "read":
        if not args.images.is_dir():
            return f"--images {args.images}: not a folder"
        if args.model is not None and not args.model.is_file():
            return f"--model {args.model}: not a file"
        if args.threads < 1 or args.rounds < 1 or args.input_size < 1:
            return "--threads, --rounds and --input-size must be at least 1"
        return None
    if not args.model.is_file() or not args.images.is_dir():
        return "--model must be a file and --images a folder"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    start = time.time()
    result, table = {"model": _model, "server": _server, "job": _job, "ray": _ray,
                     "select": _select, "read": _read}[args.bench](args)
    meta = {"benchmark": args.bench, "model_file": str(getattr(args, "model", "")),
            "images": str(getattr(args, "images", "")),
            "commit": git_commit(), "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
            "command": "pretag bench " + " ".join(args.argv)}
    result = {**meta, **result}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"`{meta['command']}` (commit {meta['commit']})\n\n{table}")
    log.info("results:\n%s", table)
    return 0
