"""memfast.cross_entropy against torch.nn.functional.cross_entropy, and the
compiled forward op against its reference twin."""
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import reference
from memfast._stats import ROW

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _compare(x, y, tol, **kw):
    """Loss and input gradient of memfast vs PyTorch (on the fp32/fp64 upcast input)."""
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().to(torch.float64 if x.dtype == torch.float64 else torch.float32).requires_grad_(True)
    shift = kw.pop("shift", None)
    memfast_kw = dict(kw)
    a = memfast.cross_entropy(xa, y, **kw)
    if shift is not None:
        kw.pop("adjustment", None), kw.pop("groups", None)
        b = F.cross_entropy(xb + shift.to(xb.dtype), y, **kw)
    else:
        b = F.cross_entropy(xb, y, **kw)
    assert a.dtype == x.dtype and a.shape == b.shape
    torch.testing.assert_close(a.to(b.dtype), b, atol=tol, rtol=tol, equal_nan=True)
    g = torch.randn_like(b)  # a random upstream gradient also checks per-row scaling
    (ga,) = torch.autograd.grad(a, xa, g.to(a.dtype))
    (gb,) = torch.autograd.grad(b, xb, g, retain_graph=True)
    assert ga.dtype == x.dtype and ga.shape == x.shape
    torch.testing.assert_close(ga.to(gb.dtype), gb, atol=tol, rtol=tol, equal_nan=True)
    # An upstream gradient of ones (loss.backward()): the saved gradient is the answer as it is
    xa1 = x.detach().clone().requires_grad_(True)
    a1 = memfast.cross_entropy(xa1, y, **memfast_kw)
    (ga1,) = torch.autograd.grad(a1, xa1, torch.ones_like(a1))
    (gb1,) = torch.autograd.grad(b, xb, torch.ones_like(b))
    torch.testing.assert_close(ga1.to(gb1.dtype), gb1, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pytorch(backend, dtype, reduction):
    N, C = 37, 11
    x = (torch.randn(N, C) * 3).to(dtype)
    y = torch.randint(0, C, (N,))
    y[::5] = -100
    _compare(x, y, TOL[dtype], reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_smoothing_ignore_index(backend, dtype, reduction):
    N, C = 29, 7
    x = (torch.randn(N, C) * 2).to(dtype)
    y = torch.randint(0, C, (N,))
    y[3] = y[7] = 5
    y[4] = 2
    w = torch.rand(C) + 0.1
    for kw in (dict(weight=w), dict(label_smoothing=0.15), dict(weight=w, label_smoothing=0.3),
               dict(weight=w, label_smoothing=0.2, ignore_index=5), dict(ignore_index=2)):
        kw = dict(kw)
        if "weight" in kw:
            kw["weight"] = kw["weight"].to(torch.float64 if dtype == torch.float64 else torch.float32)
        _compare(x, y, TOL[dtype] * 2, reduction=reduction, **kw)


@pytest.mark.parametrize("shape", [(4, 5, 3), (2, 6, 3, 4), (3, 1, 2)])
def test_spatial_inputs(backend, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    y.view(-1)[0] = -100
    for reduction in ("mean", "none", "sum"):
        _compare(x, y, 1e-10, reduction=reduction, label_smoothing=0.1)


def test_unbatched_and_class_one(backend):
    _compare(torch.randn(6, dtype=torch.float64), torch.tensor(4), 1e-10)
    _compare(torch.randn(6, dtype=torch.float64), torch.tensor(4), 1e-10, reduction="none")
    # C == 1: the loss is 0 and so is the gradient
    _compare(torch.randn(9, 1, dtype=torch.float64), torch.zeros(9, dtype=torch.long), 1e-10, reduction="none")


def test_non_contiguous_inputs(backend):
    base = torch.randn(40, 30, dtype=torch.float64)
    y = torch.randint(0, 15, (20,))
    _compare(base[::2, ::2], y, 1e-10)          # strided rows and classes
    _compare(base[:20, :15].t().contiguous().t(), y, 1e-10)  # column-major
    _compare(base[::2, 5:20], y, 1e-10, reduction="none")   # row stride, offset
    _compare(torch.randn(1, 8, dtype=torch.float64).expand(5, 8), torch.randint(0, 8, (5,)), 1e-10)


def test_empty_batch_and_all_ignored(backend):
    for reduction in ("mean", "sum", "none"):
        _compare(torch.randn(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long), 1e-10, reduction=reduction)
        _compare(torch.randn(4, 5, dtype=torch.float64), torch.full((4,), -100), 1e-10, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_and_tiny_logits(backend, dtype):
    N, C = 16, 50
    y = torch.randint(0, C, (N,))
    for scale in (1e4, 1e-6, 80.0):
        x = (torch.randn(N, C) * scale).to(dtype)
        _compare(x, y, TOL[dtype] * (10 if scale > 1 else 1), reduction="none")
    x = torch.zeros(N, C).to(dtype)  # all ties
    _compare(x, y, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e4, -3e5, 1e8])
def test_logits_far_from_zero_keep_the_loss_exact(backend, cpu_kernel, dtype, offset):
    """Logits of one sign and a large magnitude (an un-normalised head, a shared bias): the loss
    is lse - z_y formed from z - max, as log_softmax forms it. Through m + log_sum it was rounded
    to ulp(m): 4e-4 off at 1e4 and 0 instead of ~3 at 1e8 in fp32. The tracker's loss, p_true,
    max_prob and margin too; the truth is fp64 PyTorch on the same (rounded) logits."""
    N, C = 24, 40
    g = torch.Generator().manual_seed(int(abs(offset)) % 1000)
    x64 = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + offset)
    # fp32 keeps the spread at 1e8 only where it exceeds the ulp (8): scale it with the offset
    x64 = offset + (x64 - offset) * max(1.0, abs(offset) * 2e-7)
    x = x64.to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    truth = x.to(torch.float64)
    # (a bf16 loss is returned in bf16: one rounding; the tracker below keeps fp32)
    tol = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
           torch.bfloat16: dict(atol=0, rtol=8e-3)}[dtype]
    for kw in (dict(), dict(label_smoothing=0.2), dict(weight=torch.rand(C, generator=g, dtype=acc) + 0.5)):
        got = memfast.cross_entropy(x, y, reduction="none", **kw)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        want = F.cross_entropy(truth, y, reduction="none", **kw64)
        assert want.min() > 0.5  # the case this test is about: losses of order 1, not 0
        torch.testing.assert_close(got.double(), want, **tol, msg=str(kw))
    t = memfast.SampleTracker(N, stats="all")
    memfast.cross_entropy(x, y, sample_ids=torch.arange(N), tracker=t)
    nll = F.cross_entropy(truth, y, reduction="none")
    p = truth.softmax(1)
    others = truth.scatter(1, y[:, None], -math.inf).max(1).values
    f32 = dict(atol=2e-5, rtol=2e-5)  # the tracker's state is fp32
    torch.testing.assert_close(t.stat("csl").double(), nll, **f32)
    torch.testing.assert_close(t.stat("last_loss").double(), nll, **f32)
    torch.testing.assert_close(t.stat("inconf").double(), 1 - p.gather(1, y[:, None])[:, 0], **f32)
    torch.testing.assert_close(t.stat("last_maxprob").double(), p.max(1).values, **f32)
    torch.testing.assert_close(t.stat("margin").double(), truth.gather(1, y[:, None])[:, 0] - others, **f32)


def test_non_finite_logits(backend):
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x[0, 2] = math.nan
    x[1, 1] = -math.inf  # target logit -inf: loss inf
    x[2, 0] = -math.inf  # another logit -inf: finite
    a = memfast.cross_entropy(x, y, reduction="none")
    b = F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("kernel", ["default", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("C", [2, 3, 17, 100, 1000])
def test_nan_logits_row_stats_match_reference(kernel, dtype, C, monkeypatch):
    """NaN logits: for the largest other logit and correctness they count as -inf, and a NaN
    target logit is never correct -- the same in the kernels (CPU and CUDA) and the reference."""
    if not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    if kernel == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    g = torch.Generator().manual_seed(C)
    R = 64
    x = torch.randn(R, C, generator=g) * 3
    y = torch.randint(0, C, (R,), generator=g)
    x[1::3].scatter_(1, y[1::3, None], 50.0)  # rows the target wins unless a NaN lands on it
    for r in range(R):
        x[r, torch.randint(0, C, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)] = math.nan
        if r % 5 == 0:
            x[r, y[r]] = math.nan
        if r % 7 == 0:  # -inf everywhere else: a NaN before the target ties it (argmax: first index)
            x[r] = torch.where(x[r].isnan(), x[r], torch.full_like(x[r], -math.inf))
    args = (x.to(dtype), y, None, -100, 0.0, None, None, False, 0)
    got, want = torch.ops.memfast.cross_entropy_fwd(*args), reference.cross_entropy_fwd(*args)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert want[1][ROW["correct"], ::5].eq(0).all() and want[1][ROW["correct"]].eq(1).any()


@pytest.mark.parametrize("kernel", ["default", "generic"])
def test_all_minus_inf_row_stats_match_reference(kernel, monkeypatch):
    """A row of only -inf logits: lse NaN (as -inf - -inf), and `correct` as argmax (first index: 0)."""
    if not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    if kernel == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    x = torch.randn(4, 37)
    x[1] = -math.inf
    x[2] = -math.inf
    y = torch.tensor([3, 0, 20, 5])  # the -inf rows' targets: the first index (argmax) and another
    args = (x, y, None, -100, 0.0, None, None, False, 0)
    got, want = torch.ops.memfast.cross_entropy_fwd(*args), reference.cross_entropy_fwd(*args)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert got[1][ROW["log_sum"], 1:3].isnan().all()
    assert got[1][ROW["correct"], 1:3].tolist() == [1.0, 0.0]


def test_bfloat16_target_gradient_formed_in_fp32(backend):
    # p_y -> 1: the true-class gradient p_y - 1 is tiny; rounding p_y to bf16 first would give exactly 0.
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    x[:, 3] = 12.0
    y = torch.full((4,), 3)
    x.requires_grad_(True)
    memfast.cross_entropy(x, y, reduction="sum").backward()
    exact = -(7 * math.exp(-12.0)) / (1 + 7 * math.exp(-12.0))
    assert x.grad[0, 3].item() != 0.0
    assert abs(x.grad[0, 3].item() - exact) / abs(exact) < 1e-2


@pytest.mark.parametrize("form", ["dense", "vector", "table"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_adjustment(backend, form, dtype):
    N, C, A = 23, 6, 4
    x = torch.randn(N, C).to(dtype)
    y = torch.randint(0, C, (N,))
    y[2] = -100
    if form == "dense":
        adj = torch.randn(N, C)
        kw, shift = dict(adjustment=adj), adj
    elif form == "vector":
        adj = torch.randn(C)
        kw, shift = dict(adjustment=adj), adj.expand(N, C)
    else:
        table, groups = torch.randn(A, C), torch.randint(0, A, (N,))
        kw, shift = dict(adjustment=table, groups=groups), table[groups]
    for reduction in ("mean", "none"):
        _compare(x, y, TOL[dtype], reduction=reduction, shift=shift, label_smoothing=0.1, **kw)


def test_adjustment_gets_no_gradient(backend):
    x = torch.randn(5, 3, requires_grad=True)
    adj = torch.randn(5, 3, requires_grad=True)
    memfast.cross_entropy(x, torch.randint(0, 3, (5,)), adjustment=adj).backward()
    assert adj.grad is None and x.grad is not None


def test_adjustment_spatial(backend):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 5))
    adj = torch.randn(3, 4, 5, dtype=torch.float64)
    _compare(x, y, 1e-10, reduction="none", adjustment=adj, shift=adj)
    table, groups = torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 2, (3, 5))
    _compare(x, y, 1e-10, adjustment=table, groups=groups, shift=table[groups].permute(0, 2, 1))


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
def test_gradcheck_float64(backend, check):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (7,))
    y[1] = -100
    w = torch.rand(5, dtype=torch.float64) + 0.5
    table, groups = torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    for reduction in ("mean", "none", "sum"):
        check(
            lambda t: memfast.cross_entropy(t, y, w, reduction=reduction, label_smoothing=0.2, adjustment=table,
                                            groups=groups), (x,))


def test_module_form(backend):
    x = torch.randn(8, 4, requires_grad=True)
    y = torch.randint(0, 4, (8,))
    w = torch.rand(4) + 0.5
    loss = memfast.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss(x, y), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1,
                                                                      reduction="sum")(x, y))


def test_module_form_with_tracker(backend):
    x = torch.randn(8, 4, requires_grad=True)
    y, ids = torch.randint(0, 4, (8,)), torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    module_tracker, functional_tracker = memfast.SampleTracker(7, stats="all"), memfast.SampleTracker(7, stats="all")
    loss_fn = memfast.CrossEntropyLoss(label_smoothing=0.1, tracker=module_tracker)
    torch.testing.assert_close(loss_fn(x, y, ids), memfast.cross_entropy(x, y, label_smoothing=0.1, sample_ids=ids,
                                                                         tracker=functional_tracker))
    assert torch.equal(module_tracker.state, functional_tracker.state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            loss_fn(x, y)  # an evaluation call: untracked on purpose, no warning
    with pytest.warns(UserWarning, match="no sample_ids"):
        loss_fn(x, y)  # a training step without ids: untracked, and said so once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, y)
    assert torch.equal(module_tracker.state, functional_tracker.state)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_matches_pytorch(backend, autocast_dtype, reduction):
    """Under autocast the logits are fp16 / bf16 and F.cross_entropy (autocast's fp32 policy) returns
    an fp32 loss; so does memfast, with the same gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 7)
    x, y = torch.randn(12, 16), torch.randint(0, 7, (12,))
    y[3] = -100
    losses, grads = [], []
    for fn in (F.cross_entropy, memfast.cross_entropy):
        model.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype):
            logits = model(x)
            assert logits.dtype == autocast_dtype
            loss = fn(logits, y, reduction=reduction)
        loss.sum().backward()
        losses.append(loss)
        grads.append(model.weight.grad.clone())
    assert losses[1].dtype == losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-2, rtol=1e-2)


def test_autocast_output_dtype_under_compile(backend):
    def loss_fn(logits, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return memfast.cross_entropy(logits, y)

    logits, y = torch.randn(6, 5).bfloat16(), torch.randint(0, 5, (6,))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert compiled(logits, y).dtype == loss_fn(logits, y).dtype == torch.float32
    assert memfast.cross_entropy(logits, y).dtype == torch.bfloat16  # no autocast: the input's dtype, as F


def test_legacy_reduction_arguments(backend):
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    torch.testing.assert_close(memfast.cross_entropy(x, y, size_average=False), F.cross_entropy(x, y, reduction="sum"))


def test_no_grad_skips_gradient(backend):
    x = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        out = memfast.cross_entropy(x, torch.randint(0, 3, (4,)))
    assert not out.requires_grad


# ---------------------------------------------------------------- op vs reference
def _fwd_cases():
    g = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        for C in (1, 2, 10, 257):
            for opts in ({}, {"w": True}, {"eps": 0.1}, {"w": True, "eps": 0.3}, {"adj": "dense"},
                         {"adj": "table"}, {"adj": "expand"}):
                yield dtype, C, opts, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 257, 3000])
@pytest.mark.parametrize("opts", ["plain", "weight", "smooth", "weight+smooth", "dense", "table", "expand"])
@pytest.mark.parametrize("kernel", ["default", "generic"])
def test_forward_op_matches_reference(dtype, C, opts, kernel, monkeypatch):
    if kernel == "generic":  # the portable loops, where the build also has AVX-512 ones
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    if not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    R, A = 19, 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(R, C) * 4).to(dtype)
    target = torch.randint(0, C, (R,))
    target[::4] = -1
    weight = torch.rand(C, dtype=acc) + 0.2 if "weight" in opts else None
    eps = 0.2 if "smooth" in opts else 0.0
    adjustment = groups = None
    if opts == "dense":
        adjustment = torch.randn(R, C, dtype=acc)
    elif opts == "table":
        adjustment, groups = torch.randn(A, C, dtype=acc), torch.randint(0, A, (R,))
    elif opts == "expand":
        adjustment = torch.randn(C, dtype=acc).expand(R, C)
    reduction = C % 3  # none, mean and sum across the C values
    args = (logits, target, weight, -1, eps, adjustment, groups, True, reduction)
    got = torch.ops.memfast.cross_entropy_fwd(*args)
    want = reference.cross_entropy_fwd(*args)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype != torch.float64 else dict(atol=1e-12, rtol=1e-12)
    for a, b, name in zip(got, want, ("loss", "row_stats", "grad")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "grad":
            tol_g = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(a.float(), b.float(), **tol_g, msg=name)
        else:
            torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=name)


def test_backward_twice(backend):
    # the first backward scales the saved gradient in place; a second one recomputes it
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    logits = x * 2
    loss = memfast.cross_entropy(logits, y, reduction="sum")
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (want,) = torch.autograd.grad(F.cross_entropy(x * 2, y, reduction="sum"), x)
    torch.testing.assert_close(x.grad, 2 * want)
    del logits  # small logits are kept by the loss: a third backward recomputes from them
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * want)
    with torch.no_grad():
        x.grad = None
    big_x = torch.randn(64, memfast._ops.KEEP_LOGITS_BYTES // (4 * 64) + 1, requires_grad=True)
    big = big_x * 2
    loss = memfast.cross_entropy(big, torch.zeros(64, dtype=torch.long), reduction="sum")
    loss.backward(retain_graph=True)
    del big  # larger logits are held weakly: without them a second backward cannot recompute
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_double_backward_graph_keeps_gradient(backend):
    # create_graph=True takes the differentiable path: the saved gradient is not consumed.
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    (g1,) = torch.autograd.grad(memfast.cross_entropy(x, y), x, create_graph=True)
    assert g1.requires_grad
    torch.testing.assert_close(g1, torch.autograd.grad(F.cross_entropy(x, y), x)[0])


def _with_gradient_penalty(loss_fn, model, x, y):
    """loss + |d loss / d x|^2 (input-gradient regularisation): needs create_graph."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y, label_smoothing=0.1)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + gx.pow(2).sum()).backward()
    return [p.grad for p in model.parameters()]


def test_gradient_penalty_matches_pytorch(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, -100, 1, 0])
    got = _with_gradient_penalty(memfast.cross_entropy, model, x, y)
    want = _with_gradient_penalty(F.cross_entropy, twin, x, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("autograd", ["c++", "python"])
def test_saved_logits_are_freed_by_the_backward(backend, autograd, monkeypatch):
    """Small logits saved for a second backward go with the graph's buffers: after a backward
    without retain_graph they are freed although the loss lives on (e.g. summed into a total); a
    small view of large logits does not pin them (its storage decides)."""
    import gc
    import weakref

    if autograd == "python":
        monkeypatch.setattr(memfast._ops, "_C", None)
    model = torch.nn.Linear(5, 4)
    logits = model(torch.randn(6, 5))
    ref = weakref.ref(logits)
    loss = memfast.cross_entropy(logits, torch.randint(0, 4, (6,)))
    del logits
    gc.collect()
    assert ref() is not None  # saved for the backward
    loss.backward()
    gc.collect()
    assert ref() is None and loss.requires_grad
    classes = memfast._ops.KEEP_LOGITS_BYTES // (4 * 64) + 1
    full = torch.randn(64, classes, requires_grad=True) * 1.0
    ref = weakref.ref(full)
    loss = memfast.cross_entropy(full[-2:], torch.zeros(2, dtype=torch.long))  # a small view of large logits
    del full
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("autograd", ["c++", "python"])
def test_create_graph_keeps_small_logits_only(backend, autograd, monkeypatch):
    """The differentiable gradient is recomputed from the logits: a classifier's (up to
    KEEP_LOGITS_BYTES) are kept by the loss, so the input-gradient penalty works with nobody
    holding them, as with F.cross_entropy; larger ones (an LM head's) are held weakly, and
    without a reference the penalty raises, naming them."""
    if autograd == "python":
        monkeypatch.setattr(memfast._ops, "_C", None)
    model = torch.nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    (got,) = torch.autograd.grad(memfast.cross_entropy(model(x), y), x, create_graph=True)
    (want,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.pow(2).sum(), x)[0],
                               torch.autograd.grad(want.pow(2).sum(), x)[0])
    classes = memfast._ops.KEEP_LOGITS_BYTES // (4 * 64) + 1  # 64 rows of fp32: just over the limit
    big = torch.nn.Linear(8, classes)
    xb = torch.randn(64, 8, requires_grad=True)
    loss = memfast.cross_entropy(big(xb), torch.randint(0, classes, (64,)))
    with pytest.raises(RuntimeError, match="logits alive"):
        torch.autograd.grad(loss, xb, create_graph=True)


@pytest.mark.parametrize("autograd", ["c++", "python"])
@pytest.mark.parametrize("shape, target_shape", [((2, 3, 4, 5), (2, 4, 5)), ((3,), ())],
                         ids=["spatial", "unbatched"])
def test_second_and_differentiable_backward_of_reshaped_inputs(backend, shape, target_shape, autograd,
                                                                monkeypatch):
    # memfast makes the op's [R, C] rows itself here (a movedim + reshape copy, an unsqueeze): a
    # recompute must start from the caller's tensor, which is what the caller keeps alive.
    # autograd: the C++ eager Function, or the Python one (used when the extension is missing)
    if autograd == "python":
        monkeypatch.setattr(memfast._ops, "_C", None)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, target_shape)
    logits = x * 1.5
    (got,) = torch.autograd.grad(memfast.cross_entropy(logits, y), x, create_graph=True)
    (want,) = torch.autograd.grad(F.cross_entropy(logits, y), x, create_graph=True)
    torch.testing.assert_close(got, want)
    (got2,) = torch.autograd.grad(got.pow(2).sum(), x, retain_graph=True)
    (want2,) = torch.autograd.grad(want.pow(2).sum(), x)
    torch.testing.assert_close(got2, want2)
    loss = memfast.cross_entropy(x * 1.5, y, reduction="sum")  # a temporary: small, so the loss keeps it
    loss.backward(retain_graph=True)
    loss.backward()
    (want,) = torch.autograd.grad(F.cross_entropy(x * 1.5, y, reduction="sum"), x)
    torch.testing.assert_close(x.grad, 2 * want)


def test_eager_step_runs_no_python_autograd(backend):
    """With the extension built, a plain eager step goes through the C++ autograd Function
    (csrc/autograd.cpp): torch.library's Python autograd wrapper never runs, and (kernels) nor
    does any memfast Python in the backward -- at small shapes a step is host time."""
    if memfast.build_info() is None:
        pytest.skip("the extension is not built")
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    tracker = memfast.SampleTracker(6, stats="all")
    files = []

    def record(frame, event, arg):
        if event == "call":
            files.append(frame.f_code.co_filename)

    sys.setprofile(record)
    try:
        loss = memfast.cross_entropy(x, y, sample_ids=torch.arange(6), tracker=tracker)
        forward_files, files[:] = list(files), []
        loss.backward()
    finally:
        sys.setprofile(None)
    assert "CrossEntropyFunction" in loss.grad_fn.name()
    assert not [f for f in forward_files + files if "_library" in f], "torch.library's Python autograd ran"
    # a bf16 loss (F.cross_entropy's dtype) comes out of the Function itself: no extra .to() node
    half = memfast.cross_entropy(x.detach().bfloat16().requires_grad_(True), y)
    assert half.dtype == torch.bfloat16 and "CrossEntropyFunction" in half.grad_fn.name()
    if backend == "kernels":
        assert not [f for f in files if "memfast" in f], files
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, y), x)[0])
    assert tracker.stat("count").tolist() == [1, 1, 1, 1, 1, 0]


def test_torch_func_transforms(backend):
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, -100, 1, 2, 3])
    for reduction in ("mean", "none"):
        def loss(fn):
            return lambda z: fn(z, y, reduction=reduction, label_smoothing=0.1).sum()
        torch.testing.assert_close(torch.func.grad(loss(memfast.cross_entropy))(x),
                                   torch.func.grad(loss(F.cross_entropy))(x))
        # second order: the gradient of the gradient (jacrev over grad)
        torch.testing.assert_close(torch.func.jacrev(torch.func.grad(loss(memfast.cross_entropy)))(x),
                                   torch.func.jacrev(torch.func.grad(loss(F.cross_entropy)))(x))
    # forward mode: jvp / jacfwd, forward-over-reverse hessian, and torch.autograd.forward_ad
    w = torch.rand(4, dtype=torch.float64) + 0.5
    for kw in (dict(), dict(reduction="none", weight=w), dict(reduction="sum", weight=w, label_smoothing=0.2)):
        def ours(z):
            return memfast.cross_entropy(z, y, **kw)

        def theirs(z):
            return F.cross_entropy(z, y, **kw)

        torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(theirs)(x))
        torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(theirs)(x))
        tangent = torch.randn_like(x)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, tangent)
            got = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
            want = torch.autograd.forward_ad.unpack_dual(theirs(dual)).tangent
        torch.testing.assert_close(got, want)
    # per-sample gradients of a linear model: vmap over grad (vmap runs the op per example)
    W, X, Y = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), y.clamp(min=0)

    def per_sample(fn):
        def f(w, xi, yi):
            return fn((xi @ w)[None], yi[None])
        return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(W, X, Y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "no batching rule: falling back to a loop"
        torch.testing.assert_close(per_sample(memfast.cross_entropy), per_sample(F.cross_entropy))


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_op_scalar_and_unit_factors(ns, dtype):
    """cross_entropy_bwd(_) with a 0-d grad_loss (mean / sum) and with per-row
    factors of exactly 1, which the in-place form skips."""
    if ns == "memfast" and not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    g = torch.randn(7, 13).to(dtype)
    g[3] = 0
    for factor in (torch.tensor(1.0), torch.tensor(0.5), torch.tensor([1.0, 2.0, 1.0, math.inf, 1.0, -1.0, 1.0])):
        want = torch.where(g.float() == 0, 0.0, g.float() * (factor[:, None] if factor.dim() else factor)).to(dtype)
        out = op.cross_entropy_bwd(g, factor)
        assert out.data_ptr() != g.data_ptr()
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        inplace = g.clone()
        op.cross_entropy_bwd_(inplace, factor)
        torch.testing.assert_close(inplace, want, atol=0, rtol=0)


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_inplace_backward_op_refuses_grad_loss_sharing_the_gradient(ns):
    """cross_entropy_bwd_ reads grad_loss while it scales the rows: a grad_loss that is
    a view of the gradient would be read after being overwritten. The allocating form
    has no such hazard and accepts it."""
    if ns == "memfast" and not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    g = torch.randn(6, 6)
    for view in (g[:, 0], g.view(-1)[:6], g[2, 3]):
        before = g.clone()
        with pytest.raises(ValueError, match="grad_loss shares the memory"):
            op.cross_entropy_bwd_(g, view)
        assert torch.equal(g, before)
        want = torch.where(g == 0, 0.0, g * (view[:, None] if view.dim() else view))
        torch.testing.assert_close(op.cross_entropy_bwd(g, view), want, atol=0, rtol=0)
    op.cross_entropy_bwd_(g, g[:, 0].clone())


# ------------------------------------------------------------ inplace_backward
# Every inplace_backward test runs with class-index targets (cross_entropy_fwd_) and with
# class-probability targets (cross_entropy_prob_fwd_).
TARGET_KINDS = ["index", "probability"]


def _lm_head(dtype, R=11, H=6, C=9, seed=0, targets="index"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=g).to(dtype)
    w = torch.randn(H, C, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, C, (R,), generator=g)
    y[3] = -100
    if targets == "probability":  # soft labels, and a row without mass where index targets ignore one
        y = torch.softmax(2 * torch.randn(R, C, generator=g), 1).to(dtype)
        y[3] = 0
    return h, w, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "weight+smooth", "table", "tracked"])
@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_matches_pytorch(backend, dtype, reduction, opts, targets):
    h, w, y = _lm_head(dtype, targets=targets)
    C = w.shape[1]
    kw, want_kw = {}, {}
    if opts == "weight+smooth":
        kw = want_kw = {"weight": torch.rand(C, dtype=torch.float64).to(dtype) + 0.5, "label_smoothing": 0.1}
    table, groups = torch.randn(2, C, dtype=torch.float64), torch.randint(0, 2, (len(y),))
    if opts == "table":
        kw = {"adjustment": table.to(dtype), "groups": groups}

    def run(inplace):
        w.grad = None
        tracker = memfast.SampleTracker(len(y), stats="all")
        extra = {"sample_ids": torch.arange(len(y)), "tracker": tracker} if opts == "tracked" else {}
        logits = h @ w
        loss = memfast.cross_entropy(logits, y, reduction=reduction, inplace_backward=inplace, **kw, **extra)
        buffer = logits.detach().clone()
        grads = []
        logits.register_hook(lambda g: grads.append(g.data_ptr()))
        upstream = torch.linspace(0.5, 2.0, len(y), dtype=loss.dtype) if reduction == "none" else None
        if targets == "probability" and inplace:
            assert logits._version > 0  # (the fused op ran: PyTorch's loss would not write the logits)
        loss.backward(upstream)
        return loss.detach(), w.grad.clone(), buffer, grads[0] == logits.data_ptr(), tracker.state

    loss, grad, buffer, reused, state = run(True)
    loss_alloc, grad_alloc, _, reused_alloc, state_alloc = run(False)
    assert reused and not reused_alloc  # the gradient the head's backward got is the logits' own buffer
    torch.testing.assert_close(loss, loss_alloc)
    torch.testing.assert_close(grad, grad_alloc)
    torch.testing.assert_close(state, state_alloc, equal_nan=True)
    # after the forward the logits hold d loss / d logits (for 'none', before the upstream scaling)
    logits = (h @ w).detach().requires_grad_(True)
    if opts == "table":
        z = logits.double() + table[groups]
        want = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum" if reduction == "none" else reduction), logits)
    else:
        want = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum" if reduction == "none" else reduction,
                                                   **want_kw), logits)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(buffer, want[0].to(dtype), **tol)


@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_is_refused_where_it_would_corrupt(backend, targets):
    h, w, y = _lm_head(torch.float32, targets=targets)
    with pytest.raises(ValueError, match="a leaf"):
        memfast.cross_entropy(w, y[:6], inplace_backward=True)
    with pytest.raises(ValueError, match="a view of a leaf"):
        memfast.cross_entropy(w[:, :5], y[:6] if targets == "index" else y[:6, :5], inplace_backward=True)
    assert w.grad is None
    with pytest.raises(ValueError, match="contiguous"):
        memfast.cross_entropy((h @ w).t().contiguous().t(), y, inplace_backward=True)
    if targets == "probability":  # the kernel reads them while it writes the logits
        logits = h @ w
        with pytest.raises(ValueError, match="target shares their memory"):
            memfast.cross_entropy(logits, logits.detach(), inplace_backward=True)
    # another backward that saved the logits: autograd refuses it, as after any in-place op
    logits = h @ w
    z_loss = logits.logsumexp(1).pow(2).mean()
    loss = memfast.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + 1e-4 * z_loss).backward()
    # the logits changed in place after the loss: its gradient (their buffer) is no longer its own
    logits = h @ w
    loss = memfast.cross_entropy(logits, y, inplace_backward=True)
    with torch.no_grad():
        logits.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # two in-place losses on the same logits (a distillation's soft and hard terms): the second
    # read the first's gradient as logits, which the first's backward refuses, whichever kind came first
    _, _, q = _lm_head(torch.float32, targets="probability")
    _, _, labels = _lm_head(torch.float32)
    logits = h @ w
    loss = memfast.cross_entropy(logits, y, inplace_backward=True)
    loss = loss + memfast.cross_entropy(logits, q if targets == "index" else labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # recomputing the gradient needs the logits, which now hold it
    logits = h @ w
    loss = memfast.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss, w, create_graph=True)
    loss = memfast.cross_entropy(h @ w, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


@pytest.mark.parametrize("first", TARGET_KINDS)
def test_inplace_loss_after_another_loss_of_the_same_logits(backend, first):
    """Distillation's soft and hard terms of one set of logits, the in-place one last (as the README
    advises): the first loss's backward does not need the logits it kept (small ones, for a
    gradient penalty), so it does not fail on the in-place change; both gradients are PyTorch's.
    A gradient penalty through the first loss then needs them, and raises. (Index targets first:
    the C++ autograd keeps them; probability targets first: the Python one.)"""
    h, w, y = _lm_head(torch.float64)
    _, _, q = _lm_head(torch.float64, targets="probability")
    hard, soft = (y, q) if first == "index" else (q, y)
    logits = h @ w
    loss = memfast.cross_entropy(logits, hard) + memfast.cross_entropy(logits, soft, inplace_backward=True)
    loss.backward()
    (want,) = torch.autograd.grad(F.cross_entropy(h @ w, hard) + F.cross_entropy(h @ w, soft), w)
    torch.testing.assert_close(w.grad, want)
    logits = h @ w
    loss = memfast.cross_entropy(logits, hard)
    memfast.cross_entropy(logits, soft, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, w, create_graph=True)


@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_without_a_gradient_writes_nothing(backend, targets):
    h, w, y = _lm_head(torch.float32, targets=targets)
    logits = h @ w
    before = logits.detach().clone()
    with torch.no_grad():
        memfast.cross_entropy(logits, y, inplace_backward=True)
    memfast.cross_entropy(logits.detach(), y, inplace_backward=True)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("shape", [(2, 4, 3), (1, 4, 3), (2, 4, 1)], ids=["copied", "strided-view", "view"])
@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_spatial_input_is_left_alone(backend, shape, targets):
    # [N, C, d] inputs are copied to rows (also where the rows could be a view of the input):
    # the gradient goes over memfast's copy, not the input
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (shape[0], shape[2]))
    if targets == "probability":
        y = torch.softmax(torch.randn(*shape, dtype=torch.float64), 1)
    logits = x * 2
    before = logits.detach().clone()
    memfast.cross_entropy(logits, y, inplace_backward=True).backward()
    assert torch.equal(logits.detach(), before)
    (want,) = torch.autograd.grad(F.cross_entropy(x * 2, y), x)
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_through_the_module(backend, targets):
    h, w, y = _lm_head(torch.float32, targets=targets)
    loss_fn = memfast.CrossEntropyLoss(inplace_backward=True)
    logits = h @ w
    loss_fn(logits, y).backward()
    (want,) = torch.autograd.grad(F.cross_entropy(h @ w, y), w)
    torch.testing.assert_close(w.grad, want)
    assert not torch.equal(logits.detach(), (h @ w).detach())  # the logits now hold the gradient


class _ViewInCustomFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_through_views(backend, targets):
    # an LM's logits: a [B, T, V] output viewed as rows, or a view made inside a custom Function
    h, w, y = _lm_head(torch.float64, R=12, targets=targets)
    C = w.shape[1]
    (want,) = torch.autograd.grad(F.cross_entropy(h @ w, y), w)
    for make in (lambda: (h @ w).view(3, 4, C).view(-1, C), lambda: _ViewInCustomFunction.apply(h @ w)):
        w.grad = None
        rows = make()
        memfast.cross_entropy(rows, y, inplace_backward=True).backward()
        torch.testing.assert_close(w.grad, want)
    # a softcap saved its output (tanh): that backward must refuse the overwritten values
    rows = (h @ w).tanh().view(3, 4, C).view(-1, C)
    loss = memfast.cross_entropy(rows, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _loss_inputs(kind, large):
    """Logits [64, C] from x (small: kept by the loss; large: over KEEP_LOGITS_BYTES, held weakly),
    an index or probability target, class weights and a dense adjustment."""
    from memfast import _ops

    C = _ops.KEEP_LOGITS_BYTES // (8 * 64) + 1 if large else 5
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    logits = x @ torch.randn(3, C, dtype=torch.float64)
    target = torch.randint(0, C, (64,)) if kind == "index" else torch.softmax(torch.randn(64, C, dtype=torch.float64), 1)
    return x, logits, target, torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(64, C, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("changed", ["weight", "adjustment", "target"])
def test_inputs_changed_in_place_after_the_loss_are_refused(backend, kind, large, changed):
    """As for tensors autograd saves: a backward (which may recompute the gradient from them, in a
    second or a differentiable backward) refuses a target, weight or adjustment changed in place
    since the forward, naming it -- before, a recompute used the new values silently."""
    x, logits, target, weight, adjustment = _loss_inputs(kind, large)
    loss = memfast.cross_entropy(logits, target, weight=weight, adjustment=adjustment)
    {"weight": weight, "adjustment": adjustment, "target": target}[changed].mul_(2)
    for backward in (lambda: loss.backward(retain_graph=True), lambda: torch.autograd.grad(loss, x, create_graph=True)):
        with pytest.raises(RuntimeError, match=f"the {changed} was modified in place"):
            backward()
    assert x.grad is None


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("large", [False, True])
def test_inputs_are_freed_by_a_backward_that_frees_the_graph(backend, kind, large):
    """The target (a teacher's [N, C] probabilities) and a dense adjustment are let go by a backward
    without retain_graph, as autograd frees what it saved, though the loss tensor lives on (a loop
    keeps it until the next step's loss replaces it); a second backward then raises PyTorch's
    message, as it would (before, one through large logits recomputed silently)."""
    import gc

    x, logits, target, weight, adjustment = _loss_inputs(kind, large)
    loss = memfast.cross_entropy(logits, target, weight=weight, adjustment=adjustment)
    memory = [t.untyped_storage()._weak_ref() for t in (target, adjustment)]
    del target, adjustment, logits
    gc.collect()
    assert not any(torch.UntypedStorage._expired(m) for m in memory)  # kept for the backward
    loss.backward()
    gc.collect()
    assert all(torch.UntypedStorage._expired(m) for m in memory)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_gradient_penalty_refuses_large_logits_detached_in_place(backend, kind):
    """Large logits are held weakly; detach_() on them after the loss removes the history a
    differentiable gradient needs: refused, not a penalty that silently adds nothing."""
    x, logits, target, _, _ = _loss_inputs(kind, large=True)
    loss = memfast.cross_entropy(logits, target)
    logits.detach_()
    with pytest.raises(RuntimeError, match="detach_"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("targets", TARGET_KINDS)
def test_inplace_backward_checks_the_ids_before_it_writes(backend, targets):
    """With inplace_backward the forward overwrites the logits before the tracker sees the ids: an
    out-of-range id is refused first, leaving logits and tracker as they were."""
    h, w, y = _lm_head(torch.float32, targets=targets)
    tracker = memfast.SampleTracker(11)
    logits = h @ w
    before = logits.detach().clone()
    for bad in (11, -1):
        ids = torch.arange(11)
        ids[5] = bad
        with pytest.raises(IndexError, match=f"sample_ids\\[5\\] = {bad} is out of range"):
            memfast.cross_entropy(logits, y, sample_ids=ids, tracker=tracker, inplace_backward=True)
        assert torch.equal(logits, before)
        assert not tracker.state.any() and not tracker.counters.any()
