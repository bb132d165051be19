"""Every key of the Lightly Worker's config that a user may bring: the v4 ``worker_config``
and the old flat config (Worker <= 2.5). Each is honoured (:data:`HONOURED`, with what it
does in pretag) or refused with what to do instead (:data:`REFUSED`): nothing is silently
ignored. docs/selection.md shows both tables; a test holds them to the docs."""

from __future__ import annotations

from typing import Any

#: Keys pretag takes, and what they do here (the parsing is in :mod:`.config`).
HONOURED: dict[str, str] = {
    "object_level": "object-level selection: each detection of task_name is a sample "
                    "(padding: the crops' margin)",
    "selected_sequence_length": "windows of that many consecutive video frames are the "
                                "samples (docs/video.md)",
    "use_datapool": "earlier selections' picks count (DIR/datapool.json)",
    "relevant_filenames_file": "the run and the selection only take the inputs it names",
    "datasource.process_all": "pretag run --selection-config predicts every input again",
    "datasource.enable_datapool_update": "false: the selection uses the datapool but does "
                                         "not add its picks to it",
    "datasource.bypass_verify": "no effect needed: pretag reads the input itself, there is "
                                "no datasource access to verify",
    "pretagging": "true: the selection uses pretag run's predictions, which are the "
                  "pretagging (false is refused)",
    "pretagging_upload": "the predictions are always in DIR/.lightly/predictions; nothing "
                         "is uploaded",
    "upload_report": "the report is always written to DIR/report",
    "shutdown_when_job_finished": "pretag exits when the job is done",
    "embeddings": "a custom embeddings file (Lightly's embeddings.csv, or Parquet) used "
                  "instead of the run's vectors (also pretag select --embeddings FILE)",
    "normalize_embeddings": "true: vectors are L2-normalised, as always here (false is "
                            "refused)",
    "corruptness_check.corruption_threshold": "images whose uniformRowRatio (pretag run's "
                                              "pixel metadata) is above it are corrupt and "
                                              "no candidates (default 0.025); so are files "
                                              "that failed to decode (DIR/report/corrupt.json)",
}

_TRAIN = ("pretag does not train or load an embedding model: its vectors come from the "
          "detector's own pass (pretag run --embeddings image|all)")
#: Keys pretag refuses, and what to do instead.
REFUSED: dict[str, str] = {
    "checkpoint": _TRAIN,
    "checkpoint_run_id": _TRAIN,
    "enable_training": _TRAIN,
    "training": _TRAIN,
    "crops": "pretag uploads nothing: write the picked crops with pretag select "
             "--write-crops",
    "num_processes": "set pretag run --read-threads, or the server's --threads",
    "num_threads": "set pretag run --read-threads, or the server's --threads",
    "output_image_format": "pretag writes no images but crops, as PNG (--write-crops)",
    "cache_size": "pretag keeps no worker cache: remove it",
    "datasource.input_expiration": "pretag does not check when inputs expire: remove it",
    # the old flat config
    "pretagging_debug": "draw boxes with pretag run --debug-images N, or pretag select "
                        "--images DIR",
    "pretagging_config": "keep images with enough objects of a class with a THRESHOLD "
                         "strategy on a PREDICTIONS CATEGORY_COUNT input",
    "enable_corruptness_check": "the check always runs: corrupt images "
                                "(DIR/report/corrupt.json) are never candidates; set its "
                                "threshold with worker_config.corruptness_check."
                                "corruption_threshold",
    "remove_exact_duplicates": "exact duplicates are always removed: one image of each "
                               "group of byte-identical files is a candidate "
                               "(DIR/report/duplicates.json)",
    "stopping_condition": "use selection_config.n_samples (or proportion_samples) and a "
                          "DIVERSITY strategy's stopping_condition_minimum_distance",
    "datapool": "use worker_config.use_datapool: true (the record is DIR/datapool.json)",
    "n_example_images": "the report shows the first 6 picks beside their nearest sample not "
                        "selected and up to 48 picks in a grid (pass --images): remove it",
    "memory_requirement_in_GB": "pretag sizes nothing by it: remove it",
    "show_video_sampling_timeline": "not supported yet: the report has no video timeline",
    "method": "the old selection methods are strategies now: put a DIVERSITY strategy in "
              "selection_config.strategies",
}

#: Keys of the old flat config that may sit at the top level of a config file.
FLAT = frozenset({"pretagging", "pretagging_debug", "pretagging_upload", "pretagging_config",
                  "enable_corruptness_check", "remove_exact_duplicates",
                  "stopping_condition", "object_level", "datapool", "n_example_images",
                  "memory_requirement_in_GB", "show_video_sampling_timeline", "method"})

_BOOLEAN = ("pretagging", "pretagging_upload", "upload_report", "shutdown_when_job_finished",
            "normalize_embeddings")


def check_worker(worker: dict[str, Any], fail: Any) -> None:
    """Refuse what pretag does not do; check the booleans it takes. ``fail(path, message)``
    makes the error."""
    for key, value in worker.items():
        if key in REFUSED:
            raise fail(f"worker_config.{key}", f"not supported: {REFUSED[key]}")
        if key in _BOOLEAN and not isinstance(value, bool):
            raise fail(f"worker_config.{key}", f"must be true or false, not {value!r}")
    for key in ("pretagging", "normalize_embeddings"):
        if worker.get(key) is False:
            raise fail(f"worker_config.{key}", f"false is not supported: {HONOURED[key]}")
    datasource = worker.get("datasource", {})
    if isinstance(datasource, dict) and "input_expiration" in datasource:
        raise fail("worker_config.datasource.input_expiration",
                   f"not supported: {REFUSED['datasource.input_expiration']}")


def check_flat(data: dict[str, Any], fail: Any) -> None:
    """A config file in the old flat form: each key refused with its new form."""
    old = sorted(k for k in data if k in FLAT)
    if not old:
        return
    hints = "; ".join(f"{key}: " + (REFUSED.get(key) or f"put it under worker_config "
                                                        f"({HONOURED.get(key, '')})")
                      for key in old)
    raise fail(", ".join(old), f"keys of the old flat worker config (Lightly Worker <= 2.5); "
                               f"pretag reads {{\"worker_config\": ..., \"selection_config\": "
                               f"...}}. {hints}")


def known_worker_keys() -> set[str]:
    """The top-level worker_config keys pretag takes."""
    return {k for k in HONOURED if "." not in k} | {"datasource", "corruptness_check"}
