"""Smoke runs of `memfast mat-demo` (tiny configurations) and its GroupDRO loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from memfast import cli
from memfast.mat_demo import GroupDROLoss


def test_spurious_demo_reproduces_the_finding_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["mat-demo", "--n", "200", "--dim", "400", "--epochs", "300", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ERM, no noise" in out and "MAT, noise 0.5" in out
    assert (tmp_path / "mat_spurious.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "results_spurious.json").read_text())["results"]
    noiseless, erm, mat = res["ERM, no noise"], res["ERM, noise 0.5"], res["MAT, noise 0.5"]
    assert noiseless["min_test"] > 0.9                       # no memorisation: ERM generalises
    assert erm["min_train"] >= 0.85 and erm["min_test"] < 0.3  # memorises the minority, fails on it at test
    assert mat["min_test"] > 0.8                              # MAT recovers it
    assert mat["xrm"]["groups_valid"]


def test_colored_digits_demo_runs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    rc = cli.main(["mat-demo", "--dataset", "colored-digits", "--seeds", "1", "--epochs", "2",
                   "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("ERM", "MAT (XRM groups)", "GroupDRO (true groups)", "worst group"):
        assert name in out
    res = json.loads((tmp_path / "results_colored-digits.json").read_text())["results"]
    for name in ("ERM", "MAT (XRM groups)", "GroupDRO (true groups)"):
        assert len(res[name]["worst"]) == 1 and 0.0 <= res[name]["worst"][0] <= res[name]["avg"][0] + 1e-9


def test_group_dro_loss_matches_direct_update():
    torch.manual_seed(0)
    groups = torch.tensor([0, 1, 1, 2, 3, 3, 0, 2])
    loss_fn = GroupDROLoss(groups, 4, eta=0.5)
    ids = torch.tensor([0, 1, 2, 4, 5])  # group 2 absent from the batch
    logits, y = torch.randn(5, 2, requires_grad=True), torch.tensor([0, 1, 0, 1, 1])
    loss = loss_fn(logits, y, ids)
    ce = F.cross_entropy(logits, y, reduction="none")
    g = groups[ids]
    means = torch.stack([ce[g == k].mean() if (g == k).any() else ce.new_zeros(()) for k in range(4)])
    q = torch.full((4,), 0.25) * torch.exp(0.5 * means.detach() * torch.tensor([1.0, 1, 0, 1]))
    q = q / q.sum()
    torch.testing.assert_close(loss_fn.q, q)
    torch.testing.assert_close(loss, (q * means).sum())
