"""memfast.linear_cross_entropy against F.cross_entropy(F.linear(...)): values,
gradients of input / weight / bias, chunking, tracking, autocast, bad input."""
import pytest
import torch
import torch.nn.functional as F

import memfast

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _head(dtype, B=3, T=5, H=6, C=13, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(C, H, generator=g) / H ** 0.5).to(dtype).requires_grad_(True)
    b = torch.randn(C, generator=g).to(dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, C, (B, T), generator=g)
    y[0, :2] = -100  # a prompt
    return x, w, b, y


def _reference(x, w, b, y, **kw):
    logits = F.linear(x, w, b)
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), **kw).reshape(
        y.shape if kw.get("reduction") == "none" else ())


def _grads(loss, inputs, upstream=None):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, inputs, upstream)


def _assert_matches(got, want, inputs, dtype, reduction):
    """The same dtype, shape, value and gradients (per-row upstream ones for 'none')."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    upstream = torch.linspace(0.5, 2, want.numel(), dtype=want.dtype).reshape(want.shape) if reduction == "none" \
        else None
    for a, c in zip(_grads(got, inputs, upstream), _grads(want, inputs, upstream)):
        torch.testing.assert_close(a, c, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "weight+smooth", "no-bias"])
@pytest.mark.parametrize("chunk_size", [1, 4, None, 1000])
def test_matches_linear_then_cross_entropy(backend, dtype, reduction, opts, chunk_size):
    x, w, b, y = _head(dtype, bias=opts != "no-bias")
    kw = {"reduction": reduction}
    if opts == "weight+smooth":
        kw.update(weight=torch.rand(w.shape[0], dtype=torch.float64).to(dtype) + 0.5, label_smoothing=0.1)
    got = memfast.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=chunk_size, **kw)
    _assert_matches(got, _reference(x, w, b, y, **kw), (x, w, b), dtype, reduction)


def test_matches_torch_linear_cross_entropy_where_it_exists(backend):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch.nn.functional.linear_cross_entropy: PyTorch 2.13+")
    x, w, b, y = _head(torch.float64)
    rows = x.reshape(-1, x.shape[-1])  # torch's takes 1-D or 2-D input
    for targets in (y.reshape(-1), _soft(y, w.shape[0], torch.float64).reshape(-1, w.shape[0])):
        for reduction in ("mean", "sum", "none"):
            got = memfast.linear_cross_entropy(rows, w, targets, linear_bias=b, reduction=reduction,
                                               label_smoothing=0.2)
            want = F.linear_cross_entropy(rows, w, targets, linear_bias=b, reduction=reduction, label_smoothing=0.2)
            torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_chunks_bound_the_logits(backend, monkeypatch):
    from memfast import linear

    x, w, b, y = _head(torch.float32, B=4, T=8)
    shapes = []
    real = linear.F.linear

    def spy(*args):
        out = real(*args)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(linear.F, "linear", spy)
    memfast.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=5).backward()
    assert shapes == [(5, 13)] * 6 + [(2, 13)]  # 32 rows; mean: the gradients are formed in the forward
    shapes.clear()
    memfast.linear_cross_entropy(x, w, y, linear_bias=b).backward()  # default: at least 2^24 logits a chunk
    assert shapes == [(32, 13)]
    shapes.clear()
    monkeypatch.setattr(linear, "_MIN_CHUNK_ELEMENTS", 1)  # then a chunk's logits hold the input's elements
    memfast.linear_cross_entropy(x, w, y, linear_bias=b).backward()
    assert shapes == [(15, 13)] * 2 + [(2, 13)]  # ceil(32 * 6 / 13) = 15 rows
    shapes.clear()
    memfast.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", chunk_size=16).sum().backward()
    assert shapes == [(16, 13)] * 4  # 'none': forward, then the backward recomputes


@pytest.mark.parametrize("ids", ["per-row", "per-sequence"])
@pytest.mark.parametrize("chunk_size", [3, 7, None])
def test_tracking_matches_cross_entropy(backend, ids, chunk_size):
    # chunks of 3 and 7 rows split sequences of 5 tokens: a sequence's tokens still add into it
    x, w, b, y = _head(torch.float64)
    sample_ids = torch.tensor([4, 0, 2]) if ids == "per-sequence" else torch.arange(15) % 6
    got, want = (memfast.SampleTracker(6, stats="all") for _ in range(2))
    for tracker in (got, want):
        tracker.end_epoch()
    memfast.linear_cross_entropy(x, w, y, linear_bias=b, sample_ids=sample_ids, tracker=got,
                                 chunk_size=chunk_size).backward()
    logits = F.linear(x, w, b).reshape(-1, w.shape[0])
    memfast.cross_entropy(logits, y.reshape(-1), sample_ids=sample_ids, tracker=want)
    torch.testing.assert_close(got.state, want.state, equal_nan=True)
    assert torch.equal(got.counters, want.counters)


def test_without_gradient_only_tracks(backend):
    x, w, b, y = _head(torch.float32)
    tracker = memfast.SampleTracker(3)
    with torch.no_grad():
        loss = memfast.linear_cross_entropy(x, w, y, linear_bias=b, sample_ids=torch.arange(3), tracker=tracker,
                                            chunk_size=4)
    torch.testing.assert_close(loss, _reference(x, w, b, y).detach())
    assert tracker.stat("count").tolist() == [3, 5, 5]


def test_frozen_head_and_frozen_input(backend):
    x, w, b, y = _head(torch.float64)
    w.requires_grad_(False)
    (gx,) = torch.autograd.grad(memfast.linear_cross_entropy(x, w, y, linear_bias=b.detach(), chunk_size=4), x)
    torch.testing.assert_close(gx, torch.autograd.grad(_reference(x, w, b.detach(), y), x)[0])
    w.requires_grad_(True)
    xd = x.detach()
    gw, gb = torch.autograd.grad(memfast.linear_cross_entropy(xd, w, y, linear_bias=b, chunk_size=4), (w, b))
    want = torch.autograd.grad(_reference(xd, w, b, y), (w, b))
    torch.testing.assert_close(gw, want[0])
    torch.testing.assert_close(gb, want[1])


def test_empty_and_all_ignored_are_nan_with_zero_gradients(backend):
    for B in (0, 2):
        x, w, b, y = _head(torch.float64, B=max(B, 1))
        x, y = x[:B].detach().requires_grad_(True), y[:B]
        y = torch.full_like(y, -100)
        loss = memfast.linear_cross_entropy(x, w, y, linear_bias=b)
        assert torch.isnan(loss)
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
        assert not gx.any() and not gw.any() and not gb.any()


def test_backward_twice(backend):
    x, w, b, y = _head(torch.float64)
    loss = memfast.linear_cross_entropy(x, w, y, linear_bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()
    x.grad = None
    loss = memfast.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none")
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()  # 'none' recomputes: fine
    torch.testing.assert_close(x.grad, 2 * torch.autograd.grad(_reference(x, w, b, y, reduction="sum"), x)[0])


def test_autocast_bf16_matches_pytorch(backend):
    x, w, b, y = _head(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = memfast.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=4)
        want = _reference(x, w, b, y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    for a, c in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, c, **TOL[torch.bfloat16])


@pytest.mark.parametrize("soft", [False, True])
def test_autocast_leaves_float64_alone(backend, soft):
    """Autocast does not cast float64 (F.linear of fp64 tensors stays fp64 under it): nor does
    memfast -- before, the head ran in bf16 and returned an fp32 loss 3e-3 off."""
    x, w, b, y = _head(torch.float64)
    target = torch.softmax(torch.randn(*y.shape, w.shape[0], dtype=torch.float64), -1) if soft else y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = memfast.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4)
        want = F.cross_entropy(F.linear(x, w, b).reshape(-1, w.shape[0]),
                               target.reshape(-1, w.shape[0]) if soft else target.reshape(-1))
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for a, c in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b))):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, c, **TOL[torch.float64])


def test_bad_input_names_the_argument(backend):
    x, w, b, y = _head(torch.float32)
    cases = [
        (dict(input=x.long()), TypeError, "input"),
        (dict(linear_weight=w.t()), ValueError, "linear_weight"),
        (dict(linear_bias=b[:3]), ValueError, "linear_bias"),
        (dict(target=y.float()), ValueError, "target has shape .* class probabilities"),
        (dict(target=y.bool()), TypeError, "target"),
        (dict(target=y[:, :2]), ValueError, "target"),
        (dict(weight=torch.ones(3)), ValueError, "weight"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(tracker=memfast.SampleTracker(3)), ValueError, "sample_ids"),
    ]
    for override, error, name in cases:
        args = dict(input=x, linear_weight=w, target=y, linear_bias=b)
        args.update(override)
        with pytest.raises(error, match=name):
            memfast.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)
    tracker = memfast.SampleTracker(3)
    bad = y.clone()
    bad[2, 4] = 99  # the last chunk's: raised there, on the CPU; the tracker is only updated after the loop
    with pytest.raises(IndexError):
        memfast.linear_cross_entropy(x, w, bad, linear_bias=b, sample_ids=torch.arange(3), tracker=tracker,
                                     chunk_size=4)
    assert not tracker.state.any() and not tracker.counters.any()


def test_bf16_mean_gradient_has_no_scale_bias(backend):
    # The mean's 1/denominator (60 rows here) enters the kernel in fp32: a bf16-rounded scale would
    # bias every gradient by the same factor (1/60 is 0.34% off in bf16), which averaging shows
    # (the bf16 inputs' own rounding leaves ~0.04%).
    x, w, b, y = _head(torch.bfloat16, B=4, T=16, H=32, C=50)
    y[1, :2] = -100
    assert int((y != -100).sum()) == 60
    got = torch.autograd.grad(memfast.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=16), (x, w, b))
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    want = torch.autograd.grad(_reference(xr, wr, br, y), (xr, wr, br))
    for a, c in zip(got, want):
        ratio = float((a.double() * c).sum() / (c * c).sum())
        assert abs(ratio - 1) < 1e-3, ratio


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph_and_matches_eager(backend, reduction):
    """torch.compile traces the chunked Function (its loop unrolled): same loss, gradients, tracker."""
    x, w, b, y = _head(torch.float32)
    ids = torch.arange(3)
    results = []
    for compiled in (False, True):
        tracker = memfast.SampleTracker(3, stats="all")
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))

        def step(xi, wi, bi):
            return memfast.linear_cross_entropy(xi, wi, y, linear_bias=bi, reduction=reduction, chunk_size=4,
                                                sample_ids=ids, tracker=tracker)

        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        loss = fn(xi, wi, bi)
        loss.sum().backward()
        results.append((loss.detach(), xi.grad, wi.grad, bi.grad, tracker.state, tracker.counters))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("autocast", [False, True])
def test_fp32_accumulation_of_the_weight_gradient(backend, autocast):
    """accum_dtype=torch.float32 over many bf16 chunks: the weight gradient is as accurate as one
    bf16 rounding (or better), where a bf16 running sum drifts by a few percent."""
    g = torch.Generator().manual_seed(0)
    N, H, C = 4096, 32, 64
    dtype = torch.float32 if autocast else torch.bfloat16  # the parameters' dtype
    x = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, H, generator=g) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    x64, w64 = x.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    F.cross_entropy(x64 @ w64.t(), y, reduction="sum").backward()
    errors = {}
    for accum_dtype in (None, torch.float32):
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = memfast.linear_cross_entropy(x, w, y, reduction="sum", chunk_size=16, accum_dtype=accum_dtype)
        loss.backward()
        assert w.grad.dtype == dtype
        errors[accum_dtype] = float((w.grad.double() - w64.grad).norm() / w64.grad.norm())
    print("relative error of the weight gradient by accum_dtype:", errors)  # the README quotes it (-s)
    assert errors[torch.float32] < 4e-3 < errors[None], errors
    with pytest.raises(ValueError, match="accum_dtype"):
        memfast.linear_cross_entropy(x, w, y, accum_dtype=torch.bfloat16)


# ------------------------------------------------ class-probability targets (a teacher's)
def _soft(y, C, dtype, seed=1):
    """A teacher's probabilities [..., C] in dtype, without mass where y is ignored."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(2 * torch.randn(*y.shape, C, generator=g, dtype=torch.float64), -1)
    return (q * (y != -100).unsqueeze(-1)).to(dtype)


@pytest.mark.parametrize("dtype,opts", [(d, o) for d in (torch.float64, torch.float32, torch.bfloat16)
                                         for o in ("plain", "weight+smooth", "zloss+softcap")]
                         + [(torch.bfloat16, "fp32 targets")])  # (fp32: bf16 logits' accumulation dtype)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_probability_targets_match_cross_entropy(backend, dtype, reduction, opts, chunk_size):
    """Soft targets: PyTorch's soft-target loss of the projection (the mean over all rows, rows
    without mass included), chunk by chunk; the z-loss and softcap as memfast.cross_entropy's."""
    x, w, b, y = _head(dtype)
    C = w.shape[0]
    q = _soft(y, C, torch.float32 if opts == "fp32 targets" else dtype)
    kw, extra = {"reduction": reduction}, {}
    if opts == "weight+smooth":
        kw.update(weight=torch.rand(C, dtype=torch.float64).to(dtype) + 0.5, label_smoothing=0.1)
    elif opts == "zloss+softcap":
        extra = {"lse_square_scale": 1e-2, "softcap": 2.0}
    got = memfast.linear_cross_entropy(x, w, q, linear_bias=b, chunk_size=chunk_size, **kw, **extra)
    logits = F.linear(x, w, b).reshape(-1, C)
    if extra:
        want = memfast.cross_entropy(logits, q.reshape(-1, C), **kw, **extra)
    else:
        want = F.cross_entropy(logits, q.reshape(-1, C), **kw)
    _assert_matches(got, want.reshape(y.shape) if reduction == "none" else want, (x, w, b), dtype, reduction)


@pytest.mark.parametrize("ids", ["per-row", "per-sequence"])
@pytest.mark.parametrize("chunk_size", [3, 7, None])
def test_probability_targets_track_as_cross_entropy(backend, ids, chunk_size):
    """Each row against its most probable class, rows without mass not counted: the tracker of
    memfast.cross_entropy on the whole logits, with chunks that split sequences."""
    x, w, b, y = _head(torch.float64)
    q = _soft(y, w.shape[0], torch.float64)
    sample_ids = torch.tensor([4, 0, 2]) if ids == "per-sequence" else torch.arange(15) % 6
    got, want = (memfast.SampleTracker(6, stats="all") for _ in range(2))
    memfast.linear_cross_entropy(x, w, q, linear_bias=b, sample_ids=sample_ids, tracker=got,
                                 chunk_size=chunk_size).backward()
    logits = F.linear(x, w, b).reshape(-1, w.shape[0])
    memfast.cross_entropy(logits, q.reshape(-1, w.shape[0]), sample_ids=sample_ids, tracker=want)
    torch.testing.assert_close(got.state, want.state, equal_nan=True)
    assert torch.equal(got.counters, want.counters)
    assert got.stat("count").sum() == 13  # two prompt tokens without mass


def test_probability_targets_under_autocast_empty_and_compiled(backend):
    x, w, b, y = _head(torch.float32)
    q = _soft(y, w.shape[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 targets for bf16 logits
        got = memfast.linear_cross_entropy(x, w, q, linear_bias=b, chunk_size=4)
        want = F.cross_entropy(F.linear(x, w, b).reshape(-1, w.shape[0]), q.reshape(-1, w.shape[0]))
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    for a, c in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b))):
        torch.testing.assert_close(a, c, **TOL[torch.bfloat16])
    # no rows: PyTorch's NaN mean, zero gradients
    x0 = x[:0].detach().requires_grad_()
    loss = memfast.linear_cross_entropy(x0, w, q[:0], linear_bias=b)
    assert torch.isnan(loss)
    assert not any(g.any() for g in torch.autograd.grad(loss, (x0, w, b)))
    # no classes: as F.cross_entropy (NaN mean, zeros otherwise)
    for rows in (x, x[:0]):
        for reduction in ("mean", "sum", "none"):
            w0, q0 = w[:0].detach(), q[..., :0][:len(rows)]
            want = F.cross_entropy(F.linear(rows, w0).flatten(0, -2), q0.flatten(0, -2), reduction=reduction)
            got = memfast.linear_cross_entropy(rows, w0, q0, reduction=reduction)
            torch.testing.assert_close(got, want.reshape(got.shape), equal_nan=True)
    # torch.compile(fullgraph=True): the same loss, gradients and tracker
    results = []
    for compiled in (False, True):
        tracker = memfast.SampleTracker(3, stats="all")
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

        def step(xi, wi):
            return memfast.linear_cross_entropy(xi, wi, q, chunk_size=4, sample_ids=torch.arange(3),
                                                tracker=tracker, lse_square_scale=1e-3)

        loss = (torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step)(xi, wi)
        loss.backward()
        results.append((loss.detach(), xi.grad, wi.grad, tracker.state))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


def test_probability_targets_bad_input_names_the_argument(backend):
    x, w, b, y = _head(torch.float32)
    q = _soft(y, w.shape[0], torch.float32)
    cases = [
        (dict(target=q[..., :5]), ValueError, r"target has shape .* class probabilities"),
        (dict(target=q.double()), TypeError, "class-probability targets must be in the logits' dtype"),
        (dict(target=q.clone().requires_grad_()), ValueError, "target requires grad"),
        (dict(ignore_index=0), ValueError, "ignore_index"),
        (dict(target=q.bool()), TypeError, "target"),
        (dict(target=(q * 255).to(torch.uint8)), ValueError, "class probabilities must be a floating-point"),
        # one id per row (15) or per sequence (3): 13 ids divide the 13 x 15 probabilities, not the rows
        (dict(sample_ids=torch.arange(13), tracker=memfast.SampleTracker(13)), ValueError, "sample_ids"),
    ]
    for override, error, match in cases:
        args = dict(target=q, linear_bias=b)
        args.update(override)
        with pytest.raises(error, match=match):
            memfast.linear_cross_entropy(x, w, args.pop("target"), **args)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_without_grad_mode(backend, monkeypatch, mode):
    """Under no_grad / inference_mode (an eval loop) the chunks form no gradients, although the
    parameters require grad (an autograd Function would still see that): same cost as detached."""
    x, w, b, y = _head(torch.float32)
    products = []
    monkeypatch.setattr(memfast.linear, "_accumulate", lambda *a: products.append(1))
    with getattr(torch, mode)():
        got = memfast.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=4)
    assert not products and not got.requires_grad
    torch.testing.assert_close(got, _reference(x, w, b, y).detach(), **TOL[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_differentiable_gradient_is_refused(backend, reduction, soft):
    """create_graph=True: the chunks' gradients are in-place products with no history, so a
    gradient penalty would silently miss this loss's part; refused with the alternative named."""
    x, w, b, y = _head(torch.float64)
    target = torch.softmax(torch.randn(*y.shape, w.shape[0], dtype=torch.float64), -1) if soft else y
    loss = memfast.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="create_graph=True.*memfast.cross_entropy"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("soft", [False, True])
def test_torch_func_transforms_match_pytorch(backend, soft):
    """torch.func (grad, vmap, jvp) gets the unfused loss, which it can transform; the tracker is
    updated once per call, as with memfast.cross_entropy."""
    x, w, b, y = _head(torch.float64)
    C = w.shape[0]
    target = torch.softmax(torch.randn(*y.shape, C, dtype=torch.float64), -1) if soft else y
    x, w, b = x.detach(), w.detach(), b.detach()

    def ours(w, x=x, target=target, **kw):
        return memfast.linear_cross_entropy(x, w, target, linear_bias=b, **kw)

    def theirs(w, x=x, target=target):
        return F.cross_entropy(F.linear(x, w, b).reshape(-1, C), target.reshape(-1, C) if soft else target.reshape(-1))

    torch.testing.assert_close(torch.func.grad(ours)(w), torch.func.grad(theirs)(w), **TOL[torch.float64])
    per_sequence = torch.func.vmap(torch.func.grad(ours), in_dims=(None, 0, 0))(w, x[:, None], target[:, None])
    torch.testing.assert_close(per_sequence, torch.func.vmap(torch.func.grad(theirs), in_dims=(None, 0, 0))(
        w, x[:, None], target[:, None]), **TOL[torch.float64])
    tangent = torch.randn_like(w)
    torch.testing.assert_close(torch.func.jvp(ours, (w,), (tangent,)), torch.func.jvp(theirs, (w,), (tangent,)),
                               **TOL[torch.float64])
    tracker, plain = memfast.SampleTracker(3, stats="all"), memfast.SampleTracker(3, stats="all")
    torch.func.grad(lambda w: ours(w, sample_ids=torch.arange(3), tracker=tracker))(w)
    ours(w, sample_ids=torch.arange(3), tracker=plain)
    torch.testing.assert_close(tracker.state, plain.state)
    assert torch.equal(tracker.counters, plain.counters)
