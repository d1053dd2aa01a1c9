"""memfast.mat (XRM phase 1, MAT shift, MATLoss) and memfast.datasets against
direct formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfast
from memfast import mat
from memfast.datasets import colored_digits, spurious_features
from memfast.metrics import group_accuracy, worst_group_accuracy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _linear_twins(D, K, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(D, K, bias=bias), nn.Linear(D, K, bias=bias)


def _mlp(D, K, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))


# -- phase 1 pieces ------------------------------------------------------------------------------------
def test_flip_probability_formula():
    for K in (2, 3, 7):
        probs = torch.softmax(torch.randn(50, K) * 3, 1)
        expected = (probs.max(1).values - 1 / K) * K / (K - 1)
        torch.testing.assert_close(mat.flip_probability(probs), expected)
        assert mat.flip_probability(torch.full((1, K), 1 / K)).item() == pytest.approx(0, abs=1e-6)
        assert mat.flip_probability(F.one_hot(torch.tensor([1]), K).float()).item() == pytest.approx(1)


@pytest.mark.parametrize("K", [2, 5])
def test_class_balanced_loss_is_sum_of_class_means(K):
    logits = torch.randn(40, K, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, K - 1, (40,))  # the last class is absent
    loss = mat.class_balanced_cross_entropy(logits, targets)
    ce = F.cross_entropy(logits, targets, reduction="none")
    expected = sum(ce[targets == c].mean() for c in targets.unique())
    torch.testing.assert_close(loss, expected)
    g, = torch.autograd.grad(loss, logits)
    g_ref, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, g_ref)


def _direct_step(twin_a, twin_b, assignment, dyn, x, y, ids, lr, rng, K):
    """XRM's step written out: owner's loss on dynamic labels, class-balanced;
    flip with the pre-step held-out probabilities."""
    dyn_b = torch.where(dyn[ids] >= 0, dyn[ids], y)
    la, lb = twin_a(x), twin_b(x)
    own = assignment[ids]
    trained = torch.where(own[:, None], la, lb)
    held_out = torch.where(own[:, None], lb, la).detach()
    ce = F.cross_entropy(trained, dyn_b, reduction="none")
    loss = sum(ce[dyn_b == c].mean() for c in dyn_b.unique())
    params = list(twin_a.parameters()) + list(twin_b.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g
    probs = held_out.softmax(1)
    p_flip = (probs.max(1).values - 1 / K) * K / (K - 1)
    flip = torch.rand(len(ids), generator=rng) < p_flip
    dyn[ids] = torch.where(flip, probs.argmax(1), dyn_b)
    return loss.detach()


@pytest.mark.parametrize("fuse", ["auto", "vmap", "none"])
def test_xrm_step_matches_direct_implementation(fuse):
    N, D, K, lr = 60, 5, 3, 0.5
    x_all, y_all = torch.randn(N, D), torch.randint(0, K, (N,))
    a, b = _linear_twins(D, K, seed=1)
    xrm = mat.XRM(a, b, N, K, seed=3, fuse=fuse)
    ref_a, ref_b = _linear_twins(D, K, seed=1)
    dyn = torch.full((N,), -1, dtype=torch.long)
    opt = torch.optim.SGD(xrm.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(3 + 1)  # documented: flips draw from Generator(seed + 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randperm(N, generator=gen)[:25]
        loss = xrm.step(x_all[ids], y_all[ids], ids, opt)
        ref_loss = _direct_step(ref_a, ref_b, xrm.assignment, dyn, x_all[ids], y_all[ids], ids, lr, rng, K)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.weight, ref_a.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.bias, ref_b.bias, rtol=1e-5, atol=1e-6)
        assert torch.equal(xrm.dynamic_labels, dyn)
    seen = dyn >= 0
    assert torch.equal(xrm.labels[seen], y_all[seen])
    assert xrm.flip_rate == pytest.approx((dyn[seen] != y_all[seen]).float().mean().item())
    assert xrm.flip_rate > 0  # lr 0.5 on 6 steps must flip something, or the test checks nothing


def test_flip_frequency_follows_held_out_confidence():
    # lr = 0: the twins never change, so each sample's flip probability is fixed
    N, K = 20000, 2
    x = torch.zeros(N, 1)
    a, b = nn.Linear(1, K), nn.Linear(1, K)
    with torch.no_grad():
        for t in (a, b):
            t.weight.zero_()
            t.bias.copy_(torch.tensor([0.0, 1.0]))  # p_max = sigmoid(1) for everyone, argmax = class 1
    xrm = mat.XRM(a, b, N, K)
    y = torch.zeros(N, dtype=torch.long)
    xrm.step(x, y, torch.arange(N), torch.optim.SGD(xrm.parameters(), lr=0.0))
    p = 1 / (1 + math.exp(-1))
    expected = (p - 0.5) * 2
    assert xrm.flip_rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / N))
    assert set(xrm.dynamic_labels.unique().tolist()) == {0, 1}


def test_step_loss_routes_to_owner_twin():
    N, D, K = 40, 4, 2
    a, b = _linear_twins(D, K)
    xrm = mat.XRM(a, b, N, K, seed=5)
    own_a = xrm.assignment.nonzero().squeeze(1)
    assert 0 < len(own_a) < N
    ids = own_a[:8]
    x, y = torch.randn(len(ids), D), torch.randint(0, K, (len(ids),))
    b_before = b.weight.detach().clone()
    xrm.step(x, y, ids, torch.optim.SGD(xrm.parameters(), lr=1.0))
    assert b.weight.grad is None or not b.weight.grad.any()
    assert torch.equal(b.weight, b_before)
    assert a.weight.grad.abs().sum() > 0


def test_dynamic_labels_persist_by_sample_id():
    N, D, K = 10, 3, 2
    a, b = _linear_twins(D, K)
    xrm = mat.XRM(a, b, N, K)
    x = torch.randn(4, D)
    ids = torch.tensor([7, 2, 9, 4])
    xrm.dynamic_labels[ids] = torch.tensor([1, 0, 1, 1])  # as if flipped earlier
    xrm.labels[ids] = torch.tensor([0, 0, 0, 0])
    opt = torch.optim.SGD(xrm.parameters(), lr=0.0)
    with torch.no_grad():
        a.weight.zero_(); a.bias.zero_(); b.weight.zero_(); b.bias.zero_()  # uniform: no flips
    xrm.step(x, torch.zeros(4, dtype=torch.long), ids, opt)
    assert xrm.dynamic_labels[ids].tolist() == [1, 0, 1, 1]  # kept, not reset to y
    assert xrm.flip_rate == pytest.approx(3 / 4)
    assert (xrm.dynamic_labels[[0, 1, 3, 5, 6, 8]] == -1).all()
    sd = xrm.state_dict()
    assert {"assignment", "labels", "dynamic_labels"} <= set(sd)


def test_assignment_is_fixed_bernoulli_half():
    a, b = _linear_twins(2, 2)
    xrm = mat.XRM(a, b, 4000, 2, seed=11)
    again = mat.XRM(*_linear_twins(2, 2), 4000, 2, seed=11)
    assert torch.equal(xrm.assignment, again.assignment)
    assert abs(xrm.assignment.float().mean().item() - 0.5) < 0.04
    assert not torch.equal(xrm.assignment, mat.XRM(*_linear_twins(2, 2), 4000, 2, seed=12).assignment)


def _loader(x, y, batch=7):
    n = len(y)
    perm = torch.randperm(n)
    return [(x[perm[i:i + batch]], y[perm[i:i + batch]], perm[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("twins", ["linear", "mlp"])
def test_held_out_logits_use_the_other_twin_in_eval_mode(twins):
    N, D, K = 30, 4, 3
    if twins == "linear":
        a, b = _linear_twins(D, K)
    else:
        a, b = _mlp(D, K, 1), _mlp(D, K, 2)
        a.append(nn.Dropout(0.5)); b.append(nn.Dropout(0.5))  # eval mode must switch it off
    xrm = mat.XRM(a, b, N, K, seed=2)
    x, y = torch.randn(N, D), torch.randint(0, K, (N,))
    ho = xrm.held_out_logits(_loader(x, y))
    assert xrm.training  # restored
    a.eval(); b.eval()
    with torch.no_grad():
        expected = torch.where(xrm.assignment[:, None], b(x), a(x))
    torch.testing.assert_close(ho, expected)
    with pytest.warns(UserWarning, match="did not visit"):
        partial = xrm.held_out_logits(_loader(x[:10], y[:10]))
    assert partial[10:].isnan().all() and not partial[:10].isnan().any()


def test_fused_forward_modes_agree():
    D, K = 6, 4
    x = torch.randn(9, D)
    a, b = _linear_twins(D, K)
    fused = mat.XRM(a, b, 9, K, fuse="linear")
    plain = mat.XRM(a, b, 9, K, fuse="none")
    for got, want in zip(fused.twin_logits(x), plain.twin_logits(x)):
        torch.testing.assert_close(got, want)
    a, b = _mlp(D, K, 1), _mlp(D, K, 2)
    assert mat.XRM(a, b, 9, K).fuse == "auto"  # vmap on CUDA inputs, two forwards on the CPU
    vm = mat.XRM(a, b, 9, K, fuse="vmap")
    la, lb = vm.twin_logits(x)
    torch.testing.assert_close(la, a(x))
    torch.testing.assert_close(lb, b(x))
    (la.sum() + 2 * lb.sum()).backward()
    ga = a[0].weight.grad.clone()
    a.zero_grad()
    a(x).sum().backward()
    torch.testing.assert_close(ga, a[0].weight.grad)
    with pytest.raises(ValueError, match="fuse"):
        mat.XRM(a, b, 9, K, fuse="linear")
    bn_a, bn_b = nn.Sequential(nn.Linear(D, K), nn.BatchNorm1d(K)), nn.Sequential(nn.Linear(D, K), nn.BatchNorm1d(K))
    assert mat.XRM(bn_a, bn_b, 9, K).fuse == "none"  # buffers: run the twins one after the other


def test_inferred_groups_or_of_twin_mistakes_with_original_labels():
    N, D, K = 50, 4, 2
    a, b = _linear_twins(D, K, seed=4)
    xrm = mat.XRM(a, b, N, K)
    x, y = torch.randn(N, D), torch.randint(0, K, (N,))
    xrm.dynamic_labels[:] = 1 - y  # must be ignored: groups use the original labels
    groups = xrm.inferred_groups(_loader(x, y))
    with torch.no_grad():
        expected = (a(x).argmax(1) != y) | (b(x).argmax(1) != y)
    assert torch.equal(groups.labels, y)
    assert torch.equal(groups.mistakes, expected)
    assert torch.equal(groups.groups, 2 * y + expected.long())
    labels, mistakes = groups  # unpacks as the pair
    assert labels is groups.labels and mistakes is groups.mistakes


def test_inferred_groups_degenerate_check():
    N, D, K = 20, 2, 2
    a, b = _linear_twins(D, K)
    with torch.no_grad():
        for t in (a, b):
            t.weight.zero_(); t.bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    xrm = mat.XRM(a, b, N, K)
    x, y = torch.randn(N, D), torch.arange(N) % 2
    with pytest.warns(UserWarning, match="do not split"):
        groups = xrm.inferred_groups(_loader(x, y))
    assert groups.degenerate_classes == [0, 1] and not groups.valid
    with pytest.raises(ValueError, match="do not split"):
        xrm.inferred_groups(_loader(x, y), strict=True)
    # a validation set of another size
    with pytest.warns(UserWarning):
        g6 = xrm.inferred_groups([(x[:6], y[:6], torch.arange(6))], num_samples=6)
    assert g6.labels.shape == (6,)


def test_xrm_argument_checks():
    a, b = _linear_twins(3, 2)
    with pytest.raises(ValueError, match="num_classes"):
        mat.XRM(a, b, 10, 1)
    with pytest.raises(ValueError, match="different"):
        mat.XRM(a, a, 10, 2)
    xrm = mat.XRM(a, b, 10, 2)
    opt = torch.optim.SGD(xrm.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="sample_ids"):
        xrm.step(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), opt)
    with pytest.raises(ValueError, match="y has shape"):
        xrm.step(torch.randn(2, 3), torch.tensor([0, 1, 1]), torch.tensor([0, 1]), opt)


# -- phase 2: the shift --------------------------------------------------------------------------------
def _direct_shift(ho, y, T, K):
    P = np.exp(ho / T - (ho / T).max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    joint = np.zeros((K, K))
    for i in range(len(y)):
        joint[:, y[i]] += P[i]
    Q = np.where(joint.sum(1, keepdims=True) > 0, joint / np.maximum(joint.sum(1, keepdims=True), 1e-300), 0)
    return np.log(P @ Q + 1e-6)


@pytest.mark.parametrize("T", [0.1, 1.0, 3.0])
def test_shift_table_matches_direct_formula(T):
    N, K = 80, 4
    ho = torch.randn(N, K, dtype=torch.float64)
    y = torch.randint(0, K, (N,))
    got = mat.shift_table(ho, y, T)
    assert got.shape == (N, K) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _direct_shift(ho.numpy(), y.numpy(), T, K), rtol=1e-5, atol=1e-5)


def test_shift_table_with_absent_class_keeps_all_columns():
    N, K = 50, 4
    ho = torch.randn(N, K)
    y = torch.tensor([0, 1, 3] * 16 + [0, 1])  # class 2 absent
    got = mat.shift_table(ho, y, 0.5)
    assert got.shape == (N, K)
    assert torch.allclose(got[:, 2], torch.full((N,), math.log(1e-6)))
    np.testing.assert_allclose(got.numpy(), _direct_shift(ho.double().numpy(), y.numpy(), 0.5, K), rtol=1e-5,
                               atol=1e-5)
    # p(y | a) sums to one over y: exp(shift) sums to ~1 per row (up to the 1e-6 floors)
    torch.testing.assert_close(got.exp().sum(1), torch.full((N,), 1 + K * 1e-6), rtol=1e-5, atol=1e-5)


def test_shift_table_per_batch_matches_reference_style_per_minibatch_estimate():
    N, K, B = 64, 3, 16
    ho = torch.randn(N, K)
    y = torch.randint(0, K, (N,))
    got = mat.shift_table(ho, y, 0.1, per_batch=True, batch_size=B)
    for s in range(0, N, B):
        # the reference's estimate on one minibatch (all classes present here)
        hb, yb = ho[s:s + B], y[s:s + B]
        p = (hb / 0.1).softmax(1)
        joint = torch.stack([p[yb == c].sum(0) / len(yb) for c in range(K)], 1)
        expected = torch.log(p @ (joint / joint.sum(1, keepdim=True)) + 1e-6)
        torch.testing.assert_close(got[s:s + B], expected, rtol=1e-5, atol=1e-5)
    whole = mat.shift_table(ho, y, 0.1)
    assert not torch.allclose(got, whole)
    torch.testing.assert_close(mat.shift_table(ho[:B], y[:B], 0.1, per_batch=True), got[:B])


def test_argmax_shift_table_counts_and_temperature_limit():
    N, K = 200, 5
    ho = torch.randn(N, K) * 3
    y = torch.randint(0, K, (N,))
    table, attribute = mat.argmax_shift_table(ho, y)
    assert table.shape == (K, K) and torch.equal(attribute, ho.argmax(1))
    for a in range(K):
        sel = attribute == a
        q = torch.bincount(y[sel], minlength=K).float() / max(int(sel.sum()), 1)
        torch.testing.assert_close(table[a], torch.log(q + 1e-6))
    # temperature -> 0: the soft table becomes the gathered argmax table
    torch.testing.assert_close(mat.shift_table(ho, y, 1e-4), table[attribute], rtol=1e-4, atol=1e-4)


def test_shift_table_argument_checks():
    ho, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="temperature"):
        mat.shift_table(ho, y, 0.0)
    with pytest.raises(ValueError, match="labels"):
        mat.shift_table(ho, torch.tensor([0, 1, 3, 0, 1]))
    with pytest.raises(ValueError, match="labels"):
        mat.shift_table(ho, y[:4])
    bad = ho.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        mat.shift_table(bad, y)


# -- MATLoss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["table", "argmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mat_loss_equals_cross_entropy_of_shifted_logits(device, form, dtype):
    N, K, B = 40, 6, 12
    ho, y_all = torch.randn(N, K), torch.randint(0, K, (N,))
    if form == "table":
        shift = mat.shift_table(ho, y_all, 0.3)
        loss_fn = memfast.MATLoss(shift).to(device)
        rows = shift
        gather = lambda ids: rows[ids]  # noqa: E731
    else:
        am = mat.argmax_shift_table(ho, y_all)
        loss_fn = memfast.MATLoss(am).to(device)
        gather = lambda ids: am.table[am.attribute[ids]]  # noqa: E731
    ids = torch.randperm(N)[:B]
    logits = torch.randn(B, K, dtype=dtype, device=device, requires_grad=True)
    targets = y_all[ids].to(device)
    loss = loss_fn(logits, targets, ids.to(device))
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits + gather(ids).to(device, dtype), targets)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref, **tol)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, **tol)
    assert not loss_fn.shift.requires_grad


def test_mat_loss_with_tracker_tracks_shifted_loss():
    N, K = 30, 3
    ho, y = torch.randn(N, K), torch.randint(0, K, (N,))
    shift = mat.shift_table(ho, y, 0.2)
    tracker = memfast.SampleTracker(N)
    loss_fn = memfast.MATLoss(shift, tracker=tracker, reduction="none")
    ids = torch.arange(0, N, 2)
    logits = torch.randn(len(ids), K)
    per_sample = loss_fn(logits, y[ids], ids)
    torch.testing.assert_close(per_sample, F.cross_entropy(logits + shift[ids], y[ids], reduction="none"))
    tracker.end_epoch()
    csl = tracker.scores()["csl"]
    torch.testing.assert_close(csl[ids], per_sample, rtol=1e-5, atol=1e-6)
    assert (csl[1::2] == 0).all()


def test_mat_loss_argument_checks():
    with pytest.raises(ValueError, match="shift"):
        memfast.MATLoss(torch.randn(5))
    with pytest.raises(ValueError, match="attribute"):
        memfast.MATLoss(torch.randn(3, 3), torch.tensor([0, 3]))
    loss_fn = memfast.MATLoss(torch.randn(4, 2))
    with pytest.raises(IndexError):
        loss_fn(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([1, 4]))


# -- metrics on groups ---------------------------------------------------------------------------------
def test_group_metrics_on_inferred_groups():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    mistakes = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    groups = mat.InferredGroups(y, mistakes).groups
    pred = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1])
    direct = {}
    for g in groups.unique().tolist():
        sel = groups == g
        direct[g] = (pred[sel] == y[sel]).float().mean().item()
    assert group_accuracy(pred, y, groups) == pytest.approx(direct)
    assert worst_group_accuracy(pred, y, groups) == pytest.approx(min(direct.values()))
    assert direct == {0: pytest.approx(2 / 3), 1: 0.0, 2: 1.0, 3: 0.5}


# -- data sets -----------------------------------------------------------------------------------------
def test_spurious_features_follow_setup():
    d = spurious_features(500, 40, minority_fraction=0.1, noise_std=0.5, seed=3)
    assert d.x.shape == (500, 40) and d.x.dtype == torch.float32
    assert int(d.minority.sum()) == 50
    assert torch.equal(d.minority, d.attribute != d.y)
    s_y, s_a = (2 * d.y - 1).float(), (2 * d.attribute - 1).float()
    core, spur = d.x[:, 0] * s_y, d.x[:, 1] * s_a / 5
    assert abs(core.mean() - 1) < 0.03 and abs(core.std() - 0.12) < 0.02
    assert abs(spur.mean() - 1) < 0.03 and abs(spur.std() - 0.12) < 0.02
    assert abs(d.x[:, 2:].std() - 0.5) < 0.02
    assert torch.equal(d.groups, 2 * d.y + d.minority.long())
    test = spurious_features(500, 40, minority_fraction=0.5, noise_std=0.0, seed=4)
    assert int(test.minority.sum()) == 250 and (test.x[:, 2:] == 0).all()
    assert torch.equal(spurious_features(50, 5, seed=1).x, spurious_features(50, 5, seed=1).x)


def test_colored_digits_colour_agreement():
    pytest.importorskip("sklearn")  # (the digits; the GPU image may not have it)
    tr, te = colored_digits("train", seed=0), colored_digits("test", seed=0)
    assert tr.x.shape[1:] == (2, 8, 8) and len(tr) + len(te) == 1797
    assert int(tr.minority.sum()) == int(0.1 * len(tr)) and int(te.minority.sum()) == int(0.5 * len(te))
    # the digit is drawn in the channel named by the attribute, the other one is blank
    ink = tr.x.flatten(2).sum(2)
    assert torch.equal(ink.argmax(1), tr.attribute)
    assert (ink[torch.arange(len(tr)), 1 - tr.attribute] == 0).all()
    assert set(tr.y.unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="split"):
        colored_digits("val")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fuse", ["auto", "none"])
def test_xrm_on_cuda_matches_routing_and_flip_rule(fuse):
    N, D, K = 64, 5, 3
    a, b = _mlp(D, K, 1).cuda(), _mlp(D, K, 2).cuda()
    xrm = mat.XRM(a, b, N, K, fuse=fuse).cuda()
    x, y = torch.randn(N, D, device="cuda"), torch.randint(0, K, (N,), device="cuda")
    opt = torch.optim.SGD(xrm.parameters(), lr=0.5)
    for _ in range(5):
        xrm.step(x, y, torch.arange(N, device="cuda"), opt)
    assert xrm.flip_rate > 0
    ho = xrm.held_out_logits([(x, y, torch.arange(N, device="cuda"))])
    with torch.no_grad():
        torch.testing.assert_close(ho, torch.where(xrm.assignment[:, None], b(x), a(x)))
    shift = mat.shift_table(ho, y, 0.1)
    logits = torch.randn(N, K, device="cuda", requires_grad=True)
    loss = memfast.MATLoss(shift)(logits, y, torch.arange(N, device="cuda"))
    torch.testing.assert_close(loss, F.cross_entropy(logits + shift, y))


def test_xrm_under_a_float64_default_dtype():
    """torch.set_default_dtype(torch.float64) changes neither the twins' split for a seed nor the fp32
    held-out logits (they crashed: an fp64 NaN buffer filled with fp32 logits)."""
    N, D, K = 30, 4, 3
    a, b = _linear_twins(D, K)
    split = mat.XRM(a, b, N, K, seed=7).assignment.clone()
    x, y = torch.randn(N, D), torch.randint(0, K, (N,))
    want = mat.XRM(a, b, N, K, seed=7).held_out_logits(_loader(x, y))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        xrm = mat.XRM(a, b, N, K, seed=7)
        assert torch.equal(xrm.assignment, split)
        got = xrm.held_out_logits(_loader(x, y))
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_class_balanced_cross_entropy_in_float64():
    """fp64 logits: the 1/count class weights in fp64 too (fp32 ones were 5e-8 off)."""
    logits, y = torch.randn(7, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 2, 2, 0])
    want = sum(F.cross_entropy(logits[y == k], y[y == k]) for k in range(3))
    torch.testing.assert_close(mat.class_balanced_cross_entropy(logits, y), want, atol=1e-14, rtol=1e-14)


def test_xrm_names_bad_sample_ids_and_loaders():
    N, D, K = 8, 4, 3
    a, b = _linear_twins(D, K)
    xrm = mat.XRM(a, b, N, K)
    x, y = torch.randn(4, D), torch.randint(0, K, (4,))
    labels = xrm.labels.clone()
    with pytest.raises(IndexError, match=r"sample_ids must be in \[0, 8\), got values in \[5, 12\]"):
        xrm.step(x, y, torch.tensor([5, 6, 7, 12]), torch.optim.SGD(xrm.parameters(), lr=0.1))
    assert torch.equal(xrm.labels, labels)
    with pytest.raises(ValueError, match=r"got a dict with keys \['x', 'y', 'idx'\]"):
        xrm.held_out_logits([{"x": x, "y": y, "idx": torch.arange(4)}])


def test_xrm_scans_check_labels_and_skip_empty_batches():
    xrm = mat.XRM(nn.Linear(4, 3), nn.Linear(4, 3), 6, 3)
    with pytest.raises(IndexError, match=r"y must be in \[0, 3\)"):
        xrm.inferred_groups([(torch.randn(2, 4), torch.tensor([0, 9]), torch.tensor([0, 1]))])
    empty = (torch.randn(0, 4), torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    full = (torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.arange(6))
    assert not xrm.held_out_logits([empty, full]).isnan().any()
    with pytest.raises(ValueError, match="at least 2 classes"):
        mat.flip_probability(torch.ones(2, 1))
