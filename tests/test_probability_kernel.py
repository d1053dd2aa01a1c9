"""cross_entropy_prob_fwd, the fused class-probability op: the CPU kernel against the reference
(and the reference against PyTorch's own soft-target loss), on fresh random inputs in every
dtype, both CPU kernel modes and the edge cases; opcheck; what the API does with it."""
import math

import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import _ops, reference
from memfast._stats import ROW

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_targets(R, C, dtype, g, zero_rows=(), nan_rows=()):
    t = torch.softmax(3 * torch.randn(R, C, generator=g, dtype=torch.float64), 1)
    t[t < 0.05] = 0  # sparse rows, ties and exact zeros happen
    t = t / t.sum(1, keepdim=True).clamp_min(1e-12)
    for r in zero_rows:
        t[r] = 0
    for r in nan_rows:
        t[r, 0] = math.nan
    return t.to(dtype)


def check(args, dtype):
    got = torch.ops.memfast.cross_entropy_prob_fwd(*args)
    want = reference.cross_entropy_prob_fwd(*args)
    acc = acc_of(dtype)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], **tol, equal_nan=True)
    assert torch.equal(got[2], want[2])
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[3].to(acc), want[3].to(acc), **gtol, equal_nan=True)
    if args[6]:  # cross_entropy_prob_fwd_ (inplace_backward): the same results, the gradient over the logits
        logits, rest, (reduction, *scalars) = args[0], args[1:6], args[7:]
        buffer = logits.detach().clone(memory_format=torch.contiguous_format)
        loss, row_stats, label = torch.ops.memfast.cross_entropy_prob_fwd_(buffer, *rest, reduction, *scalars)
        for a, b in ((loss, got[0]), (row_stats, got[1]), (label, got[2]), (buffer, got[3])):
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 1000, 32000])
@pytest.mark.parametrize("options", ["plain", "weight+smoothing", "adjustment", "table", "zloss+softcap"])
def test_kernel_matches_reference(cpu_kernel, dtype, C, options):
    g = torch.Generator().manual_seed(C)
    R = 37 if C <= 1000 else 5
    acc = acc_of(dtype)
    x = (4 * torch.randn(R, C, generator=g, dtype=torch.float64)).to(dtype)
    t = soft_targets(R, C, dtype, g, zero_rows=(1,), nan_rows=(3,) if R > 3 else ())
    weight = adjustment = groups = None
    eps, zeta, cap = 0.0, 0.0, 0.0
    if options == "weight+smoothing":
        weight, eps = torch.rand(C, generator=g, dtype=torch.float64).to(acc), 0.2
    elif options == "adjustment":
        adjustment = torch.randn(R, C, generator=g, dtype=torch.float64).to(acc)
    elif options == "table":
        adjustment = torch.randn(3, C, generator=g, dtype=torch.float64).to(acc)
        groups = torch.randint(0, 3, (R,), generator=g)
    else:
        zeta, cap = 1e-2, 3.0
    for reduction in (0, 1, 2):
        check((x, t, weight, eps, adjustment, groups, True, reduction, zeta, cap), dtype)
    # targets in the accumulation dtype for half-precision logits (fp32 mixup weights, bf16 logits)
    if dtype in (torch.bfloat16, torch.float16):
        check((x, t.to(acc), weight, eps, adjustment, groups, True, 1, zeta, cap), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_reference_is_pytorchs_loss(dtype, eps):
    """The reference twin is F.cross_entropy with probability targets (loss and gradient), and its
    row statistics are those of index targets against the most probable class."""
    g = torch.Generator().manual_seed(0)
    R, C = 23, 9
    x = torch.randn(R, C, generator=g, dtype=dtype, requires_grad=True)
    t = soft_targets(R, C, dtype, g)
    w = torch.rand(C, generator=g, dtype=dtype)
    for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
        loss, row_stats, label, grad = reference.cross_entropy_prob_fwd(x.detach(), t, w, eps, None, None, True,
                                                                        reduction)
        want = F.cross_entropy(x, t, w, reduction=name, label_smoothing=eps)
        torch.testing.assert_close(loss, want.detach())
        seed = torch.randn(want.shape, generator=g, dtype=dtype) if reduction == 0 else torch.ones((), dtype=dtype)
        (want_grad,) = torch.autograd.grad(want, x, seed)
        torch.testing.assert_close(reference.cross_entropy_bwd(grad, seed), want_grad)
    assert torch.equal(label, t.argmax(1))
    index_stats = reference.cross_entropy_fwd(x.detach(), label, None, -100, 0.0, None, None, False, 0)[1]
    index_stats[ROW["weight"]] = 1
    torch.testing.assert_close(row_stats, index_stats)


def test_labels_rows_without_mass_and_ties(cpu_kernel):
    """label: the first most probable class; -100 (and zero statistics, no z-loss) for a row with
    no positive mass, negative mass only, or a NaN target; such a row's loss is PyTorch's."""
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([[0.0, 0.5, 0.5, 0.0],   # a tie: the first
                      [0.0, 0.0, 0.0, 0.0],   # no mass
                      [-0.2, -0.1, 0.0, 0.0],  # no positive mass
                      [0.1, math.nan, 0.9, 0.0],
                      [0.0, 0.0, 0.0, 1.0],
                      [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    loss, row_stats, label, _ = check((x, t, None, 0.0, None, None, True, 0, 0.5, 0.0), torch.float64)
    assert label.tolist() == [1, -100, -100, -100, 3, 0]
    assert row_stats[:, [1, 2, 3]][[ROW["log_sum"], ROW["target_logit"], ROW["correct"]]].abs().sum() == 0
    lse = torch.logsumexp(x, 1)
    want = F.cross_entropy(x, t.nan_to_num(0.0), reduction="none")
    want[[0, 4, 5]] += 0.5 * lse[[0, 4, 5]] ** 2
    torch.testing.assert_close(loss[[0, 1, 2, 4, 5]], want[[0, 1, 2, 4, 5]])
    assert loss[3].isnan()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_extreme_logits(cpu_kernel, dtype):
    """Huge logits (the loss is formed from shifted sums: no cancellation), tiny ones, and rows of
    -inf / +inf / NaN logits (the plain formula's NaN, as PyTorch)."""
    g = torch.Generator().manual_seed(1)
    R, C = 8, 50
    t = soft_targets(R, C, torch.float64, g)
    big = (torch.randn(R, C, generator=g, dtype=torch.float64) + 3e4).to(dtype)
    got = check((big, t.to(dtype), None, 0.1, None, None, True, 0), dtype)
    want = F.cross_entropy(big.double(), t.to(dtype).double(), reduction="none", label_smoothing=0.1)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got[0].double(), want, rtol=tol, atol=tol)
    tiny = (1e-30 * torch.randn(R, C, generator=g, dtype=torch.float64)).to(dtype)
    check((tiny, t.to(dtype), None, 0.0, None, None, True, 1), dtype)
    odd = torch.randn(3, C, generator=g, dtype=torch.float64).to(dtype)
    odd[0] = -math.inf
    odd[1, 4] = math.inf
    odd[2, 7] = math.nan
    loss = check((odd, t[:3].to(dtype), None, 0.0, None, None, True, 0), dtype)[0]
    assert loss.isnan().all()


def test_strided_rows_and_empty_batch(cpu_kernel):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(10, 14, generator=g)
    x = base[::2, 2:12]  # strided rows, dense classes
    t = soft_targets(5, 10, torch.float32, g)
    got = check((x, t, None, 0.0, None, None, True, 0), torch.float32)
    want = check((x.contiguous(), t, None, 0.0, None, None, True, 0), torch.float32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    columns = torch.randn(10, 5, generator=g).t()  # a non-dense class dimension: copied
    check((columns, soft_targets(5, 10, torch.float32, g).t().contiguous().t(), None, 0.0, None, None, True, 1),
          torch.float32)
    empty = torch.empty(0, 7)
    loss, row_stats, label, grad = torch.ops.memfast.cross_entropy_prob_fwd(empty, empty, None, 0.0, None, None,
                                                                            True, 1)
    assert loss.isnan() and row_stats.shape == (5, 0) and label.shape == (0,) and grad.shape == (0, 7)
    assert torch.ops.memfast.cross_entropy_prob_fwd(empty, empty, None, 0.0, None, None, True, 2)[0] == 0


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck(ns, inplace):
    """Both forms; the in-place one gets a fresh buffer each time (opcheck runs the op repeatedly)."""
    lib = getattr(torch.ops, ns)

    def opcheck(x, t, weight, eps, adjustment, groups, compute_grad, reduction, *scalars):
        if not inplace:
            torch.library.opcheck(lib.cross_entropy_prob_fwd, (x, t, weight, eps, adjustment, groups, compute_grad,
                                                               reduction, *scalars))
        elif compute_grad:  # (the in-place form always forms the gradient)
            torch.library.opcheck(lib.cross_entropy_prob_fwd_, (x.detach().clone(), t, weight, eps, adjustment,
                                                                groups, reduction, *scalars))

    g = torch.Generator().manual_seed(3)
    R, C = 9, 6
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        acc = acc_of(dtype)
        x = torch.randn(R, C, dtype=dtype, generator=g).requires_grad_()
        t = soft_targets(R, C, dtype, g, zero_rows=(2,))
        for reduction in (0, 1, 2):
            opcheck(x, t, None, 0.0, None, None, True, reduction)
        opcheck(x, t.to(acc), torch.rand(C, dtype=acc, generator=g), 0.1, torch.randn(3, C, dtype=acc, generator=g),
                torch.randint(0, 3, (R,), generator=g), True, 1, 1e-2, 2.0)
        opcheck(x.detach(), t, None, 0.0, torch.randn(R, C, dtype=acc, generator=g), None, False, 0)


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_inplace_refuses_what_it_cannot_write(ns):
    """cross_entropy_prob_fwd_ needs contiguous logits that share no memory with the other inputs
    (the kernels still read those while they write the gradient), and writes nothing when it refuses."""
    op = getattr(torch.ops, ns).cross_entropy_prob_fwd_
    t = torch.softmax(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="contiguous"):
        op(torch.randn(4, 6)[:, :5], t, None, 0.0, None, None, 1)
    storage = torch.randn(3, 4, 5)
    logits, before = storage[0], storage.clone()
    for kw in ({"target": storage[1]}, {"target": logits}, {"weight": storage[1, 0]}, {"adjustment": storage[2]}):
        args = {"target": t, "weight": None, "adjustment": None, **kw}
        (name,) = kw
        with pytest.raises(ValueError, match=f"{name} shares their memory"):
            op(logits, args["target"], args["weight"], 0.0, args["adjustment"], None, 1)
        assert torch.equal(storage, before)
    with pytest.raises(ValueError, match="class-probability targets"):
        op(logits, torch.rand(4, 2), None, 0.0, None, None, 1)
    assert torch.equal(storage, before)


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_bad_arguments_raise(ns):
    op = getattr(torch.ops, ns).cross_entropy_prob_fwd
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="class-probability targets"):
        op(x, torch.rand(4, 2), None, 0.0, None, None, True, 1)
    with pytest.raises(ValueError, match="class-probability targets"):
        op(x, torch.rand(4, 3, dtype=torch.float64), None, 0.0, None, None, True, 1)
    with pytest.raises(ValueError, match="reduction"):
        op(x, torch.rand(4, 3), None, 0.0, None, None, True, 3)
    with pytest.raises(ValueError, match="softcap"):
        op(x, torch.rand(4, 3), None, 0.0, None, None, True, 1, 0.0, -1.0)
    with pytest.raises(IndexError, match="groups"):
        op(x, torch.rand(4, 3), None, 0.0, torch.zeros(2, 3), torch.tensor([0, 1, 2, 0]), True, 1)


def test_api_runs_the_fused_op_and_tracks_in_the_same_pass(monkeypatch):
    """memfast.cross_entropy with probability targets calls cross_entropy_prob_fwd once (loss,
    gradient and statistics), not PyTorch's loss plus a tracking pass; fp64 targets for fp32
    logits, targets that require grad and forward-mode AD take PyTorch's loss (its precision, a
    gradient into the target, its jvp)."""
    calls = []
    real = _ops.cross_entropy_prob
    monkeypatch.setattr(_ops, "cross_entropy_prob", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(8, 5, requires_grad=True)
    q = torch.softmax(torch.randn(8, 5), 1)
    tracker = memfast.SampleTracker(8, stats="all")
    loss = memfast.cross_entropy(x, q, sample_ids=torch.arange(8), tracker=tracker)
    loss.backward()
    assert calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(x, q))
    assert tracker.scores()["count"].sum() == 8
    for target in (q.double(), q.clone().requires_grad_()):
        memfast.cross_entropy(x, target)
    assert calls == [1]


@pytest.mark.parametrize("shape", [(6, 5), (5,), (3, 4, 2, 3)])
def test_create_graph_and_second_backward(shape):
    """A gradient penalty (create_graph) and a second backward (retain_graph) through the fused
    loss, for batched, unbatched and spatial inputs, as PyTorch's."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(shape, dtype=torch.float64), 0 if len(shape) == 1 else 1)
    for fn in (memfast.cross_entropy, F.cross_entropy):
        loss = fn(x, q, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        loss2 = fn(x, q)
        first = torch.autograd.grad(loss2, x, retain_graph=True)[0]
        second = torch.autograd.grad(loss2, x)[0]
        if fn is memfast.cross_entropy:
            got = (g, gg, first, second)
        else:
            want = (g, gg, first, second)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_no_classes_weight_dtype_and_other_devices():
    """C = 0 gives PyTorch's zeros; the loss dtype promotes the weight too (as F.cross_entropy);
    a device with neither kernel nor reference twin (meta here) takes PyTorch's loss, unwarned."""
    for reduction in ("none", "sum", "mean"):
        x, q = torch.randn(3, 0, requires_grad=True), torch.rand(3, 0)
        torch.testing.assert_close(memfast.cross_entropy(x, q, reduction=reduction),
                                   F.cross_entropy(x, q, reduction=reduction), equal_nan=True)  # mean: NaN
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    q, w = torch.softmax(torch.randn(4, 3), 1).bfloat16(), torch.rand(3)
    assert memfast.cross_entropy(x, q, w).dtype == F.cross_entropy(x, q, w).dtype == torch.float32
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = memfast.cross_entropy(torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"))
    assert loss.device.type == "meta"


def test_recomputed_gradient_needs_the_inputs_unchanged():
    """A second backward needs the logits and the target: small logits are saved by the loss
    (nobody else needs to hold them, as with F.cross_entropy), large ones held weakly (dropped: it
    raises, naming them); a target modified in place after the forward raises, as a tensor autograd
    saved does, rather than giving another gradient."""
    lin = torch.nn.Linear(4, 5)
    x, q = torch.randn(8, 4), torch.softmax(torch.randn(8, 5), 1)
    loss = memfast.cross_entropy(lin(x), q)  # the logits are not kept by anyone else
    loss.backward(retain_graph=True)
    loss.backward()
    (want,) = torch.autograd.grad(F.cross_entropy(lin(x), q), lin.weight)
    torch.testing.assert_close(lin.weight.grad, 2 * want)
    classes = _ops.KEEP_LOGITS_BYTES // (4 * 64) + 1  # 64 rows of fp32: just over the limit
    big = torch.nn.Linear(4, classes)
    xb, qb = torch.randn(64, 4), torch.softmax(torch.randn(64, classes), 1)
    loss = memfast.cross_entropy(big(xb), qb)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="logits alive"):
        loss.backward()
    logits = lin(x)
    loss = memfast.cross_entropy(logits, q)
    loss.backward(retain_graph=True)
    q.mul_(0.5)
    with pytest.raises(RuntimeError, match="target was modified"):
        loss.backward()
    # index targets too, in the C++ eager autograd
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss = memfast.cross_entropy(lin(x), y)
    y[0] = 3
    with pytest.raises(RuntimeError, match="target was modified"):
        loss.backward()


def test_backward_state_survives_compiled_autograd():
    """Compiled autograd runs the Python autograd's backward with a stand-in ctx that keeps
    assignments to itself: the state a backward changes (the kept logits, freed after a backward
    that does not keep the graph; the saved gradient, scaled in place by a first backward) must
    still reach the loss."""
    import gc
    import weakref

    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    h, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logits = h @ w
    ref = weakref.ref(logits)
    loss = memfast.cross_entropy(logits, q)  # small logits: kept for a recompute
    del logits
    with ca._enable(lambda gm: gm):
        loss.backward()
    gc.collect()
    assert ref() is None
    classes = _ops.KEEP_LOGITS_BYTES // (8 * 64) + 1  # large logits: the saved gradient is scaled in place
    h, q = torch.randn(64, 3, dtype=torch.float64), torch.softmax(torch.randn(64, classes, dtype=torch.float64), 1)
    w = torch.randn(3, classes, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (memfast.cross_entropy, F.cross_entropy):
        w.grad = None
        logits = h @ w
        loss = fn(logits, q) * 3
        with ca._enable(lambda gm: gm):
            loss.backward(retain_graph=True)
            first = w.grad.clone()
            loss.backward()
        grads.append((first, w.grad - first))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_gradient_penalty_refuses_logits_detached_in_place():
    """detach_() on the logits after the loss removes the history a differentiable gradient needs:
    refused (as autograd refuses a saved tensor detached in place), not an incomplete penalty."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.tanh(x @ torch.randn(3, 4, dtype=torch.float64)) * 3
    loss = memfast.cross_entropy(logits, torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1))
    logits.detach_()
    with pytest.raises(RuntimeError, match="detach_"):
        torch.autograd.grad(loss, x, create_graph=True)
