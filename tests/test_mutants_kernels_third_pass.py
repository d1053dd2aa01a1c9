"""Tests from a third mutation-testing pass over the CPU kernels and shared headers (csrc/cpu, csrc/common;
2026-12-02): each fails on a plausible single-token kernel bug that the rest of the suite (including
test_mutants_kernels.py) let through -- rounding and underflow details, NaN detection in a loop's tail,
the sums' accumulation type, and op argument checks that no test reached."""
import math

import pytest
import torch

import memfast
from memfast import SampleTracker, _ops, reference
from memfast._stats import ROW

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")

def _fwd(x, y, **kw):
    """cross_entropy_fwd(x, y) with the op's defaults (reduction none, gradient on)."""
    a = dict(weight=None, ignore_index=-100, label_smoothing=0.0, adjustment=None, groups=None, compute_grad=True,
             reduction=0, lse_square_scale=0.0, softcap=0.0)
    a.update(kw)
    return torch.ops.memfast.cross_entropy_fwd(x, y, a["weight"], a["ignore_index"], a["label_smoothing"],
                                               a["adjustment"], a["groups"], a["compute_grad"], a["reduction"],
                                               a["lse_square_scale"], a["softcap"])


def _prob_fwd(x, t, reduction=0):
    return torch.ops.memfast.cross_entropy_prob_fwd(x, t, None, 0.0, None, None, True, reduction, 0.0, 0.0)


# ce_math.h fast_exp (the portable loops' fp32 exp): below -87 it flushes to 0; it must never return more
# than exp(x) there (clamping x to -87 but flushing only below -88 gives exp(-87), up to 2.7x too large).
# The AVX-512 exp16 returns the (subnormal) value itself; both are within 1% of it or 0.
def test_probabilities_just_below_the_fp32_exp_range_are_zero_or_exact(cpu_kernel):
    offsets = [-86.5, -87.1, -87.3, -87.5, -87.7, -87.95]
    x = torch.zeros(2, 40)
    x[:, 1:1 + len(offsets)] = torch.tensor(offsets)
    x[:, 10:] = -1e30
    y = torch.tensor([0, 0])
    _, _, g = _fwd(x, y)
    truth = torch.softmax(x.double(), dim=1)[:, 1:1 + len(offsets)]
    got = g[:, 1:1 + len(offsets)].double()
    ok = (got == 0) | ((got - truth).abs() <= 0.01 * truth)
    assert ok.all(), (got, truth)
    assert (got[:, 0] > 0).all()  # exp(-86.5) is a normal fp32 number: not flushed


# row_loops.h exp16 (AVX-512) and ce_math.h fast_exp: x = n ln2 + r with n rounded to NEAREST, so that
# |r| <= ln2 / 2, where the polynomial is good to ~1e-9; truncating n leaves r in (-ln2, 0], where it
# is off by up to 8.6e-7 (7 ulp) -- within the suite's fp32 tolerances, not within a few ulp.
def test_fp32_probabilities_are_accurate_to_a_few_ulp(cpu_kernel):
    x = torch.linspace(-30, 0, 4096).view(8, 512)
    y = torch.zeros(8, dtype=torch.long)
    _, _, g = _fwd(x, y)
    p = torch.softmax(x.double(), 1)[:, 1:]
    rel = (g[:, 1:].double() - p).abs() / p
    assert rel.max() < 4e-7, rel.max()


# row_loops.h narrow16 / store_grad: the forward's bf16 / fp16 gradient is the fp32 value rounded to
# nearest even (test_mutants_kernels checks the backward's rounding; this is the forward's own store,
# vector body and masked tail). Rounded toward zero, about half the entries would be one ulp off.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_gradient_is_rounded_to_nearest(cpu_kernel, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 53, generator=gen) * 3).to(dtype)
    y = torch.randint(0, 53, (64,), generator=gen)
    _, _, g = _fwd(x, y)
    want = (torch.softmax(x.double(), 1) - torch.nn.functional.one_hot(y, 53).double()).float().to(dtype)
    ulps = (g.float() - want.float()).abs() / (want.float().abs() * 2.0 ** -(10 if dtype == torch.float16 else 7))
    exact = (g == want).float().mean().item()
    assert exact > 0.97, exact
    assert (ulps[want != 0] <= 1.01).all()
    # written over the logits (cross_entropy_fwd_), row by row: the masked tail store must not touch
    # the next row's logits before they are read
    inplace = x.clone()
    torch.ops.memfast.cross_entropy_fwd_(inplace, y, None, -100, 0.0, None, None, 0, 0.0, 0.0)
    assert torch.equal(inplace.view(torch.int16), g.view(torch.int16))


# cross_entropy.cpp write_total: the mean's and the sum's loss add the row losses in double. An fp32
# sum drops every row loss under half an ulp of the running total: one row of loss 1e8 then 256 rows
# of log(50) = 3.9 loses all of them (1e3, 1e-5 relative).
@pytest.mark.parametrize("reduction", [1, 2])
def test_reduced_loss_sums_row_losses_in_double(reduction):
    R, C = 257, 50
    x = torch.zeros(R, C)
    x[0, 1] = 1e8  # row 0: the target (class 0) is 1e8 below the maximum
    y = torch.zeros(R, dtype=torch.long)
    rows, _, _ = _fwd(x, y, compute_grad=False)
    assert rows[0] == 1e8 and torch.allclose(rows[1:], torch.tensor(math.log(C)))
    total, _, _ = _fwd(x, y, compute_grad=False, reduction=reduction)
    want = rows.double().sum() / (R if reduction == 1 else 1)
    torch.testing.assert_close(total.double(), want, rtol=1e-7, atol=0)


# cross_entropy_prob.cpp lanes_any_nan: a row whose targets hold a NaN anywhere -- also the last entry
# of the loop's tail -- has no label (-100), so the tracker skips it.
@pytest.mark.parametrize("C", [3, 17, 35])
def test_nan_in_the_last_target_entry_leaves_the_row_unlabelled(cpu_kernel, C):
    x = torch.randn(3, C)
    t = torch.softmax(torch.randn(3, C), 1)
    t[0, C - 1] = math.nan
    t[1, C - 2] = math.nan
    _, _, label, _ = _prob_fwd(x, t)
    assert label[:2].tolist() == [-100, -100]
    assert label[2] == t[2].argmax()


# curvature.cpp reduce_word: d = g - g0 is formed in the op-math type, as the reference forms it, and
# only then widened to double. g = 1, g0 = 2^-25: fp32 rounds d to exactly 1 (a tie to even), so
# ||d||^2 over 128 elements is 128; subtracting in double gives 128 - 2^-17.
def test_curvature_reduce_forms_differences_in_the_op_math_type():
    g0 = torch.full((2, 128), 2.0 ** -25)
    grads = torch.ones(2, 128)
    out = torch.ops.memfast.curvature_reduce(grads, g0, 3, 0)
    want = reference.curvature_reduce(grads, g0, 3, 0)
    assert out[1].tolist() == [128.0, 128.0]
    assert torch.equal(out, want)


# curvature_checks.h check_sample_shape: the element blocks of one sample (ceil(D / 128)) are a 32-bit
# counter word. Empty batches make the boundary testable without the memory.
def test_curvature_refuses_samples_with_more_than_2_to_the_32_element_blocks():
    too_many = 128 * (2**32 - 1) + 1  # 2^32 blocks, the last one partial
    with pytest.raises(ValueError, match="too many elements per sample"):
        torch.ops.memfast.curvature_perturb(torch.empty(0, too_many), 0, 0, 1, 1e-3)
    with pytest.raises(ValueError, match="too many elements per sample"):
        torch.ops.memfast.curvature_reduce(torch.empty(0, too_many), torch.empty(0, too_many), 0, 0)
    ok = 128 * (2**32 - 1)
    assert torch.ops.memfast.curvature_perturb(torch.empty(0, ok), 0, 0, 1, 1e-3).shape == (0, ok)


# curvature_checks.h check_perturb_args: num_probes * batch rows must fit int64; the largest product
# that fits is accepted (empty samples: no memory).
def test_curvature_perturb_rows_must_fit_int64():
    B = 2**32 - 1
    x = torch.empty(B, 0)
    most = (2**63 - 1) // B  # 2^31
    assert torch.ops.memfast.curvature_perturb(x, 0, 0, most, 1e-3).shape == (most * B, 0)
    with pytest.raises(ValueError, match="do not fit a tensor"):
        torch.ops.memfast.curvature_perturb(x, 0, 0, most + 1, 1e-3)


# ce_math.h row_contribution: a row whose loss is NaN (a NaN logit) or -inf (track_ takes row statistics
# from any caller) is not finite: counted in nonfinite, not accumulated -- one NaN would poison csl.
def test_track_counts_nan_and_minus_inf_losses_as_nonfinite():
    t = SampleTracker(5, stats="all")
    x = torch.randn(2, 7)
    x[0, 3] = math.nan
    y = torch.tensor([1, 2])
    memfast.cross_entropy(x, y, sample_ids=torch.tensor([3, 4]), tracker=t, reduction="none")
    stats = torch.zeros(5, 3)
    stats[ROW["log_sum"]] = torch.tensor([-math.inf, 0.5, math.nan])
    stats[ROW["weight"]] = 1
    torch.ops.memfast.track_(t.state, t.counters, stats, torch.tensor([0, 0, 0]), torch.arange(3), -100, 2,
                             t._stat_rows)
    assert t.stat("nonfinite").tolist() == [1, 0, 1, 1, 0]
    assert t.stat("count").tolist() == [0, 1, 0, 0, 1]
    assert torch.isfinite(t.state).all()


# track.cpp: a tracker that keeps only last_update (the op takes any stat_rows) still records the call.
def test_track_records_last_update_alone():
    n = len(SampleTracker(2, stats="all")._stat_rows)
    stat_rows = [-1] * n
    from memfast._stats import KERNEL_STATS
    stat_rows[KERNEL_STATS.index("last_update")] = 0
    state, counters = torch.zeros(1, 4), torch.zeros(4, dtype=torch.long)
    x = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    _, stats, _ = _fwd(x, y, compute_grad=False)
    for _ in range(2):
        torch.ops.memfast.track_(state, counters, stats, y, torch.tensor([1, 3]), -100, 3, stat_rows)
    assert state[0].tolist() == [0, 2, 0, 2]


# checks.h / curvature_checks.h / cross_entropy.cpp: argument checks of the ops that no other test
# reaches (the Python API converts or checks these first; direct op calls, as traced code makes, do not).
def test_cross_entropy_op_refuses_bad_target_and_groups():
    op = torch.ops.memfast
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="target must be 1-D with one entry per row"):
        _fwd(x, y[:3])
    with pytest.raises(ValueError, match="target must be 1-D with one entry per row"):
        _fwd(x, y.view(2, 2))
    with pytest.raises(ValueError, match="target must be int64"):
        _fwd(x, y.int())
    with pytest.raises(ValueError, match="target must be contiguous"):
        _fwd(x, torch.tensor([0, 9, 1, 9, 2, 9, 3, 9])[::2])
    table = torch.zeros(2, 5)
    for bad in [torch.tensor([0, 1, 1, 0], dtype=torch.int32), torch.tensor([0, 1, 1]),
                torch.tensor([0, 9, 1, 9, 1, 9, 0, 9])[::2]]:
        with pytest.raises(ValueError, match="groups must be a contiguous int64 vector"):
            _fwd(x, y, adjustment=table, groups=bad)
    _fwd(x, y, adjustment=table, groups=torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="groups must be a contiguous int64 vector"):
        op.cross_entropy_prob_fwd(x, torch.rand(4, 5), None, 0.0, table, torch.tensor([0, 1, 1]), True, 0, 0.0, 0.0)


def test_backward_ops_refuse_bad_gradient_and_grad_loss():
    op = torch.ops.memfast
    g = torch.randn(4, 5)
    with pytest.raises(ValueError, match="the saved gradient is missing"):
        op.cross_entropy_bwd(torch.randn(5), torch.ones(()))
    for bad in [torch.ones(3), torch.ones(4, dtype=torch.float64), torch.ones(4, 1)]:
        with pytest.raises(ValueError, match="grad_loss must be a Float scalar or vector of 4 entries"):
            op.cross_entropy_bwd(g, bad)
        with pytest.raises(ValueError, match="grad_loss must be a Float scalar or vector of 4 entries"):
            op.cross_entropy_bwd_(g.clone(), bad)
    strided = torch.randn(5, 4).t()
    with pytest.raises(ValueError, match="the saved gradient must be contiguous"):
        op.cross_entropy_bwd_(strided, torch.ones(4))
    # out of place, a strided gradient is fine
    torch.testing.assert_close(op.cross_entropy_bwd(strided, torch.full((4,), 2.0)), strided * 2)


def test_track_op_refuses_bad_stat_rows_target_and_ids():
    t = SampleTracker(6, stats="all")
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 1, 2])
    _, stats, _ = _fwd(x, y, compute_grad=False)
    state, counters = t.state.clone(), t.counters.clone()
    bad = [
        ("stat_rows must have", dict(stat_rows=t._stat_rows[:-1])),
        ("target must be a contiguous int64 vector", dict(target=y.int())),
        ("target must be a contiguous int64 vector", dict(target=torch.tensor([0, 9, 1, 9, 1, 9, 2, 9])[::2])),
        ("sample_ids must be a contiguous int64 vector", dict(ids=torch.arange(4, dtype=torch.int32))),
        ("sample_ids must be a contiguous int64 vector", dict(ids=torch.arange(4).view(2, 2))),
    ]
    for match, kw in bad:
        with pytest.raises(ValueError, match=match):
            torch.ops.memfast.track_(t.state, t.counters, stats, kw.get("target", y), kw.get("ids", torch.arange(4)),
                                     -100, 5, kw.get("stat_rows", t._stat_rows))
        assert torch.equal(t.state, state) and torch.equal(t.counters, counters)


def test_curvature_ops_refuse_0d_and_integer_inputs():
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        torch.ops.memfast.curvature_perturb(torch.tensor(1.0), 0, 0, 1, 1e-3)
    with pytest.raises(ValueError, match="g0 must have a batch dimension"):
        torch.ops.memfast.curvature_reduce(torch.tensor(1.0), torch.tensor(1.0), 0, 0)
    with pytest.raises(ValueError, match="g0 must be floating point"):
        torch.ops.memfast.curvature_reduce(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 0, 0)


# ce_math.h row_contribution: with no competitor (C == 1, or every other class masked to -inf) the
# margin is 0, not z_y - (-inf) = inf (which would make the AUM sum infinite).
def test_margin_without_a_competitor_is_zero():
    t = SampleTracker(3, stats="all")
    memfast.cross_entropy(torch.randn(2, 1), torch.tensor([0, 0]), sample_ids=torch.tensor([0, 1]), tracker=t,
                          reduction="none")
    x = torch.full((1, 6), -math.inf)
    x[0, 4] = 1.5
    memfast.cross_entropy(x, torch.tensor([4]), sample_ids=torch.tensor([2]), tracker=t, reduction="none")
    assert t.stat("margin").tolist() == [0, 0, 0]
    assert t.stat("count").tolist() == [1, 1, 1] and t.stat("nonfinite").tolist() == [0, 0, 0]


# track.cpp: an empty batch still counts a tracker call (counters[calls], which last_update records),
# also when traced code calls the op itself with no rows.
def test_track_op_counts_a_call_for_an_empty_batch():
    from memfast._stats import COUNTER
    t = SampleTracker(3, stats="all")
    empty = torch.empty(0, dtype=torch.long)
    torch.ops.memfast.track_(t.state, t.counters, torch.zeros(5, 0), empty, empty, -100, 4, t._stat_rows)
    assert t.counters[COUNTER["calls"]] == 1
    _, stats, _ = _fwd(torch.randn(1, 4), torch.tensor([2]), compute_grad=False)
    torch.ops.memfast.track_(t.state, t.counters, stats, torch.tensor([2]), torch.tensor([1]), -100, 4, t._stat_rows)
    assert t.counters[COUNTER["calls"]] == 2 and t.stat("last_update")[1] == 2


# checks.h check_common_forward_args: the kernels index the weight and each adjustment row as dense
# [C] arrays, so a strided weight or an adjustment whose class dimension is strided is refused (the
# Python API makes them contiguous first; a direct op call would otherwise read the wrong classes).
def test_forward_ops_refuse_strided_weight_and_adjustment_classes():
    op = torch.ops.memfast
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    t = torch.rand(4, 5)
    w = torch.rand(10)[::2]
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        _fwd(x, y, weight=w)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        op.cross_entropy_prob_fwd(x, t, w, 0.0, None, None, True, 0, 0.0, 0.0)
    adj = torch.randn(4, 10)[:, ::2]
    with pytest.raises(ValueError, match="adjustment must be a Float"):
        _fwd(x, y, adjustment=adj)
    with pytest.raises(ValueError, match="adjustment must be a Float"):
        op.cross_entropy_prob_fwd(x, t, None, 0.0, adj, None, True, 0, 0.0, 0.0)
    # rows may be strided
    rows = torch.randn(8, 5)[::2]
    torch.testing.assert_close(_fwd(x, y, weight=w.contiguous(), adjustment=rows)[0],
                               _fwd(x, y, weight=w.contiguous(), adjustment=rows.contiguous())[0], atol=0, rtol=0)
