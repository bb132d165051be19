"""Server operations: KServe v2 (tritonclient), TLS, tokens, overload, `pretag serve`, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pretag.client import AsyncClient, Client, Connection, Overloaded, Unauthenticated
from pretag.client.api import PretagError
from pretag.server.app import BackgroundServer
from pretag.server.config import server_config

StartServe = Callable[..., Any]

TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    url, model, *paths = sys.argv[1:]
    c = tc.InferenceServerClient(url)
    meta = c.get_model_metadata(model, as_json=True)
    out = {"live": c.is_server_live(), "ready": c.is_server_ready(),
           "model_ready": c.is_model_ready(model), "metadata": meta, "results": []}
    data = np.array([open(p, "rb").read() for p in paths], dtype=np.object_)
    inp = tc.InferInput("IMAGE", [len(paths)], "BYTES")
    inp.set_data_from_numpy(data)
    r = c.infer(model, [inp], request_id="req-1")
    for name in ("boxes", "scores", "labels", "num_detections"):
        out[name] = r.as_numpy(name).tolist()
    try:
        bad = tc.InferInput("IMAGE", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        c.infer(model, [bad], request_id="bad-1")
    except tc.InferenceServerException as exc:
        out["bad_status"], out["bad_message"] = exc.status(), exc.message()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def server(start_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return start_server()


def test_tritonclient_gives_the_same_detections_as_detect(server: BackgroundServer,
                                                          shared: Path):
    paths = [shared / "data" / "driving" / n for n in
             ("kitti_000008.png", "nuscenes_cam_front.jpg", "kitti_000007.png")]
    # tritonclient ships its own copy of the "inference" protos; a separate process keeps
    # it from meeting pretag's copy in one protobuf descriptor pool.
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, f"127.0.0.1:{server.port}",
                           "yolox_nano-driving", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert [i["name"] for i in out["metadata"]["inputs"]] == ["IMAGE"]
    assert [o["name"] for o in out["metadata"]["outputs"]] == [
        "boxes", "scores", "labels", "num_detections", "embeddings", "object_embeddings",
        "class_probabilities"]
    assert out["bad_status"] == "StatusCode.INVALID_ARGUMENT"
    assert "bad-1" in out["bad_message"]
    info_names = ["bicycle", "bus", "car", "motorcycle", "person", "train", "truck"]
    with Client(f"127.0.0.1:{server.port}") as client:
        for i, path in enumerate(paths):
            pred = client.detect(path.read_bytes())
            n = out["num_detections"][i]
            assert n == len(pred.labels)
            assert [info_names[k] for k in out["labels"][i][:n]] == pred.labels
            np.testing.assert_allclose(np.array(out["boxes"][i][:n]).reshape(-1, 4),
                                       np.array(pred.boxes).reshape(-1, 4), atol=1e-6)
            np.testing.assert_allclose(out["scores"][i][:n], pred.scores, atol=1e-6)
    assert out["num_detections"][0] >= 5  # kitti_000008 is full of cars


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(folder: Path) -> None:
    """A CA, a server cert for localhost, a client cert, and a client cert from another CA."""
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for ca in ("ca", "rogue_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=folder)
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue_ca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", "/CN=localhost", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", "san.ext", cwd=folder)


def test_mutual_tls_and_token(yolox_model: Path, tmp_path: Path, shared: Path):
    _make_certs(tmp_path)
    (tmp_path / "token").write_text("s3cret-token\n")
    config = server_config(model=yolox_model, host="127.0.0.1", port=0, metrics_port=None,
                          warmup=False, tls_cert=tmp_path / "server.pem",
                          tls_key=tmp_path / "server.key", tls_client_ca=tmp_path / "ca.pem",
                          token_file=tmp_path / "token")
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()

    def connect(token: str | None, client: str = "client") -> Client:
        return Client(Connection(f"localhost:{srv.port}", token=token,
                                 root_cert=tmp_path / "ca.pem",
                                 client_cert=tmp_path / f"{client}.pem",
                                 client_key=tmp_path / f"{client}.key"))

    with BackgroundServer(config) as srv:
        with connect("s3cret-token") as good:
            assert "car" in good.detect(image).labels
        for token in (None, "wrong-token"):
            with connect(token) as bad, pytest.raises(Unauthenticated):
                bad.detect(image)
        with connect("s3cret-token", "rogue") as rogue, pytest.raises(PretagError):
            rogue.model_info(timeout=5)  # client cert from an unknown CA: handshake refused
        doubting = Connection(f"localhost:{srv.port}", token="s3cret-token",
                              root_cert=tmp_path / "rogue_ca.pem",
                              client_cert=tmp_path / "client.pem",
                              client_key=tmp_path / "client.key")
        with Client(doubting) as wrong_ca, pytest.raises(Unauthenticated, match="handshake"):
            wrong_ca.model_info(timeout=5)  # server cert not from the CA we trust: no retry
        with Client(f"localhost:{srv.port}", token="s3cret-token") as plain, \
                pytest.raises(PretagError):
            plain.model_info(timeout=5)  # plaintext against a TLS port
        # health stays open without a token
        creds = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes(),
                                             (tmp_path / "client.key").read_bytes(),
                                             (tmp_path / "client.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_full_queue_answers_resource_exhausted_and_recovers(yolox_model: Path, coco128: Path):
    config = server_config(model=yolox_model, host="127.0.0.1", port=0, metrics_port=None,
                          warmup=False, max_queue=2, max_batch_size=1)
    data = next(coco128.glob("images/**/*.jpg")).read_bytes()

    async def burst(port: int) -> list[object]:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            return await asyncio.gather(*(client.detect(data) for _ in range(40)),
                                        return_exceptions=True)

    with BackgroundServer(config) as srv:
        results = asyncio.run(burst(srv.port))
        rejected = [r for r in results if isinstance(r, Overloaded)]
        assert rejected and all(r.retryable for r in rejected)
        assert all(isinstance(r, Overloaded) or r.error is None for r in results)  # type: ignore[union-attr]
        with Client(f"127.0.0.1:{srv.port}") as client:
            assert client.detect(data).error is None


def test_sigterm_during_a_stream_finishes_accepted_work_then_ends_it_promptly(
        yolox_model: Path, coco128: Path, tmp_path: Path, serve_process: StartServe):
    """Draining: accepted images are answered, the open stream then ends with UNAVAILABLE
    (the client sends the rest elsewhere), and the server exits long before --grace-s."""
    config = tmp_path / "serve.toml"
    config.write_text(f'model = "{yolox_model}"\nhost = "127.0.0.1"\nport = 0\n'
                      f'max-batch-size = 4\ngrace-s = 20\n')
    server = serve_process("--config", str(config), "--no-metrics")
    port = server.wait_ready()
    paths = sorted(coco128.glob("images/**/*.jpg"))
    sent: list[str] = []
    signalled: list[float] = []

    def items() -> Iterator[tuple[str, bytes]]:
        for i in range(400):
            item_id = f"{i}:{paths[i % len(paths)].name}"
            sent.append(item_id)
            yield item_id, paths[i % len(paths)].read_bytes()
            if i == 60:
                signalled.append(time.monotonic())
                os.kill(server.proc.pid, signal.SIGTERM)

    answers: dict[str, object] = {}
    with Client(f"127.0.0.1:{port}") as client, pytest.raises(PretagError) as ended:
        for pred in client.detect_stream(items(), window=16):
            assert pred.id not in answers
            answers[pred.id] = pred.error
    assert server.proc.wait(60) == 0, "".join(server.lines)
    drain_s = time.monotonic() - signalled[0]
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in str(ended.value)
    assert set(answers) <= set(sent) and len(sent) < 400  # the client learnt to stop early
    codes = [None if e is None else e.code for e in answers.values()]  # type: ignore[attr-defined]
    assert set(codes) <= {None, grpc.StatusCode.UNAVAILABLE}
    assert codes.count(None) >= 40  # the work accepted before the signal was finished
    assert drain_s < 10, f"drain took {drain_s:.1f} s of the 20 s grace"
    log = "".join(server.lines)
    assert "received SIGTERM" in log and "draining" in log


def test_serve_refuses_bad_settings_with_exit_code_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "pretag.cli", "serve", "--model",
                           str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "missing.onnx is not a file" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "x.onnx"\nmax_bach_size = 4\n')
    proc = subprocess.run([sys.executable, "-m", "pretag.cli", "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown settings" in proc.stderr


class SlowBackend:
    """A fake model: the real model's spec, no detections, a fixed time per batch."""

    def __init__(self, spec: object, seconds: float) -> None:
        self.spec = spec
        self.providers = ("FakeProvider",)
        self.seconds = seconds
        self.batches: list[int] = []
        self.started = threading.Event()  # set once a batch is inside the model

    def run(self, batch: object) -> object:
        from pretag.runtime.backend import Outputs

        n = batch.images.shape[0]  # type: ignore[attr-defined]
        self.batches.append(n)
        self.started.set()
        time.sleep(self.seconds)
        return Outputs(np.zeros((n, 1, 4), np.float32), np.zeros((n, 1), np.float32),
                       np.full((n, 1), -1, np.int64), np.zeros((n,), np.int64))


def test_expired_deadline_is_dropped_before_compute(yolox_model: Path, coco128: Path):
    from pretag.client import DeadlineExceeded
    from pretag.contract import validate_model

    backend = SlowBackend(validate_model(yolox_model), seconds=1.0)
    config = server_config(model=yolox_model, host="127.0.0.1", port=0, metrics_port=None,
                          warmup=False, max_batch_size=1, instances=1)
    data = next(coco128.glob("images/**/*.jpg")).read_bytes()

    async def scenario(port: int) -> None:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            busy = asyncio.ensure_future(client.detect(data, id="busy"))
            # "busy" is in the model for 1 s once this returns
            await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 10)
            with pytest.raises(DeadlineExceeded):
                await client.detect(data, id="late", timeout=0.3)
            assert (await busy).error is None

    with BackgroundServer(config, backend=backend) as srv:  # type: ignore[arg-type]
        asyncio.run(scenario(srv.port))
        assert backend.batches == [1]  # "late" never reached the model
        registry = srv.server.metrics.registry  # type: ignore[union-attr]

        def dropped() -> float:
            # gRPC cancels the handler when the deadline passes (counted CANCELLED); had
            # the batch been formed first, the batcher would have refused it (DEADLINE_...)
            return sum(registry.get_sample_value(
                "pretag_requests_total", {"method": "Detect", "code": code}) or 0
                for code in ("CANCELLED", "DEADLINE_EXCEEDED"))

        deadline = time.monotonic() + 5  # the cancelled handler is counted as it unwinds
        while dropped() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dropped() == 1


def test_example_config_file_is_valid(yolox_model: Path):
    from pretag.server.config import build_config, read_config_file

    root = Path(__file__).resolve().parent.parent
    values = read_config_file(root / "examples" / "serve.toml")
    assert values["model"] == root / "examples" / ".." / "models" / "yolox_nano_driving.onnx"
    config = build_config(values, {"model": yolox_model, "port": 0})  # flags win
    assert (config.model, config.port, config.batching.max_batch_size) == (yolox_model, 0, 8)
    assert config.metrics_port == 8000 and config.grace_s == 30


def test_config_file_can_switch_metrics_off(tmp_path: Path, yolox_model: Path):
    from pretag.server.config import ConfigError, build_config, read_config_file

    path = tmp_path / "serve.toml"
    path.write_text(f'model = "{yolox_model}"\nmetrics = false\n')
    assert build_config(read_config_file(path), {}).metrics_port is None
    assert build_config(read_config_file(path), {"metrics_port": 0}).metrics_port == 0
    # the --no-metrics flag takes the same path, and wins over a port set in the file
    path.write_text(f'model = "{yolox_model}"\nmetrics-port = 9000\n')
    assert build_config(read_config_file(path), {"metrics": False}).metrics_port is None
    path.write_text('metrics = "no"\n')
    with pytest.raises(ConfigError, match="true or false"):
        read_config_file(path)
    path.write_text("metrics = false\nmetrics-port = 9000\n")
    with pytest.raises(ConfigError, match="contradict"):
        read_config_file(path)


def test_providers_are_resolved_and_a_silent_fallback_is_caught(caplog: pytest.LogCaptureFixture):
    from pretag.runtime.backend import BackendError, check_started, resolve_providers

    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    assert resolve_providers(None, [cpu, cuda, trt]) == [trt, cuda, cpu]
    assert resolve_providers(None, [cpu]) == [cpu]
    assert resolve_providers(["cuda", "cpu"], [trt, cuda, cpu]) == [cuda, cpu]
    with pytest.raises(BackendError, match=r"pretag\[gpu\]"):
        resolve_providers(["cuda"], [cpu])
    with pytest.raises(BackendError, match="did not start"):  # asked for, fell back
        check_started([cuda, cpu], [cpu], explicit=True)
    with caplog.at_level("WARNING", logger="pretag.runtime.backend"):
        check_started([trt, cuda, cpu], [cuda, cpu], explicit=False)  # CUDA is fine
        assert not caplog.records
        check_started([trt, cuda, cpu], [cpu], explicit=False)  # TensorRT -> CPU
    assert "--providers cuda" in caplog.text


def test_provider_options_from_flags_and_file_reach_the_sessions(yolox_model, tmp_path,
                                                                  monkeypatch):
    """One BackendConfig carries them; ONNX Runtime gets them per provider, in order; options
    for a provider the session does not use are refused, not dropped."""
    import onnxruntime as ort

    from pretag.runtime.backend import (
        BackendConfig,
        BackendError,
        OrtBackend,
        parse_provider_options,
    )
    from pretag.server.config import ConfigError, build_config, read_config_file

    assert parse_provider_options(["tensorrt:trt_fp16_enable=True", "trt:a=b=c"]) == \
        {"tensorrt": {"trt_fp16_enable": "True"}, "trt": {"a": "b=c"}}
    with pytest.raises(BackendError, match="PROVIDER:KEY=VALUE"):
        parse_provider_options(["tensorrt"])
    path = tmp_path / "serve.toml"
    path.write_text(f'model = "{yolox_model}"\nproviders = ["cpu"]\n'
                    '[provider_options.cpu]\narena_extend_strategy = "kSameAsRequested"\n')
    from_file = build_config(read_config_file(path), {})
    assert (from_file.backend.providers, from_file.backend.provider_options) == (
        ("cpu",), {"cpu": {"arena_extend_strategy": "kSameAsRequested"}})
    flags = build_config(read_config_file(path), {"provider_options": ["cpu:x=1"], "threads": 2})
    assert flags.backend.provider_options == {"cpu": {"x": "1"}} and flags.backend.threads == 2
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        build_config(read_config_file(path), {"threads": 0})

    given: list[object] = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        given.append(kwargs.get("provider_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    OrtBackend(yolox_model, from_file.backend, instances=2)
    assert given == [[{"arena_extend_strategy": "kSameAsRequested"}]] * 2
    with pytest.raises(BackendError, match="TensorrtExecutionProvider, which this session "
                                           "does not use"):
        OrtBackend(yolox_model, BackendConfig(providers=("cpu",),
                                              provider_options={"tensorrt": {"a": "1"}}))
