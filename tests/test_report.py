import csv
import json

import numpy as np
import pytest
import torch

import memfast
from memfast import metrics, report
from memfast.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_scores(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.rand(n, generator=g)  # noqa: E731
    return {"csl": r() * 10, "inconf_final": r(), "inconf_max": r(), "last_loss": r(), "learn_time": r(),
            "forgetting": torch.randint(0, 3, (n,), generator=g).float(), "cum_01_loss": r(), "aum": r() - 0.5,
            "curv": torch.full((n,), float("nan"))}


def test_proxies_orientation_and_missing():
    s = _fake_scores(50)
    p = report.proxies(s, eval_scores={"csl": s["csl"] * 2}, confident_learning=np.arange(50.0), csl_key="csl_free")
    assert [k for k, _ in report.ROWS] == list(p)
    np.testing.assert_allclose(p["neg_aum"], -s["aum"].numpy().astype(np.float64))
    np.testing.assert_allclose(p["csl_eval"], 2 * s["csl"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(p["final_loss"], s["last_loss"].numpy(), rtol=1e-7)
    assert p["curvature"] is None                      # all NaN: never scored
    assert report.proxies(s)["confident_learning"] is None
    assert "csl_eval" not in report.proxies(s)


def test_detection_table_separates_the_two_tasks():
    rng = np.random.default_rng(0)
    n = 200
    noisy = np.zeros(n, bool); noisy[:20] = True
    dup = np.zeros(n, bool); dup[20:30] = True
    score = rng.random(n)
    score[dup] += 5        # duplicates score highest: must not count as false positives for mislabeled
    score[noisy] += 2
    rows = report.detection_table({"csl": score, "curvature": None}, noisy, dup)
    row = rows[0]
    assert row["mislabeled_auroc"] == 1.0
    assert row["mislabeled_auroc"] == metrics.auroc(score[~dup], noisy[~dup])
    assert row["mislabeled_aupr"] == pytest.approx(metrics.aupr(score[~dup], noisy[~dup]))
    assert row["mislabeled_fpr95"] == 0.0
    assert row["duplicate_auroc"] == 1.0
    assert all(rows[1][m] is None for m in report.METRICS)
    only_dup = report.detection_table({"csl": score}, None, dup)[0]
    assert only_dup["mislabeled_auroc"] is None and only_dup["duplicate_auroc"] == metrics.auroc(score, dup)
    with pytest.raises(ValueError, match="noisy"):
        report.detection_table({"csl": score}, noisy[:10])


def test_aggregate_and_format():
    a = [{"key": "csl", "proxy": "CSL", "mislabeled_auroc": 0.9, "mislabeled_aupr": 0.5, "mislabeled_fpr95": 0.1,
          "duplicate_auroc": None}]
    b = [{**a[0], "mislabeled_auroc": 0.8}]
    agg = report.aggregate([a, b])[0]
    assert agg["mislabeled_auroc"]["mean"] == pytest.approx(0.85)
    assert agg["mislabeled_auroc"]["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert agg["duplicate_auroc"] is None
    text = report.format_table(report.aggregate([a, b]))
    assert "0.8500 ± 0.0707" in text and "n/a" in text and "CSL" in text
    assert "0.9000" in report.format_table(a)
    with pytest.raises(ValueError, match="differ in their number of rows"):  # (zip dropped the extra rows)
        report.aggregate([a, a + b])


def test_binned_means():
    x = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    y = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    centers, means, stds, counts = report.binned(x, y, bins=2)
    np.testing.assert_allclose(means, [2.0, 7.0])
    np.testing.assert_allclose(counts, [2, 3])
    np.testing.assert_allclose(stds, [1.0, np.std([5.0, 7.0, 9.0])])


def test_write_report_files_exist_and_parse(tmp_path):
    n = 64
    rng = np.random.default_rng(1)
    p = report.proxies(_fake_scores(n), csl_key="csl_free")
    noisy = rng.random(n) < 0.2
    dup = np.zeros(n, bool); dup[~noisy][:4] = True
    dup[np.flatnonzero(~noisy)[:4]] = True
    given = rng.integers(0, 10, n)
    written = report.write_report(tmp_path, p, given_labels=given, true_labels=given, noisy=noisy, duplicates=dup,
                                  images=rng.random((n, 64)), extra={"note": "test"}, plots=False)
    names = {x.split("/")[-1] for x in written}
    assert names == {"scores.csv", "summary.json"}  # the plots: test_report_command_on_saved_tracker
    with open(tmp_path / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n
    assert list(table[0])[:5] == ["id", "label", "given_label", "is_noisy", "is_duplicate"]
    assert set(p) <= set(table[0])
    assert table[3]["curvature"] == "" and float(table[3]["csl_free"]) == pytest.approx(p["csl_free"][3])
    assert [int(r["is_noisy"]) for r in table] == noisy.astype(int).tolist()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["note"] == "test" and [r["key"] for r in summary["rows"]] == list(p)


def _trained_tracker(n=120, classes=4, epochs=6, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 8)
    y = (x[:, :classes].argmax(1))
    given, noisy = memfast.noise.symmetric(y, 0.2, seed=seed, num_classes=classes)
    model = torch.nn.Linear(8, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = memfast.SampleTracker(n, stats="all")
    for _ in range(epochs):
        for sid in torch.randperm(n).split(32):
            loss = memfast.cross_entropy(model(x[sid]), given[sid], sample_ids=sid, tracker=tracker)
            opt.zero_grad(); loss.backward(); opt.step()
        tracker.end_epoch()
    return tracker, x, given, noisy


def test_report_command_on_saved_tracker(tmp_path, capsys):
    tracker, x, given, noisy = _trained_tracker()
    tracker.save(tmp_path / "tracker.pt")
    torch.save(given, tmp_path / "labels.pt")
    np.save(tmp_path / "noisy.npy", noisy.numpy())
    np.save(tmp_path / "images.npy", x.reshape(-1, 8, 1).repeat(1, 1, 8).numpy())
    out = tmp_path / "out"
    rc = main(["report", str(tmp_path / "tracker.pt"), "--labels", str(tmp_path / "labels.pt"), "--noisy",
               str(tmp_path / "noisy.npy"), "--images", str(tmp_path / "images.npy"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mislabeled AUROC" in text and "AUM (-aum)" in text and "highest CSL" in text
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    expected = metrics.auroc(tracker.scores()["csl"], noisy)
    assert rows["csl"]["mislabeled_auroc"] == pytest.approx(expected)
    assert summary["epochs"] == 6 and summary["num_samples"] == 120
    assert (out / "scores.csv").exists()
    for name in ("histograms.png", "roc.png", "top_csl.png", "csl_vs_learning_time.png", "cartography.png"):
        assert (out / name).read_bytes()[:8] == PNG

    # A second (eval-pass) tracker adds the CSL (eval) row.
    assert main(["report", str(tmp_path / "tracker.pt"), "--labels", str(tmp_path / "labels.pt"), "--noisy",
                 str(tmp_path / "noisy.npy"), "--eval-tracker", str(tmp_path / "tracker.pt")]) == 0
    text = capsys.readouterr().out
    assert "CSL (free)" in text and "CSL (eval)" in text

    # Without a mask: the distribution of each proxy instead of detection metrics.
    assert main(["report", str(tmp_path / "tracker.pt"), "--labels", str(tmp_path / "labels.pt")]) == 0
    text = capsys.readouterr().out
    assert "median" in text and "mislabeled AUROC" not in text

    # An LM's per-sequence tracker has no labels: the tables and the files without that column.
    lm_out = tmp_path / "lm"
    assert main(["report", str(tmp_path / "tracker.pt"), "--noisy", str(tmp_path / "noisy.npy"), "--out",
                 str(lm_out)]) == 0
    assert "mislabeled AUROC" in capsys.readouterr().out
    assert "given_label" not in (lm_out / "scores.csv").read_text().splitlines()[0]
    with pytest.raises(SystemExit, match="--images needs --labels"):
        main(["report", str(tmp_path / "tracker.pt"), "--images", str(tmp_path / "images.npy")])

    # mislabeled() with an eval-pass tracker's scores has the CSL (eval) row (it was dropped)
    keys = [r["key"] for r in report.mislabeled(tracker.scores(), noisy, eval_scores=tracker.scores())]
    assert keys[:2] == ["csl", "csl_eval"]
    small = memfast.SampleTracker(5)
    small.save(tmp_path / "small.pt")
    with pytest.raises(SystemExit, match="--eval-tracker has 5 samples, the tracker has 120"):
        main(["report", str(tmp_path / "tracker.pt"), "--eval-tracker", str(tmp_path / "small.pt")])

    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    with pytest.raises(SystemExit, match="--labels has 5 entries"):
        main(["report", str(tmp_path / "tracker.pt"), "--labels", str(tmp_path / "short.npy")])
    # unreadable files: one line naming the argument, no traceback
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="memfast report: tracker: .*not a readable"):
        main(["report", str(tmp_path / "bad.pt"), "--labels", str(tmp_path / "labels.pt")])
    with pytest.raises(SystemExit, match="memfast report: tracker: no file .*nothere.pt"):
        main(["report", str(tmp_path / "nothere.pt"), "--labels", str(tmp_path / "labels.pt")])
    tracker_file, labels, missing = str(tmp_path / "tracker.pt"), str(tmp_path / "labels.pt"), str(tmp_path / "x.npy")
    for junk in (b"", b"junk"):  # empty (EOFError) or not a pickle at all
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(SystemExit, match="memfast report: --labels"):
            main(["report", tracker_file, "--labels", str(tmp_path / "junk.pt")])
    for flag, args in (("--labels", ["--labels", missing]), ("--noisy", ["--labels", labels, "--noisy", missing]),
                       ("--eval-tracker", ["--labels", labels, "--eval-tracker", missing])):
        with pytest.raises(SystemExit, match=f"memfast report: {flag}: no file"):
            main(["report", tracker_file] + args)


def test_mislabeled_shortcut_matches_the_table():
    s = _fake_scores(80, seed=3)
    noisy = np.zeros(80, bool)
    noisy[::7] = True
    rows = report.mislabeled(s, noisy)
    assert rows == report.detection_table(report.proxies(s), noisy)
    assert rows[0]["key"] == "csl" and rows[0]["mislabeled_auroc"] == pytest.approx(metrics.auroc(s["csl"], noisy))
