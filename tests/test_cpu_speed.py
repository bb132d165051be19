"""Issue 26's switches: ``pretag bench read``, ``--instances auto`` (the session-layout rule
and where it is resolved), ``--full-decode``, and ``bench job --layouts``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pretag.bench.job import layout_settings
from pretag.cli import main
from pretag.preprocess import prepare
from pretag.runtime.backend import SMALL_MODEL_BYTES, OrtBackend, session_layout
from pretag.server.config import ConfigError, EngineConfig, build_config, server_config
from pretag.server.engine import Engine

CPU = ["CPUExecutionProvider"]


def _sized(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)  # sparse: only the size matters to the rule
    return path


def test_the_session_layout_rule(tmp_path: Path):
    small = _sized(tmp_path, "nano.onnx", 4 * 2**20)
    large = _sized(tmp_path, "frcnn.onnx", SMALL_MODEL_BYTES + 1)
    assert session_layout(small, CPU, 2) == (2, 1)  # measured here: 2 x 1 beats 1 x 2
    assert session_layout(small, CPU, 16) == (8, 2)  # at most 8 sessions, cores shared out
    assert session_layout(small, CPU, 1) == (1, 1)
    assert session_layout(large, CPU, 2) == (1, 2)
    assert session_layout(large, CPU, 16) == (4, 4)
    assert session_layout(small, CPU, 4, threads=2) == (2, 2)  # threads given: sessions fit
    assert session_layout(small, ["CUDAExecutionProvider", *CPU], 16) == (1, 16)


def test_instances_auto_is_the_servers_default_and_resolved_once(yolox_model: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    cores = os.cpu_count() or 1
    with caplog.at_level("INFO", logger="pretag.server.config"):
        auto = server_config(model=yolox_model)
    assert (auto.engine.batching.instances, auto.backend.threads) == \
        session_layout(yolox_model, CPU, cores)
    assert "--instances auto:" in caplog.text
    fixed = server_config(model=yolox_model, instances=1)
    assert fixed.engine.batching.instances == 1 and fixed.backend.threads is None
    threads = build_config({"model": str(yolox_model)}, {"instances": "auto", "threads": 1})
    assert (threads.engine.batching.instances, threads.backend.threads) == \
        (min(8, cores), 1)
    for bad in ("two", 1.5, True):
        with pytest.raises(ConfigError, match="instances must be a whole number or 'auto'"):
            server_config(model=yolox_model, instances=bad)


def test_serve_refuses_a_bad_instances_value(yolox_model: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(yolox_model), "--instances", "many"])
    assert exit_info.value.code == 2
    assert "--instances" in capsys.readouterr().err


def test_full_decode_switches_the_reduced_decode_off(yolox_model: Path, shared: Path):
    """The server's default decodes a 1600x900 JPEG at 1/2 for the 416 canvas; with
    ``full_decode`` it is the plain full decode + resize, pixel for pixel."""
    data = (shared / "data" / "driving" / "nuscenes_cam_front.jpg").read_bytes()
    backend = OrtBackend(yolox_model)
    spec = backend.spec.resize
    plain, _ = prepare(data, spec, reduced=False)
    reduced, _ = prepare(data, spec)
    assert plain.shape == reduced.shape and not np.array_equal(plain, reduced)
    for full, expected in ((True, plain), (False, reduced)):
        engine = Engine(backend, EngineConfig(full_decode=full, warmup=False))
        try:
            prepared = engine._prepare(data)
        finally:
            engine._decode_pool.shutdown()
            engine._compute_pool.shutdown()
        assert np.array_equal(prepared.image, expected) and prepared.original == (900, 1600)
    config = build_config({"model": str(yolox_model)}, {"full_decode": True, "instances": 1})
    assert config.engine.full_decode


def test_bench_read_measures_both_paths_per_format(shared: Path, tmp_path: Path):
    out, md = tmp_path / "read.json", tmp_path / "read.md"
    assert main(["bench", "read", "--images", str(shared / "data" / "driving"),
                 "--input-size", "640", "--threads", "2", "--rounds", "1",
                 "--output", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["threads"] == 2 and result["canvas"] == [640, 640]
    assert result["decode_scales"] == {"1/1": 5, "1/2": 6}  # PNGs full, 1600x900 JPEGs at 1/2
    assert [r["images"] for r in result["rows"]] == ["all", "JPEG", "PNG"]
    assert [r["files"] for r in result["rows"]] == [11, 6, 5]
    for row in result["rows"]:
        assert row["images_per_s_per_thread"] == pytest.approx(row["images_per_s"] / 2)
    assert "JPEG" in md.read_text()


@pytest.mark.parametrize("args, problem", [
    (["--images", "/nonexistent"], "--images"),
    (["--images", ".", "--threads", "0"], "--threads"),
    (["--images", ".", "--input-size", "0"], "--input-size"),
])
def test_bench_read_refuses_bad_arguments(args: list[str], problem: str,
                                          caplog: pytest.LogCaptureFixture):
    assert main(["bench", "read", *args]) == 2
    assert problem in caplog.text


def test_layouts_name_sessions_threads_and_the_decode():
    assert layout_settings("auto") == {"instances": "auto"}
    assert layout_settings("2x1") == {"instances": 2, "threads": 1}
    assert layout_settings("1x2+full") == {"instances": 1, "threads": 2, "full_decode": True}
    for bad in ("2", "0x1", "2x1+fast", "axb"):
        with pytest.raises(ValueError, match="layout"):
            layout_settings(bad)
