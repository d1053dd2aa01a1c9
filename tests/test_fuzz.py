"""Property tests: the compiled kernels against the reference on random shapes,
dtypes, options, adjustments and repeated / per-sequence ids."""
import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memfast import SampleTracker, _ops, reference
from memfast._stats import ROW

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def cases(draw):
    R = draw(st.integers(0, 24))
    C = draw(st.integers(1, 70))
    return dict(
        R=R, C=C,
        dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.sampled_from([1e-3, 1.0, 10.0, 300.0])),
        offset=draw(st.sampled_from([0.0, 0.0, 1e4, -3e4])),  # logits far from zero (fp16 holds 3e4)
        weighted=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0])),
        ignore_frac=draw(st.sampled_from([0.0, 0.2, 1.0])),
        adjustment=draw(st.sampled_from(["none", "dense", "vector", "table"])),
        rows_per_id=draw(st.sampled_from([1, 1, 2, 3])),
        num_samples=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
        reduction=draw(st.sampled_from([0, 1, 2])),
        kernel=draw(st.sampled_from(["default", "generic"])),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 30.0])),
    )


def make_adjustment(form, R, C, acc, g):
    """(adjustment, groups) of a form: none, dense [R, C], vector ([C] expanded), table [3, C]."""
    if form == "dense":
        return torch.randn(R, C, generator=g, dtype=acc), None
    if form == "vector":
        return torch.randn(C, generator=g, dtype=acc).expand(R, C), None
    if form == "table":
        return torch.randn(3, C, generator=g, dtype=acc), torch.randint(0, 3, (R,), generator=g)
    return None, None


def run_both(op, args, case):
    """The compiled op (in the case's CPU kernel mode) and its reference twin on the same arguments,
    and the tolerance to compare them at."""
    with _cpu_kernel(case["kernel"]):
        got = getattr(torch.ops.memfast, op)(*args)
    want = getattr(reference, op)(*args)
    exact = args[0].dtype == torch.float64
    tol = dict(atol=1e-9, rtol=1e-9) if exact else dict(atol=2e-4 * max(1.0, case["scale"]), rtol=2e-4)
    return got, want, tol


def assert_row_stats_close(got, want, softcap, tol):
    """Row statistics, kernel against reference. Under a softcap large logits saturate at +-cap,
    where the kernels' tanh and torch.tanh may differ by an ulp: a target within a few ulps of the
    largest other logit is a tie whose winner is rounding, so its correctness is not compared."""
    got = got.clone()
    if softcap:
        z_y = want[ROW["target_logit"]]
        ulps = 4 * torch.finfo(want.dtype).eps * z_y.abs()
        saturated = z_y.abs() >= 0.99 * softcap  # (within 1% of the cap: tanh's last bits decide)
        near = saturated & ((z_y - want[ROW["max_other"]]).abs() <= ulps)
        got[ROW["correct"], near] = want[ROW["correct"], near]
    torch.testing.assert_close(got, want, **tol, equal_nan=True)


@contextlib.contextmanager
def _cpu_kernel(name):
    """MEMFAST_CPU_KERNEL=generic: the portable loops where the build also has AVX-512 ones."""
    old = os.environ.get("MEMFAST_CPU_KERNEL")
    os.environ["MEMFAST_CPU_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["MEMFAST_CPU_KERNEL"]
        else:
            os.environ["MEMFAST_CPU_KERNEL"] = old


SATURATED_TIE = dict(R=11, C=70, dtype=torch.float32, scale=300.0, offset=0.0, weighted=False, eps=0.0, ignore_frac=0.0,
                     adjustment="none", rows_per_id=1, num_samples=1, seed=330519234, reduction=0, kernel="default",
                     softcap=30.0)  # found by hypothesis: the kernels' tanh and torch.tanh round one logit apart


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(SATURATED_TIE)
def test_kernels_match_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    R, C, dtype = case["R"], case["C"], case["dtype"]
    if R % case["rows_per_id"]:
        R -= R % case["rows_per_id"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(R, C, generator=g) * case["scale"] + case["offset"]).to(dtype)
    target = torch.randint(0, C, (R,), generator=g)
    target[torch.rand(R, generator=g) < case["ignore_frac"]] = -100
    weight = torch.rand(C, generator=g, dtype=acc) + 0.1 if case["weighted"] else None
    adjustment, groups = make_adjustment(case["adjustment"], R, C, acc, g)
    args = (logits, target, weight, -100, case["eps"], adjustment, groups, True, case["reduction"], 0.0,
            case["softcap"])
    got, want, tol = run_both("cross_entropy_fwd", args, case)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)  # the mean over no rows is NaN
    # row stats: the target logit and max are exact; log_sum to tolerance
    assert_row_stats_close(got[1], want[1], case["softcap"], tol)
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[2].double(), want[2].double(), **gtol)

    n_ids = R // case["rows_per_id"]
    ids = torch.randint(0, case["num_samples"], (n_ids,), generator=g)
    trackers = [SampleTracker(case["num_samples"], stats="all") for _ in range(2)]
    for t, track in zip(trackers, (torch.ops.memfast.track_, reference.track_)):
        track(t.state, t.counters, want[1], target, ids, -100, C, t._stat_rows)
    torch.testing.assert_close(trackers[0].state, trackers[1].state, atol=1e-4, rtol=1e-4)
    assert torch.equal(trackers[0].counters, trackers[1].counters)


@st.composite
def api_cases(draw):
    return dict(
        shape=draw(st.sampled_from(["rows", "spatial", "unbatched"])),
        R=draw(st.integers(0, 12)), C=draw(st.integers(1, 9)), d=draw(st.integers(1, 3)),
        weighted=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 0.1, 1.0])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        inplace=draw(st.booleans()),
        tracked=draw(st.booleans()),
        probabilities=draw(st.booleans()),
        z_loss=draw(st.sampled_from([0.0, 0.05])),
        softcap=draw(st.sampled_from([None, None, 1.5])),
        offset=draw(st.sampled_from([0.0, 0.0, 0.0, 1e6, -1e8])),  # one sign, far from zero
        adjustment=draw(st.sampled_from(["none", "dense", "vector", "table"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api_cases())
def test_api_matches_pytorch(case):
    """memfast.cross_entropy end to end (the C++ eager autograd Function, inplace_backward, the
    tracker call, class-probability targets) against F.cross_entropy in float64: loss and input gradient."""
    import torch.nn.functional as F

    import memfast

    g = torch.Generator().manual_seed(case["seed"])
    R, C, d = case["R"], case["C"], case["d"]
    shape, tshape = {"rows": ((R, C), (R,)), "spatial": ((R, C, d), (R, d)), "unbatched": ((C,), ())}[case["shape"]]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) + case["offset"]).requires_grad_(True)
    target = torch.randint(0, C, tshape, generator=g)
    ignored = torch.rand(tshape, generator=g) < case["ignore_frac"]
    target[ignored] = -100
    if case["probabilities"]:  # class probabilities; an ignored row has no mass
        class_dim = 0 if x.dim() == 1 else 1
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, class_dim)
        target = target * (~ignored).unsqueeze(class_dim)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if case["weighted"] else None
    kw = dict(weight=weight, label_smoothing=case["eps"], reduction=case["reduction"])
    upstream = torch.rand(tshape, generator=g, dtype=torch.float64) if case["reduction"] == "none" else None
    extra = {}
    if case["tracked"] and tshape:
        extra = dict(sample_ids=torch.arange(tshape[0]), tracker=SampleTracker(max(1, tshape[0])))
    shift = None  # what memfast adds to the logits, in the input's shape
    if case["adjustment"] == "dense":
        extra["adjustment"] = shift = torch.randn(*shape, generator=g, dtype=torch.float64)
    elif case["adjustment"] == "vector":
        extra["adjustment"] = torch.randn(C, generator=g, dtype=torch.float64)
        shift = extra["adjustment"].reshape((C,) + (1,) * (x.dim() - 2) if x.dim() > 1 else (C,))
    elif case["adjustment"] == "table":
        table, groups = torch.randn(3, C, generator=g, dtype=torch.float64), torch.randint(0, 3, tshape, generator=g)
        extra.update(adjustment=table, groups=groups)
        shift = table[groups].movedim(-1, 1) if x.dim() > 2 else table[groups]
    logits = x * 1.0  # a non-leaf, as a model's output (inplace_backward refuses leaves)
    zeta = case["z_loss"]
    got = memfast.cross_entropy(logits, target, inplace_backward=case["inplace"], lse_square_scale=zeta,
                                softcap=case["softcap"], **kw, **extra)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    z = x if case["softcap"] is None else case["softcap"] * torch.tanh(x / case["softcap"])
    z = z if shift is None else z + shift
    want = F.cross_entropy(z, target, **kw)
    if zeta:  # zeta * w_y * lse^2 per counted row (unweighted for probabilities), reduced like the loss
        # logsumexp's backward forms exp(z - lse) with lse rounded to ulp(lse); shifted by the
        # (detached) max it is exact, as memfast's p = exp(z - m) / sum, at offsets of 1e8 too
        class_dim = 0 if z.dim() == 1 else 1
        m = z.detach().amax(class_dim, keepdim=True)
        lse = (m + torch.logsumexp(z - m, class_dim, keepdim=True)).squeeze(class_dim)
        w_y = (~ignored).double()
        if weight is not None and not case["probabilities"]:
            w_y = w_y * weight[target.clamp(min=0)]
        per_row = zeta * w_y * lse * lse
        den = w_y.sum() if not case["probabilities"] else per_row.new_tensor(float(per_row.numel()))
        mean = per_row.sum() / torch.where(den > 0, den, 1.0)  # no rows: F's NaN mean stays, its gradient 0
        want = want + {"none": per_row, "sum": per_row.sum(), "mean": mean}[case["reduction"]]
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, equal_nan=True)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=1e-10, equal_nan=True)
    if "tracker" in extra:
        valid = ~ignored  # one sample per leading index: its rows that are not ignored
        counted = valid.flatten(1).sum(1) if valid.dim() > 1 else valid.long()
        torch.testing.assert_close(extra["tracker"].stat("count")[:tshape[0]], counted.float())


@st.composite
def probability_cases(draw):
    return dict(
        R=draw(st.integers(0, 20)), C=draw(st.integers(1, 70)),
        dtype=draw(st.sampled_from(DTYPES)),
        target_in_acc=draw(st.booleans()),
        scale=draw(st.sampled_from([1e-3, 1.0, 10.0, 300.0])),
        sharpness=draw(st.sampled_from([0.1, 1.0, 10.0])),  # flat targets, soft ones, near one-hot
        empty_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ties=draw(st.booleans()),
        weighted=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        adjustment=draw(st.sampled_from(["none", "dense", "vector", "table"])),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 30.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-2])),
        reduction=draw(st.sampled_from([0, 1, 2])),
        kernel=draw(st.sampled_from(["default", "generic"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(probability_cases())
def test_probability_kernel_matches_reference(case):
    """cross_entropy_prob_fwd against its reference twin: loss, row statistics, the tracked label
    (ties, rows without mass) and the gradient."""
    g = torch.Generator().manual_seed(case["seed"])
    R, C, dtype = case["R"], case["C"], case["dtype"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(R, C, generator=g) * case["scale"]).to(dtype)
    target = torch.softmax(torch.randn(R, C, generator=g, dtype=torch.float64) * case["sharpness"], 1)
    if case["ties"] and C > 1:
        target[:, 1] = target[:, 0]
    target[torch.rand(R, generator=g) < case["empty_frac"]] = 0
    target = target.to(acc if case["target_in_acc"] else dtype)
    weight = torch.rand(C, generator=g, dtype=acc) + 0.1 if case["weighted"] else None
    adjustment, groups = make_adjustment(case["adjustment"], R, C, acc, g)
    args = (logits, target, weight, case["eps"], adjustment, groups, True, case["reduction"], case["z_loss"],
            case["softcap"])
    got, want, tol = run_both("cross_entropy_prob_fwd", args, case)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    assert_row_stats_close(got[1], want[1], case["softcap"], tol)
    assert torch.equal(got[2], want[2])
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[3].double(), want[3].double(), **gtol)
