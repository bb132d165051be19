"""Server faults from issue 11: undecodable messages, decode memory, KServe admission,
token files and schemes. Each test failed on the code before the fixes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from pretag.cli import main
from pretag.kserve_v2 import grpc_service_pb2 as kpb
from pretag.preprocess import DecodeBudget, decode_image, read_header
from pretag.server.app import BackgroundServer
from pretag.v1 import pretag_pb2 as pb

GARBAGE = b"\xff" * 20
MODEL = "yolox_nano-driving"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., BackgroundServer],
           tmp_path_factory: pytest.TempPathFactory) -> BackgroundServer:
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    return start_server(max_queue=8, max_batch_size=4, token_file=token)


AUTH = (("authorization", "Bearer s3cret"),)


def _count(srv: BackgroundServer, method: str, code: str) -> float:
    assert srv.server is not None
    value = srv.server.metrics.registry.get_sample_value(
        "pretag_requests_total", {"method": method, "code": code})
    return value or 0.0


def _kserve_request(images: list[bytes], version: str = "") -> bytes:
    request = kpb.ModelInferRequest(model_name=MODEL, model_version=version, id="r1")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(images)])
    request.inputs[0].contents.bytes_contents.extend(images)
    return request.SerializeToString()


async def _garbage_mid_stream(port: int, method: str, good: bytes) -> tuple[int, str]:
    """good, garbage, good on one stream; returns (answers before the end, status)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(method, request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)

        answered, ended = asyncio.Event(), asyncio.Event()

        async def requests() -> AsyncIterator[bytes]:
            yield good
            await answered.wait()  # the garbage comes after the first answer
            yield GARBAGE
            await ended.wait()  # never sent: the server ends the stream on the garbage
            yield good

        answers = 0
        stream = call(requests(), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stream:
                answers += 1
                answered.set()
        ended.set()
        return answers, failed.value.code().name


def test_undecodable_messages_get_invalid_argument_on_every_door(
        server: BackgroundServer, shared: Path, caplog: pytest.LogCaptureFixture):
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()
    detect = pb.DetectRequest(id="a", image=image).SerializeToString()
    for method, good in (("/pretag.v1.Pretagger/DetectStream", detect),
                         ("/inference.GRPCInferenceService/ModelStreamInfer",
                          _kserve_request([image]))):
        answers, code = asyncio.run(asyncio.wait_for(
            _garbage_mid_stream(server.port, method, good), 20))  # before: hung forever
        assert (answers, code) == (1, "INVALID_ARGUMENT"), method
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("/pretag.v1.Pretagger/Detect", "/inference.GRPCInferenceService/ModelInfer"):
            unary = channel.unary_unary(method, request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as failed:
                unary(GARBAGE, metadata=AUTH, timeout=10)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # before: UNKNOWN
            assert "undecodable request message" in failed.value.details()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per call
    assert _count(server, "Detect", "INVALID_ARGUMENT") >= 1


def test_kserve_requests_are_admitted_whole(server: BackgroundServer, shared: Path):
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda b: b,
                                    response_deserializer=kpb.ModelInferResponse.FromString)

        def refused(images: list[bytes], version: str = "") -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as failed:
                infer(_kserve_request(images, version), metadata=AUTH, timeout=30)
            return failed.value

        assert server.server is not None
        batches = server.server.metrics.batch_size.collect()[0].samples
        before = next(s.value for s in batches if s.name.endswith("_count"))
        too_many = refused([image] * 9)  # max_queue is 8: it could never be admitted
        assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT  # not retryable
        assert "send fewer" in too_many.details()
        batches = server.server.metrics.batch_size.collect()[0].samples
        assert next(s.value for s in batches if s.name.endswith("_count")) == before  # no work
        bad = refused([image, b"not an image", image])
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "IMAGE[1] (of 3)" in bad.details()
        assert refused([image], version="7").code() == grpc.StatusCode.NOT_FOUND
        answer = infer(_kserve_request([image] * 8, "1"), metadata=AUTH, timeout=60)
        assert list(answer.outputs[3].shape) == [8]  # num_detections: a full queue's worth


def test_token_scheme_is_case_insensitive_and_refusals_are_counted(server: BackgroundServer,
                                                                   shared: Path):
    image = (shared / "data" / "driving" / "kitti_000008.png").read_bytes()
    request = pb.DetectRequest(id="t", image=image).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        detect = channel.unary_unary("/pretag.v1.Pretagger/Detect",
                                     request_serializer=lambda b: b,
                                     response_deserializer=pb.DetectResponse.FromString)
        assert detect(request, metadata=(("authorization", "bearer s3cret"),), timeout=30)
        before = _count(server, "Detect", "UNAUTHENTICATED")
        for metadata in ((("authorization", "Bearer wrong"),), ()):
            with pytest.raises(grpc.RpcError) as failed:
                detect(request, metadata=metadata, timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _count(server, "Detect", "UNAUTHENTICATED") == before + 2


def test_token_files_empty_refused_and_readable_by_others_warned(
        yolox_model: Path, coco128: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["serve", "--model", str(yolox_model), "--port", "0", "--no-metrics",
                 "--token-file", str(empty)]) == 2  # before: a traceback after binding
    assert main(["run", str(coco128), "--output-dir", str(tmp_path / "o"), "--server",
                 "127.0.0.1:1", "--token-file", str(empty), "--quiet"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"token file {empty} is empty"] * 2
    loose = tmp_path / "loose"
    loose.write_text("s3cret\n")
    loose.chmod(0o644)
    from pretag.token_file import read_token_file

    assert read_token_file(loose) == "s3cret"
    assert "can be read by other users" in caplog.text and "chmod 600" in caplog.text


def _png16(path: Path, size: int) -> None:
    ramp = np.linspace(0, 65535, size, dtype=np.uint16)
    image = np.stack([np.broadcast_to(ramp, (size, size))] * 3, axis=-1)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])


@pytest.fixture(scope="module")
def png16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("png16") / "big16.png"
    _png16(path, 5000)  # 25 MP, 16-bit RGB: 150 MB decoded
    return path


PEAK_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    def status_mb(key):  # this process's own figures (ru_maxrss keeps the parent's peak)
        line = [l for l in open("/proc/self/status") if l.startswith(key + ":")][0]
        return int(line.split()[1]) / 1024
    from pretag.runtime.backend import BackendConfig, OrtBackend
    from pretag.server.config import BatchingConfig, EngineConfig
    from pretag.server.engine import Engine
    model, image, budget_mb, count = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:])
    data = image.read_bytes()
    engine = Engine(OrtBackend(model, BackendConfig(providers=("cpu",))),  # warm-up: arena
                    EngineConfig(BatchingConfig(max_batch_size=1), decode_memory_mb=budget_mb,
                                 decode_threads=4))
    async def main():
        await engine.start()
        before = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        results = await asyncio.gather(*(engine.detect(data) for _ in range(count)))
        after = status_mb("VmHWM")
        await engine.close()
        print(json.dumps({"peak_mb": after - before, "widths": [r.width for r in results],
                          "budget_peak_mb": engine.decode_budget.peak / 2**20}))
    asyncio.run(main())
""")


def _decode_peak(model: Path, image: Path, budget_mb: int, count: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model), str(image),
                           str(budget_mb), str(count)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_decode_memory_is_bounded(yolox_model: Path, png16: Path):
    """Measured peak RSS growth (VmHWM after a reset, minus VmRSS) of a warmed-up engine
    decoding 16-bit 25 MP PNGs in a fresh process."""
    data = png16.read_bytes()
    need_mb = read_header(data).decode_bytes / 2**20  # twice the 143 MB uint16 array
    assert need_mb == pytest.approx(2 * 25e6 * 6 / 2**20)
    one = _decode_peak(yolox_model, png16, 1024, 1)
    assert one["peak_mb"] < 1.15 * need_mb, one  # before: uint32 copies, about 3x this
    four = _decode_peak(yolox_model, png16, 400, 4)  # room for one at a time
    assert four["widths"] == [5000] * 4 and four["budget_peak_mb"] <= 400
    assert four["peak_mb"] < 1.3 * need_mb, four
    free = _decode_peak(yolox_model, png16, 4096, 4)  # the same four, unbounded
    assert free["peak_mb"] > 2 * need_mb, free  # the bound is what keeps memory down
    print(f"decode peak RSS growth: one {one['peak_mb']:.0f} MB, four with a 400 MB budget "
          f"{four['peak_mb']:.0f} MB, four unbounded {free['peak_mb']:.0f} MB "
          f"(need {need_mb:.0f} MB per image)")


def test_16_bit_conversion_is_exact_for_every_value():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    ok, png = cv2.imencode(".png", np.stack([values] * 3, axis=-1))
    assert ok
    out = decode_image(png.tobytes())
    expected = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)


def test_decode_budget_is_first_come_first_served_and_lets_a_large_one_run_alone():
    budget = DecodeBudget(100)
    order: list[str] = []
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()
    release_a = threading.Event()

    def work(name: str, size: int) -> None:
        with budget.reserve(size):
            with lock:
                order.append(name)
                running.append(size)
                peak[0] = max(peak[0], sum(running))
            if name == "a":
                release_a.wait(10)
            with lock:
                running.remove(size)

    def wait_until(check: object) -> None:
        deadline = time.monotonic() + 10
        while not check() and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.001)

    threads = []
    for queued, (name, size) in enumerate((("a", 60), ("big", 150), ("b", 30), ("c", 30))):
        threads.append(threading.Thread(target=work, args=(name, size)))
        threads[-1].start()
        # the next one starts only once this one holds its share or waits in line
        wait_until(lambda q=queued: order == ["a"] and budget.waiting == q)
    release_a.set()
    for thread in threads:
        thread.join(10)
    assert order == ["a", "big", "b", "c"]  # b and c would fit beside a, but big came first
    assert peak[0] == 150 and budget.peak == 150 and budget.used == 0  # big ran alone
