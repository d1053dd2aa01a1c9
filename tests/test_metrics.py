"""memfast.metrics against scikit-learn on random data (with ties)."""
import numpy as np
import pytest
import torch

from memfast import metrics

sk = pytest.importorskip("sklearn.metrics")


def _data(seed, n=400, tie_levels=None):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[:2] = [True, False]
    s = rng.normal(size=n) + 1.3 * y
    if tie_levels:
        s = np.round(s * tie_levels) / tie_levels
    return s, y


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [None, 2])
def test_detection_metrics_match_sklearn(seed, ties):
    s, y = _data(seed, tie_levels=ties)
    assert metrics.auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    precision, recall, _ = sk.precision_recall_curve(y, s)
    assert metrics.aupr(s, y) == pytest.approx(sk.auc(recall, precision), abs=1e-12)
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    f, t = metrics.roc_curve(s, y)
    np.testing.assert_allclose(f, fpr, atol=1e-12)
    np.testing.assert_allclose(t, tpr, atol=1e-12)
    for level in (0.5, 0.9, 0.95):
        assert metrics.fpr_at_tpr(s, y, level) == pytest.approx(fpr[np.argmax(tpr >= level)], abs=1e-12)


def test_detection_metrics_extremes_and_errors():
    y = np.array([0, 0, 1, 1], bool)
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert metrics.fpr_at_tpr([0.1, 0.2, 0.8, 0.9], y) == 0.0
    with pytest.raises(ValueError, match="both"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([np.nan, 0.2], [0, 1])
    with pytest.raises(ValueError, match="length"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_cosine_pearson_accuracy_match_references(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random(300), rng.random(300) + 0.3 * np.arange(300) / 300
    assert metrics.cosine(a, b) == pytest.approx(
        sk.pairwise.cosine_similarity(a[None], b[None])[0, 0], rel=1e-12)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-10)
    logits = rng.normal(size=(300, 7))
    y = rng.integers(0, 7, 300)
    assert metrics.accuracy(logits, y) == pytest.approx(sk.accuracy_score(y, logits.argmax(1)))
    groups = rng.integers(0, 4, 300)
    per_group = metrics.group_accuracy(logits, y, groups)
    for g in range(4):
        m = groups == g
        assert per_group[g] == pytest.approx(sk.accuracy_score(y[m], logits.argmax(1)[m]))
    assert metrics.worst_group_accuracy(logits, y, groups) == min(per_group.values())


def test_theory_learning_time_follows_the_papers_notebook():
    g = np.array([[4.0, 1.0, 2.0],
                  [2.0, 1.0, 6.0],
                  [0.0, 1.0, 1.0]])
    # running means per sample: [4, 3, 2], [1, 1, 1], [2, 4, 3]; tau = mean = 21 / 9
    cond = np.array([[4, 1, 2], [3, 1, 4], [2, 1, 3]], dtype=float)
    tau = cond.mean()
    expected = 1 - (cond < tau).mean(0)
    np.testing.assert_allclose(metrics.theory_learning_time(g), expected)
    np.testing.assert_allclose(expected, [2 / 3, 0.0, 2 / 3])
    # the same from a list of per-epoch tensors, and with a given tau
    np.testing.assert_allclose(metrics.theory_learning_time([torch.tensor(row) for row in g]), expected)
    np.testing.assert_allclose(metrics.theory_learning_time(g, tau=10.0), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="epochs, samples"):
        metrics.theory_learning_time(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.theory_learning_time(np.array([[1.0, np.nan]]))


def test_equal_infinite_scores_are_a_tie():
    """inf - inf is NaN, which np.diff took for a change: equal infinite scores split by row order."""
    for labels in ([1, 0, 1, 0], [0, 1, 1, 0]):
        assert metrics.auroc([np.inf, np.inf, 1.0, 0.0], labels) == pytest.approx(0.625)
        assert metrics.auroc([-np.inf, -np.inf, 1.0, 0.0], labels[::-1]) == pytest.approx(
            metrics.auroc([-1.0, -1.0, 1.0, 0.0], labels[::-1]))


def test_accuracy_checks_lengths_and_single_logit_heads():
    with pytest.raises(ValueError, match="differ in length: 1 vs 5"):
        metrics.accuracy(np.array([1]), np.ones(5))
    with pytest.raises(ValueError, match="single-logit"):
        metrics.accuracy(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(ValueError, match="single-logit"):
        metrics.group_accuracy(np.zeros((4, 1)), np.zeros(4), np.zeros(4))
    assert metrics.accuracy(np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([1, 1])) == 0.5


def test_bad_metric_arguments_are_refused():
    with pytest.raises(ValueError, match="tpr must be a number in"):
        metrics.fpr_at_tpr([1, 2, 3, 4], [0, 1, 0, 1], tpr=1.5)
    with pytest.raises(ValueError, match="tpr must be a number in"):
        metrics.fpr_at_tpr([1, 2, 3, 4], [0, 1, 0, 1], tpr=float("nan"))
    with pytest.raises(ValueError, match="labels must be binary"):
        metrics.auroc([1, 2, 3], [0, 2, 2])  # (was binarized silently)
    assert metrics.auroc([1.0, 2.0, 3.0], np.array([False, True, True])) == 1.0
    with pytest.raises(ValueError, match="tau must be a finite number"):
        metrics.theory_learning_time(np.ones((2, 3)), tau=float("nan"))
