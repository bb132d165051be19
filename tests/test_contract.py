"""The contract validator accepts contract models and explains what is wrong with others."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from pretag.contract import (
    ContractError,
    ModelSpec,
    ResizeSpec,
    read_model_spec,
    validate_model,
)

#: Both readers of a model file: with an ONNX Runtime session, and from its declarations.
READERS = pytest.mark.parametrize("read", [validate_model, read_model_spec],
                                  ids=["session", "declarations"])


@READERS
def test_accepts_exported_model(yolox_model, read):
    spec = read(yolox_model)
    assert spec == validate_model(yolox_model)
    assert spec.contract_version == "1" and spec.max_detections == 100
    assert (spec.embedding_dim, spec.object_embedding_dim) == (448, 64)
    assert "head" in spec.embedding_method and "anchor" in spec.object_embedding_method
    assert spec.resize == ResizeSpec("longest_edge", max_size=416, pad_value=114,
                                     canvas=(416, 416))


def _with_metadata(src: Path, dst: Path, change: dict[str, str | None]) -> Path:
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    for key, value in change.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("change, message", [
    ({"pretag.class_names": None}, "'pretag.class_names' is missing"),
    ({"pretag.contract_version": "2"}, "version '2' is not supported"),
    ({"pretag.class_names": "[]"}, "non-empty JSON list"),
    ({"pretag.resize": '{"policy": "stretch", "max_size": 3}'}, "unknown resize policy"),
    ({"pretag.max_detections": "many"}, "unreadable pretag metadata"),
    ({"pretag.embeddings": '{"dim": 10, "method": "x"}'}, "has 10 values, the graph 448"),
    ({"pretag.object_embeddings": "64"}, "must be JSON"),
])
@READERS
def test_rejects_bad_metadata(yolox_model, tmp_path, change, message, read):
    path = _with_metadata(yolox_model, tmp_path / "m.onnx", change)
    with pytest.raises(ContractError, match=message):
        read(path)


@READERS
def test_missing_and_unloadable_files(tmp_path, read):
    with pytest.raises(ContractError, match="does not exist"):
        read(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ContractError, match="cannot load"):
        read(tmp_path / "bad.onnx")


def test_both_readers_explain_a_foreign_model_alike(yolox_original):
    """The raw YOLOX file (float input, fixed sizes, one output) fails the same checks."""
    said = []
    for read in (validate_model, read_model_spec):
        with pytest.raises(ContractError) as caught:
            read(yolox_original)
        said.append(sorted(str(caught.value).splitlines()[1:]))
    assert said[0] == said[1] and any("fixed to 416" in line for line in said[0])


def test_metadata_round_trip():
    spec = ModelSpec("m", ("car", "bus"), ResizeSpec("shortest_edge", 1333, 800), 0.25, 50,
                     "file:w.pth", "ab" * 32)
    assert ModelSpec.from_metadata(spec.metadata()) == spec


def test_precision_is_recorded_and_defaults_to_fp32():
    spec = ModelSpec("m", ("car",), ResizeSpec("longest_edge", 416), 0.05, 100, "file:w", "0",
                     precision="fp16")
    meta = spec.metadata()
    assert ModelSpec.from_metadata(meta).precision == "fp16"
    del meta["pretag.precision"]  # models written before the key existed
    assert ModelSpec.from_metadata(meta).precision == "fp32"
    with pytest.raises(ContractError, match="precision"):
        ModelSpec.from_metadata({**meta, "pretag.precision": "int8"})
