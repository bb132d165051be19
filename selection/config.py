"""Lightly's ``selection_config`` and ``worker_config``, parsed and checked into the frozen
dataclasses the selection runs on.

Everything the Lightly Worker documents for these keys is accepted as its users write it
(validated by the pydantic models of :mod:`pretag.selection.schema`); anything else stops
with :class:`SelectionConfigError`, whose message names the key path and the allowed
values. Nothing is silently ignored. :func:`load` bounds the file first (size, nesting,
no YAML aliases).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pretag.health import DEFAULT_MAX_UNIFORM_ROW_RATIO
from pretag.selection.schema import SelectionModel, StepModel, WorkerModel, validated
from pretag.selection.worker import check_flat, check_worker

M = TypeVar("M", bound=BaseModel)


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


def _unknown(data: dict[str, Any], known: set[str], path: str) -> None:
    extra = sorted(data.keys() - known)
    if extra:
        raise _fail(f"{path}.{extra[0]}", f"unknown key; allowed: {', '.join(sorted(known))}")


def _checked(model: type[M], data: Any, root: str) -> M:
    try:
        return validated(model, data, root)
    except ValueError as exc:
        raise SelectionConfigError(str(exc)) from None


def _step(model: StepModel) -> Step:
    i, s = model.input, model.strategy
    return Step(
        Input(i.type, i.task, i.name, i.score, i.key, i.random_seed,
              tuple(i.categories) if i.categories is not None else None,
              tuple(i.query_filenames) if i.query_filenames is not None else None,
              i.query_embeddings),
        Strategy(s.type, s.strength, s.stopping_condition_minimum_distance, s.threshold,
                 s.operation, tuple(sorted(s.target.items())) if s.target is not None
                 else None, s.distribution, s.stopping_condition_max_sum,
                 s.num_nearest_neighbors, s.stopping_condition_minimum_typicality))


def parse(data: Any, n_samples: int | None = None) -> SelectionConfig:
    """A :class:`SelectionConfig` from ``{"selection_config": ..., "worker_config": ...}``
    or a ``selection_config`` alone. ``n_samples`` overrides the file's count. The keys
    are validated by :mod:`pretag.selection.schema`'s pydantic models; the keys pretag
    refuses first, by :mod:`pretag.selection.worker`."""
    if not isinstance(data, dict):
        raise _fail("config", "must be an object")
    check_flat(data, _fail)
    worker = data.get("worker_config", {})
    selection = data.get("selection_config", data)
    if "selection_config" in data:
        _unknown(data, {"selection_config", "worker_config"}, "config")
    if not isinstance(selection, dict):
        raise _fail("selection_config", "must be an object")
    counts = [k for k in ("n_samples", "proportion_samples") if k in selection]
    if n_samples is None and len(counts) != 1:
        raise _fail("selection_config", "set exactly one of n_samples and proportion_samples")
    if not isinstance(worker, dict):
        raise _fail("worker_config", "must be an object")
    check_worker(worker, _fail)
    chosen = _checked(SelectionModel, selection, "selection_config")
    options = _checked(WorkerModel, worker, "worker_config")
    count = chosen.n_samples if n_samples is None else n_samples
    level, source = options.object_level, options.datasource
    return SelectionConfig(
        tuple(_step(s) for s in chosen.strategies), count,
        chosen.proportion_samples if count is None else None,
        level.task_name if level is not None else None,
        level.padding if level is not None else 0.0, options.selected_sequence_length,
        options.use_datapool, source.process_all, source.enable_datapool_update,
        options.relevant_filenames_file, options.embeddings,
        options.corruptness_check.corruption_threshold)


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
