"""Tests from a mutation-testing pass over the Python modules (2026-12-02): each kills a plausible
bug that the rest of the suite let through (a dropped check, a flipped comparison, a merge rule)."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfast
from memfast import SampleTracker, _ops, metrics
from memfast._stats import COUNTER


# ------------------------------------------------------------------------------------ tracker
def test_loss_var_is_exactly_zero_for_repeated_identical_updates(backend):
    """Five identical updates have no spread: E[l^2] - E[l]^2 of the fp32 sums is rounding noise of
    either sign (up to ~2e-6 here), which loss_var must report as 0, not only when it is negative."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 5, generator=g) * 2, torch.randint(0, 5, (64,), generator=g)
    t = SampleTracker(64, stats="all")
    for _ in range(5):
        t.update(logits, y, torch.arange(64))
    c = t.stat("count")
    raw = t.stat("loss_sq") / c - (t.stat("csl") / c) ** 2
    assert (raw > 0).any()  # the case this test is about: positive cancellation noise
    assert torch.equal(t.scores()["loss_var"], torch.zeros(64))


def _variability_of_identical_updates(logits, y, times):
    t = SampleTracker(len(y), stats="all")
    for _ in range(times):
        t.update(logits, y, torch.arange(len(y)))
    return t.scores()["variability"]


def test_variability_is_exactly_zero_for_repeated_identical_updates(backend):
    """The same for variability (dataset cartography's std of p_true): E[p] comes from
    1 - E[1 - p], whose rounding (ulps of E[1 - p]) dwarfs E[p]^2 when p is small; it gave up
    to 1e-4 here before the noise floor counted it."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 5, generator=g) * 2, torch.randint(0, 5, (64,), generator=g)
    assert torch.equal(_variability_of_identical_updates(logits, y, 5), torch.zeros(64))
    # real spread still shows: p_true alternating between two values
    t2 = SampleTracker(64, stats="all")
    for k in range(4):
        t2.update(logits * (1 + k % 2), y, torch.arange(64))
    p = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]
    p2 = torch.softmax(2 * logits, 1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(t2.scores()["variability"], (p - p2).abs() / 2, atol=2e-4, rtol=1e-3)


def test_variability_is_exactly_zero_where_p_true_is_below_the_rounding_of_its_mean(backend):
    """p_true below ~6e-8: E[p] = 1 - E[1 - p] rounds to 0 and E[p^2] ~ p^2 is left over; the
    noise floor must count the square of E[p]'s error (2e-9 here before, 7540 of 20000 samples
    nonzero at logits * 30; found by a mutation pass)."""
    assert _variability_of_identical_updates(torch.tensor([[0.0, 20.0]]), torch.tensor([0]), 2).item() == 0.0
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(20000, 7, generator=g) * 30, torch.randint(0, 7, (20000,), generator=g)
    assert torch.equal(_variability_of_identical_updates(logits, y, 2), torch.zeros(20000))


def test_learn_time_of_a_sample_learned_in_the_first_epoch_is_zero(backend):
    """learned_epoch 0 is a real epoch (learned at once), not "never learned" (-1)."""
    t = SampleTracker(2, stats="all")
    y, ids = torch.zeros(2, dtype=torch.long), torch.arange(2)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # sample 0 right, sample 1 wrong
    for _ in range(2):
        t.update(logits, y, ids)
        t.end_epoch()
    assert t.stat("learned_epoch").tolist() == [0.0, -1.0]
    torch.testing.assert_close(t.scores()["learn_time"], torch.tensor([0.0, 1.0]))


def test_end_epoch_and_check_report_device_flags_once():
    """The CUDA kernels only flag bad ids / targets in the counters (here set by hand, as they would be):
    end_epoch() raises before counting the epoch, and the flags are cleared so the next check passes."""
    t = SampleTracker(4)
    t.counters[COUNTER["bad_ids"]] = 2
    with pytest.raises(IndexError, match="2 row\\(s\\) with sample_ids out of range"):
        t.end_epoch()
    assert t.epoch == 0
    t.check()  # reported once: cleared
    t.end_epoch()
    assert t.epoch == 1
    t.counters[COUNTER["bad_targets"]] = 1
    with pytest.raises(IndexError, match="targets out of range"):
        t.scores()
    t.check()


def test_load_refuses_another_format_version(tmp_path):
    t = SampleTracker(3)
    sd = t.state_dict()
    sd["version"] = 2
    with pytest.raises(ValueError, match="format version 2"):
        SampleTracker(3).load_state_dict(sd)
    torch.save(sd, tmp_path / "v2.pt")
    with pytest.raises(ValueError, match="format version 2"):
        SampleTracker.load(tmp_path / "v2.pt")


def test_checksum_covers_the_state_and_the_counters():
    """A changed value in any of the checksummed tensors is caught (the state, not only the counters)."""
    t = SampleTracker(5, stats=("csl", "count"))
    t.update(torch.randn(5, 3), torch.randint(0, 3, (5,)), torch.arange(5))
    for key in ("state", "counters"):
        sd = t.state_dict()
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] += 1
        with pytest.raises(ValueError, match="corrupted"):
            SampleTracker(5, stats=("csl", "count")).load_state_dict(sd)


# ------------------------------------------------------------------------------------ metrics
def test_fpr_at_tpr_counts_a_threshold_that_reaches_the_level_exactly():
    """The first threshold whose TPR *reaches* the level: at tpr=0.5 with two positives that is after one."""
    s, y = np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0])
    assert metrics.fpr_at_tpr(s, y, 0.5) == 0.0
    assert metrics.fpr_at_tpr(s, y, 1.0) == 0.5
    sk = pytest.importorskip("sklearn.metrics")
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    for level in (0.5, 1.0):
        assert metrics.fpr_at_tpr(s, y, level) == fpr[np.argmax(tpr >= level)]


def test_theory_learning_time_uses_running_means_and_a_strict_threshold():
    """Hand-worked: g = [[0, 2], [2, 2]] has running means [[0, 2], [1, 2]] and tau = 5/4 (the plain
    per-epoch values would give tau = 3/2 and LT_0 = 1/2); a running mean equal to tau is not below it."""
    np.testing.assert_allclose(metrics.theory_learning_time(np.array([[0.0, 2.0], [2.0, 2.0]])), [0.0, 1.0])
    # running means [[2, 0], [2, 2]] against tau = 2: only the 0 is below
    np.testing.assert_allclose(metrics.theory_learning_time(np.array([[2.0, 0.0], [2.0, 4.0]]), tau=2.0),
                               [1.0, 0.5])


# ---------------------------------------------------------------------------------- curvature
def test_score_curvature_draws_new_probes_for_every_batch():
    """Two batches with the same inputs get different probes (each batch its own seed), so their
    one-probe estimates differ; the same base seed gives the same scores again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    loader = [(x, y, torch.arange(4)), (x, y, torch.arange(4, 8))]

    def run():
        t = SampleTracker(8, stats=("csl", "curv"))
        memfast.score_curvature(model, loader, t, n_probes=1, h=0.5, seed=3, progress=False)
        return t.scores()["curv"]

    first = run()
    assert not torch.allclose(first[:4], first[4:])
    assert torch.equal(run(), first)


# ------------------------------------------------- class-probability targets, PyTorch's loss path
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_taking_a_gradient_get_the_z_loss_of_rows_with_mass(backend, reduction):
    """A target that requires grad runs PyTorch's loss (not the fused op) plus the z-loss: zeta * lse^2
    for rows with some target mass (an all-zero row gets none and is not tracked), reduced as PyTorch
    reduces probability targets (the mean over all rows)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    q = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    q[2] = 0.0  # no mass
    q.requires_grad_()
    tracker = SampleTracker(6, stats="all")
    got = memfast.cross_entropy(x, q, reduction=reduction, lse_square_scale=0.05, sample_ids=torch.arange(6),
                                tracker=tracker)
    has_mass = torch.tensor([1.0, 1, 0, 1, 1, 1], dtype=torch.float64)
    rows = F.cross_entropy(x, q, reduction="none") + 0.05 * torch.logsumexp(x, 1) ** 2 * has_mass
    want = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    torch.testing.assert_close(got, want)
    assert tracker.stat("count").tolist() == [1.0, 1, 0, 1, 1, 1]
    # the fused op (a target without grad) gives the same
    fused = memfast.cross_entropy(x, q.detach(), reduction=reduction, lse_square_scale=0.05)
    torch.testing.assert_close(fused, want)


def test_aupr_with_a_tie_at_the_highest_score():
    """sklearn appends (recall 0, precision 1) to the curve; with a positive and a negative tied at the top,
    the first threshold has precision 1/2 at recall 1/2, so that appended point matters. Hand-worked:
    (1, 2/3) -> (1/2, 1/2) -> (0, 1): 1/2 * (2/3 + 1/2) / 2 + 1/2 * (1/2 + 1) / 2 = 2/3."""
    s, y = np.array([2.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0])
    assert metrics.aupr(s, y) == pytest.approx(2 / 3, abs=1e-12)
    sk = pytest.importorskip("sklearn.metrics")
    precision, recall, _ = sk.precision_recall_curve(y, s)
    assert metrics.aupr(s, y) == pytest.approx(sk.auc(recall, precision), abs=1e-12)


def test_sample_ids_of_a_wrong_length_are_refused_before_an_inplace_write(backend):
    """The tracker checks how many ids there are before the op runs: an in-place loss leaves the logits
    as they were (the op's own check comes after it has written the gradient over them)."""
    t = SampleTracker(5)
    x = torch.randn(6, 3, requires_grad=True)
    logits = x * 1.0
    before = logits.detach().clone()
    with pytest.raises(ValueError, match="one per row"):
        memfast.cross_entropy(logits, torch.zeros(6, dtype=torch.long), sample_ids=torch.arange(4), tracker=t,
                              inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    assert int(t.counters[COUNTER["calls"]]) == 0


def test_margin_is_zero_without_a_finite_other_class(backend):
    """AUM's margin z_y - max_{c != y} z_c is 0 (not +inf) when there is no other class (C = 1) or every
    other logit is -inf; csl and the probabilities are those of a certain prediction."""
    t = SampleTracker(5, stats="all")
    t.update(torch.tensor([[1.0], [0.5], [2.0]]), torch.zeros(3, dtype=torch.long), torch.arange(3))
    t.update(torch.tensor([[2.0, -math.inf], [-math.inf, 1.0]]), torch.tensor([0, 1]), torch.tensor([3, 4]))
    s = t.scores()
    assert s["margin"].tolist() == [0.0] * 5 and s["aum"].tolist() == [0.0] * 5
    assert s["csl"].tolist() == [0.0] * 5 and s["nonfinite"].tolist() == [0.0] * 5
    torch.testing.assert_close(s["inconf_max"], torch.zeros(5))


# ------------------------------------------------------------------------------ linear head
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_backward_scales_by_the_upstream_gradient(backend, reduction):
    """The gradients formed in the forward are multiplied by d out / d loss (here 3, as in
    (3 * loss).backward() or a GradScaler's scale), like those of F.linear + F.cross_entropy."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (10,), generator=g)
    got = torch.autograd.grad(3.0 * memfast.linear_cross_entropy(x, W, y, linear_bias=b, reduction=reduction,
                                                                 chunk_size=4), (x, W, b))
    want = torch.autograd.grad(3.0 * F.cross_entropy(F.linear(x, W, b), y, reduction=reduction), (x, W, b))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


# ------------------------------------------------------------------------------------ report
def test_proxies_keep_a_score_with_some_nan_entries():
    """A proxy is dropped (None) only when it was never computed (all NaN); samples never updated have
    NaN latest-update values, and the proxy stays, NaN there (distribution_table skips those)."""
    from memfast import report

    last = torch.tensor([0.5, float("nan"), 2.0, 1.0])
    p = report.proxies({"csl": torch.tensor([1.0, 0.0, 3.0, 2.0]), "last_loss": last,
                        "curv": torch.tensor([float("nan"), 1.0, float("nan"), 2.0])})
    np.testing.assert_array_equal(p["final_loss"], last.numpy().astype(np.float64))
    np.testing.assert_array_equal(p["curvature"], [np.nan, 1.0, np.nan, 2.0])
    assert "final loss" in report.distribution_table(p)


def test_duplicate_detection_leaves_out_the_noisy_samples():
    """Duplicates are scored against clean samples only: noisy samples scoring higher still than the
    duplicates are no false positives of that task."""
    from memfast import report

    n = 100
    noisy, dup = np.zeros(n, bool), np.zeros(n, bool)
    noisy[:10], dup[10:20] = True, True
    score = np.linspace(0, 1, n)
    score[dup] += 5
    score[noisy] += 10  # above the duplicates
    row = report.detection_table({"csl": score}, noisy, dup)[0]
    assert row["duplicate_auroc"] == 1.0
    assert row["mislabeled_auroc"] == 1.0


# ---------------------------------------------------------------------- reference probe loop
def test_reference_probe_loop_uses_the_offset_probe():
    """The reference estimator perturbs by h * (v + offset) and reports <h (v + offset), g>: with a
    large offset the probe direction is visibly not h * v. Checked against the formula written out."""
    from memfast.reference.curvature import reference_probe_loop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    probes = (torch.randint(0, 2, (2, 5, 3)) * 2 - 1).double()
    h, off = 0.1, 0.5
    curv, eig = reference_probe_loop(model, x, y, 2, h, probes, reduction="sum", offset=off)
    regr, dots = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for k in range(2):
        v = h * (probes[k] + off)
        xg = x.clone().requires_grad_()
        (gk,) = torch.autograd.grad(F.cross_entropy(model(xg + v), y, reduction="sum"), xg)
        xg0 = x.clone().requires_grad_()
        (g0,) = torch.autograd.grad(F.cross_entropy(model(xg0), y, reduction="sum"), xg0)
        regr += (gk - g0).norm(dim=1)
        dots += (v * (gk - g0)).sum(1)
    torch.testing.assert_close(curv, regr / 2)
    torch.testing.assert_close(eig, dots / 2)


# ----------------------------------------------------------------------------- memfast score
def test_score_append_refuses_a_history_of_another_shape_before_scoring(tmp_path):
    """--append with a --history file that is not [checkpoints, N] stops with a message before anything
    is scored or written (the tracker file is left as it was)."""
    from memfast.cli import main

    (tmp_path / "models.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 3)\n")
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(30, 4, generator=g), "targets": torch.randint(0, 3, (30,), generator=g)},
               tmp_path / "data.pt")
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "ckpt.pt")
    args = ["score", "--model", f"{tmp_path / 'models.py'}:make", "--data", str(tmp_path / "data.pt"),
            "--tracker", str(tmp_path / "scores.pt"), "--quiet", "--grad-norm", "--history", str(tmp_path / "h.pt")]
    assert main(args + [str(tmp_path / "ckpt.pt")]) == 0
    before = (tmp_path / "scores.pt").read_bytes()
    torch.save(torch.zeros(1, 31), tmp_path / "h.pt")
    with pytest.raises(SystemExit, match=r"not a \[checkpoints, 30\] tensor"):
        main(args + ["--append", str(tmp_path / "ckpt.pt")])
    assert (tmp_path / "scores.pt").read_bytes() == before


def test_reset_forgets_the_sums_of_the_last_all_reduce(backend):
    """reset() starts over: nothing of the previous run is kept, the sums as of the last all_reduce
    neither (a later all_reduce would subtract them from the new run's sums)."""
    from memfast._stats import SUM_STATS

    t = SampleTracker(4, stats="all")
    t.update(torch.randn(4, 3), torch.randint(0, 3, (4,)), torch.arange(4))
    t._synced_sums = t.state[[t._row[s] for s in t.stored_stats if s in SUM_STATS]].clone()  # as after all_reduce
    t.reset()
    fresh = SampleTracker(4, stats="all")
    sd, want = t.state_dict(), fresh.state_dict()
    assert sd["synced_sums"] is None
    assert torch.equal(sd["state"], want["state"]) and torch.equal(sd["counters"], want["counters"])


def test_an_empty_batch_counts_a_call(backend):
    """An update of no rows is still a tracker call (ranks keep making the same number of calls, which
    all_reduce compares): the call counter moves and the next update's last_update is 2."""
    t = SampleTracker(4, stats="all")
    t.update(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert int(t.counters[COUNTER["calls"]]) == 1
    t.update(torch.randn(1, 3), torch.tensor([0]), torch.tensor([2]))
    assert t.stat("last_update").tolist() == [0.0, 0.0, 2.0, 0.0]


def test_cross_entropy_loss_without_a_tracker_takes_sample_ids(backend):
    """A training loop may pass sample_ids to every loss; a CrossEntropyLoss without a tracker ignores
    them (it is then plain cross entropy), as the one with a tracker uses them."""
    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    got = memfast.CrossEntropyLoss()(x, y, torch.arange(5))
    torch.testing.assert_close(got, F.cross_entropy(x, y))


def test_summary_json_is_strict_json_with_infinite_values(tmp_path):
    """Non-finite numbers (a NaN or an infinite metric) are written as null: the file stays JSON that
    strict parsers (JavaScript, jq) read, not Python's NaN / Infinity extensions."""
    import json

    from memfast import report

    path = tmp_path / "summary.json"
    report.write_summary_json(path, [{"key": "csl", "mislabeled_auroc": float("inf"), "mislabeled_aupr": float("nan"),
                                      "mislabeled_fpr95": np.float64(-np.inf), "duplicate_auroc": 0.5}])

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    row = json.loads(path.read_text(), parse_constant=refuse)["rows"][0]
    assert row["mislabeled_auroc"] is None and row["mislabeled_aupr"] is None and row["mislabeled_fpr95"] is None
    assert row["duplicate_auroc"] == 0.5


def test_noise_refuses_negative_labels():
    from memfast import noise

    with pytest.raises(ValueError, match="non-negative"):
        noise.symmetric(np.array([0, -1, 2, 1]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        noise.duplicates(np.zeros((4, 2)), np.array([0, -1, 2, 1]), 1)


# ------------------------------- a second pass: _ops, mat, data, cli, datasets, integrations
LARGE = (1100, 1000)  # storage above KEEP_LOGITS_BYTES: held weakly, the saved gradient scaled in place


def _probs(*shape):
    return torch.softmax(torch.randn(*shape), -1)


# -- _ops: backend choice --------------------------------------------------------------------------
def test_set_backend_switches_the_cached_namespace():
    before = memfast.get_backend()
    try:
        memfast.set_backend("reference")
        assert _ops.ops("cpu") is torch.ops.memfast_ref
        if _ops.extension_available("cpu"):
            memfast.set_backend("kernels")
            assert _ops.ops("cpu") is torch.ops.memfast
    finally:
        memfast.set_backend(before)


def test_no_kernels_for_other_device_types():
    assert not _ops.extension_available("meta")
    assert not _ops.extension_available("mps")
    assert _ops.prob_ops("meta") is None


def test_cuda_probability_kernel_is_opt_in(monkeypatch):
    monkeypatch.setattr(_ops, "ops", lambda kind: torch.ops.memfast)
    monkeypatch.delenv("MEMFAST_CUDA_PROB", raising=False)
    assert _ops.prob_ops("cuda") is None
    monkeypatch.setenv("MEMFAST_CUDA_PROB", "1")
    assert _ops.prob_ops("cuda") is torch.ops.memfast


def test_retained_graph_keeps_saved_inputs(backend):
    h = torch.randn(6, 5, requires_grad=True) * 1
    p = _probs(6, 5)
    loss = memfast.cross_entropy(h, p)
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward works with retain_graph=True


def test_target_modified_after_the_forward_is_refused(backend):
    h = torch.randn(6, 5, requires_grad=True) * 1
    p = _probs(6, 5)
    loss = memfast.cross_entropy(h, p)
    p.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_differentiable_backward_refuses_kept_logits_modified_in_place(backend):
    x = torch.randn(6, 5, requires_grad=True)
    h = x * 1
    loss = memfast.cross_entropy(h, _probs(6, 5))
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace"):
        torch.autograd.grad(loss, x, create_graph=True)




def test_second_backward_of_large_logits_with_grad_loss_not_one(backend):
    assert LARGE[0] * LARGE[1] * 4 > _ops.KEEP_LOGITS_BYTES
    x = torch.randn(*LARGE, requires_grad=True)
    h = x * 1
    p = _probs(*LARGE)
    loss = memfast.cross_entropy(h, p) * 3.0
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, g1)
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(x, p) * 3.0, x)[0]
    torch.testing.assert_close(g1, want, atol=1e-6, rtol=1e-4)


def test_second_backward_of_large_logits_refuses_modified_logits(backend):
    x = torch.randn(*LARGE, requires_grad=True)
    h = x * 1
    loss = memfast.cross_entropy(h, _probs(*LARGE))
    loss.backward(retain_graph=True)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="alive and unmodified"):
        loss.backward()


def test_second_backward_recomputes_with_the_softcap(backend):
    x = torch.randn(*LARGE, requires_grad=True)
    h = x * 3
    loss = memfast.cross_entropy(h, _probs(*LARGE), softcap=2.0) * 2.0
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, g1)


def test_inplace_backward_probability_targets_refuse_a_second_backward(backend):
    if not _ops.extension_available("cpu"):
        pytest.skip("inplace_backward needs the extension")
    x = torch.randn(6, 5, requires_grad=True)
    h = x * 1
    v = h._version
    loss = memfast.cross_entropy(h, _probs(6, 5), inplace_backward=True)
    assert h._version > v
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


# -- mat ---------------------------------------------------------------------------------------------
def test_linear_fuse_needs_matching_biases():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
    xrm = memfast.mat.XRM(a, b, num_samples=8, num_classes=3)
    assert xrm.fuse == "none"
    x = torch.randn(5, 4)
    la, lb = xrm.twin_logits(x)
    torch.testing.assert_close(la, a(x))
    torch.testing.assert_close(lb, b(x))
    with pytest.raises(ValueError):
        memfast.mat.XRM(a, b, num_samples=8, num_classes=3, fuse="linear")


def test_sample_id_range_is_exclusive():
    from memfast.mat import _check_ids

    _check_ids(torch.tensor([0, 9]), 10)
    with pytest.raises(IndexError):
        _check_ids(torch.tensor([0, 10]), 10)
    loss = memfast.MATLoss(torch.zeros(4, 3))
    with pytest.raises(IndexError):
        loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 4]))


def test_flip_generator_is_seeded_with_seed_plus_one():
    xrm = memfast.mat.XRM(nn.Linear(2, 2), nn.Linear(2, 2), num_samples=4, num_classes=2, seed=5)
    g = xrm._flip_rng(torch.device("cpu"))
    want = torch.Generator().manual_seed(6)
    assert torch.equal(torch.rand(8, generator=g), torch.rand(8, generator=want))


# -- data --------------------------------------------------------------------------------------------
def test_tensor_batches_zero_means_one_full_batch():
    from memfast.data import tensor_batches

    batches = list(tensor_batches(torch.randn(7, 2), torch.arange(7), 0))
    assert len(batches) == 1 and batches[0][2].tolist() == list(range(7))


def test_tensor_batches_shuffle_is_seeded():
    from memfast.data import tensor_batches

    def order(seed):
        torch.manual_seed(torch.randint(0, 1000, ()).item() + 1)  # the global RNG must not matter
        return torch.cat([b[2] for b in tensor_batches(torch.randn(20, 2), torch.arange(20), 6, shuffle=True,
                                                       seed=seed)]).tolist()

    assert order(3) == order(3)
    assert sorted(order(3)) == list(range(20))
    assert order(3) != order(4)


def test_with_index_batch_ids_are_a_long_tensor():
    from torch.utils.data import TensorDataset

    from memfast.data import WithIndex

    x, y, ids = WithIndex(TensorDataset(torch.randn(5, 2), torch.arange(5)))[[1, 3]]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.tolist() == [1, 3]


# -- cli ---------------------------------------------------------------------------------------------
def test_positive_types_refuse_zero_inf_and_nan():
    from memfast.cli import positive_float, positive_int

    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    for text in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(text)
    for text in ("0", "inf", "nan", "-2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(text)


# -- datasets ----------------------------------------------------------------------------------------
def test_colored_digits_train_and_test_are_disjoint_partition():
    pytest.importorskip("sklearn")
    from memfast.datasets import colored_digits

    train, test = colored_digits("train"), colored_digits("test")
    assert len(train) + len(test) == 1797
    flat = lambda d: {tuple(img.tolist()) for img in d.x.sum(1).reshape(len(d), -1)}  # noqa: E731
    a, b = flat(train), flat(test)
    assert len(a & b) < 0.05 * len(b)  # (load_digits has a few exact duplicate images)


def test_colored_digits_minority_after_label_noise():
    pytest.importorskip("sklearn")
    from memfast.datasets import colored_digits

    d = colored_digits("train", label_noise=0.25)
    assert torch.equal(d.minority, d.attribute != d.y)


def test_minority_fraction_must_be_in_unit_interval():
    from memfast.datasets import spurious_features

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="minority_fraction"):
            spurious_features(n=20, dim=4, minority_fraction=bad)


# -- integrations ------------------------------------------------------------------------------------
def test_hf_loss_relabels_ignore_index_itself():
    """compute_loss may see labels that did not pass through the relabelling collator."""
    from types import SimpleNamespace

    hf = pytest.importorskip("memfast.integrations.hf")
    t = object.__new__(hf.MemfastTrainer)
    t.ignore_index, t.shift_labels, t.tracker, t._batch_sample_ids, t._head_input = 0, False, None, None, None
    t.inplace_backward, t.lse_square_scale = False, 0.0
    t.args = SimpleNamespace(label_smoothing_factor=0.0)
    t.model = nn.Linear(1, 1)
    t.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 0, 2, 0], [3, 4, 0, 0]])
    got = t._memfast_loss({"logits": logits}, labels)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=0)
    torch.testing.assert_close(got, want)


def test_lightning_epoch_end_applied_once_per_epoch():
    from types import SimpleNamespace

    lt = pytest.importorskip("memfast.integrations.lightning")
    cb = lt.TrackerCallback(num_samples=4)
    trainer = SimpleNamespace(current_epoch=0)
    cb.on_train_epoch_end(trainer, None)
    cb.on_train_epoch_end(trainer, None)
    assert cb.tracker.epoch == 1
    trainer.current_epoch = 1
    cb.on_train_epoch_end(trainer, None)
    assert cb.tracker.epoch == 2


def test_rank_score_averages_ties():
    import numpy as np

    from memfast.integrations.cleanlab import _rank_score

    np.testing.assert_allclose(_rank_score(np.array([1.0, 1.0, 2.0, np.nan])), [0.75, 0.75, 0.0, np.nan])
