import json
import os
import runpy
import sys

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

import memfast
from memfast import report
from memfast.cli import main
from memfast.data import WithIndex

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
TINY = ["demo", "--epochs", "4", "--cl-epochs", "2", "--width", "32", "--quiet"]


def test_with_index_items_and_batches():
    x, y = torch.randn(10, 3), torch.arange(10) % 3
    ds = WithIndex(TensorDataset(x, y))
    xi, yi, i = ds[7]
    assert len(ds) == 10 and i == 7 and torch.equal(xi, x[7]) and yi == y[7]
    xb, yb, sid = next(iter(DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert sid.dtype == torch.int64 and torch.equal(xb, x[sid]) and torch.equal(yb, y[sid])
    # A whole batch in one dataset call (what the demo's loader does).
    loader = DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), 6, False), batch_size=None)
    batches = list(loader)
    assert [b[2].tolist() for b in batches] == [list(range(6)), list(range(6, 10))]
    assert torch.equal(batches[1][0], x[6:])
    assert WithIndex([("a", 1), ("b", 2)])[1] == ("b", 2, 1)
    with pytest.raises(TypeError, match="dataset"):
        WithIndex(5)


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(TINY + ["--curv-every", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for _, label in report.ROWS:
        assert label in text
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert list(rows) == [k for k, _ in report.ROWS]
    for key in ("csl_free", "csl_eval", "curvature", "loss_sensitivity", "final_loss", "neg_aum", "learn_time_theory"):
        assert 0.0 <= rows[key]["mislabeled_auroc"]["mean"] <= 1.0
        assert 0.0 <= rows[key]["duplicate_auroc"]["mean"] <= 1.0
    try:
        import cleanlab  # noqa: F401
        assert rows["confident_learning"]["mislabeled_auroc"] is not None
    except ImportError:
        assert rows["confident_learning"]["mislabeled_auroc"] is None
    assert summary["num_noisy"] == int(0.1 * 1797) and summary["num_duplicates"] == 40
    for name in ("histograms.png", "roc.png", "top_csl.png", "csl_vs_learning_time.png", "cartography.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = (out / "scores.csv").read_text().splitlines()
    assert len(lines) == 1798 and lines[0].startswith("id,label,given_label,is_noisy,is_duplicate,csl_free")


def test_demo_seeds_mean_std(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(TINY + ["--no-cl", "--no-plots", "--seeds", "0", "1", "--out", str(out)]) == 0
    assert "mean ± std over seeds [0, 1]" in capsys.readouterr().out
    rows = {r["key"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    values = rows["csl_free"]["mislabeled_auroc"]["values"]
    assert len(values) == 2 and values[0] != values[1]
    for seed in (0, 1):
        per_seed = json.loads((out / f"seed{seed}" / "summary.json").read_text())
        row = {r["key"]: r for r in per_seed["rows"]}["csl_free"]
        assert row["mislabeled_auroc"] == pytest.approx(values[seed])
        assert sorted(os.listdir(out / f"seed{seed}")) == ["scores.csv", "summary.json"]


def test_demo_without_optional_parts_prints_na(capsys):
    assert main(TINY + ["--no-eval-pass", "--no-cl", "--no-grad-norm", "--curv-every", "0", "--duplicates", "0"]) == 0
    lines = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    for label in ("CSL (eval)", "confident learning", "input curvature", "loss sensitivity (grad norm)",
                  "learning time (theory, Eq. 7)"):
        assert lines[label].split()[-4:] == ["n/a"] * 4, label
    assert lines["CSL (free)"].split()[-1] == "n/a"                 # no duplicates injected
    assert lines["CSL (free)"].split()[-4] != "n/a"


def test_demo_bad_arguments():
    with pytest.raises(SystemExit, match="--noise"):
        main(["demo", "--noise", "1.5"])


def test_python_dash_m_memfast_demo(monkeypatch, capsys):
    # `python -m memfast demo ...` runs memfast/__main__.py; run it in-process (a
    # subprocess would pay the torch import again).
    monkeypatch.setattr(sys, "argv", ["memfast"] + TINY + ["--no-cl", "--no-eval-pass", "--epochs", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("memfast", run_name="__main__")
    assert exit_info.value.code == 0
    assert "CSL (free)" in capsys.readouterr().out
