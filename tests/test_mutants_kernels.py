"""Tests from a mutation-testing pass over the CPU kernels (csrc/cpu, csrc/common; 2026-12-02): each
fails on a plausible kernel bug that the rest of the suite let through (exact zeros, ties, checks)."""
import math

import pytest
import torch

import memfast
from memfast import SampleTracker, _ops, reference

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")


def _fwd(*args):
    """The compiled op and the reference on the same arguments."""
    return torch.ops.memfast.cross_entropy_fwd(*args), reference.cross_entropy_fwd(*args)


# ce_math.h row_contribution: a row whose target logit is -inf (a masked target class) has loss +inf;
# it must count as non-finite, not be added to the sums.
def test_masked_target_row_is_nonfinite_not_accumulated():
    t = SampleTracker(4, stats="all")
    x = torch.randn(3, 5)
    y = torch.tensor([1, 2, 3])
    x[0, 1] = -math.inf  # target masked: lse finite, nll = +inf
    memfast.cross_entropy(x, y, sample_ids=torch.tensor([0, 1, 2]), tracker=t, reduction="none")
    assert t.stat("nonfinite").tolist() == [1, 0, 0, 0]
    assert t.stat("count").tolist() == [0, 1, 1, 0]
    assert torch.isfinite(t.stat("csl")).all() and torch.isfinite(t.stat("loss_sq")).all()
    assert t.stat("csl")[0] == 0 and t.stat("last_loss")[0] == 0


# ce_math.h grad_coefficients: a mean over rows that all weigh 0 divides by 0; the rows contribute
# nothing, so their gradient is 0 (the reference's), not 0 * inf = NaN.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeta", [0.0, 1e-3])
def test_mean_over_zero_weight_rows_has_zero_gradient(dtype, zeta):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(6, 19, dtype=dtype)
    w = torch.ones(19, dtype=acc)
    w[[0, 4]] = 0
    y = torch.tensor([0, 4, 0, 4, 0, 4])
    got, want = _fwd(x, y, w, -100, 0.0, None, None, True, 1, zeta, 0.0)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert torch.equal(want[2], torch.zeros_like(want[2]))
    torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)


# ce_math.h fast_exp (the portable loops' exp) and row_loops.h exp16 (AVX-512): exp of -inf (a masked
# class) and of anything below the fp32 range, down to finfo.min, is exactly 0, so masked classes
# get exactly zero probability and gradient (and the loss stays finite).
@pytest.mark.parametrize("kernel", ["default", "generic"])
def test_masked_classes_get_exactly_zero_gradient(monkeypatch, kernel):
    if kernel == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    x = torch.randn(5, 37)
    x[:, 5:30] = -math.inf  # masked (padded vocabulary)
    x[:, 0] = 60.0  # and classes far below the maximum: exp(-60 - 1) is still a normal fp32 number
    x[:, 31] = -90.0  # exp(-150) is below fp32's range: 0
    x[:, 32] = -1e30  # finite mask values (masked_fill(-1e30), finfo.min as in HF): exp 0, not NaN
    x[:, 33] = torch.finfo(torch.float32).min
    y = torch.tensor([0, 1, 2, 3, 4])
    loss, _, g = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 0, 0.0, 0.0)
    assert torch.equal(g[:, 5:30], torch.zeros(5, 25))
    assert torch.equal(g[:, 31:34], torch.zeros(5, 3))
    want = reference.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 0, 0.0, 0.0)
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(g, want[2], atol=1e-30, rtol=1e-5)


# row_loops.h to_storage: the backward's bf16 / fp16 rounding of g * grad_loss (formed in fp32) is
# round-to-nearest-even, bit for bit what torch's .to() gives (ties are common: a bf16 times a
# power of two or a short fp32 scale lands exactly halfway).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_rounds_to_nearest_even_bitwise(dtype, inplace):
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(64, 37, generator=g) * 1e-2).to(dtype)
    grad[:, 3] = 0
    grad_loss = torch.randn(64, generator=g)
    grad_loss[:8] = torch.tensor([1.5, 0.75, 3.0, 1.25, -1.5, 2.5, 1.0078125, 0.5])  # many exact ties
    grad_loss[8] = math.inf  # zeros (ignored rows, column 3) stay zero even then
    grad_loss[9] = 1.0  # out of place: a factor of 1 still writes the row
    want = reference.cross_entropy_bwd(grad, grad_loss)
    if inplace:
        got = grad.clone()
        torch.ops.memfast.cross_entropy_bwd_(got, grad_loss)
    else:
        got = torch.ops.memfast.cross_entropy_bwd(grad, grad_loss)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(got[:, 3], torch.zeros(64, dtype=dtype))


# cross_entropy.cpp ROW_CORRECT: correct means argmax (the first maximal index) == target, also on
# ties and on a row that is all -inf (argmax 0); the tracker's accuracy and forgetting read it.
@pytest.mark.parametrize("kernel", ["default", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_correctness_is_argmax_with_first_index_ties(monkeypatch, kernel, dtype):
    if kernel == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    inf = math.inf
    C = 21  # a vector body and a tail
    rows, y = [], []
    for tgt, tie_at in [(1, (1, 2)), (2, (1, 2)), (0, (0, 20)), (20, (0, 20)), (17, (16, 17)), (16, (16, 17))]:
        r = torch.zeros(C)
        r[list(tie_at)] = 3.0
        rows.append(r)
        y.append(tgt)
    rows += [torch.full((C,), -inf), torch.full((C,), -inf)]
    y += [0, 5]
    x = torch.stack(rows).to(dtype)
    yt = torch.tensor(y)
    got, want = _fwd(x, yt, None, -100, 0.0, None, None, False, 0, 0.0, 0.0)
    from memfast._stats import ROW
    assert got[1][ROW["correct"]].tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    assert torch.equal(got[1][ROW["correct"]], want[1][ROW["correct"]])
    # C == 1: the only class is the argmax
    one = torch.ops.memfast.cross_entropy_fwd(torch.randn(3, 1).to(dtype), torch.zeros(3, dtype=torch.long), None,
                                              -100, 0.0, None, None, False, 0, 0.0, 0.0)
    assert one[1][ROW["correct"]].tolist() == [1, 1, 1]


# checks.h / track.cpp: the ops' own bound checks, at the exact boundary (the Python API checks
# some of these first, so only a direct op call reaches the kernels' checks).
@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_ops_refuse_indices_just_out_of_range(ns):
    op = getattr(torch.ops, ns)
    C = 5
    x = torch.randn(4, C)
    with pytest.raises(IndexError, match="target"):
        op.cross_entropy_fwd(x, torch.tensor([0, C, 1, 2]), None, -100, 0.0, None, None, True, 1, 0.0, 0.0)
    with pytest.raises(IndexError, match="groups"):
        op.cross_entropy_fwd(x, torch.tensor([0, 1, 1, 2]), None, -100, 0.0, torch.zeros(2, C),
                             torch.tensor([0, 1, 2, 0]), True, 1, 0.0, 0.0)
    with pytest.raises(IndexError, match="groups"):
        op.cross_entropy_prob_fwd(x, torch.rand(4, C), None, 0.0, torch.zeros(2, C), torch.tensor([0, 1, 2, 0]),
                                  True, 1, 0.0, 0.0)
    t = SampleTracker(6, stats="all")
    _, row_stats, _ = op.cross_entropy_fwd(x, torch.tensor([0, 1, 1, 2]), None, -100, 0.0, None, None, False, 0,
                                           0.0, 0.0)
    y = torch.tensor([0, 1, 1, 2])
    state, counters = t.state.clone(), t.counters.clone()
    bad = [
        (IndexError, "sample_ids", dict(ids=torch.tensor([0, 1, 6, 2]))),  # == num_samples
        (IndexError, "target", dict(target=torch.tensor([0, C, 1, 2]))),  # == num_classes
        (ValueError, "sample_ids", dict(ids=torch.tensor([0, 1, 2]))),  # 3 ids do not divide 4 rows
        (ValueError, "stat_rows", dict(stat_rows=[t.state.shape[0]] + t._stat_rows[1:])),  # == number of rows
    ]
    for exc, match, kw in bad:
        with pytest.raises(exc, match=match):
            op.track_(t.state, t.counters, row_stats, kw.get("target", y), kw.get("ids", torch.arange(4)), -100, C,
                      kw.get("stat_rows", t._stat_rows))
        assert torch.equal(t.state, state) and torch.equal(t.counters, counters)
    # the largest valid values are accepted
    op.track_(t.state, t.counters, row_stats, torch.tensor([0, C - 1, 1, 2]), torch.tensor([0, 5]), -100, C,
              t._stat_rows)
    assert t.stat("count")[[0, 5]].tolist() == [2, 2]


# curvature_checks.h: probes [probe_offset, probe_offset + num_probes) may end exactly at 2^32.
@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_curvature_probe_range_ends_at_two_to_the_32(ns):
    op = getattr(torch.ops, ns)
    x = torch.randn(3, 200)
    last = 2**32 - 1
    out = op.curvature_perturb(x, 7, last, 1, 1e-3)
    want = reference.curvature_perturb(x, 7, last, 1, 1e-3)
    assert torch.equal(out, want)
    red = op.curvature_reduce(out, x, 7, last)
    torch.testing.assert_close(red, reference.curvature_reduce(out, x, 7, last))
    with pytest.raises(ValueError, match="probe_offset"):
        op.curvature_perturb(x, 7, last, 2, 1e-3)
    with pytest.raises(ValueError, match="probe_offset"):
        op.curvature_reduce(torch.cat([out, out]), x, 7, last)


def test_curvature_refuses_two_to_the_32_samples():
    # the sample index is a 32-bit counter word; empty samples make the check testable without the memory
    with pytest.raises(ValueError, match="fewer than 2\\^32 samples per call, got 4294967296"):
        torch.ops.memfast.curvature_perturb(torch.empty(2**32, 0), 0, 0, 1, 1e-3)
    torch.ops.memfast.curvature_perturb(torch.empty(2**32 - 1, 0), 0, 0, 1, 1e-3)


# A second pass: the ops' own argument checks (memfast.cross_entropy and SampleTracker check or convert
# their arguments in Python first, so only direct calls of torch.ops.memfast.*, as traced code makes, reach them).
NS = ["memfast", "memfast_ref"]


def _args(x, y, weight=None, label_smoothing=0.0, softcap=0.0):
    return (x, y, weight, -100, label_smoothing, None, None, True, 1, 0.0, softcap)


def _prob_args(x, t, weight=None, label_smoothing=0.0, softcap=0.0):
    return (x, t, weight, label_smoothing, None, None, True, 1, 0.0, softcap)


# checks.h check_ce_args: the weight must be in the logits' accumulation dtype, refused up front with
# the op's ValueError (without the check, the kernel's typed const_data_ptr<acc_t>() fails later with
# an unrelated RuntimeError, "expected scalar type ..."). memfast.cross_entropy converts the weight first.
@pytest.mark.parametrize("ns", NS)
@pytest.mark.parametrize("dtype,bad", [(torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16),
                                       (torch.float64, torch.float32)])
def test_ops_refuse_weight_of_the_wrong_dtype(ns, dtype, bad):
    op = getattr(torch.ops, ns)
    x = torch.randn(4, 5, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="weight"):
        op.cross_entropy_fwd(*_args(x, y, weight=torch.ones(5, dtype=bad)))
    with pytest.raises(ValueError, match="weight"):
        op.cross_entropy_fwd_(x.clone(), y, torch.ones(5, dtype=bad), -100, 0.0, None, None, 1, 0.0, 0.0)
    with pytest.raises(ValueError, match="weight"):
        op.cross_entropy_prob_fwd(*_prob_args(x, torch.rand(4, 5, dtype=dtype), weight=torch.ones(5, dtype=bad)))
    # the accumulation dtype is accepted
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    op.cross_entropy_fwd(*_args(x, y, weight=torch.ones(5, dtype=acc)))


# checks.h check_ce_args: label_smoothing in [0, 1], both ends included.
@pytest.mark.parametrize("ns", NS)
def test_ops_refuse_label_smoothing_outside_zero_one(ns):
    op = getattr(torch.ops, ns)
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    for ls in [-0.1, -1e-12, 1.0 + 1e-9]:
        with pytest.raises(ValueError, match="label_smoothing"):
            op.cross_entropy_fwd(*_args(x, y, label_smoothing=ls))
        with pytest.raises(ValueError, match="label_smoothing"):
            op.cross_entropy_prob_fwd(*_prob_args(x, torch.rand(4, 5), label_smoothing=ls))
    for ls in [0.0, 1.0]:
        op.cross_entropy_fwd(*_args(x, y, label_smoothing=ls))



# cross_entropy.cpp forward_rows: rows may be strided (only the class dimension must be dense), so
# row r starts at r * stride(0), not r * C: a slice of wider logits ([:, :C], or every other row).
# memfast.cross_entropy passes such views through, e.g. the logits of a sliced vocabulary.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["default", "generic"])
def test_row_strided_logits_match_contiguous(monkeypatch, dtype, kernel):
    if kernel == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    C = 21
    wide = torch.randn(6, C + 11, dtype=dtype)
    y = torch.tensor([0, 3, 20, 7, 7, 1])
    for x in [wide[:, :C], wide[:, 5:5 + C], torch.randn(12, C, dtype=dtype)[::2]]:
        assert x.stride(0) != C and x.stride(1) == 1
        got = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.1, None, None, True, 0, 0.0, 0.0)
        want = torch.ops.memfast.cross_entropy_fwd(x.contiguous(), y, None, -100, 0.1, None, None, True, 0, 0.0, 0.0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        torch.testing.assert_close(got[0], torch.nn.functional.cross_entropy(x, y, reduction="none",
                                                                             label_smoothing=0.1))
