"""The pretag detector contract, version 1 (see docs/contract.md).

A contract model is one ONNX graph:

* inputs ``images`` uint8 [N, 3, H, W] (RGB, padded canvas) and ``image_sizes``
  int64 [N, 2] (valid height and width of each image inside the canvas);
* outputs ``boxes`` float32 [N, K, 4] (x1, y1, x2, y2 in input pixels),
  ``scores`` float32 [N, K], ``labels`` int64 [N, K] (index into the class
  names, -1 for padding), ``num_detections`` int64 [N], and optionally
  ``embeddings`` float32 [N, D] (one vector per image), ``object_embeddings``
  float32 [N, K, E] (one per detection slot, zeros in padding slots) and
  ``class_probabilities`` float32 [N, K, C] (each detection's distribution over the C
  class names, summing to 1; zeros in padding slots);
* metadata under ``pretag.*`` keys describing classes and resizing.

:func:`validate_model` checks a model against all of this and returns its
:class:`ModelSpec`; the server calls it on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

CONTRACT_VERSION = "1"
META_PREFIX = "pretag."
PRECISIONS = ("fp32", "fp16")

#: (ONNX Runtime type string, shape) of every input; strings are symbolic dims.
INPUTS: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "images": ("tensor(uint8)", ("N", 3, "H", "W")),
    "image_sizes": ("tensor(int64)", ("N", 2)),
}
OUTPUTS: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "boxes": ("tensor(float)", ("N", "K", 4)),
    "scores": ("tensor(float)", ("N", "K")),
    "labels": ("tensor(int64)", ("N", "K")),
    "num_detections": ("tensor(int64)", ("N",)),
}
OPTIONAL_OUTPUTS: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "embeddings": ("tensor(float)", ("N", "D")),
    "object_embeddings": ("tensor(float)", ("N", "K", "E")),
    "class_probabilities": ("tensor(float)", ("N", "K", "C")),
}
#: output name -> its axis holding the vector size (D or E)
VECTOR_AXIS = {"embeddings": 1, "object_embeddings": 2}

DRIVING_CLASSES: tuple[str, ...] = (
    "bicycle", "bus", "car", "motorcycle", "person", "train", "truck",
)


class ContractError(ValueError):
    """A model does not follow the detector contract; the message lists every problem."""


@dataclass(frozen=True)
class ResizeSpec:
    """How images must be resized and padded before they enter the graph.

    ``shortest_edge``: torchvision style, scale so the short side is ``min_size``
    unless the long side would exceed ``max_size``.
    ``longest_edge``: letterbox style, scale so the long side is ``max_size``.
    The batch canvas is padded with ``pad_value`` to a multiple of
    ``size_multiple``, or to exactly ``canvas`` (height, width) when set.
    """

    policy: Literal["shortest_edge", "longest_edge"]
    max_size: int
    min_size: int = 0
    pad_value: int = 0
    size_multiple: int = 32
    canvas: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("shortest_edge", "longest_edge"):
            raise ContractError(f"unknown resize policy {self.policy!r}")
        if self.max_size <= 0 or self.size_multiple <= 0:
            raise ContractError("resize max_size and size_multiple must be positive")
        if self.policy == "shortest_edge" and not 0 < self.min_size <= self.max_size:
            raise ContractError("shortest_edge resizing needs 0 < min_size <= max_size")
        if not 0 <= self.pad_value <= 255:
            raise ContractError("pad_value must be in 0..255")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResizeSpec:
        data = json.loads(text)
        if data.get("canvas") is not None:
            data["canvas"] = tuple(data["canvas"])
        return cls(**data)


def threshold_problem(value: float, name: str = "score_threshold") -> str | None:
    """Why ``value`` cannot be a score threshold, or None: the one rule every layer applies."""
    if not 0.0 <= value <= 1.0:
        return f"{name} {value:g} is outside [0, 1]"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Everything a server or client needs to know about a contract model."""

    name: str
    class_names: tuple[str, ...]
    resize: ResizeSpec
    score_threshold: float
    max_detections: int
    source_weights: str
    source_sha256: str
    contract_version: str = CONTRACT_VERSION
    embedding_dim: int | None = field(default=None, compare=False)
    object_embedding_dim: int | None = field(default=None, compare=False)
    #: how each vector is made, recorded in the metadata with its size (empty: no such output)
    embedding_method: str = ""
    object_embedding_method: str = ""
    #: arithmetic of the network body; inputs, outputs and post-processing are always as above
    precision: Literal["fp32", "fp16"] = "fp32"
    #: how the class_probabilities output is made (empty: no such output)
    class_probability_method: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ContractError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")

    def metadata(self) -> dict[str, str]:
        """The ONNX metadata_props that record this spec in a model file."""
        return {
            META_PREFIX + "contract_version": self.contract_version,
            META_PREFIX + "name": self.name,
            META_PREFIX + "class_names": json.dumps(list(self.class_names)),
            META_PREFIX + "resize": self.resize.to_json(),
            META_PREFIX + "score_threshold": repr(float(self.score_threshold)),
            META_PREFIX + "max_detections": str(int(self.max_detections)),
            META_PREFIX + "source_weights": self.source_weights,
            META_PREFIX + "source_sha256": self.source_sha256,
            META_PREFIX + "precision": self.precision,
            **{META_PREFIX + key: json.dumps({"dim": dim, "method": method})
               for key, dim, method in (
                   ("embeddings", self.embedding_dim, self.embedding_method),
                   ("object_embeddings", self.object_embedding_dim,
                    self.object_embedding_method))
               if method},
            **({META_PREFIX + "class_probabilities": json.dumps(
                {"method": self.class_probability_method})}
               if self.class_probability_method else {}),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelSpec:
        def get(key: str) -> str:
            try:
                return meta[META_PREFIX + key]
            except KeyError:
                raise ContractError(f"metadata key {META_PREFIX + key!r} is missing") from None

        version = get("contract_version")
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"contract version {version!r} is not supported (this pretag reads "
                f"{CONTRACT_VERSION!r})"
            )
        try:
            names = json.loads(get("class_names"))
            resize = ResizeSpec.from_json(get("resize"))
            threshold = float(get("score_threshold"))
            max_det = int(get("max_detections"))
        except (ValueError, TypeError) as exc:
            raise ContractError(f"unreadable pretag metadata: {exc}") from exc
        if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n for n in names
        ):
            raise ContractError("metadata class_names must be a non-empty JSON list of strings")
        return cls(
            name=get("name"),
            class_names=tuple(names),
            resize=resize,
            score_threshold=threshold,
            max_detections=max_det,
            source_weights=get("source_weights"),
            source_sha256=get("source_sha256"),
            contract_version=version,
            precision=meta.get(META_PREFIX + "precision", "fp32"),  # type: ignore[arg-type]
            **_vector_meta(meta, "embeddings", "embedding"),
            **_vector_meta(meta, "object_embeddings", "object_embedding"),
            class_probability_method=_probability_meta(meta),
        )


def _probability_meta(meta: dict[str, str]) -> str:
    """The method recorded under ``pretag.class_probabilities`` = {"method": "..."}."""
    raw = meta.get(META_PREFIX + "class_probabilities")
    if raw is None:
        return ""
    try:
        method = json.loads(raw)["method"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ContractError(f"metadata class_probabilities must be JSON {{\"method\": "
                            f"\"...\"}}: {exc}") from exc
    if not isinstance(method, str) or not method:
        raise ContractError("metadata class_probabilities needs a non-empty method")
    return method


def _vector_meta(meta: dict[str, str], key: str, field_prefix: str) -> dict[str, Any]:
    """ModelSpec fields from an optional ``pretag.<key>`` = {"dim": D, "method": "..."}."""
    raw = meta.get(META_PREFIX + key)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
        dim, method = int(data["dim"]), str(data["method"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ContractError(f"metadata {key} must be JSON {{\"dim\": D, \"method\": "
                            f"\"...\"}}: {exc}") from exc
    return {f"{field_prefix}_dim": dim, f"{field_prefix}_method": method}


IOSpec = dict[str, tuple[str, tuple[int | str, ...]]]


def _check_io(kind: str, actual: dict[str, Any], expected: IOSpec, optional: IOSpec) -> list[str]:
    problems = []
    for name in expected.keys() - actual.keys():
        problems.append(f"{kind} {name!r} is missing")
    for name in actual.keys() - expected.keys() - optional.keys():
        problems.append(f"unexpected {kind} {name!r}")
    for name, arg in actual.items():
        want = expected.get(name) or optional.get(name)
        if want is None:
            continue
        dtype, shape = want
        if arg.type != dtype:
            problems.append(f"{kind} {name!r} has type {arg.type}, expected {dtype}")
        if len(arg.shape) != len(shape):
            problems.append(f"{kind} {name!r} has rank {len(arg.shape)}, expected {len(shape)}")
            continue
        for axis, (got, exp) in enumerate(zip(arg.shape, shape, strict=True)):
            if isinstance(exp, int) and got != exp:
                problems.append(f"{kind} {name!r} axis {axis} is {got}, expected {exp}")
            if isinstance(exp, str) and kind == "input" and isinstance(got, int):
                problems.append(f"{kind} {name!r} axis {axis} is fixed to {got}; it must be "
                                f"symbolic ({exp})")
    return problems


def validate_session(session: Any) -> ModelSpec:
    """Check an ``onnxruntime.InferenceSession`` against the contract."""
    return _validate({a.name: a for a in session.get_inputs()},
                     {a.name: a for a in session.get_outputs()},
                     dict(session.get_modelmeta().custom_metadata_map))


@dataclass(frozen=True)
class _Declared:
    """A graph input or output as ONNX Runtime describes one (name, type, shape)."""

    name: str
    type: str  # "tensor(float)"
    shape: list[int | str | None]


def _declared(value: Any) -> _Declared:
    import onnx

    tensor = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    shape: list[int | str | None] = [
        d.dim_value if d.HasField("dim_value") else d.dim_param or None
        for d in tensor.shape.dim]
    return _Declared(value.name, f"tensor({dtype})", shape)


def read_model_spec(path: str | Path) -> ModelSpec:
    """:func:`validate_model` from the file's declarations alone: the onnx package parses
    the graph's inputs, outputs and metadata; no session is built (no kernels, no provider,
    no weights copied to a device). For a driver that only needs to know what a model is."""
    try:
        import onnx
    except ImportError as exc:
        raise ContractError(f"reading a model's metadata needs the onnx package ({exc}): "
                            f"pip install 'pretag[ray]'") from None
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ContractError(f"onnx cannot load {path}: {exc}") from exc
    weights = {i.name for i in model.graph.initializer}  # older exporters list them as inputs
    return _validate({v.name: _declared(v) for v in model.graph.input if v.name not in weights},
                     {v.name: _declared(v) for v in model.graph.output},
                     {p.key: p.value for p in model.metadata_props})


def _validate(inputs: dict[str, Any], outputs: dict[str, Any], meta: dict[str, str]
              ) -> ModelSpec:
    problems = _check_io("input", inputs, INPUTS, {})
    problems += _check_io("output", outputs, OUTPUTS, OPTIONAL_OUTPUTS)
    spec: ModelSpec | None = None
    try:
        spec = ModelSpec.from_metadata(meta)
    except ContractError as exc:
        problems.append(str(exc))
    if problems or spec is None:
        raise ContractError("model does not follow pretag detector contract v1:\n  - "
                            + "\n  - ".join(problems))
    return _with_vectors(spec, outputs)


def _with_vectors(spec: ModelSpec, outputs: dict[str, Any]) -> ModelSpec:
    """The vector sizes from the graph, checked against what the metadata records."""
    problems: list[str] = []
    sizes: dict[str, Any] = {}
    for name, axis in VECTOR_AXIS.items():
        field_prefix = "embedding" if name == "embeddings" else "object_embedding"
        recorded = getattr(spec, f"{field_prefix}_dim")
        if name not in outputs:
            if recorded is not None:
                problems.append(f"metadata describes {name!r} but the graph has no such output")
            continue
        dim = outputs[name].shape[axis]
        if not isinstance(dim, int):
            problems.append(f"output {name!r} axis {axis} must be a fixed size, not {dim!r}")
        elif recorded is not None and recorded != dim:
            problems.append(f"metadata says {name!r} has {recorded} values, the graph {dim}")
        sizes[f"{field_prefix}_dim"] = dim if isinstance(dim, int) else None
    problems += _probability_problems(spec, outputs)
    if problems:
        raise ContractError("model does not follow pretag detector contract v1:\n  - "
                            + "\n  - ".join(problems))
    return replace(spec, **sizes)


def _probability_problems(spec: ModelSpec, outputs: dict[str, Any]) -> list[str]:
    """class_probabilities: one value per class name, described in the metadata."""
    declared = outputs.get("class_probabilities")
    if declared is None:
        return (["metadata describes 'class_probabilities' but the graph has no such output"]
                if spec.class_probability_method else [])
    problems = []
    width = declared.shape[2] if len(declared.shape) == 3 else None
    if width != len(spec.class_names):
        problems.append(f"output 'class_probabilities' axis 2 must be the {len(spec.class_names)}"
                        f" classes, not {width!r}")
    if not spec.class_probability_method:
        problems.append("output 'class_probabilities' needs metadata "
                        "pretag.class_probabilities = {\"method\": \"...\"}")
    return problems


def validate_model(path: str | Path) -> ModelSpec:
    """Load ``path`` with ONNX Runtime (CPU) and check it against the contract."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ContractError(f"model file {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private exception types
        raise ContractError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    return validate_session(session)
