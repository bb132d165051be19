"""Each detection's class distribution: served on request over both protocols, stored by
pretag run, and turned into Lightly's uncertainty scores by pretag select (real YOLOX model
on real images, a real server, tritonclient)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pretag.cli import main
from pretag.client import Client
from pretag.server.app import BackgroundServer
from pretag.server.config import server_config

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

TRITON = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    url, model, path = sys.argv[1:]
    c = tc.InferenceServerClient(url)
    inp = tc.InferInput("IMAGE", [1], "BYTES")
    inp.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=np.object_))
    asked = [tc.InferRequestedOutput(n) for n in ("scores", "class_probabilities")]
    r = c.infer(model, [inp], outputs=asked)
    meta = c.get_model_metadata(model, as_json=True)
    print(json.dumps({"probabilities": r.as_numpy("class_probabilities").tolist(),
                      "scores": r.as_numpy("scores").tolist(),
                      "outputs": {o["name"]: o["shape"] for o in meta["outputs"]}}))
""")


@pytest.fixture(scope="module")
def server(start_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return start_server()


def test_both_protocols_serve_the_same_distribution(server: BackgroundServer, shared: Path):
    path = shared / "data" / "driving" / "nuscenes_cam_front.jpg"
    with Client(f"127.0.0.1:{server.port}") as client:
        info = client.model_info()
        plain = client.detect(path.read_bytes())
        asked = client.detect(path.read_bytes(), class_probabilities=True)
    assert info.class_probabilities and "sigmoid" in info.class_probability_method
    assert plain.class_probabilities is None  # old callers pay nothing
    p = asked.class_probabilities
    assert p is not None and p.shape == (len(asked.labels), 7) and len(asked.labels) >= 5
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    assert asked.labels == plain.labels and asked.scores == plain.scores
    proc = subprocess.run([sys.executable, "-c", TRITON, f"127.0.0.1:{server.port}",
                           info.name, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [int(d) for d in out["outputs"]["class_probabilities"]] == [-1, -1, 7]
    served = np.array(out["probabilities"])[0]
    assert served.shape == (len(asked.labels), 7)  # K: this image's detections
    np.testing.assert_allclose(served, p, rtol=0, atol=1e-6)


def _first_images(coco128: Path, folder: Path, count: int) -> Path:
    """``folder`` holding links to coco128's first ``count`` images."""
    folder.mkdir(exist_ok=True)
    for path in sorted((coco128 / "images").rglob("*.jpg"))[:count]:
        (folder / path.name).symlink_to(path)
    return folder


def _without_probabilities(model: Path, out: Path) -> Path:
    """The same contract model without its class_probabilities output (an older export)."""
    import onnx

    proto = onnx.load(str(model))
    keep = [o for o in proto.graph.output if o.name != "class_probabilities"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    props = [p for p in proto.metadata_props if p.key != "pretag.class_probabilities"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    onnx.save(proto, str(out))
    return out


def test_a_model_without_them_refuses_the_request_and_its_run_has_none(
        yolox_model: Path, coco128: Path, shared: Path, tmp_path: Path):
    from pretag.client import Unsupported

    bare = _without_probabilities(yolox_model, tmp_path / "bare.onnx")
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()
    config = server_config(model=bare, host="127.0.0.1", port=0, metrics_port=None)
    with BackgroundServer(config) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        assert not client.model_info().class_probabilities
        with pytest.raises(Unsupported, match="gives no class probabilities"):
            client.detect(image, class_probabilities=True)
        streamed = list(client.detect_stream([("a", image)], class_probabilities=True))
        assert isinstance(streamed[0].error, Unsupported)
    folder = _first_images(coco128, tmp_path / "in", 6)
    out = tmp_path / "out"
    assert main(["run", str(folder), "--output-dir", str(out), "--model", str(bare),
                 "--quiet"]) == 0
    entries = [json.loads(p.read_text())[0]
               for p in (out / ".lightly" / "predictions").rglob("0*.json")]
    assert len(entries) == 6 and not any("probabilities" in e for e in entries)
    config_file = tmp_path / "uncertain.json"
    config_file.write_text(json.dumps({"n_samples": 2, "strategies": [
        {"input": {"type": "SCORES", "task": "lightly_pretagging",
                   "score": "uncertainty_entropy"}, "strategy": {"type": "WEIGHTS"}}]}))
    assert main(["select", str(out), "--config", str(config_file)]) == 2


@pytest.fixture(scope="module")
def uncertain_run(coco128: Path, yolox_model: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Path:
    folder = _first_images(coco128, tmp_path_factory.mktemp("uncertain_in"), 40)
    out = tmp_path_factory.mktemp("uncertain_out")
    assert main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet"]) == 0
    return out


def _entries(run: Path) -> dict[str, dict]:
    return {e["filename"]: e for e in (json.loads(p.read_text())[0] for p in
                                       (run / ".lightly" / "predictions").rglob("0*.json"))}


@pytest.mark.parametrize("score", ["uncertainty_least_confidence", "uncertainty_margin",
                                   "uncertainty_entropy"])
def test_uncertainty_scores_pick_the_most_uncertain_images(uncertain_run: Path,
                                                           tmp_path: Path, score: str):
    """WEIGHTS on each score picks the images whose most uncertain detection is the most
    uncertain, the score recomputed here from the stored probabilities."""
    entries = _entries(uncertain_run)
    assert len(entries) == 40
    with_objects = [e for e in entries.values() if e["boxes"]]
    assert len(with_objects) >= 12 and all(
        len(e["probabilities"]) == len(e["boxes"]) for e in with_objects)

    def value(entry: dict) -> float:
        if not entry["boxes"]:
            return 0.0
        p = np.array(entry["probabilities"])
        top = np.sort(p, axis=1)
        per_object = {"uncertainty_least_confidence": (1 - top[:, -1]) / (1 - 1 / 7),
                      "uncertainty_margin": 1 - (top[:, -1] - top[:, -2]),
                      "uncertainty_entropy": -(p * np.log(np.where(p > 0, p, 1))).sum(1)
                      / np.log(7)}[score]
        return float(per_object.max())

    config = tmp_path / "uncertain.json"
    config.write_text(json.dumps({"n_samples": 5, "strategies": [
        {"input": {"type": "SCORES", "task": "lightly_pretagging", "score": score},
         "strategy": {"type": "WEIGHTS"}}]}))
    out = tmp_path / "sel"
    assert main(["select", str(uncertain_run), "--config", str(config),
                 "--output-dir", str(out)]) == 0
    picked = (out / "selection" / "selected.txt").read_text().split()
    values = {name: value(e) for name, e in entries.items()}
    ranked = sorted(values, key=lambda n: -values[n])
    assert sorted(values[n] for n in picked) == pytest.approx(
        sorted(values[n] for n in ranked[:5]), abs=1e-5)
    assert min(values[n] for n in picked) > np.median(list(values.values()))


def test_hand_edited_probabilities_are_named_or_left_out(uncertain_run: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture):
    """A row that does not sum to 1 leaves its detection out (named in selection.json);
    a probabilities list of another length than the boxes is exit 2 naming the file."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uncertain_run, run)
    entries = _entries(run)
    name = next(n for n, e in sorted(entries.items()) if len(e["boxes"]) >= 2)
    path = next((run / ".lightly" / "predictions").rglob(Path(name).stem + ".json"))
    entry = entries[name]
    entry["probabilities"][0] = [0.5] * 7
    path.write_text(json.dumps([entry]))
    config = tmp_path / "uncertain.json"
    config.write_text(json.dumps({"n_samples": 3, "strategies": [
        {"input": {"type": "SCORES", "task": "lightly_pretagging",
                   "score": "uncertainty_margin"}, "strategy": {"type": "WEIGHTS"}}]}))
    assert main(["select", str(run), "--config", str(config)]) == 0
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert record["rejected_detections"] == [
        {"filename": name, "detection": 0, "reason": "probabilities sum to 3.5000, not 1"}]
    entry["probabilities"] = entry["probabilities"][1:]
    path.write_text(json.dumps([entry]))
    assert main(["select", str(run), "--config", str(config)]) == 2
    assert path.name in caplog.text and "one row per box" in caplog.text


def test_no_class_probabilities_leaves_them_out(coco128: Path, yolox_model: Path,
                                                tmp_path: Path):
    folder = _first_images(coco128, tmp_path / "in", 8)
    out = tmp_path / "out"
    assert main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--no-class-probabilities", "--quiet"]) == 0
    entries = _entries(out)
    assert len(entries) == 8 and any(e["boxes"] for e in entries.values())
    assert not any("probabilities" in e for e in entries.values())
