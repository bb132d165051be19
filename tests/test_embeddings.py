"""Vectors from the same pass: what they capture (real YOLOX model on coco128), how they
are served (pretag.v1, KServe with tritonclient) and stored (Parquet, resumable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pretag.cli import main
from pretag.client import Client
from pretag.job.vectors import embeddings_dir, load_embeddings
from pretag.server.app import BackgroundServer
from pretag.server.config import server_config

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return start_server()


@pytest.fixture(scope="module")
def flipped_run(coco128: Path, yolox_model: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Path:
    """coco128 plus a horizontally flipped, re-encoded copy of every image, pretagged with
    all vectors."""
    folder = tmp_path_factory.mktemp("flipped")
    for path in sorted((coco128 / "images").rglob("*.jpg")):
        image = cv2.imread(str(path))
        cv2.imwrite(str(folder / path.name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(folder / f"{path.stem}_flip.jpg"), cv2.flip(image, 1),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    out = tmp_path_factory.mktemp("flipped_out")
    assert main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--embeddings", "all", "--score-threshold", "0.3", "--quiet"]) == 0
    return out


def _normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_flipped_copy_is_its_image_s_nearest_neighbour(flipped_run: Path):
    names, vectors = load_embeddings(flipped_run)
    assert len(names) == 256 and vectors.shape == (256, 448) and len(set(names)) == 256
    unit = _normalised(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    index = {n: i for i, n in enumerate(names)}
    originals = [n for n in names if not n.endswith("_flip.jpg")]
    hits = sum(names[int(np.argmax(similarity[index[n]]))] == n.replace(".jpg", "_flip.jpg")
               for n in originals)
    print(f"flipped copy is the nearest neighbour for {hits} of {len(originals)} images")
    assert hits >= 0.95 * len(originals)


def test_object_vectors_of_one_class_are_closer_than_of_different_classes(flipped_run: Path):
    table = pq.read_table(next(embeddings_dir(flipped_run).glob("objects-*.parquet")))
    labels = np.array(table["label"].to_pylist())
    _, vectors = load_embeddings(flipped_run, "objects")
    assert len(labels) == len(vectors) > 100
    distance = 1 - _normalised(vectors) @ _normalised(vectors).T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    within, across = distance[same & off_diagonal].mean(), distance[~same].mean()
    print(f"mean cosine distance of object vectors: same class {within:.3f}, "
          f"different classes {across:.3f} ({len(labels)} objects)")
    assert within < across


def test_csv_export_has_lightly_s_layout(flipped_run: Path, tmp_path: Path):
    out = tmp_path / "embeddings.csv"
    assert main(["embeddings", "export", str(flipped_run), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert header == ["filenames", *(f"embedding_{i}" for i in range(448)), "labels"]
    names, vectors = load_embeddings(flipped_run)
    assert len(lines) == 1 + len(names)
    first = lines[1].split(",")
    assert first[0] == names[0] and first[-1] == "0"
    np.testing.assert_allclose(np.array(first[1:-1], float), vectors[0], rtol=1e-5)
    assert main(["embeddings", "export", str(tmp_path / "nothing")]) == 2


def test_old_callers_get_today_s_answers_and_vectors_come_when_asked(server: BackgroundServer,
                                                                     shared: Path):
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()
    with Client(f"127.0.0.1:{server.port}") as client:
        info = client.model_info()
        assert (info.embedding_dim, info.object_embedding_dim) == (448, 64)
        plain = client.detect(image)
        assert plain.embedding is None and plain.object_embeddings is None
        full = client.detect(image, embeddings="all")
        only_image = client.detect(image, embeddings="image")
    assert full.labels == plain.labels and full.scores == plain.scores
    assert full.embedding is not None and full.embedding.shape == (448,)
    assert full.object_embeddings is not None
    assert full.object_embeddings.shape == (len(full.labels), 64)
    assert only_image.object_embeddings is None
    np.testing.assert_array_equal(only_image.embedding, full.embedding)


TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    url, model, path = sys.argv[1:]
    c = tc.InferenceServerClient(url)
    inp = tc.InferInput("IMAGE", [1], "BYTES")
    inp.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=np.object_))
    plain = c.infer(model, [inp])
    asked = [tc.InferRequestedOutput(n) for n in ("scores", "embeddings", "object_embeddings")]
    asked.append(tc.InferRequestedOutput("labels", class_count=3))
    r = c.infer(model, [inp], outputs=asked)
    meta = c.get_model_metadata(model, as_json=True)
    print(json.dumps({
        "plain_outputs": sorted(o.name for o in plain.get_response().outputs),
        "names": [x.decode() for x in r.as_numpy("labels").reshape(-1)],
        "scores": r.as_numpy("scores")[0].tolist(),
        "embeddings": list(r.as_numpy("embeddings").shape),
        "objects": list(r.as_numpy("object_embeddings").shape),
        "metadata_outputs": [o["name"] for o in meta["outputs"]]}))
""")


def test_tritonclient_gets_vectors_and_class_names(server: BackgroundServer, shared: Path):
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, f"127.0.0.1:{server.port}",
                           "yolox_nano-driving",
                           str(shared / "data" / "driving" / "kitti_000008.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plain_outputs"] == ["boxes", "labels", "num_detections", "scores"]
    assert out["embeddings"] == [1, 448] and out["objects"][0] == 1 and out["objects"][2] == 64
    assert len(out["names"]) == 3
    for text, score in zip(out["names"], out["scores"], strict=False):
        value, index, name = text.split(":")
        assert abs(float(value) - score) < 1e-5 and name in ("car", "person", "truck")
        assert int(index) in range(7)
    assert out["metadata_outputs"][-3:] == ["embeddings", "object_embeddings",
                                            "class_probabilities"]


def _rows(out: Path, kind: str) -> list[tuple]:
    rows = []
    for path in sorted(embeddings_dir(out).glob(f"{kind}-*.parquet")):
        table = pq.read_table(path).to_pydict()
        keys = ["filename", "detection"] if kind == "objects" else ["filename"]
        rows += [(*(table[k][i] for k in keys), tuple(table["vector"][i]))
                 for i in range(len(table["filename"]))]
    return rows


def test_killed_run_with_vectors_resumes_to_the_rows_of_a_clean_run(coco128: Path,
                                                                    yolox_model: Path,
                                                                    tmp_path: Path):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "pretag.cli", "run", str(coco128), "--output-dir",
                str(out), "--model", str(yolox_model), "--embeddings", "all", "--quiet",
                "--window", "8", "--shard-images", "16"]

    clean = tmp_path / "clean"
    subprocess.run(command(clean), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(embeddings_dir(killed).glob("images-*.parquet"))) >= 3:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = len(list(embeddings_dir(killed).glob("images-*.parquet")))
    assert 0 < shards < 8, "the kill came too late to test resuming"
    subprocess.run(command(killed), check=True, capture_output=True, timeout=300)
    for kind in ("images", "objects"):
        again, fresh = _rows(killed, kind), _rows(clean, kind)
        assert len(again) == len(set(r[:-1] for r in again))  # no row twice
        assert sorted(again) == sorted(fresh)
    assert not list(embeddings_dir(killed).glob(".*.tmp"))


def _without_vectors(model: Path, out: Path) -> Path:
    """The same contract model with its vector outputs removed (as an older export)."""
    import onnx

    proto = onnx.load(str(model))
    keep = [o for o in proto.graph.output if o.name not in ("embeddings", "object_embeddings")]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    props = [p for p in proto.metadata_props
             if p.key not in ("pretag.embeddings", "pretag.object_embeddings")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    onnx.save(proto, str(out))
    return out


def test_vectors_from_a_model_without_them_are_unsupported(yolox_model: Path, shared: Path,
                                                           tmp_path: Path):
    """Issue 29: this reached the Python client as InvalidImage, the bad-image class."""
    from pretag.client import InvalidImage, Unsupported

    bare = _without_vectors(yolox_model, tmp_path / "bare.onnx")
    image = next((shared / "data" / "driving").iterdir()).read_bytes()
    config = server_config(model=bare, host="127.0.0.1", port=0, metrics_port=None)
    with BackgroundServer(config) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        assert client.detect(image).embedding is None
        with pytest.raises(Unsupported, match="gives no image embeddings") as raised:
            client.detect(image, embeddings="image")
        assert not isinstance(raised.value, InvalidImage)
        streamed = list(client.detect_stream([("a", image)], embeddings="objects"))
        assert isinstance(streamed[0].error, Unsupported)


def test_kserve_class_count_below_one_is_invalid(server: BackgroundServer, shared: Path):
    """class_count=-1 answered OK with shape [1, -1] and lost a detection (issue 29)."""
    import grpc

    from pretag.kserve_v2 import grpc_service_pb2 as kpb
    from pretag.kserve_v2 import grpc_service_pb2_grpc as kpb_grpc
    from pretag.server.kserve import encode_bytes_tensor

    image = next((shared / "data" / "driving").iterdir()).read_bytes()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert server.server is not None
        name = server.server.engine.spec.name
        for count in (-1, 0):
            request = kpb.ModelInferRequest(model_name=name)
            request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(encode_bytes_tensor([image]))
            output = request.outputs.add(name="labels")
            output.parameters["classification"].int64_param = count
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "class_count" in (raised.value.details() or "")
