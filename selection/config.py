"""Lightly's ``selection_config`` (and the worker config's ``object_level``), parsed and checked.

Everything the Lightly Worker documents for these keys is accepted as its users write it;
anything else stops with :class:`SelectionConfigError`, whose message names the key path
and the allowed values. Nothing is silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pretag.health import DEFAULT_MAX_UNIFORM_ROW_RATIO
from pretag.job.outputs import TASK
from pretag.selection.worker import check_flat, check_worker, known_worker_keys

INPUT_TYPES = ("EMBEDDINGS", "PREDICTIONS", "SCORES", "METADATA", "RANDOM")
STRATEGY_TYPES = ("DIVERSITY", "WEIGHTS", "THRESHOLD", "BALANCE", "SIMILARITY", "TYPICALITY")
PREDICTION_NAMES = ("CLASS_DISTRIBUTION", "CATEGORY_COUNT")
OPERATIONS = ("SMALLER", "SMALLER_EQUAL", "BIGGER", "BIGGER_EQUAL")
DISTRIBUTIONS = ("TARGET", "UNIFORM", "INPUT")
#: pretag's scores for SCORES inputs (docs/selection.md)
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
_INPUT_KEYS = {"type", "task", "name", "score", "key", "random_seed", "categories",
               "query_filenames", "query_embeddings", "dataset_id", "tag_name"}
_STRATEGY_KEYS = {"type", "strength", "stopping_condition_minimum_distance", "threshold",
                  "operation", "target", "distribution", "stopping_condition_max_sum",
                  "num_nearest_neighbors", "stopping_condition_minimum_typicality"}
#: The keys beside type and strength that each strategy takes.
_OWN_KEYS = {"DIVERSITY": {"stopping_condition_minimum_distance"},
             "THRESHOLD": {"threshold", "operation"}, "BALANCE": {"target", "distribution"},
             "WEIGHTS": {"stopping_condition_max_sum"},
             "TYPICALITY": {"num_nearest_neighbors", "stopping_condition_minimum_typicality"}}


class SelectionConfigError(ValueError):
    """The config cannot be run; the message names the key path and what is allowed."""


@dataclass(frozen=True)
class Input:
    type: str
    task: str | None = None
    name: str | None = None
    score: str | None = None
    key: str | None = None
    random_seed: int = 0
    categories: tuple[str, ...] | None = None
    query_filenames: tuple[str, ...] | None = None  # SIMILARITY: samples of the run
    query_embeddings: str | None = None  # SIMILARITY: an embeddings file of query vectors


@dataclass(frozen=True)
class Strategy:
    type: str
    strength: float = 1.0
    minimum_distance: float | None = None  # DIVERSITY's stopping_condition_minimum_distance
    threshold: float | None = None
    operation: str | None = None
    target: tuple[tuple[str, float], ...] | None = None
    distribution: str = "TARGET"
    max_sum: float | None = None  # WEIGHTS' stopping_condition_max_sum
    neighbours: int = 20  # TYPICALITY's num_nearest_neighbors
    min_typicality: float | None = None  # TYPICALITY's stopping_condition_minimum_typicality


@dataclass(frozen=True)
class Step:
    input: Input
    strategy: Strategy


@dataclass(frozen=True)
class SelectionConfig:
    steps: tuple[Step, ...]
    n_samples: int | None = None
    proportion_samples: float | None = None
    object_level_task: str | None = None  # worker_config.object_level.task_name
    padding: float = 0.0  # worker_config.object_level.padding
    sequence_length: int = 1  # worker_config.selected_sequence_length (1: frames alone)
    use_datapool: bool = False  # worker_config.use_datapool: earlier selections count
    process_all: bool = False  # worker_config.datasource.process_all (pretag run: predict all)
    update_datapool: bool = True  # worker_config.datasource.enable_datapool_update
    relevant_filenames_file: str | None = None  # worker_config.relevant_filenames_file
    embeddings: str | None = None  # worker_config.embeddings: a custom embeddings file
    #: worker_config.corruptness_check.corruption_threshold: an image whose uniformRowRatio
    #: is above it is corrupt and no candidate (pretag.job.health)
    corruption_threshold: float = DEFAULT_MAX_UNIFORM_ROW_RATIO
    #: pretag select --remove-near-duplicates: report/near_duplicates.json's "removed"
    #: images are no candidates
    remove_near_duplicates: bool = False

    def count(self, available: int) -> int:
        """How many samples to pick out of ``available``."""
        if self.n_samples is not None:
            return self.n_samples
        return round((self.proportion_samples or 0.0) * available)


def _fail(path: str, message: str) -> SelectionConfigError:
    return SelectionConfigError(f"{path}: {message}")


def _choice(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(path, f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _number(value: Any, path: str, low: float | None = None, high: float | None = None
            ) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"must be a number, not {value!r}")
    if not math.isfinite(value):
        raise _fail(path, f"must be a finite number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(path, f"{value} is outside [{low}, {high}]")
    return float(value)


def _unknown(data: dict[str, Any], known: set[str], path: str) -> None:
    extra = sorted(data.keys() - known)
    if extra:
        raise _fail(f"{path}.{extra[0]}", f"unknown key; allowed: {', '.join(sorted(known))}")


def _input(data: Any, path: str) -> Input:
    if not isinstance(data, dict):
        raise _fail(path, "must be an object")
    _unknown(data, _INPUT_KEYS, path)
    kind = _choice(data.get("type"), f"{path}.type", INPUT_TYPES)
    for key in ("task", "name", "score", "key"):  # recorded as parsed: strings, or absent
        if key in data and not isinstance(data[key], str):
            raise _fail(f"{path}.{key}", f"must be a string, not {type(data[key]).__name__}")
    name = data.get("name")
    if kind == "PREDICTIONS":
        name = _choice(name, f"{path}.name", PREDICTION_NAMES)
        if not data.get("task"):
            raise _fail(f"{path}.task", f"PREDICTIONS needs a task ({TASK})")
    if kind == "SCORES":
        _choice(data.get("score"), f"{path}.score", SCORES)
    if kind in ("PREDICTIONS", "SCORES") and data.get("task", TASK) != TASK:
        raise _fail(f"{path}.task", f"{data.get('task')!r}: pretag run's predictions are the "
                                    f"task {TASK}, the only one a run folder holds")
    seed = data.get("random_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise _fail(f"{path}.random_seed", f"must be a whole number >= 0, not {seed!r}")
    if kind == "METADATA" and not isinstance(data.get("key"), str):
        raise _fail(f"{path}.key", "METADATA needs the key of a per-image metadata value")
    categories = data.get("categories")
    if categories is not None and not (isinstance(categories, list)
                                       and all(isinstance(c, str) for c in categories)):
        raise _fail(f"{path}.categories", "must be a list of class names")
    for key in ("dataset_id", "tag_name"):
        if key in data:
            raise _fail(f"{path}.{key}", "pretag has no other datasets to query: give "
                                         "SIMILARITY query_filenames (samples of the run) or "
                                         "query_embeddings (an embeddings file)")
    queries = data.get("query_filenames")
    if queries is not None and not (isinstance(queries, list) and queries
                                    and all(isinstance(q, str) for q in queries)):
        raise _fail(f"{path}.query_filenames", "must be a non-empty list of file names")
    query_file = data.get("query_embeddings")
    if query_file is not None and not isinstance(query_file, str):
        raise _fail(f"{path}.query_embeddings", "must be a file's path")
    return Input(kind, data.get("task"), name, data.get("score"), data.get("key"),
                 seed, tuple(categories) if categories is not None else None,
                 tuple(queries) if queries is not None else None, query_file)


def _target(data: Any, path: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(data, dict) or not data:
        raise _fail(path, "must map class names to shares")
    shares = {k: _number(v, f"{path}.{k}", 0.0, 1.0) for k, v in data.items()}
    if sum(shares.values()) > 1.0 + 1e-6:
        raise _fail(path, f"shares sum to {sum(shares.values()):.3f}; a distribution sums "
                          f"to at most 1 (the rest goes to the classes not listed)")
    return tuple(sorted(shares.items()))


def _strategy(data: Any, path: str) -> Strategy:
    if not isinstance(data, dict):
        raise _fail(path, "must be an object")
    _unknown(data, _STRATEGY_KEYS, path)
    kind = _choice(data.get("type"), f"{path}.type", STRATEGY_TYPES)
    alien = sorted(data.keys() - {"type", "strength"} - _OWN_KEYS.get(kind, set()))
    if alien:
        takes = ", ".join(sorted(_OWN_KEYS.get(kind, ()))) or "only strength"
        raise _fail(f"{path}.{alien[0]}", f"{kind} does not take it (it takes {takes})")
    strength = _number(data.get("strength", 1.0), f"{path}.strength", -1e9, 1e9)
    if kind == "THRESHOLD":
        return Strategy(kind, strength, threshold=_number(data.get("threshold"),
                                                          f"{path}.threshold"),
                        operation=_choice(data.get("operation"), f"{path}.operation",
                                          OPERATIONS))
    if kind == "BALANCE":
        distribution = _choice(data.get("distribution", "TARGET"), f"{path}.distribution",
                               DISTRIBUTIONS)
        target = data.get("target")
        if distribution == "TARGET" and target is None:
            raise _fail(f"{path}.target", "BALANCE with distribution TARGET needs a target")
        return Strategy(kind, strength, distribution=distribution,
                        target=None if target is None else _target(target, f"{path}.target"))
    if kind == "DIVERSITY" and "stopping_condition_minimum_distance" in data:
        return Strategy(kind, strength, minimum_distance=_number(
            data["stopping_condition_minimum_distance"],
            f"{path}.stopping_condition_minimum_distance", 0.0, 2.0))
    if kind == "TYPICALITY":
        k = data.get("num_nearest_neighbors", 20)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise _fail(f"{path}.num_nearest_neighbors", f"must be a whole number in "
                                                         f"[1, 1000], not {k!r}")
        low = data.get("stopping_condition_minimum_typicality")
        return Strategy(kind, strength, neighbours=k, min_typicality=None if low is None else
                        _number(low, f"{path}.stopping_condition_minimum_typicality", 0.0, 1.0))
    if kind == "WEIGHTS" and "stopping_condition_max_sum" in data:
        return Strategy(kind, strength, max_sum=_number(
            data["stopping_condition_max_sum"], f"{path}.stopping_condition_max_sum", 0.0))
    return Strategy(kind, strength)


def _step(data: Any, path: str) -> Step:
    if not isinstance(data, dict) or set(data) != {"input", "strategy"}:
        raise _fail(path, "each strategy is {\"input\": {...}, \"strategy\": {...}}")
    source = _input(data["input"], f"{path}.input")
    raw = data["strategy"] if isinstance(data["strategy"], dict) else {}
    kind = _choice(raw.get("type"), f"{path}.strategy.type", STRATEGY_TYPES)
    allowed = PAIRINGS[(source.type, source.name if source.type == "PREDICTIONS" else None)]
    if kind not in allowed:  # the pairing first: it says more than the strategy's own keys
        raise _fail(f"{path}.strategy.type", f"{source.type} inputs go with "
                                             f"{', '.join(allowed)}, not {kind}")
    queries = (source.query_filenames is not None) + (source.query_embeddings is not None)
    if kind == "SIMILARITY" and queries != 1:
        raise _fail(f"{path}.input", "SIMILARITY needs one of query_filenames (samples of "
                                     "the run) and query_embeddings (an embeddings file)")
    if kind != "SIMILARITY" and queries:
        raise _fail(f"{path}.input", "query_filenames and query_embeddings go with "
                                     "SIMILARITY")
    return Step(source, _strategy(data["strategy"], f"{path}.strategy"))


def parse(data: Any, n_samples: int | None = None) -> SelectionConfig:
    """A :class:`SelectionConfig` from ``{"selection_config": ..., "worker_config": ...}``
    or a ``selection_config`` alone. ``n_samples`` overrides the file's count."""
    if not isinstance(data, dict):
        raise _fail("config", "must be an object")
    check_flat(data, _fail)
    worker = data.get("worker_config", {})
    selection = data.get("selection_config", data)
    if "selection_config" in data:
        _unknown(data, {"selection_config", "worker_config"}, "config")
    if not isinstance(selection, dict):
        raise _fail("selection_config", "must be an object")
    _unknown(selection, {"n_samples", "proportion_samples", "strategies"}, "selection_config")
    counts = [k for k in ("n_samples", "proportion_samples") if k in selection]
    if n_samples is None and len(counts) != 1:
        raise _fail("selection_config", "set exactly one of n_samples and proportion_samples")
    count = selection.get("n_samples") if n_samples is None else n_samples
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                              or count < 0):
        raise _fail("selection_config.n_samples", f"must be a whole number >= 0, not {count!r}")
    proportion = None
    if count is None:
        proportion = _number(selection["proportion_samples"],
                             "selection_config.proportion_samples", 0.0, 1.0)
    strategies = selection.get("strategies")
    if not isinstance(strategies, list) or not strategies:
        raise _fail("selection_config.strategies", "must be a non-empty list")
    steps = tuple(_step(s, f"selection_config.strategies[{i}]")
                  for i, s in enumerate(strategies))
    task, padding = _object_level(worker)
    length = _sequence_length(worker)
    if length > 1 and task is not None:
        raise _fail("worker_config.selected_sequence_length",
                    "selects windows of video frames; it cannot go with object_level")
    pool = _flag(worker, "use_datapool", "worker_config")
    datasource = worker.get("datasource", {})
    if not isinstance(datasource, dict):
        raise _fail("worker_config.datasource", "must be an object")
    _unknown(datasource, {"process_all", "enable_datapool_update", "bypass_verify"},
             "worker_config.datasource")
    process_all = _flag(datasource, "process_all", "worker_config.datasource")
    _flag(datasource, "bypass_verify", "worker_config.datasource")
    update = datasource.get("enable_datapool_update", True)
    if not isinstance(update, bool):
        raise _fail("worker_config.datasource.enable_datapool_update",
                    f"must be true or false, not {update!r}")
    relevant = worker.get("relevant_filenames_file")
    if relevant is not None and (not isinstance(relevant, str) or not relevant):
        raise _fail("worker_config.relevant_filenames_file",
                    f"must be a file's path, not {relevant!r}")
    embeddings = worker.get("embeddings")
    if embeddings is not None and (not isinstance(embeddings, str) or not embeddings):
        raise _fail("worker_config.embeddings", f"must be a file's path, not {embeddings!r}")
    if embeddings is not None and task is not None:
        raise _fail("worker_config.embeddings", "custom embeddings are one per image; they "
                                                "cannot go with object_level")
    return SelectionConfig(steps, count, proportion, task, padding, length, pool,
                           process_all, update, relevant, embeddings,
                           _corruption_threshold(worker))


def _corruption_threshold(worker: dict[str, Any]) -> float:
    check = worker.get("corruptness_check", {})
    if not isinstance(check, dict):
        raise _fail("worker_config.corruptness_check", "must be an object")
    _unknown(check, {"corruption_threshold"}, "worker_config.corruptness_check")
    return _number(check.get("corruption_threshold", DEFAULT_MAX_UNIFORM_ROW_RATIO),
                   "worker_config.corruptness_check.corruption_threshold", 0.0, 1.0)


def _flag(data: dict[str, Any], key: str, path: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise _fail(f"{path}.{key}", f"must be true or false, not {value!r}")
    return value


def _sequence_length(worker: dict[str, Any]) -> int:
    length = worker.get("selected_sequence_length", 1)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise _fail("worker_config.selected_sequence_length",
                    f"must be a whole number >= 1, not {length!r}")
    return length


def _object_level(worker: Any) -> tuple[str | None, float]:
    if not isinstance(worker, dict):
        raise _fail("worker_config", "must be an object")
    check_worker(worker, _fail)
    _unknown(worker, known_worker_keys(), "worker_config")
    level = worker.get("object_level")
    if level is None:
        return None, 0.0
    if not isinstance(level, dict):
        raise _fail("worker_config.object_level", "must be an object")
    _unknown(level, {"task_name", "padding", "crop_dataset_name"}, "worker_config.object_level")
    task = level.get("task_name")
    if task != TASK:
        raise _fail("worker_config.object_level.task_name",
                    f"{task!r}: pretag run's detections are the task {TASK}")
    padding = _number(level.get("padding", 0.0), "worker_config.object_level.padding", 0.0,
                      10.0)
    return task, padding


MAX_CONFIG_BYTES = 1 << 20
_MAX_DEPTH = 32


def _depth(data: Any) -> None:
    """Refuse a document nested past ``_MAX_DEPTH`` levels (iteratively: no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ValueError(f"nested more than {_MAX_DEPTH} levels deep")
        children = (value.values() if isinstance(value, dict)
                    else value if isinstance(value, list) else ())
        stack.extend((child, depth + 1) for child in children)


def load(path: Path, n_samples: int | None = None) -> SelectionConfig:
    """Read a JSON or YAML file (by suffix; JSON is YAML too) and :func:`parse` it."""
    import yaml

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES // 1024} KiB; a selection config is a "
                             f"few hundred bytes")
        text = path.read_text()
        if path.suffix != ".json" and any(isinstance(e, yaml.AliasEvent)
                                          for e in yaml.parse(text)):
            raise ValueError("YAML aliases (*name) are not accepted: write the values out")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        _depth(data)
    except RecursionError:
        raise SelectionConfigError(f"cannot read {path}: nested too deeply") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SelectionConfigError(f"cannot read {path}: {exc}") from None
    config = parse(data, n_samples)

    def beside(value: str | None) -> str | None:  # a path relative to the config file
        return value if value is None or Path(value).is_absolute() else str(path.parent / value)

    steps = tuple(replace(step, input=replace(
        step.input, query_embeddings=beside(step.input.query_embeddings)))
        for step in config.steps)
    return replace(config, relevant_filenames_file=beside(config.relevant_filenames_file),
                   embeddings=beside(config.embeddings), steps=steps)
