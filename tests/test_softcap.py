"""softcap (Gemma 2's final_logit_softcapping: the loss sees softcap * tanh(logits / softcap), computed
inside the fused op): against the formula written with PyTorch ops, the kernels against the reference
(and the kernels' tanh against float64), and every path that carries it (in-place gradient, tracking,
create_graph, linear heads, class-probability targets, torch.compile, bad values)."""
import math

import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import SampleTracker, _ops
from memfast._stats import ROW

needs_kernels = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")


def capped(x, cap):
    return cap * torch.tanh(x / cap)


@pytest.mark.parametrize("shape", ["rows", "spatial", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "weight+smooth+ignore", "adjusted", "z-loss"])
def test_matches_the_formula(backend, shape, reduction, opts):
    g = torch.Generator().manual_seed(7)
    C, cap = 7, 3.0
    xshape, yshape = {"rows": ((10, C), (10,)), "spatial": ((4, C, 3), (4, 3)), "unbatched": ((C,), ())}[shape]
    x = (torch.randn(xshape, generator=g, dtype=torch.float64) * 6).requires_grad_()  # well past the cap
    y = torch.randint(0, C, yshape, generator=g)
    kw = {}
    if opts == "weight+smooth+ignore":
        kw = dict(weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.2, label_smoothing=0.1)
        if y.dim():
            y.view(-1)[::3] = -100
    z = capped(x, cap)
    if opts == "adjusted":  # the shift is added to the capped logits
        kw["adjustment"] = shift = torch.randn(xshape, generator=g, dtype=torch.float64)
        z = z + shift
    got = memfast.cross_entropy(x, y, reduction=reduction, softcap=cap,
                                lse_square_scale=0.05 if opts == "z-loss" else 0.0, **kw)
    kw.pop("adjustment", None)
    want = F.cross_entropy(z, y, reduction=reduction, **kw)
    if opts == "z-loss":
        lse2 = torch.logsumexp(z, 1 if z.dim() > 1 else 0) ** 2
        want = want + 0.05 * (lse2 if reduction == "none" else lse2.mean() if reduction == "mean" else lse2.sum())
    torch.testing.assert_close(got, want)
    upstream = torch.rand(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(want, x, upstream)[0])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [1, 2, 17, 1000, 5003])
def test_kernels_match_reference(cpu_kernel, fwd_matches_reference, dtype, C):
    """Both scalar options of the op (lse_square_scale, softcap), alone and together, with weights,
    smoothing, both adjustment forms and every reduction; the in-place op bit for bit."""
    g = torch.Generator().manual_seed(C)
    R = 33
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(R, C, generator=g) * 8).to(dtype)
    y = torch.randint(0, C, (R,), generator=g)
    y[::4] = -100
    w = torch.rand(C, generator=g, dtype=acc) + 0.1
    table, groups = torch.randn(2, C, generator=g, dtype=acc), torch.randint(0, 2, (R,), generator=g)
    for args in ((x, y, None, -100, 0.0, None, None, True, 1, 1e-3, 0.0),
                 (x, y, w, -100, 0.2, None, None, True, 0, 0.3),
                 (x, y, w, -100, 0.0, table, groups, True, 2, 1.0),  # z-loss only (softcap left to its default)
                 (x, y, None, -100, 0.0, None, None, True, 1, 0.0, 5.0),
                 (x, y, w, -100, 0.2, None, None, True, 0, 1e-2, 2.0),
                 (x, y, w, -100, 0.0, table, groups, True, 2, 0.0, 30.0),
                 (x, y, None, -100, 0.1, x.to(acc) * 0.5, None, False, 0, 0.0, 0.5)):
        got = fwd_matches_reference(args)
        if args[7]:  # the in-place op writes the same loss and gradient
            buffer = x.clone()
            loss, stats = torch.ops.memfast.cross_entropy_fwd_(buffer, *args[1:7], *args[8:])
            assert torch.equal(loss, got[0]) and torch.equal(stats, got[1]) and torch.equal(buffer, got[2])


@needs_kernels
def test_kernel_tanh_is_accurate(cpu_kernel):
    """The kernels' fp32 tanh and its slope against float64, from 1e-6 to far past the cap: the capped
    logit (a row statistic) within 4 ulp, the gradient's chain factor within 1e-6 relative."""
    cap = 2.0
    mag = torch.logspace(-6, 2, 4001, dtype=torch.float64)
    z = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)]).float()
    # C == 1: the target logit is the capped logit itself
    stats = torch.ops.memfast.cross_entropy_fwd(z[:, None], torch.zeros_like(z, dtype=torch.long), None, -100, 0.0,
                                                None, None, False, 0, 0.0, cap)[1]
    want = cap * torch.tanh(z.double() / cap)
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 24)  # of the fp32 result
    err = (stats[ROW["target_logit"]].double() - want).abs() / ulp.where(want != 0, 1.0)
    assert err.max() <= 4, f"capped logit off by {err.max():.3g} ulp"
    # C == 2 with an uncapped-equal second class: the gradient carries the slope 1 - tanh^2
    rows = torch.stack([z, torch.zeros_like(z)], 1)
    got = torch.ops.memfast.cross_entropy_fwd(rows, torch.ones_like(z, dtype=torch.long), None, -100, 0.0, None,
                                              None, True, 0, 0.0, cap)[2][:, 0].double()
    # p_0 * sech^2(z / cap) in float64 (autograd's tanh backward, 1 - t^2, cancels as t -> 1)
    ref_grad = torch.softmax(capped(rows.double(), cap), 1)[:, 0] / torch.cosh(z.double() / cap) ** 2
    err = (got - ref_grad).abs() / ref_grad.abs().clamp_min(1e-30)
    live = ref_grad.abs() > 1e-30
    assert err[live].max() < 1e-6, f"gradient off by {err[live].max():.3g} (relative)"


def test_off_is_the_plain_loss_bit_for_bit(backend):
    x = torch.randn(12, 9, requires_grad=True)
    y = torch.randint(0, 9, (12,))
    a = memfast.cross_entropy(x, y, softcap=None)
    ga = torch.autograd.grad(a, x)[0]
    b = memfast.cross_entropy(x, y)
    gb = torch.autograd.grad(b, x)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(memfast.cross_entropy(x * 3, y, softcap=1.0), memfast.cross_entropy(x * 3, y))


def test_extreme_logits(backend):
    """inf and huge logits are capped to +-cap (a finite loss, a zero gradient there); NaN stays NaN."""
    cap = 5.0
    x = torch.tensor([[math.inf, 0.0, -math.inf, 1e30], [3.0, -1e30, 2.0, 1.0], [math.nan, 0.0, 1.0, 2.0]],
                     dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 3])
    got = memfast.cross_entropy(x, y, softcap=cap, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), x)
    want = F.cross_entropy(capped(x.detach(), cap), y, reduction="none")
    torch.testing.assert_close(got[:2], want[:2])
    assert torch.isfinite(got[:2]).all() and got[2].isnan()
    assert g[0, 0] == 0 and g[0, 2] == 0 and g[0, 3] == 0 and g[1, 1] == 0 and g[0, 1] != 0
    assert torch.isfinite(g[:2]).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_backward_and_tracking(backend, inplace):
    """The tracker's statistics are those of the capped logits; in place gives the same loss and gradient."""
    cap = 4.0
    x0 = torch.randn(16, 11, dtype=torch.float64) * 8
    y = torch.randint(0, 11, (16,))
    ids = torch.arange(16) // 2
    tracker = SampleTracker(8, stats="all")
    x = x0.clone().requires_grad_()
    loss = memfast.cross_entropy(x * 1.0, y, sample_ids=ids, tracker=tracker, inplace_backward=inplace, softcap=cap)
    loss.backward()
    xr = x0.clone().requires_grad_()
    want_tracker = SampleTracker(8, stats="all")
    want = memfast.cross_entropy(capped(xr, cap), y, sample_ids=ids, tracker=want_tracker)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(tracker.state, want_tracker.state)
    # the scoring pass, with the same cap
    scored = SampleTracker(8, stats="all")
    scored.update(x0, y, ids, softcap=cap)
    want_scored = SampleTracker(8, stats="all")
    want_scored.update(capped(x0, cap), y, ids)
    torch.testing.assert_close(scored.state, want_scored.state)


def test_create_graph_and_gradgradcheck(backend):
    x = (torch.randn(5, 4, dtype=torch.float64) * 3).requires_grad_()
    y = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, dtype=torch.float64) + 0.5

    def f(x):
        return memfast.cross_entropy(x, y, w, softcap=2.0, lse_square_scale=0.1, label_smoothing=0.1)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_torch_func_and_forward_ad(backend):
    x = torch.randn(6, 5, dtype=torch.float64) * 4
    y = torch.randint(0, 5, (6,))

    def f(x):
        return memfast.cross_entropy(x, y, softcap=3.0)

    def g(x):
        return F.cross_entropy(capped(x, 3.0), y)

    torch.testing.assert_close(torch.func.grad(f)(x), torch.func.grad(g)(x))
    v = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(f, (x,), (v,))[1], torch.func.jvp(g, (x,), (v,))[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_linear_cross_entropy(backend, reduction, chunk_size):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(13, 8, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 13, (2, 6), generator=g)
    y[0, :2] = -100
    tracker = SampleTracker(2, stats="all")
    got = memfast.linear_cross_entropy(x, W, y, reduction=reduction, chunk_size=chunk_size, softcap=4.0,
                                       sample_ids=torch.arange(2), tracker=tracker)
    z = capped(x @ W.t(), 4.0)
    want = F.cross_entropy(z.reshape(-1, 13), y.reshape(-1), reduction=reduction)
    want = want.reshape(y.shape) if reduction == "none" else want
    torch.testing.assert_close(got, want)
    upstream = torch.rand(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, W), upstream), torch.autograd.grad(want, (x, W), upstream)):
        torch.testing.assert_close(a, b)
    want_tracker = SampleTracker(2, stats="all")
    want_tracker.update(z.detach().reshape(-1, 13), y.reshape(-1), torch.arange(2))
    torch.testing.assert_close(tracker.state, want_tracker.state)


@pytest.mark.parametrize("adjusted", [False, True])
def test_probability_targets(backend, adjusted):
    x = (torch.randn(6, 5, dtype=torch.float64) * 5).requires_grad_()
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    shift = torch.randn(6, 5, dtype=torch.float64) if adjusted else None
    tracker = SampleTracker(6, stats="all")
    got = memfast.cross_entropy(x, q, softcap=2.0, adjustment=shift, sample_ids=torch.arange(6), tracker=tracker)
    z = capped(x, 2.0) + (0 if shift is None else shift)
    want = F.cross_entropy(z, q)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    want_tracker = SampleTracker(6, stats="all")
    want_tracker.update(z.detach(), q.argmax(1), torch.arange(6))
    torch.testing.assert_close(tracker.state, want_tracker.state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adjusted", [False, True])
def test_probability_targets_cap_in_fp32(backend, dtype, adjusted):
    """Half-precision logits with class-probability targets under autocast (an fp32 loss): capped in fp32,
    as the fused op caps. A cap in bf16 was 0.6% off in the loss and up to 200% in the gradient."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(64, 100, generator=g) * 40).to(dtype).requires_grad_()
    q = torch.softmax(torch.randn(64, 100, generator=g) * 3, 1).to(dtype)
    shift = torch.randn(100, generator=g) if adjusted else None
    with torch.autocast("cpu", dtype=dtype):
        got = memfast.cross_entropy(x, q, softcap=30.0, adjustment=shift, reduction="none")
    x64 = x.detach().double().requires_grad_()
    z = capped(x64, 30.0) + (0 if shift is None else shift.double())
    want = F.cross_entropy(z, q.double(), reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=0, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x64)
    torch.testing.assert_close(g_got.double(), g_want, atol=1e-5, rtol=1e-2)  # one rounding to dtype


def test_compile_matches_eager(backend):
    x = (torch.randn(8, 6) * 5).requires_grad_()
    y = torch.randint(0, 6, (8,))
    loss_fn = memfast.CrossEntropyLoss(softcap=3.0)
    eager = loss_fn(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(lambda x, y: loss_fn(x, y), fullgraph=True, backend="aot_eager")(x, y)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


def test_fp64_logits_take_caps_beyond_the_fp32_range(backend):
    """fp64 logits compute in fp64, where a cap of 1e-39 or 1e39 (refused for fp32 logits,
    tests/test_bad_input.py) and its reciprocal are normal numbers."""
    x, y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (4,))
    for cap in (1e-39, 1e39):
        loss = memfast.cross_entropy(x, y, softcap=cap)
        want = F.cross_entropy(capped(x, cap), y)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])
