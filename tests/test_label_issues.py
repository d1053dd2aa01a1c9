"""label_issues: cleanlab's output convention from tracker scores; the threshold
rules; precision / recall of the flagged set on digits with injected noise."""
import math

import numpy as np
import pytest
import torch

import memfast
from memfast.integrations.cleanlab import label_issues, otsu_threshold

pd = pytest.importorskip("pandas")


def _brute_force_otsu(values):
    """Every split between distinct sorted values; the one with the largest
    between-group variance (population variances, float64)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    best, cut = -1.0, math.inf
    for i in range(len(v) - 1):
        if v[i] == v[i + 1]:
            continue
        low, high = v[: i + 1], v[i + 1:]
        w0, w1 = len(low) / len(v), len(high) / len(v)
        between = w0 * w1 * (high.mean() - low.mean()) ** 2
        if between > best + 1e-15:
            best, cut = between, (v[i] + v[i + 1]) / 2
    return cut


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0, 1, 60), rng.normal(rng.uniform(2, 6), 1, 20)])
    values[rng.integers(0, 80, 5)] = values[0]  # ties
    assert otsu_threshold(values) == pytest.approx(_brute_force_otsu(values), rel=1e-12)


def test_otsu_degenerate():
    assert otsu_threshold([]) == math.inf
    assert otsu_threshold([3.0, 3.0, 3.0]) == math.inf
    assert otsu_threshold([0.0, 1.0]) == 0.5
    assert otsu_threshold([0.0, np.nan, 1.0, np.inf]) == 0.5


def _tracker_after_random_updates(n=50, c=5, stats="all"):
    tracker = memfast.SampleTracker(n, stats=stats)
    for _ in range(4):
        ids = torch.randperm(n)[:30]
        tracker.update(torch.randn(30, c) * 3, torch.randint(0, c, (30,)), ids)
        tracker.end_epoch()
    return tracker


def test_columns_and_label_score_formulas():
    tracker = _tracker_after_random_updates()
    labels = torch.randint(0, 5, (50,))
    probs = torch.softmax(torch.randn(50, 5), 1)
    df = label_issues(tracker, labels, pred_probs=probs)
    assert list(df.columns[:4]) == ["is_label_issue", "label_score", "given_label", "predicted_label"]
    assert df["is_label_issue"].dtype == bool
    np.testing.assert_array_equal(df["given_label"], labels.numpy())
    np.testing.assert_array_equal(df["predicted_label"], probs.argmax(1).numpy())
    s = tracker.scores()
    seen = (s["count"] > 0).numpy()
    assert 0 < seen.sum() < 50  # some samples never updated: NaN score, never flagged
    expected = np.exp(-(s["csl"] / s["count"]).double().numpy())
    np.testing.assert_allclose(df["label_score"][seen], expected[seen], rtol=1e-6)
    assert df["label_score"][~seen].isna().all() and not df["is_label_issue"][~seen].any()
    assert ((df["label_score"][seen] >= 0) & (df["label_score"][seen] <= 1)).all()
    for name in ("csl", "count", "inconf", "forgetting", "aum"):
        np.testing.assert_array_equal(df[name].to_numpy(), s[name].numpy())
    # inconf: label_score is the mean true-class probability (cartography's confidence)
    df = label_issues(s, labels, score="inconf")
    np.testing.assert_allclose(df["label_score"][seen], s["confidence"].numpy()[seen], rtol=1e-6)
    # rank-based scores: 1 for the least suspicious, 0 for the most; aum is "low = suspicious"
    df = label_issues(s, labels, score="aum", num_issues=3)
    aum = s["aum"].numpy()
    order = np.argsort(aum[seen])
    assert df["label_score"][seen].to_numpy()[order[0]] == 0.0
    assert df["label_score"][seen].to_numpy()[order[-1]] == 1.0
    flagged = np.flatnonzero(df["is_label_issue"])
    np.testing.assert_array_equal(np.sort(flagged), np.sort(np.flatnonzero(seen)[order[:3]]))


def test_threshold_rules():
    n = 200
    csl_mean = np.concatenate([np.random.default_rng(0).exponential(0.1, 180), np.random.default_rng(1).uniform(3, 5, 20)])
    scores = {"csl": torch.tensor(csl_mean * 4, dtype=torch.float32), "count": torch.full((n,), 4.0),
              "csl_mean": torch.tensor(csl_mean, dtype=torch.float32)}
    labels = np.zeros(n, dtype=np.int64)
    df = label_issues(scores, labels)
    assert df.attrs["rule"] == "otsu"
    np.testing.assert_array_equal(np.flatnonzero(df["is_label_issue"]), np.arange(180, 200))
    df = label_issues(scores, labels, num_issues=0.05)
    assert df.attrs["rule"] == "noise_rate" and df["is_label_issue"].sum() == 10
    assert df.loc[df["is_label_issue"], "csl_mean"].min() >= df.loc[~df["is_label_issue"], "csl_mean"].max()
    df = label_issues(scores, labels, num_issues=7)
    assert df["is_label_issue"].sum() == 7 == df.attrs["num_issues"]
    assert label_issues(scores, labels, num_issues=0)["is_label_issue"].sum() == 0


def test_bad_input():
    s = _tracker_after_random_updates(stats=("csl", "count")).scores()
    with pytest.raises(ValueError, match="labels"):
        label_issues(s, np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match="labels"):
        label_issues(s, np.zeros(50))
    with pytest.raises(ValueError, match="inconf_mean"):
        label_issues(s, np.zeros(50, dtype=np.int64), score="inconf")
    with pytest.raises(ValueError, match="unknown score"):
        label_issues(s, np.zeros(50, dtype=np.int64), score="nope")
    with pytest.raises(ValueError, match="noise rate"):
        label_issues(s, np.zeros(50, dtype=np.int64), num_issues=1.5)
    with pytest.raises(ValueError, match="num_issues"):
        label_issues(s, np.zeros(50, dtype=np.int64), num_issues="gmm")
    with pytest.raises(TypeError, match="scores"):
        label_issues([1, 2], np.zeros(2, dtype=np.int64))


def test_digits_injected_noise_precision_recall(one_thread):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    n = len(y)
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(n, generator=g) < 0.10  # 10% symmetric noise: a uniformly drawn other class
    given = torch.where(noisy, (y + torch.randint(1, 10, (n,), generator=g)) % 10, y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = memfast.SampleTracker(n, stats="all")
    ids = torch.arange(n)
    for epoch in range(400):  # full batch, until it memorizes the noisy labels
        logits = model(x)
        loss = memfast.cross_entropy(logits, given, sample_ids=ids, tracker=tracker)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.end_epoch()
        if (logits.argmax(1) == given).float().mean() >= 0.99:
            break
    assert (logits.argmax(1) == given).float().mean() >= 0.99, "the MLP did not memorize the noisy labels"
    truth = noisy.numpy()
    for score in ("csl", "inconf", "cum_01_loss"):
        df = label_issues(tracker, given, score=score)
        flagged = df["is_label_issue"].to_numpy()
        precision = (flagged & truth).sum() / flagged.sum()
        recall = (flagged & truth).sum() / truth.sum()
        assert precision >= 0.85 and recall >= 0.85, (score, precision, recall, flagged.sum(), truth.sum())
    # the noise-rate rule with the true rate
    df = label_issues(tracker, given, num_issues=float(truth.mean()))
    flagged = df["is_label_issue"].to_numpy()
    assert flagged.sum() == round(truth.mean() * n)
    assert (flagged & truth).sum() / flagged.sum() >= 0.9


def test_integrations_package_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, memfast.integrations as mi, memfast.integrations.cleanlab, memfast.integrations.cartography; "
            "assert mi.label_issues is memfast.integrations.cleanlab.label_issues; "
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'pandas', 'matplotlib') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_exposes_label_issues():
    import memfast

    assert memfast.report.label_issues.__doc__ and callable(memfast.report.label_issues)
    tracker = memfast.SampleTracker(4)
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])  # sample 1 contradicts its label
    labels = torch.tensor([0, 1, 0, 1])
    tracker.update(logits, labels, torch.arange(4))
    via_report = memfast.report.label_issues(tracker.scores(), labels, num_issues=1)
    assert via_report["is_label_issue"].tolist() == [False, True, False, False]
