"""Lightly's config as pydantic v2 models (as Lightly's own API client defines it): the
``selection_config`` and the ``worker_config`` keys pretag honours, strictly typed (no
string for a number, no NaN or infinity, no unknown key), with the rules that tie fields
together. :func:`validated` turns pydantic's errors into one message naming each key path
(``selection_config.strategies[0].strategy.target.car: ...``);
:mod:`pretag.selection.config` turns the models into the frozen dataclasses the selection
runs on. The keys pretag refuses are in :mod:`pretag.selection.worker`, checked first.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pretag.health import DEFAULT_MAX_UNIFORM_ROW_RATIO
from pretag.job.outputs import TASK

INPUT_TYPES = ("EMBEDDINGS", "PREDICTIONS", "SCORES", "METADATA", "RANDOM")
STRATEGY_TYPES = ("DIVERSITY", "WEIGHTS", "THRESHOLD", "BALANCE", "SIMILARITY", "TYPICALITY")
PREDICTION_NAMES = ("CLASS_DISTRIBUTION", "CATEGORY_COUNT")
#: pretag's scores for SCORES inputs (docs/selection.md, pretag.selection.scores)
SCORES = ("object_frequency", "objectness_least_confidence", "uncertainty_least_confidence",
          "uncertainty_margin", "uncertainty_entropy")
PAIRINGS = {  # Lightly's allowed input -> strategy combinations
    ("EMBEDDINGS", None): ("DIVERSITY", "SIMILARITY", "TYPICALITY"),
    ("PREDICTIONS", "CLASS_DISTRIBUTION"): ("BALANCE",),
    ("PREDICTIONS", "CATEGORY_COUNT"): ("WEIGHTS", "THRESHOLD"),
    ("SCORES", None): ("WEIGHTS", "THRESHOLD"),
    ("RANDOM", None): ("WEIGHTS", "THRESHOLD"),
    ("METADATA", None): ("WEIGHTS", "THRESHOLD", "BALANCE"),
}
#: The keys beside type and strength that each strategy takes.
OWN_KEYS = {"DIVERSITY": {"stopping_condition_minimum_distance"},
            "THRESHOLD": {"threshold", "operation"}, "BALANCE": {"target", "distribution"},
            "WEIGHTS": {"stopping_condition_max_sum"},
            "TYPICALITY": {"num_nearest_neighbors", "stopping_condition_minimum_typicality"}}

Finite = Annotated[float, Field(allow_inf_nan=False)]
Share = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1.0)]
Path_ = Annotated[StrictStr, Field(min_length=1)]


def problem(message: str, key: str = "") -> PydanticCustomError:
    """A rule of pretag's broken: ``key`` is the field under the model it names."""
    return PydanticCustomError("pretag", "{message}", {"message": message, "key": key})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputModel(Strict):
    type: Literal["EMBEDDINGS", "PREDICTIONS", "SCORES", "METADATA", "RANDOM"]
    task: StrictStr | None = None
    name: StrictStr | None = None
    score: StrictStr | None = None
    key: StrictStr | None = None
    random_seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] = 0
    categories: list[StrictStr] | None = None
    query_filenames: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    query_embeddings: Path_ | None = None
    dataset_id: Any = None  # Lightly's SIMILARITY across datasets: refused below
    tag_name: Any = None

    @model_validator(mode="after")
    def _kind(self) -> InputModel:
        for key in ("dataset_id", "tag_name"):
            if getattr(self, key) is not None:
                raise problem("pretag has no other datasets to query: give SIMILARITY "
                              "query_filenames (samples of the run) or query_embeddings "
                              "(an embeddings file)", key)
        if self.type == "PREDICTIONS":
            if self.name not in PREDICTION_NAMES:
                raise problem(f"{self.name!r} is not one of {', '.join(PREDICTION_NAMES)}",
                              "name")
            if not self.task:
                raise problem(f"PREDICTIONS needs a task ({TASK})", "task")
        if self.type == "SCORES" and self.score not in SCORES:
            raise problem(f"{self.score!r} is not one of {', '.join(SCORES)}", "score")
        if self.type in ("PREDICTIONS", "SCORES") and (self.task or TASK) != TASK:
            raise problem(f"{self.task!r}: pretag run's predictions are the task {TASK}, "
                          f"the only one a run folder holds", "task")
        if self.type == "METADATA" and self.key is None:
            raise problem("METADATA needs the key of a per-image metadata value", "key")
        return self


class StrategyModel(Strict):
    type: Literal["DIVERSITY", "WEIGHTS", "THRESHOLD", "BALANCE", "SIMILARITY", "TYPICALITY"]
    strength: Annotated[float, Field(allow_inf_nan=False, ge=-1e9, le=1e9)] = 1.0
    stopping_condition_minimum_distance: Annotated[
        float, Field(allow_inf_nan=False, ge=0.0, le=2.0)] | None = None
    threshold: Finite | None = None
    operation: Literal["SMALLER", "SMALLER_EQUAL", "BIGGER", "BIGGER_EQUAL"] | None = None
    target: dict[StrictStr, Share] | None = None
    distribution: Literal["TARGET", "UNIFORM", "INPUT"] = "TARGET"
    stopping_condition_max_sum: Annotated[float, Field(allow_inf_nan=False, ge=0.0)] | None = None
    num_nearest_neighbors: Annotated[StrictInt, Field(ge=1, le=1000)] = 20
    stopping_condition_minimum_typicality: Share | None = None

    @model_validator(mode="before")
    @classmethod
    def _own_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in STRATEGY_TYPES:
            kind = data["type"]
            own = OWN_KEYS.get(kind, set())
            alien = sorted(k for k in data if k in cls.model_fields
                           and k not in own | {"type", "strength"})
            if alien:
                raise problem(f"{kind} does not take it (it takes "
                              f"{', '.join(sorted(own)) or 'only strength'})", alien[0])
        return data

    @model_validator(mode="after")
    def _needs(self) -> StrategyModel:
        if self.type == "THRESHOLD":
            if self.threshold is None:
                raise problem("THRESHOLD needs a threshold (a number)", "threshold")
            if self.operation is None:
                raise problem("THRESHOLD needs an operation: SMALLER, SMALLER_EQUAL, BIGGER "
                              "or BIGGER_EQUAL", "operation")
        if self.type == "BALANCE" and self.distribution == "TARGET" and self.target is None:
            raise problem("BALANCE with distribution TARGET needs a target", "target")
        if self.target is not None:
            if not self.target:
                raise problem("must map class names to shares", "target")
            total = sum(self.target.values())
            if total > 1.0 + 1e-6:
                raise problem(f"shares sum to {total:.3f}; a distribution sums to at most 1 "
                              f"(the rest goes to the classes not listed)", "target")
        return self


class StepModel(Strict):
    input: InputModel
    strategy: StrategyModel

    @model_validator(mode="before")
    @classmethod
    def _pairing(cls, data: Any) -> Any:
        """The shape, then the pairing first: it says more than the strategy's own keys."""
        if not isinstance(data, dict) or set(data) != {"input", "strategy"}:
            raise problem('each strategy is {"input": {...}, "strategy": {...}}')
        source, strategy = data["input"], data["strategy"]
        if isinstance(source, dict) and isinstance(strategy, dict):
            kind, name = source.get("type"), source.get("name")
            pair = (kind, name if kind == "PREDICTIONS" else None)
            chosen = strategy.get("type")
            if pair in PAIRINGS and chosen in STRATEGY_TYPES and chosen not in PAIRINGS[pair]:
                raise problem(f"{kind} inputs go with {', '.join(PAIRINGS[pair])}, not "
                              f"{chosen}", "strategy.type")
        return data

    @model_validator(mode="after")
    def _queries(self) -> StepModel:
        queries = ((self.input.query_filenames is not None)
                   + (self.input.query_embeddings is not None))
        if self.strategy.type == "SIMILARITY" and queries != 1:
            raise problem("SIMILARITY needs one of query_filenames (samples of the run) and "
                          "query_embeddings (an embeddings file)", "input")
        if self.strategy.type != "SIMILARITY" and queries:
            raise problem("query_filenames and query_embeddings go with SIMILARITY", "input")
        return self


class SelectionModel(Strict):
    n_samples: Annotated[StrictInt, Field(ge=0)] | None = None
    proportion_samples: Share | None = None
    strategies: Annotated[list[StepModel], Field(min_length=1)]


class ObjectLevelModel(Strict):
    task_name: StrictStr | None = None
    padding: Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=10.0)] = 0.0
    crop_dataset_name: StrictStr | None = None

    @model_validator(mode="after")
    def _task(self) -> ObjectLevelModel:
        if self.task_name != TASK:
            raise problem(f"{self.task_name!r}: pretag run's detections are the task {TASK}",
                          "task_name")
        return self


class DatasourceModel(Strict):
    process_all: StrictBool = False
    enable_datapool_update: StrictBool = True
    bypass_verify: StrictBool = False


class CorruptnessModel(Strict):
    corruption_threshold: Share = DEFAULT_MAX_UNIFORM_ROW_RATIO


class WorkerModel(Strict):
    """The worker_config keys pretag honours (pretag.selection.worker.HONOURED)."""

    object_level: ObjectLevelModel | None = None
    selected_sequence_length: Annotated[StrictInt, Field(ge=1)] = 1
    use_datapool: StrictBool = False
    datasource: DatasourceModel = DatasourceModel()
    relevant_filenames_file: Path_ | None = None
    embeddings: Path_ | None = None
    corruptness_check: CorruptnessModel = CorruptnessModel()
    pretagging: StrictBool = True
    pretagging_upload: StrictBool = False
    upload_report: StrictBool = True
    shutdown_when_job_finished: StrictBool = True
    normalize_embeddings: StrictBool = True

    @model_validator(mode="after")
    def _together(self) -> WorkerModel:
        if self.selected_sequence_length > 1 and self.object_level is not None:
            raise problem("selects windows of video frames; it cannot go with object_level",
                          "selected_sequence_length")
        if self.embeddings is not None and self.object_level is not None:
            raise problem("custom embeddings are one per image; they cannot go with "
                          "object_level", "embeddings")
        return self


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Any, root: str) -> M:
    """``data`` as ``model``; ValueError naming each problem's key path under ``root``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError("; ".join(_describe(e, model, root) for e in exc.errors()[:5])
                         ) from None


def _path(root: str, loc: tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model a location inside ``model`` points into (for its allowed keys)."""
    for part in loc:
        if isinstance(part, int) or part not in model.model_fields:
            continue
        found = _models_in(model.model_fields[part].annotation)
        if found:
            model = found[0]
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, Annotated):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def _bounds(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, str]:
    """The range a number at ``loc`` must be in, from its field's constraints (the field
    itself, or the values of a mapping field such as a BALANCE target)."""
    names = [p for p in loc if isinstance(p, str) and p in model.model_fields]
    if not names:
        return "-inf", "inf"
    field = model.model_fields[names[-1]]
    found = list(field.metadata)
    pending = [field.annotation]
    while pending:  # constraints inside Optional[...], dict[..., Annotated[...]]
        annotation = pending.pop()
        for meta in getattr(annotation, "__metadata__", ()):
            found += meta.metadata if isinstance(meta, FieldInfo) else [meta]
        pending += get_args(annotation)
    low = next((str(m.ge) for m in found if hasattr(m, "ge")), "-inf")
    high = next((str(m.le) for m in found if hasattr(m, "le")), "inf")
    return low, high


_KINDS = {"float_type": "a number", "int_type": "a whole number", "string_type": "a string",
          "bool_type": "true or false", "dict_type": "an object", "list_type": "a list",
          "model_type": "an object", "model_attributes_type": "an object"}


def _describe(error: Any, model: type[BaseModel], root: str) -> str:
    """One pydantic error as ``path: what is wrong``."""
    kind, loc, ctx = error["type"], tuple(error["loc"]), error.get("ctx") or {}
    value = error.get("input")
    if kind == "pretag":
        key = ctx.get("key", "")
        return f"{_path(root, loc)}{'.' + key if key else ''}: {ctx['message']}"
    path = _path(root, loc)
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(_model_at(model, loc[:-1]).model_fields))
        return f"{path}: unknown key; allowed: {allowed}"
    if kind == "literal_error":
        allowed = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return f"{path}: {value!r} is not one of {allowed}"
    if kind == "missing":
        return f"{path}: is required"
    if kind == "finite_number":
        return f"{path}: must be a finite number, not {value!r}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(_model_at(model, loc[:-1]), loc)
        return f"{path}: {value!r} is outside [{low}, {high}]"
    if kind == "too_short":
        return f"{path}: must not be empty"
    if kind in _KINDS:
        return f"{path}: must be {_KINDS[kind]}, not {value!r}"
    return f"{path}: {error['msg']}"
