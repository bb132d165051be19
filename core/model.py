"""What a job needs to know of the model that predicts for it, whatever runs it.

The gRPC executor builds it once from a server's ``ModelInfo`` answer
(:meth:`ModelDescription.from_info`), the Ray executor from the model file's contract
spec (:meth:`ModelDescription.from_spec`): past that boundary the job holds no protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretag.contract import ModelSpec, ResizeSpec


@dataclass(frozen=True)
class ModelDescription:
    name: str
    class_names: tuple[str, ...]
    resize: ResizeSpec
    min_score_threshold: float  # the in-graph floor: lower scores never come out
    source_sha256: str
    precision: str  # fp32 | fp16
    embedding_dim: int  # 0: no image vectors
    object_embedding_dim: int  # 0: no object vectors
    class_probabilities: bool = False  # each detection's class distribution is offered

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelDescription:
        return cls(spec.name, tuple(spec.class_names), spec.resize, spec.score_threshold,
                   spec.source_sha256, spec.precision, spec.embedding_dim or 0,
                   spec.object_embedding_dim or 0, bool(spec.class_probability_method))

    @classmethod
    def from_info(cls, info: Any) -> ModelDescription:
        """From a ``pretag.v1.ModelInfoResponse``."""
        return cls(info.name, tuple(info.class_names), ResizeSpec.from_json(info.resize_json),
                   float(info.min_score_threshold), info.source_sha256,
                   info.precision or "fp32", int(info.embedding_dim),
                   int(info.object_embedding_dim), bool(info.class_probabilities))

    def run_settings(self, score_threshold: float) -> dict[str, Any]:
        """What decides the predictions' content (``report/run_settings.json``)."""
        return {"model": self.name, "source_sha256": self.source_sha256,
                "precision": self.precision, "class_names": list(self.class_names),
                "score_threshold": score_threshold}
