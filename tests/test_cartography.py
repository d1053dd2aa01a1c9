"""Dataset cartography: the map's coordinates against the direct formulas over a
recorded history of true-class probabilities; regions; the plot file."""
import numpy as np
import pytest
import torch

import memfast
from memfast.integrations.cartography import REGIONS, cartography_plot, cartography_table

pytest.importorskip("matplotlib")

STATS = ("inconf", "ptrue_sq", "count", "correct")


def _tracked_history(n=40, c=4, epochs=5):
    """Updates on a fixed subset, with the per-update true-class probability and
    correctness recorded the plain way."""
    tracker = memfast.SampleTracker(n, stats=STATS)
    targets = torch.randint(0, c, (n,))
    ptrue = [[] for _ in range(n)]
    right = [[] for _ in range(n)]
    ids = torch.arange(n - 3)  # the last three samples are never seen
    for _ in range(epochs):
        logits = torch.randn(len(ids), c, dtype=torch.float64) * 2
        tracker.update(logits.float(), targets[ids], ids)
        p = torch.softmax(logits, 1)
        for r, i in enumerate(ids.tolist()):
            ptrue[i].append(float(p[r, targets[i]]))
            right[i].append(float(logits[r].argmax() == targets[i]))
        tracker.end_epoch()
    return tracker, targets, ptrue, right


def test_coordinates_match_direct_formulas():
    tracker, _, ptrue, right = _tracked_history()
    table = cartography_table(tracker)
    seen = table["seen"]
    assert seen.sum() == 37 and not seen[-3:].any()
    for i in np.flatnonzero(seen):
        assert table["confidence"][i] == pytest.approx(np.mean(ptrue[i]), abs=1e-5)
        assert table["variability"][i] == pytest.approx(np.std(ptrue[i]), abs=1e-3)  # fp32 E[p^2] - E[p]^2
        assert table["correctness"][i] == pytest.approx(np.mean(right[i]), abs=1e-6)


def test_regions_by_confidence_thirds():
    rng = np.random.default_rng(0)
    n = 300
    scores = {"confidence": torch.tensor(rng.uniform(0, 1, n)), "variability": torch.tensor(rng.uniform(0, 0.5, n)),
              "accuracy": torch.tensor(rng.uniform(0, 1, n))}
    scores["confidence"][:5] = float("nan")  # never seen
    table = cartography_table(scores)
    region, conf = table["region"], scores["confidence"].numpy()
    assert (region[:5] == "").all() and not table["seen"][:5].any()
    expected = np.where(conf > 2 / 3, "easy_to_learn", np.where(conf < 1 / 3, "hard_to_learn", "ambiguous"))
    np.testing.assert_array_equal(region[5:], expected[5:])
    assert set(region[5:]) == set(REGIONS)


def test_plot_writes_image_and_summary(tmp_path):
    tracker, targets, _, _ = _tracked_history()
    noisy = torch.zeros(40, dtype=torch.bool)
    noisy[:6] = True
    path = tmp_path / "map.png"
    summary = cartography_plot(tracker.scores(), path, labels=targets, noisy=noisy)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = cartography_table(tracker.scores())
    for r in REGIONS:
        assert summary[r] == int((table["region"] == r).sum())
        assert summary["noisy_per_region"][r] == int(((table["region"] == r) & noisy.numpy()).sum())
    assert summary["seen"] == 37
    # no labels / noisy, and a subsample of the points
    summary = cartography_plot(tracker, tmp_path / "map.svg", max_points=10)
    assert (tmp_path / "map.svg").stat().st_size > 1000 and "noisy_per_region" not in summary


def test_bad_input(tmp_path):
    tracker = memfast.SampleTracker(5, stats=("csl", "count"))
    with pytest.raises(ValueError, match="ptrue_sq"):
        cartography_plot(tracker.scores(), tmp_path / "x.png")
    tracker, _, _, _ = _tracked_history()
    with pytest.raises(ValueError, match="noisy"):
        cartography_plot(tracker.scores(), tmp_path / "x.png", noisy=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="labels"):
        cartography_plot(tracker.scores(), tmp_path / "x.png", labels=np.zeros(3, dtype=np.int64))
