"""Every kind of bad input: a clear exception naming the argument (or the
documented behaviour), and the tracker unchanged afterwards."""
import math

import pytest
import torch

import memfast
from memfast import SampleTracker


@pytest.fixture
def tracker():
    t = SampleTracker(10, stats="all")
    t.update(torch.randn(4, 3), torch.randint(0, 3, (4,)), torch.arange(4))
    return t


def _unchanged(t, before):
    state, counters = before
    assert torch.equal(t.state, state) and torch.equal(t.counters, counters)


def _snapshot(t):
    return t.state.clone(), t.counters.clone()


BAD_CALLS = [
    # (description, kwargs builder, exception, message fragment)
    ("integer logits", lambda: dict(input=torch.randint(0, 3, (4, 3))), TypeError, "input"),
    ("float targets of the index shape", lambda: dict(target=torch.rand(4)), ValueError, "target is floating"),
    ("class probabilities of the wrong shape", lambda: dict(target=torch.rand(4, 2)), ValueError, "target"),
    ("bool targets", lambda: dict(target=torch.ones(4, dtype=torch.bool)), TypeError, "target"),
    ("float sample ids", lambda: dict(sample_ids=torch.zeros(4)), TypeError, "sample_ids"),
    ("sample ids of the wrong length", lambda: dict(sample_ids=torch.arange(3)), ValueError, "sample_ids"),
    ("targets of the wrong shape", lambda: dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    ("weight of the wrong size", lambda: dict(weight=torch.ones(4)), ValueError, "weight"),
    ("weight that requires grad", lambda: dict(weight=torch.ones(3, requires_grad=True)), ValueError, "weight"),
    ("label smoothing > 1", lambda: dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("bad reduction", lambda: dict(reduction="avg"), ValueError, "reduction"),
    ("adjustment of the wrong shape", lambda: dict(adjustment=torch.zeros(4, 2)), ValueError, "adjustment"),
    ("integer adjustment", lambda: dict(adjustment=torch.zeros(4, 3, dtype=torch.long)), TypeError, "adjustment"),
    ("groups without a table", lambda: dict(groups=torch.zeros(4, dtype=torch.long)), ValueError, "groups"),
    ("float groups", lambda: dict(adjustment=torch.zeros(2, 3), groups=torch.zeros(4)), TypeError, "groups"),
    ("groups of the wrong size", lambda: dict(adjustment=torch.zeros(2, 3), groups=torch.zeros(5, dtype=torch.long)),
     ValueError, "groups"),
    ("groups out of range", lambda: dict(adjustment=torch.zeros(2, 3), groups=torch.tensor([0, 1, 2, 0])),
     IndexError, "groups"),
    ("negative groups", lambda: dict(adjustment=torch.zeros(2, 3), groups=torch.tensor([0, -1, 1, 0])),
     IndexError, "groups"),
    ("sample id too large", lambda: dict(sample_ids=torch.tensor([0, 1, 10, 2])), IndexError, "sample_ids"),
    ("negative sample id", lambda: dict(sample_ids=torch.tensor([0, -1, 3, 2])), IndexError, "sample_ids"),
    ("target too large", lambda: dict(target=torch.tensor([0, 3, 1, 1])), IndexError, "target"),
    ("negative target", lambda: dict(target=torch.tensor([0, -2, 1, 1])), IndexError, "target"),
    ("sample ids without a tracker", lambda: dict(tracker=None), ValueError, "together"),
    ("negative lse_square_scale", lambda: dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale"),
    ("NaN lse_square_scale", lambda: dict(lse_square_scale=math.nan), ValueError, "lse_square_scale"),
    ("class probabilities with ignore_index >= 0", lambda: dict(target=torch.rand(4, 3), ignore_index=1), ValueError,
     "ignore_index"),
    ("class probabilities, tracker ids out of range",
     lambda: dict(target=torch.rand(4, 3), sample_ids=torch.tensor([0, 1, 10, 2])), IndexError, "sample_ids"),
]


# The op's scalar options: the bad values the Python API refuses, and those the ops themselves refuse
# (1e-39 and 1e39 as a cap for fp32 logits: it or its reciprocal is not a normal fp32 number).
SCALAR_OPTIONS = {
    "lse_square_scale": ([-1e-3, math.nan, math.inf, True, "1e-4", torch.tensor(1e-4)], [-1.0, math.nan, math.inf]),
    "softcap": ([0.0, -1.0, math.nan, math.inf, True, "30", torch.tensor(30.0), 1e-39, 1e39],
                [-1.0, math.nan, math.inf, 1e-39, 1e39]),
}


@pytest.mark.parametrize("option,bad", [(o, b) for o, (api, _) in SCALAR_OPTIONS.items() for b in api])
def test_bad_scalar_option_names_it(backend, tracker, option, bad):
    x, y, ids = torch.randn(4, 3, requires_grad=True), torch.randint(0, 3, (4,)), torch.arange(4)
    calls = [lambda: memfast.cross_entropy(x, y, sample_ids=ids, tracker=tracker, **{option: bad}),
             lambda: memfast.CrossEntropyLoss(tracker=tracker, **{option: bad})(x, y, ids),
             lambda: memfast.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y, sample_ids=ids,
                                                  tracker=tracker, **{option: bad})]
    if option == "softcap":
        calls.append(lambda: tracker.update(x, y, ids, softcap=bad))
    before = _snapshot(tracker)
    for call in calls:
        with pytest.raises(ValueError, match=option):
            call()
    _unchanged(tracker, before)


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
@pytest.mark.parametrize("option", list(SCALAR_OPTIONS))
def test_ops_refuse_a_bad_scalar_option(ns, option):
    if ns == "memfast" and not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    for bad in SCALAR_OPTIONS[option][1]:
        scalars = (bad, 0.0) if option == "lse_square_scale" else (0.0, bad)
        with pytest.raises(ValueError, match=option):
            op.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 1, *scalars)
        with pytest.raises(ValueError, match=option):
            op.cross_entropy_fwd_(x.clone(), y, None, -100, 0.0, None, None, 1, *scalars)


@pytest.mark.parametrize("what,build,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_leaves_tracker_unchanged(backend, tracker, what, build, exc, match):
    kwargs = dict(input=torch.randn(4, 3, requires_grad=True), target=torch.tensor([0, 1, 2, 1]),
                  sample_ids=torch.arange(4), tracker=tracker)
    kwargs.update(build())
    before = _snapshot(tracker)
    with pytest.raises(exc, match=match):
        memfast.cross_entropy(**kwargs)
    _unchanged(tracker, before)


def test_tracker_on_another_device(tracker):
    meta = SampleTracker(10, device="meta")
    with pytest.raises(ValueError, match="tracker is on meta"):
        memfast.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), sample_ids=torch.arange(4),
                              tracker=meta)
    with pytest.raises(ValueError, match="sample_ids is on meta"):
        memfast.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                              sample_ids=torch.arange(4, device="meta"), tracker=tracker)


def test_inputs_on_another_device():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="target is on meta"):
        memfast.cross_entropy(x, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        memfast.cross_entropy(x, torch.zeros(4, dtype=torch.long), torch.ones(3, device="meta"))


def test_non_finite_logits_are_counted_not_accumulated(backend, tracker):
    before = _snapshot(tracker)
    x = torch.randn(3, 3)
    x[0, 1] = math.nan
    x[1, 2] = math.inf
    loss = memfast.cross_entropy(x, torch.tensor([0, 1, 2]), sample_ids=torch.tensor([5, 6, 7]), tracker=tracker,
                                 reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(loss[1]) and torch.isfinite(loss[2])
    assert tracker.stat("nonfinite")[[5, 6, 7]].tolist() == [1, 1, 0]
    assert tracker.stat("count")[[5, 6, 7]].tolist() == [0, 0, 1]
    assert torch.equal(tracker.stat("csl")[:5], before[0][tracker._row["csl"], :5])


def test_empty_batch(backend, tracker):
    before = _snapshot(tracker)
    out = memfast.cross_entropy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long),
                                sample_ids=torch.zeros(0, dtype=torch.long), tracker=tracker)
    assert torch.isnan(out)  # the mean over no rows, as in PyTorch
    assert torch.equal(tracker.state, before[0])


def test_non_contiguous_and_expanded_inputs(backend):
    a, b = SampleTracker(6, stats="all"), SampleTracker(6, stats="all")
    x = torch.randn(6, 8)[:, ::2]
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])[::2]
    memfast.cross_entropy(x, y, sample_ids=ids, tracker=a)
    memfast.cross_entropy(x.contiguous(), y, sample_ids=ids.contiguous(), tracker=b)
    assert torch.equal(a.state, b.state)
    row = torch.randn(1, 4)
    memfast.cross_entropy(row.expand(6, 4), y, sample_ids=torch.zeros(1, dtype=torch.long).expand(6), tracker=a)
    memfast.cross_entropy(row.repeat(6, 1), y, sample_ids=torch.zeros(6, dtype=torch.long), tracker=b)
    torch.testing.assert_close(a.state, b.state)


def test_bad_tracker_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        SampleTracker(-1)
    with pytest.raises(ValueError, match="num_samples"):
        SampleTracker(2.5)
    with pytest.raises(ValueError, match="unknown statistic"):
        SampleTracker(3, stats=("csl", "nope"))
    with pytest.raises(TypeError, match="sample_ids"):
        SampleTracker(3).update(torch.randn(2, 2), torch.zeros(2, dtype=torch.long), [0, 1])
    for stats in (None, (), [], 3):
        with pytest.raises(ValueError, match="at least one statistic"):
            SampleTracker(3, stats=stats)


def test_mat_loss_names_its_sample_ids_and_a_learnable_adjustment_warns(tracker):
    """MATLoss checks its sample ids against its table (not as cross_entropy's groups); an adjustment
    that requires grad warns once that no gradient flows into it."""
    loss_fn = memfast.MATLoss(torch.randn(8, 3))
    with pytest.raises(IndexError, match=r"MATLoss: sample_ids \(flattened\) \[1\] = 8 is out of range for a shift "
                                         r"table of 8"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([7, 8]))
    memfast.loss._warned_adjustment_grad.clear()
    prior = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match="no gradient flows into it"):
        memfast.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), adjustment=prior)
    assert prior.grad is None


def test_load_rejects_bad_files(tmp_path):
    t = SampleTracker(20, stats=("csl", "count", "margin"))
    t.update(torch.randn(5, 3), torch.randint(0, 3, (5,)), torch.arange(5))
    path = tmp_path / "t.pt"
    t.save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        SampleTracker.load(tmp_path / "truncated.pt")
    corrupted = bytearray(data)
    for i in range(len(corrupted) // 3, len(corrupted) // 3 + 64):
        corrupted[i] ^= 0xFF
    (tmp_path / "corrupted.pt").write_bytes(bytes(corrupted))
    with pytest.raises(ValueError):
        SampleTracker.load(tmp_path / "corrupted.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a memfast SampleTracker"):
        SampleTracker.load(tmp_path / "other.pt")
    other = SampleTracker(21, stats=("csl", "count", "margin"))
    before = other.state.clone()
    with pytest.raises(ValueError, match="20 samples"):
        other.load_state_dict(t.state_dict())
    assert torch.equal(other.state, before)
    with pytest.raises(ValueError, match="keeps"):
        SampleTracker(20).load_state_dict(t.state_dict())
    sd = t.state_dict()
    sd["state"] = sd["state"][:, :5]
    with pytest.raises(ValueError, match="malformed"):
        SampleTracker(20, stats=("csl", "count", "margin")).load_state_dict(sd)


@pytest.mark.parametrize("option,bad,exc", [
    ("ignore_index", 1.5, TypeError), ("ignore_index", "x", TypeError), ("ignore_index", True, TypeError),
    ("ignore_index", 2 ** 70, ValueError), ("label_smoothing", 1.5, ValueError), ("label_smoothing", -0.1, ValueError),
    ("label_smoothing", math.nan, ValueError), ("label_smoothing", "0.1", ValueError)])
def test_bad_ignore_index_or_label_smoothing_names_it(backend, tracker, option, bad, exc):
    """As F.cross_entropy: an ignore_index that is not an int is refused (1.5 was truncated to 1), and a
    label_smoothing outside [0, 1] or not a number names the argument."""
    x, y, ids = torch.randn(4, 3, requires_grad=True), torch.randint(0, 3, (4,)), torch.arange(4)
    before = _snapshot(tracker)
    for call in (lambda: memfast.cross_entropy(x, y, sample_ids=ids, tracker=tracker, **{option: bad}),
                 lambda: memfast.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y, sample_ids=ids,
                                                      tracker=tracker, **{option: bad})):
        with pytest.raises(exc, match=option):
            call()
    _unchanged(tracker, before)


def test_mat_helpers_name_bad_ids_and_targets():
    """MATLoss refuses float ids (they were truncated); XRM.step an out-of-range label before writing
    anything; class_balanced_cross_entropy names out-of-range targets; linear_cross_entropy's mean
    names an out-of-range target as its sum does (it failed indexing the class weights)."""
    with pytest.raises(TypeError, match="MATLoss: sample_ids must be an integer tensor"):
        memfast.MATLoss(torch.randn(8, 3))(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    xrm = memfast.mat.XRM(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 6, 3)
    with pytest.raises(IndexError, match=r"y must be in \[0, 3\)"):
        xrm.step(torch.randn(2, 4), torch.tensor([0, 5]), torch.tensor([0, 1]), torch.optim.SGD(xrm.parameters(), 0.1))
    assert (xrm.labels == -1).all()
    for bad in (3, -1, -100):
        with pytest.raises(IndexError, match=r"targets must be in \[0, 3\)"):
            memfast.mat.class_balanced_cross_entropy(torch.randn(3, 3), torch.tensor([0, 1, bad]))
    for reduction in ("mean", "sum"):
        with pytest.raises(IndexError, match="target 5"):
            memfast.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 5]),
                                         reduction=reduction)
