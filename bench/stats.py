"""Measurement helpers shared by the benchmarks: percentiles, stable windows, tables."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 in milliseconds (NaN when empty)."""
    if not latencies_s:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan")}
    arr = np.asarray(latencies_s) * 1000
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


@dataclass(frozen=True)
class Stability:
    """perf_analyzer's rule: windows of ``window_s``; stop when the last ``count``
    throughputs are within ``tolerance`` of their mean, or after ``max_windows``."""

    window_s: float = 5.0
    count: int = 3
    tolerance: float = 0.10
    max_windows: int = 10

    def stable(self, rates: Sequence[float]) -> bool:
        if len(rates) < self.count:
            return False
        last = np.asarray(rates[-self.count:])
        mean = float(last.mean())
        return mean > 0 and bool(np.all(np.abs(last - mean) <= self.tolerance * mean))


def measure_until_stable(run_window: Callable[[float], dict[str, Any]],
                         stability: Stability) -> dict[str, Any]:
    """Call ``run_window(seconds)`` (returns {"images", "seconds", ...}) until stable.

    The result merges the last ``count`` windows: their images and seconds summed,
    lists (latencies) concatenated, and reports whether stability was reached.
    """
    windows: list[dict[str, Any]] = []
    rates: list[float] = []
    while len(windows) < stability.max_windows:
        w = run_window(stability.window_s)
        windows.append(w)
        rates.append(w["images"] / w["seconds"] if w["seconds"] > 0 else 0.0)
        if stability.stable(rates):
            break
    used = windows[-stability.count:]
    merged: dict[str, Any] = {"images": sum(w["images"] for w in used),
                              "seconds": sum(w["seconds"] for w in used),
                              "windows": len(windows), "stable": stability.stable(rates),
                              "window_rates": [round(r, 3) for r in rates]}
    for key, value in used[-1].items():
        if key in merged or key in ("images", "seconds"):
            continue
        merged[key] = ([x for w in used for x in w[key]] if isinstance(value, list)
                       else value)
    merged["images_per_s"] = merged["images"] / merged["seconds"] if merged["seconds"] else 0.0
    return merged


def best_rows(rows: Sequence[dict[str, Any]], by: str) -> dict[Any, dict[str, Any]]:
    """For each value of ``row[by]``, the row with the most images per second."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row[by] not in best or row["images_per_s"] > best[row[by]]["images_per_s"]:
            best[row[by]] = row
    return best


def machine() -> dict[str, Any]:
    import os

    import onnxruntime as ort

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(),
                            "onnxruntime": ort.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
