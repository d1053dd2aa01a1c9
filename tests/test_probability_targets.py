"""Class-probability targets (soft labels, mixup, distillation): memfast.cross_entropy
gives F.cross_entropy's loss and gradients, and a tracker records each row against
its most probable class."""
import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import SampleTracker


def soft(shape, dim=1, dtype=torch.float64, generator=None):
    return torch.softmax(torch.randn(shape, dtype=dtype, generator=generator) * 2, dim)


@pytest.mark.parametrize("shape", [(6, 5), (5,), (3, 4, 2, 3), (4, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_matches_pytorch(backend, shape, reduction, weighted, eps):
    class_dim = 0 if len(shape) == 1 else 1
    C = shape[class_dim]
    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    q = soft(shape, class_dim).requires_grad_()  # differentiable in the target too, as F
    w = torch.rand(C, dtype=torch.float64) + 0.1 if weighted else None
    got = memfast.cross_entropy(x, q, w, reduction=reduction, label_smoothing=eps)
    want = F.cross_entropy(x, q, w, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(got, want)
    seed = torch.randn(want.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (x, q), seed)
    want_grads = torch.autograd.grad(want, (x, q), seed)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_follows_pytorch(backend, dtype):
    """PyTorch's dtype and value; the gradient, formed in fp32 and rounded once, at least as close
    to the float64 truth (of the same rounded inputs) as PyTorch's, which rounds at every step."""
    x = torch.randn(64, 7).to(dtype).requires_grad_()
    q = soft((64, 7), dtype=torch.float32).to(dtype)
    got, want = memfast.cross_entropy(x, q), F.cross_entropy(x, q)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want)
    x64 = x.detach().double().requires_grad_()
    truth = torch.autograd.grad(F.cross_entropy(x64, q.double()), x64)[0]
    got_grad, want_grad = torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0]
    assert got_grad.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got_grad.double(), truth, rtol=ulp, atol=ulp * truth.abs().max())
    if dtype != torch.float32:  # (in fp32 both are within a few rounding errors)
        assert (got_grad.double() - truth).abs().max() <= (want_grad.double() - truth).abs().max()


@pytest.mark.parametrize("form", ["dense", "vector", "table"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_adjustment_shifts_the_logits(backend, form, reduction):
    N, C, A = 6, 5, 3
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    q = soft((N, C))
    groups = torch.randint(0, A, (N,))
    shift = {"dense": torch.randn(N, C, dtype=torch.float64), "vector": torch.randn(C, dtype=torch.float64),
             "table": torch.randn(A, C, dtype=torch.float64)}[form]
    dense = shift[groups] if form == "table" else shift
    got = memfast.cross_entropy(x, q, reduction=reduction, adjustment=shift,
                                groups=groups if form == "table" else None)
    want = F.cross_entropy(x + dense, q, reduction=reduction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_spatial_adjustment_keeps_the_layout(backend):
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    q = soft((2, 4, 3))
    shift = torch.randn(2, 4, 3, dtype=torch.float64)
    got = memfast.cross_entropy(x, q, reduction="none", adjustment=shift)
    torch.testing.assert_close(got, F.cross_entropy(x + shift, q, reduction="none"))
    assert got.shape == (2, 3)


def test_tracker_sees_the_most_probable_class(backend):
    N, C = 12, 6
    x = torch.randn(N, C, dtype=torch.float64) * 3
    q = soft((N, C))
    q[3] = 0  # no target mass: not tracked
    ids = torch.tensor([0, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9])  # repeats add
    got, want = SampleTracker(10, stats="all"), SampleTracker(10, stats="all")
    memfast.cross_entropy(x.clone().requires_grad_(), q, sample_ids=ids, tracker=got, label_smoothing=0.1)
    label = q.argmax(1)
    label[3] = -100
    want.update(x, label, ids)
    torch.testing.assert_close(got.state, want.state)
    assert got.stat("count")[3] == 0 and got.stat("count")[4] == 2
    # and through tracker.update itself, returning the soft losses
    again = SampleTracker(10, stats="all")
    losses = again.update(x, q, ids)
    torch.testing.assert_close(again.state, want.state)
    torch.testing.assert_close(losses, F.cross_entropy(x, q, reduction="none"))


@pytest.mark.parametrize("form", ["vector", "table", "dense"])
def test_tracker_sees_the_adjusted_logits_of_spatial_input(backend, form):
    B, C, T, A = 3, 5, 4, 2
    x = torch.randn(B, C, T, dtype=torch.float64)
    q = soft((B, C, T))
    groups = torch.randint(0, A, (B, T))
    shift = {"vector": torch.randn(C, dtype=torch.float64), "table": torch.randn(A, C, dtype=torch.float64),
             "dense": torch.randn(B, C, T, dtype=torch.float64)}[form]
    kw = dict(adjustment=shift, groups=groups if form == "table" else None)
    got, want = SampleTracker(B, stats="all"), SampleTracker(B, stats="all")
    memfast.cross_entropy(x, q, sample_ids=torch.arange(B), tracker=got, **kw)
    want.update(x, q.argmax(1), torch.arange(B), **kw)
    torch.testing.assert_close(got.state, want.state)


def test_one_hot_targets_equal_index_targets(backend):
    N, C = 9, 4
    x = torch.randn(N, C, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,))
    ids = torch.randint(0, 5, (N,))
    w = torch.rand(C, dtype=torch.float64) + 0.5
    trackers = SampleTracker(5, stats="all"), SampleTracker(5, stats="all")
    results = []
    for target, tracker in zip((F.one_hot(y, C).double(), y), trackers):
        xi = x.clone().requires_grad_()
        loss = memfast.cross_entropy(xi, target, w, reduction="sum", sample_ids=ids, tracker=tracker)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(trackers[0].state, trackers[1].state)


def test_per_sequence_ids_on_spatial_input(backend):
    B, C, T = 3, 5, 4
    x = torch.randn(B, C, T, dtype=torch.float64)
    q = soft((B, C, T))
    got, want = SampleTracker(B, stats="all"), SampleTracker(B, stats="all")
    memfast.cross_entropy(x, q, sample_ids=torch.arange(B), tracker=got)
    want.update(x, q.argmax(1), torch.arange(B))
    torch.testing.assert_close(got.state, want.state)
    assert got.stat("count").tolist() == [T] * B


def test_bad_input_names_the_argument_and_leaves_the_tracker(backend):
    x = torch.randn(4, 3)
    q = soft((4, 3), dtype=torch.float32)
    tracker = SampleTracker(4, stats="all")
    ids = torch.arange(4)
    before = tracker.state.clone()
    with pytest.raises(ValueError, match="ignore_index"):
        memfast.cross_entropy(x, q, ignore_index=0, sample_ids=ids, tracker=tracker)
    with pytest.raises(ValueError, match="holds class probabilities and needs the input"):
        memfast.cross_entropy(x, q[:, :2], sample_ids=ids, tracker=tracker)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        memfast.cross_entropy(x.long(), q)
    with pytest.raises(ValueError, match="weight must be"):
        memfast.cross_entropy(x, q, torch.ones(2), sample_ids=ids, tracker=tracker)
    with pytest.raises(ValueError, match="sample_ids has 3 entries"):
        memfast.cross_entropy(x, q, sample_ids=ids[:3], tracker=tracker)
    with pytest.raises(IndexError, match="out of range"):
        memfast.cross_entropy(x, q, sample_ids=ids + 1, tracker=tracker)
    assert torch.equal(tracker.state, before)


def test_empty_batch(backend):
    tracker = SampleTracker(3)
    x = torch.randn(0, 4, requires_grad=True)
    q = torch.zeros(0, 4)
    for reduction in ("mean", "sum", "none"):
        got, want = memfast.cross_entropy(x, q, reduction=reduction), F.cross_entropy(x, q, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
    memfast.cross_entropy(x, q, sample_ids=torch.zeros(0, dtype=torch.long), tracker=tracker)
    assert tracker.stat("count").sum() == 0


def test_module_and_compile(backend):
    x = torch.randn(6, 5, requires_grad=True)
    q = soft((6, 5), dtype=torch.float32)
    ids = torch.arange(6)
    trackers = SampleTracker(6, stats="all"), SampleTracker(6, stats="all")
    eager_fn, compiled_fn = (memfast.CrossEntropyLoss(label_smoothing=0.1, tracker=t) for t in trackers)
    eager = eager_fn(x, q, ids)
    compiled = torch.compile(lambda x, q, ids: compiled_fn(x, q, ids), fullgraph=True, backend="aot_eager")(x, q, ids)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(trackers[1].state, trackers[0].state)
    torch.testing.assert_close(trackers[1].counters, trackers[0].counters)
    torch.testing.assert_close(eager, F.cross_entropy(x, q, label_smoothing=0.1))


def test_ignore_index_and_dtype_as_pytorch(backend):
    x = torch.randn(5, 4)
    q = soft((5, 4), dtype=torch.float32)
    # PyTorch ignores a negative ignore_index with probability targets and refuses one >= 0
    torch.testing.assert_close(memfast.cross_entropy(x, q, ignore_index=-1), F.cross_entropy(x, q, ignore_index=-1))
    with pytest.raises(ValueError, match="ignore_index"):
        memfast.cross_entropy(x, q, ignore_index=0)
    for xd, qd in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float16)):
        want = F.cross_entropy(x.to(xd), q.to(qd))
        for adjustment in (None, torch.zeros(4)):
            got = memfast.cross_entropy(x.to(xd), q.to(qd), adjustment=adjustment)
            assert got.dtype == want.dtype, (xd, qd, adjustment)
        # the value: PyTorch rounds its log-softmax to the input's dtype, memfast computes in fp32
        # (fp64 targets for fp32 logits take PyTorch's own loss)
        truth = F.cross_entropy(x.to(xd).double(), q.to(qd).double())
        eps = torch.finfo(xd).eps
        torch.testing.assert_close(memfast.cross_entropy(x.to(xd), q.to(qd)).double(), truth, rtol=eps, atol=0)
        torch.testing.assert_close(want.double(), truth, rtol=4 * eps, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_output_dtype_and_refusals_match_pytorch(backend, autocast):
    """Every mix of logits, target and weight dtypes, with and without autocast: the loss's dtype
    is F.cross_entropy's (under autocast: fp32, or fp64 where a target or weight is fp64), and
    where PyTorch refuses a mix memfast does too. Before, bf16 logits with fp64 targets under
    autocast gave fp32."""
    import itertools

    z, q = torch.randn(6, 7), torch.softmax(torch.randn(6, 7), 1)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    for logits_dtype, target_dtype, weight_dtype in itertools.product(dtypes, dtypes, [None] + dtypes):
        kw = {} if weight_dtype is None else dict(weight=torch.rand(7, dtype=weight_dtype) + 0.5)
        results = []
        for fn in (F.cross_entropy, memfast.cross_entropy):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                try:
                    results.append(fn(z.to(logits_dtype), q.to(target_dtype), **kw).dtype)
                except (RuntimeError, TypeError, ValueError):
                    results.append("refused")
        assert results[1] == results[0], (logits_dtype, target_dtype, weight_dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shifted", [False, True])
def test_class_weights_that_require_grad_get_pytorchs_gradient(backend, reduction, shifted):
    """With probability targets F.cross_entropy is differentiable in the class weights (with class
    indices it refuses, and so does memfast): memfast gives the same weight and logits gradients,
    with a softcap and an adjustment too, and still tracks."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    q, w = soft((6, 4)), (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    adjustment = torch.randn(4, dtype=torch.float64) if shifted else None
    tracker = SampleTracker(6)
    got = memfast.cross_entropy(x, q, weight=w, reduction=reduction, adjustment=adjustment,
                                softcap=5.0 if shifted else None, sample_ids=torch.arange(6), tracker=tracker)
    z = 5.0 * torch.tanh(x / 5.0) + adjustment if shifted else x
    want = F.cross_entropy(z, q, weight=w, reduction=reduction)
    torch.testing.assert_close(got, want)
    upstream = torch.randn_like(want)
    grads = [torch.autograd.grad(loss, (x, w), upstream) for loss in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert tracker.stat("count").tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="weight requires grad"):
        memfast.cross_entropy(x, q.argmax(1), weight=w)
