"""Data health end to end (issue 24, gRPC executor): real frames broken here go through
``pretag run`` with a real server, and come out in report/corrupt.json and
report/duplicates.json; ``pretag select`` leaves them out and takes the pixel metadata as
METADATA inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pretag.cli import main
from pretag.job.health import content_hash

PREDICTIONS = Path(".lightly") / "predictions" / "lightly_pretagging"


@pytest.fixture(scope="module")
def broken(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real frames, a byte copy, a re-encoded copy, a blank frame, a frame grey from
    half way down (a decoder that gave up) and a JPEG cut in half."""
    src = shared / "data" / "driving"
    folder = tmp_path_factory.mktemp("broken")
    image = cv2.imread(str(src / "nuscenes_cam_front.jpg"))
    shutil.copy(src / "nuscenes_cam_front.jpg", folder / "front.jpg")
    shutil.copy(src / "nuscenes_cam_front.jpg", folder / "front_copy.jpg")
    shutil.copy(src / "kitti_000007.png", folder / "kitti.png")
    cv2.imwrite(str(folder / "reencoded.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    cv2.imwrite(str(folder / "blank.jpg"), np.full_like(image, 128))
    half = image.copy()
    half[450:] = 128
    cv2.imwrite(str(folder / "half_grey.jpg"), half)
    raw = (src / "nuscenes_cam_back.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(raw[:len(raw) // 2])
    return folder


@pytest.fixture(scope="module")
def health_run(broken: Path, yolox_model: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", str(broken), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet"]) == 3  # the cut JPEG fails (exit 3: some images failed)
    return out


def _report(out: Path, name: str) -> dict:
    return json.loads((out / "report" / name).read_text())


def test_corrupt_and_duplicate_inputs_are_reported(health_run: Path, broken: Path):
    corrupt = _report(health_run, "corrupt.json")
    assert corrupt["corrupt_samples"].keys() == {"blank.jpg", "half_grey.jpg", "cut.jpg"}
    assert corrupt["corrupt_samples"]["blank.jpg"] == "built-in"  # Lightly's own reason
    assert "corrupt or truncated" in corrupt["corrupt_samples"]["cut.jpg"]
    assert corrupt["corrupt_videos"] == {}
    duplicates = _report(health_run, "duplicates.json")
    assert duplicates["groups"] == [["front.jpg", "front_copy.jpg"]]
    assert duplicates["removed"] == ["front_copy.jpg"] and duplicates["hashed_images"] == 6
    entry = json.loads((health_run / PREDICTIONS / "front.json").read_text())[0]
    assert entry["content_hash"] == content_hash((broken / "front.jpg").read_bytes())
    meta = entry["metadata"]
    assert (meta["width"], meta["height"]) == (1600, 900) and meta["uniformRowRatio"] == 0
    assert meta["sharpness"] > 100 and 0 < meta["meanRed"] < 255
    half = json.loads((health_run / PREDICTIONS / "half_grey.json").read_text())[0]
    assert half["metadata"]["uniformRowRatio"] == pytest.approx(0.5, abs=0.02)


def test_a_resumed_run_reports_the_same(health_run: Path, broken: Path, yolox_model: Path):
    before = {n: _report(health_run, n) for n in ("corrupt.json", "duplicates.json")}
    assert main(["run", str(broken), "--output-dir", str(health_run), "--model",
                 str(yolox_model), "--quiet"]) == 3  # nothing predicted again but cut.jpg
    assert {n: _report(health_run, n) for n in before} == before


def test_without_pixel_metadata_only_decode_failures_are_corrupt(broken: Path,
                                                                 yolox_model: Path,
                                                                 tmp_path: Path):
    out = tmp_path / "out"
    assert main(["run", str(broken), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet", "--no-pixel-metadata"]) == 3
    assert _report(out, "corrupt.json")["corrupt_samples"].keys() == {"cut.jpg"}
    entry = json.loads((out / PREDICTIONS / "blank.json").read_text())[0]
    assert "metadata" not in entry and entry["content_hash"].startswith("blake2b:")


def _select(run: Path, config: dict, tmp_path: Path) -> tuple[list[str], dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sel"
    assert main(["select", str(run), "--config", str(path), "--output-dir", str(out)]) == 0
    picked = (out / "selection" / "selected.txt").read_text().split()
    return picked, json.loads((out / "selection" / "excluded.json").read_text())


def test_selection_leaves_corrupt_and_duplicate_images_out(health_run: Path, tmp_path: Path):
    config = {"worker_config": {"pretagging": True},
              "selection_config": {"n_samples": 10, "strategies": [
                  {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}
    picked, excluded = _select(health_run, config, tmp_path)
    assert sorted(picked) == ["front.jpg", "kitti.png", "reencoded.jpg"]
    assert excluded == {"blank.jpg": "corrupt (built-in: uniformRowRatio above 0.025)",
                        "half_grey.jpg": "corrupt (built-in: uniformRowRatio above 0.025)",
                        "front_copy.jpg": "exact duplicate of front.jpg"}
    # a threshold above the half-grey frame's 0.5 keeps it (and the blank one's 1.0 out)
    config["worker_config"]["corruptness_check"] = {"corruption_threshold": 0.6}
    picked, excluded = _select(health_run, config, tmp_path / "loose")
    assert "half_grey.jpg" in picked and "blank.jpg" in excluded


def test_pixel_metadata_are_metadata_inputs(health_run: Path, tmp_path: Path):
    """THRESHOLD on lightly.sharpness (BIGGER) keeps what is sharper than the bound: all
    three candidates below the least sharp of them, none above the sharpest."""
    sharp = {n: json.loads((health_run / PREDICTIONS / f"{n}.json").read_text())[0]
             ["metadata"]["sharpness"] for n in ("front", "kitti", "reencoded")}
    bound = min(sharp.values()) - 1
    config = {"worker_config": {"pretagging": True},
              "selection_config": {"n_samples": 10, "strategies": [
                  {"input": {"type": "METADATA", "key": "lightly.sharpness"},
                   "strategy": {"type": "THRESHOLD", "threshold": bound,
                                "operation": "BIGGER"}}]}}
    picked, _ = _select(health_run, config, tmp_path)
    assert sorted(picked) == ["front.jpg", "kitti.png", "reencoded.jpg"]
    config["selection_config"]["strategies"][0]["strategy"]["threshold"] = max(sharp.values())
    picked, _ = _select(health_run, config, tmp_path / "none")
    assert picked == []  # nothing is sharper than the sharpest
    config["selection_config"] = {"n_samples": 1, "strategies": [
        {"input": {"type": "METADATA", "key": "lightly.sharpness"},
         "strategy": {"type": "WEIGHTS"}}]}
    picked, _ = _select(health_run, config, tmp_path / "weights")
    sharpest = max(sharp, key=sharp.__getitem__)  # WEIGHTS takes the heaviest first
    assert picked == [sharpest + (".png" if sharpest == "kitti" else ".jpg")]


@pytest.mark.parametrize("check, problem", [
    ({"corruption_threshold": 2}, "outside [0.0, 1.0]"),
    ({"corruption_threshold": float("nan")}, "finite"),
    ({"threshold": 0.1}, "unknown key"),
    ("strict", "must be an object"),
])
def test_a_bad_corruptness_check_is_refused(health_run: Path, tmp_path: Path, check: object,
                                            problem: str, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"worker_config": {"corruptness_check": check},
                                "selection_config": {"n_samples": 1, "strategies": [
                                    {"input": {"type": "EMBEDDINGS"},
                                     "strategy": {"type": "DIVERSITY"}}]}}))
    assert main(["select", str(health_run), "--config", str(path)]) == 2
    assert "corruptness_check" in caplog.text and problem in caplog.text


def test_the_server_answers_pixel_metadata_only_when_asked(broken: Path, yolox_model: Path):
    from pretag.client.api import Client
    from pretag.local import local_server

    data = (broken / "half_grey.jpg").read_bytes()
    with local_server(yolox_model, window=4) as address, Client(address) as client:
        plain = client.detect(data, id="a")
        asked = client.detect(data, id="b", pixel_metadata=True)
        streamed = list(client.detect_stream([("c", data)], pixel_metadata=True))
    assert plain.metadata is None
    assert asked.metadata is not None and streamed[0].metadata == asked.metadata
    assert asked.metadata["uniformRowRatio"] == pytest.approx(0.5, abs=0.02)
    assert (asked.metadata["width"], asked.metadata["height"]) == (1600, 900)
    assert asked.boxes == plain.boxes  # the same detections either way


@pytest.mark.slow
def test_ray_finds_the_same_corrupt_and_duplicate_inputs(health_run: Path, broken: Path,
                                                         yolox_model: Path, ray_cluster: str,
                                                         tmp_path: Path):
    import os
    import subprocess
    import sys

    # as tests/test_ray.py: a cluster with token authentication needs drivers to opt in
    env = {**os.environ, **({"RAY_AUTH_MODE": "token"}
                            if (Path.home() / ".ray" / "auth_token").exists() else {})}
    out = tmp_path / "ray"
    done = subprocess.run([sys.executable, "-m", "pretag.cli", "run", str(broken),
                           "--output-dir", str(out), "--model", str(yolox_model), "--quiet",
                           "--ray", ray_cluster], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 3, done.stderr
    for name in ("corrupt.json", "duplicates.json"):
        assert _report(out, name) == _report(health_run, name)
    for path in sorted((health_run / PREDICTIONS).glob("*.json")):
        if path.name != "schema.json":  # the same entries: detections, metadata, hash
            assert (out / PREDICTIONS / path.name).read_text() == path.read_text(), path.name


def test_near_duplicates_are_found_and_can_be_left_out(health_run: Path, tmp_path: Path):
    near = _report(health_run, "near_duplicates.json")
    assert near["distance"] == 0.02 and near["exact"] and near["images"] == 6
    assert near["groups"] == [["front.jpg", "front_copy.jpg", "reencoded.jpg"]]
    assert near["removed"] == ["front_copy.jpg", "reencoded.jpg"]
    config = {"worker_config": {"pretagging": True},
              "selection_config": {"n_samples": 10, "strategies": [
                  {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sel"
    assert main(["select", str(health_run), "--config", str(path), "--output-dir", str(out),
                 "--remove-near-duplicates"]) == 0
    assert sorted((out / "selection" / "selected.txt").read_text().split()) == \
        ["front.jpg", "kitti.png"]
    excluded = json.loads((out / "selection" / "excluded.json").read_text())
    assert excluded["reencoded.jpg"] == "near duplicate of front.jpg"


def test_near_duplicate_search_exact_and_inverted_file_agree(monkeypatch: pytest.MonkeyPatch):
    from pretag.job import neardup

    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[:40] + rng.normal(scale=0.01, size=(40, 64)).astype(np.float32)
    vectors = np.concatenate([base, copies])
    exact, was_exact = neardup.find(vectors, 0.02)
    assert was_exact
    assert sorted((i, j) for i, j, _ in exact.pairs) == [(i, 3000 + i) for i in range(40)]
    assert all(d <= 0.02 for *_, d in exact.pairs) and len(exact.groups) == 40
    monkeypatch.setattr(neardup, "EXACT_MAX", 100)
    approx, was_exact = neardup.find(vectors, 0.02)
    assert not was_exact
    found = {(i, j) for i, j, _ in approx.pairs}
    assert len(found) >= 38 and found <= {(i, 3000 + i) for i in range(40)}


def test_a_bad_near_duplicate_distance_is_exit_2(broken: Path, yolox_model: Path,
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture):
    for bad in ("1", "-0.1", "nan"):
        assert main(["run", str(broken), "--output-dir", str(tmp_path / "out"), "--model",
                     str(yolox_model), "--near-duplicate-distance", bad]) == 2
    assert "--near-duplicate-distance must be in [0, 1)" in caplog.text


def test_remove_near_duplicates_needs_the_report(health_run: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    shutil.copytree(health_run, run)
    (run / "report" / "near_duplicates.json").unlink()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"selection_config": {"n_samples": 1, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}))
    assert main(["select", str(run), "--config", str(path), "--remove-near-duplicates"]) == 2
    assert "near_duplicates.json does not exist" in caplog.text


def test_the_report_shows_data_health_shares_and_bounded_grids(health_run: Path, broken: Path,
                                                               tmp_path: Path):
    from pretag.selection.report_health import MAX_PICK_THUMBNAILS

    config = {"worker_config": {"pretagging": True},
              "selection_config": {"n_samples": 2, "strategies": [
                  {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
                  {"input": {"type": "PREDICTIONS", "task": "lightly_pretagging",
                             "name": "CLASS_DISTRIBUTION"},
                   "strategy": {"type": "BALANCE", "target": {"car": 0.7, "truck": 0.3}}}]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sel"
    assert main(["select", str(health_run), "--config", str(path), "--output-dir", str(out),
                 "--images", str(broken), "--remove-near-duplicates"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["data_health"] == {
        "excluded": 4, "corrupt": 2, "exact_duplicates": 1, "near_duplicates": 1,
        "candidates": 2, "selected": 2, "not_sent_to_labelling": 0,
        "first_excluded": {"blank.jpg": "corrupt (built-in: uniformRowRatio above 0.025)",
                           "front_copy.jpg": "exact duplicate of front.jpg",
                           "half_grey.jpg": "corrupt (built-in: uniformRowRatio above 0.025)",
                           "reencoded.jpg": "near duplicate of front.jpg"}}
    page = (out / "report" / "report.html").read_text()
    assert "<h2>Data health</h2>" in page and "4 images (2 corrupt, 1 exact" in page
    assert 'alt="class shares before, after and target"' in page
    # the picks, the images left out, and each kept image beside its duplicate left out
    assert page.count("<img class=thumb") == 2 + 4 + 2 * 2
    assert "<h3>Kept, beside a duplicate left out</h3>" in page
    assert "blank.jpg: corrupt (built-in" in page  # an excluded thumbnail's caption
    assert MAX_PICK_THUMBNAILS >= 2


def _png_with(image: np.ndarray, damage: str) -> bytes:
    """A PNG with one byte of its first IDAT chunk's data flipped, or its CRC."""
    data = bytearray(cv2.imencode(".png", image)[1].tobytes())
    at = data.find(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    where = at + 4 + 20 if damage == "data" else at + 4 + length  # into the data / the CRC
    data[where] ^= 0xFF
    return bytes(data)


def test_broken_pngs_and_a_video_cut_short_are_corrupt(shared: Path, yolox_model: Path,
                                                       tmp_path: Path):
    from pretag.bench.video import cut, make_video, pan_frames

    folder = tmp_path / "in"
    folder.mkdir()
    image = cv2.imread(str(shared / "data" / "driving" / "kitti_000007.png"))
    (folder / "data_flip.png").write_bytes(_png_with(image, "data"))
    (folder / "crc_flip.png").write_bytes(_png_with(image, "crc"))
    clip = make_video(tmp_path / "whole.mp4",
                      pan_frames(sorted((shared / "data" / "driving").glob("*.jpg")), 30,
                                 (320, 192)), gop=10)
    cut(clip, folder / "cut.mp4", 0.5)
    damaged = bytearray(clip.read_bytes())  # 3,000 bytes zeroed mid-stream (a bad sector)
    middle = len(damaged) // 2
    damaged[middle:middle + 3000] = bytes(3000)
    (folder / "damaged.mp4").write_bytes(bytes(damaged))
    out = tmp_path / "out"
    assert main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet"]) == 3
    corrupt = _report(out, "corrupt.json")
    assert corrupt["corrupt_samples"].keys() == {"data_flip.png", "crc_flip.png"}
    assert all("corrupt or truncated" in r for r in corrupt["corrupt_samples"].values())
    assert list(corrupt["corrupt_videos"]) == ["cut.mp4", "damaged.mp4"]
    assert "decoding stopped" in corrupt["corrupt_videos"]["damaged.mp4"]
    # the frames decoded before the damage are predicted, the rest are not
    frames = {p.name for p in (out / ".lightly" / "predictions").rglob("*.json")
              if "damaged" in str(p)}
    assert 0 < len(frames) < 30


@pytest.mark.parametrize("damage, problem", [
    ("length", "holds vectors of 10 values, the shards before it 448"),
    ("nan", "1 vectors hold values that are not finite"),
    ("garbage", "is not a readable vector shard"),
])
def test_a_damaged_vector_shard_is_refused_naming_it(health_run: Path, tmp_path: Path,
                                                     damage: str, problem: str,
                                                     caplog: pytest.LogCaptureFixture):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    shutil.copytree(health_run, run)
    shard = run / ".lightly" / "embeddings" / "lightly_pretagging" / "images-999999.parquet"
    if damage == "garbage":
        shard.write_bytes(b"not parquet at all")
    else:
        dim = 10 if damage == "length" else 448
        values = np.ones(dim, np.float16)
        if damage == "nan":
            values[3] = np.nan
        pq.write_table(pa.table({"filename": ["extra.jpg"], "vector":
                                 pa.FixedSizeListArray.from_arrays(pa.array(values), dim)}),
                       shard)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"selection_config": {"n_samples": 1, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}))
    assert main(["select", str(run), "--config", str(path)]) == 2
    assert "images-999999.parquet" in caplog.text and problem in caplog.text


@pytest.mark.parametrize("value, problem", [
    (float("nan"), "is not a finite number for 1 samples (e.g. front.jpg: nan)"),
    ("abc", "is missing or not a number"),
])
def test_hand_edited_metadata_is_refused_naming_it(health_run: Path, tmp_path: Path,
                                                   value: object, problem: str,
                                                   caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    shutil.copytree(health_run, run)
    path = run / PREDICTIONS / "front.json"
    entry = json.loads(path.read_text())
    entry[0]["metadata"]["sharpness"] = value
    path.write_text(json.dumps(entry))  # NaN as JSON allows it, as a hand edit might
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"selection_config": {"n_samples": 2, "strategies": [
        {"input": {"type": "METADATA", "key": "lightly.sharpness"},
         "strategy": {"type": "WEIGHTS"}}]}}))
    assert main(["select", str(run), "--config", str(config)]) == 2
    assert problem in caplog.text
