"""lse_square_scale (the z-loss, zeta * weight[target] * logsumexp(row)^2 added to each row's
loss inside the fused op): against the formula written with PyTorch ops, and every path that
carries it (in-place gradient, create_graph, linear heads, class-probability targets,
torch.compile). The kernels against the reference with a z-loss: test_softcap.py's
test_kernels_match_reference, which covers both of the op's scalar options."""
import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import SampleTracker


def z_loss_formula(x, y, weight=None, reduction="mean", label_smoothing=0.0, ignore_index=-100, zeta=1e-2,
                   shift=None):
    """F.cross_entropy plus the z-loss, reduced like it (the mean divides by sum(weight[target]))."""
    z = x if shift is None else x + shift
    ce = F.cross_entropy(z, y, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1 if z.dim() > 1 else 0)
    valid = y != ignore_index
    w = weight if weight is not None else torch.ones(z.shape[1 if z.dim() > 1 else 0], dtype=z.dtype)
    w_y = torch.where(valid, w[torch.where(valid, y, 0)], torch.zeros((), dtype=z.dtype))
    rows = ce + zeta * w_y * lse * lse
    if reduction == "none":
        return rows
    return rows.sum() / w_y.sum() if reduction == "mean" else rows.sum()


@pytest.mark.parametrize("shape", ["rows", "spatial", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "weight+smooth+ignore", "adjusted"])
def test_matches_the_formula(backend, shape, reduction, opts):
    g = torch.Generator().manual_seed(3)
    C = 7
    xshape, yshape = {"rows": ((10, C), (10,)), "spatial": ((4, C, 3), (4, 3)), "unbatched": ((C,), ())}[shape]
    x = (torch.randn(xshape, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.randint(0, C, yshape, generator=g)
    kw = {}
    if opts == "weight+smooth+ignore":
        kw = dict(weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.2, label_smoothing=0.1)
        if y.dim():
            y.view(-1)[::3] = -100
    shift = None
    if opts == "adjusted":
        kw["adjustment"] = shift = torch.randn(xshape, generator=g, dtype=torch.float64)
    got = memfast.cross_entropy(x, y, reduction=reduction, lse_square_scale=0.05, **kw)
    kw.pop("adjustment", None)
    want = z_loss_formula(x, y, reduction=reduction, zeta=0.05, shift=shift, **kw)
    torch.testing.assert_close(got, want)
    upstream = torch.rand(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(want, x, upstream)[0])


def test_zero_scale_is_the_plain_loss_bit_for_bit(backend):
    x = torch.randn(12, 9, requires_grad=True)
    y = torch.randint(0, 9, (12,))
    a = memfast.cross_entropy(x, y, lse_square_scale=0.0)
    ga = torch.autograd.grad(a, x)[0]
    b = memfast.cross_entropy(x, y)
    gb = torch.autograd.grad(b, x)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(memfast.cross_entropy(x, y, lse_square_scale=1e-3), b)


def test_inplace_backward_and_tracking(backend):
    x0 = torch.randn(16, 11, dtype=torch.float64) * 3
    y = torch.randint(0, 11, (16,))
    ids = torch.arange(16) // 2
    results = []
    for inplace, zeta in ((False, 0.0), (False, 0.1), (True, 0.1)):
        tracker = SampleTracker(8, stats="all")
        x = x0.clone().requires_grad_()
        logits = x * 1.0  # a non-leaf: inplace_backward may write over it
        loss = memfast.cross_entropy(logits, y, sample_ids=ids, tracker=tracker, inplace_backward=inplace,
                                     lse_square_scale=zeta)
        loss.backward()
        results.append((loss.detach(), x.grad, tracker.state))
    torch.testing.assert_close(results[1][:2], results[2][:2])  # in place: same loss and gradient
    torch.testing.assert_close(results[1][0], z_loss_formula(x0, y, zeta=0.1))
    # the tracker records the cross entropy, with or without the z-loss
    torch.testing.assert_close(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][2], results[2][2])


def test_create_graph_and_gradgradcheck(backend):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, dtype=torch.float64) + 0.5

    def f(x):
        return memfast.cross_entropy(x, y, w, lse_square_scale=0.2, label_smoothing=0.1)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
    (want,) = torch.autograd.grad(z_loss_formula(x, y, w, zeta=0.2, label_smoothing=0.1), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.pow(2).sum(), x)[0],
                               torch.autograd.grad(want.pow(2).sum(), x)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_linear_cross_entropy(backend, reduction, chunk_size):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (2, 6), generator=g)
    y[0, :2] = -100
    w = torch.rand(13, generator=g, dtype=torch.float64) + 0.3
    got = memfast.linear_cross_entropy(x, W, y, weight=w, reduction=reduction, chunk_size=chunk_size,
                                       lse_square_scale=0.02)
    want = z_loss_formula((x @ W.t()).reshape(-1, 13), y.reshape(-1), w, reduction=reduction, zeta=0.02)
    want = want.reshape(y.shape) if reduction == "none" else want
    torch.testing.assert_close(got, want)
    upstream = torch.rand(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, W), upstream), torch.autograd.grad(want, (x, W), upstream)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets(backend, reduction):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    got = memfast.cross_entropy(x, q, reduction=reduction, lse_square_scale=0.1)
    per_row = F.cross_entropy(x, q, reduction="none") + 0.1 * torch.logsumexp(x, 1) ** 2
    want = {"none": per_row, "mean": per_row.mean(), "sum": per_row.sum()}[reduction]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_compile_matches_eager(backend):
    x = torch.randn(8, 6, requires_grad=True)
    y = torch.randint(0, 6, (8,))
    loss_fn = memfast.CrossEntropyLoss(lse_square_scale=1e-2)
    eager = loss_fn(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(lambda x, y: loss_fn(x, y), fullgraph=True, backend="aot_eager")(x, y)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
