"""A tiny run of every `pretag bench` command, to keep them working (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretag.bench.stats import Stability, measure_until_stable, percentiles
from pretag.cli import main


def test_stability_rule_and_percentiles():
    rule = Stability(window_s=1, count=3, tolerance=0.1, max_windows=6)
    assert not rule.stable([10, 10])
    assert rule.stable([5, 10, 10.5, 9.6])
    assert not rule.stable([10, 12, 9])
    rates = iter([4, 10, 10, 10, 99])
    result = measure_until_stable(
        lambda s: {"images": next(rates), "seconds": s, "latencies": [0.01, 0.02]}, rule)
    assert result["windows"] == 4 and result["stable"]
    assert result["images_per_s"] == 10 and len(result["latencies"]) == 6
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert round(p["p50_ms"], 1) == 50.5 and p["p99_ms"] > p["p90_ms"] > p["p50_ms"]


def test_bench_model_server_and_job_commands(yolox_model: Path, shared: Path, tmp_path: Path):
    images = shared / "data" / "driving"
    out = tmp_path / "model.json"
    assert main(["bench", "model", "--model", str(yolox_model), "--images", str(images),
                 "--batch-sizes", "1", "2", "--iterations", "2", "--output", str(out),
                 "--markdown", str(tmp_path / "model.md"), "--providers", "cpu",
                 "--gflops-per-image", "1.08", "--peak-tflops", "2"]) == 0
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["rows"]] == [1, 2]
    assert result["providers"] == ["CPUExecutionProvider"] and result["precision"] == "fp32"
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["p99_ms"] >= row["ms_per_batch"] * 0.5
        assert row["tflops"] == pytest.approx(row["images_per_s"] * 1.08 / 1000)
        assert row["fraction_of_peak"] == pytest.approx(row["tflops"] / 2)
    assert result["machine"]["cpu_count"] >= 1 and result["commit"]
    assert "| onnxruntime | 2 |" in (tmp_path / "model.md").read_text()

    out = tmp_path / "server.json"
    assert main(["bench", "server", "--model", str(yolox_model), "--images", str(images),
                 "--concurrency", "1", "4", "--modes", "stream", "unary", "--window-s", "0.5",
                 "--max-windows", "3", "--warmup-s", "0.3", "--image-limit", "4",
                 "--memory-requests", "10", "20", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["mode"], r["concurrency"]) for r in result["rows"]] == [
        ("stream", 1), ("stream", 4), ("unary", 1), ("unary", 4)]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["mean_batch_size"] >= 1 and row["peak_rss_mb"] > 0
    assert result["server_exit_code"] == 0
    assert set(result["memory"]) == {"10", "20"}
    assert result["stream_over_inprocess"] > 0

    out = tmp_path / "job.json"
    assert main(["bench", "job", "--model", str(yolox_model), "--images", str(images),
                 "--repeats", "1", "--layouts", "1x1+full", "auto", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 11 and result["run_over_inprocess"] > 0
    assert [r["layout"] for r in result["rows"]] == ["1x1+full", "auto"]
    assert result["over_first_layout"]["1x1+full"] == 1
    assert all(r["run_over_model_only"] > 0 for r in result["rows"])
