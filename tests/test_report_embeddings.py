"""The report's embedding figures against brute force on vectors with a known layout."""

from __future__ import annotations

import numpy as np

from pretag.selection.report import _plot
from pretag.selection.report_embeddings import (
    figures,
    pairwise_distances,
    retained_beside_removed,
)


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Eight tight clusters of 50 around random directions; one pick per cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, 16))
    x = np.repeat(centres, 50, axis=0) + 0.05 * rng.normal(size=(400, 16))
    return x.astype(np.float32), np.arange(0, 400, 50)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pairwise_distances_are_every_pair_once():
    unit = _unit(np.random.default_rng(1).normal(size=(30, 5)))
    got = np.sort(pairwise_distances(unit))
    want = np.sort([np.linalg.norm(unit[i] - unit[j])
                    for i in range(30) for j in range(i + 1, 30)])
    assert len(got) == 30 * 29 // 2
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_retained_beside_removed_is_the_nearest_unpicked_sample():
    x, picked = _clusters()
    unit = _unit(x)
    pairs = retained_beside_removed(unit, picked)
    assert len(pairs) == 6 and [p[2] for p in pairs] == sorted(p[2] for p in pairs)
    others = np.setdiff1d(np.arange(len(x)), picked)
    for kept, removed, distance in pairs:
        d = np.linalg.norm(unit[others] - unit[kept], axis=1)
        assert removed == others[d.argmin()] and removed not in picked
        assert abs(distance - d.min()) < 1e-5
        assert removed // 50 == kept // 50  # its own cluster


def test_a_diverse_pick_widens_the_pairwise_distances():
    """One pick per cluster: all the picks' pairs are between clusters, while an eighth of
    the whole set's pairs lie inside one, so the 5th percentile jumps."""
    x, picked = _clusters()
    pngs, record = figures(_plot, x, picked)
    before, after = record["pairwise_distance"]["before"], record["pairwise_distance"]["after"]
    assert before["p5"] < 0.1 < after["p5"]
    assert after["median"] >= before["median"]
    assert record["median_nearest_neighbour_distance"]["before"] < 0.1
    assert record["median_nearest_neighbour_distance"]["after"] > 0.3
    for key in ("map", "nearest", "distance_distr_before", "distance_distr_after"):
        assert pngs[key].startswith(b"\x89PNG")


def test_a_large_drawing_is_inlined_at_most_960_px(shared, tmp_path):
    import cv2

    from pretag.selection.report import PAGE_IMAGE_PX, _shrunk

    frame = cv2.imread(str(shared / "data" / "driving" / "nuscenes_cam_front.jpg"))
    assert max(frame.shape[:2]) > PAGE_IMAGE_PX
    path = tmp_path / "drawn.jpg"
    cv2.imwrite(str(path), frame)
    small = cv2.imdecode(np.frombuffer(_shrunk(path), np.uint8), cv2.IMREAD_COLOR)
    assert max(small.shape[:2]) == PAGE_IMAGE_PX
    assert abs(small.shape[1] / small.shape[0] - frame.shape[1] / frame.shape[0]) < 0.01
    tiny = tmp_path / "tiny.jpg"
    cv2.imwrite(str(tiny), frame[:100, :200])
    assert _shrunk(tiny) == tiny.read_bytes()
