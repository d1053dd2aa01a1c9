"""The CUDA kernels of cross_entropy_fwd / cross_entropy_bwd / track_ against
the pure-PyTorch reference (memfast.reference), on fresh random inputs.
Skipped without a CUDA device.

MEMFAST_TEST_CUDA_DEVICE (default "cuda") picks the device: "emulator" runs the
checks on CPU tensors against the CUDA sources themselves, compiled for the CPU
emulator in tests/cuda_emu (conftest.py routes torch.ops.memfast's CPU kernels to
them; `make test` does this on every machine); "cpu" runs them against the CPU
kernels, a dry run of the tests' own logic. The inherently CUDA-only tests (streams,
graphs, torch.compile on the device) skip in both."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast import _ops
from memfast import reference as ref
from memfast._stats import COUNTER, ROW

DEVICE_SETTING = os.environ.get("MEMFAST_TEST_CUDA_DEVICE", "cuda")
EMULATED = DEVICE_SETTING == "emulator"
DEV = "cpu" if EMULATED else DEVICE_SETTING
ON_CUDA = torch.device(DEV).type == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_only(why):
    return pytest.mark.skipif(not ON_CUDA, reason=f"CUDA-only ({why}); MEMFAST_TEST_CUDA_DEVICE={DEVICE_SETTING}")


def cuda_semantics(why):
    """What the CUDA sources do (on the GPU or under the emulator) and the CPU kernels do not."""
    return pytest.mark.skipif(not (ON_CUDA or EMULATED),
                              reason=f"CUDA semantics ({why}); MEMFAST_TEST_CUDA_DEVICE={DEVICE_SETTING}")


def synchronize():
    if ON_CUDA:
        torch.cuda.synchronize()

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CLASSES = [1, 2, 10, 1000, 32000, 50257]
# Gradient / loss tolerances: the kernels use __expf and fp32 sums in another
# order than PyTorch; bf16 / fp16 gradients are one rounding of an fp32 value.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@cuda_only("build_info()['with_cuda']")
def test_cuda_kernels_are_built():
    info = memfast.build_info()
    assert info is not None and info["with_cuda"], "build with MEMFAST_CUDA=1 to test the CUDA kernels"


def rows_for(C, budget=1 << 21):
    if EMULATED:
        budget //= 16  # every emulated thread is a fiber: a few rows exercise the same code
    return max(3, min(64, budget // C))


def random_case(R, C, dtype, ignore_every=5, scale=3.0):
    x = (torch.randn(R, C, device=DEV) * scale).to(dtype)
    y = torch.randint(0, C, (R,), device=DEV)
    if ignore_every:
        y[::ignore_every] = -100
    return x, y


def check_forward(x, y, weight=None, ignore_index=-100, eps=0.0, adjustment=None, groups=None, compute_grad=True,
                  reduction=0, lse_square_scale=0.0, softcap=0.0):
    got = torch.ops.memfast.cross_entropy_fwd(x, y, weight, ignore_index, eps, adjustment, groups, compute_grad,
                                              reduction, lse_square_scale, softcap)
    want = ref.cross_entropy_fwd(x, y, weight, ignore_index, eps, adjustment, groups, compute_grad, reduction,
                                 lse_square_scale, softcap)
    tol = TOL[x.dtype]
    loss_tol = max(tol, 1e-5) if x.dtype != torch.float64 else tol
    torch.testing.assert_close(got[0], want[0], atol=loss_tol, rtol=loss_tol, equal_nan=True)
    for name, k in ROW.items():
        if name == "correct":
            assert torch.equal(got[1][k], want[1][k]), "argmax differs"
        else:
            torch.testing.assert_close(got[1][k], want[1][k], atol=loss_tol, rtol=loss_tol, equal_nan=True,
                                       msg=lambda m: f"row stat {name}: {m}")
    assert got[2].shape == want[2].shape and got[2].dtype == x.dtype
    if compute_grad:
        torch.testing.assert_close(got[2].to(acc_dtype(x.dtype)), want[2].to(acc_dtype(x.dtype)), atol=tol,
                                   rtol=tol, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
def test_forward_matches_reference(dtype, C):
    x, y = random_case(rows_for(C), C, dtype)
    check_forward(x, y)
    check_forward(x, y, compute_grad=False)
    check_forward(x, y, reduction=1)  # the mean: the gradient carries 1 / rows (device-side denominator)
    check_forward(x, y, reduction=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [10, 1000, 32000, 50257])
@pytest.mark.parametrize("opts", ["smooth", "weight", "weight+smooth", "ignore=2", "zloss", "zloss+weight+smooth",
                                  "softcap", "softcap+zloss+weight+smooth"])
def test_forward_options(dtype, C, opts):
    x, y = random_case(rows_for(C), C, dtype)
    kw = {}
    if "weight" in opts:
        kw["weight"] = torch.rand(C, device=DEV, dtype=acc_dtype(dtype)) + 0.1
    if "smooth" in opts:
        kw["eps"] = 0.1
    if "zloss" in opts:
        kw["lse_square_scale"] = 1e-2
    if "softcap" in opts:
        kw["softcap"] = 2.5  # logits of scale 3: the tanh's whole range
    if opts == "ignore=2":
        y[y == -100] = 0
        y[1::3] = 2
        kw["ignore_index"] = 2
    check_forward(x, y, **kw)
    check_forward(x, y, reduction=1, **kw)


@pytest.mark.parametrize("kernel", ["stream", "no-cluster"])
@pytest.mark.parametrize("C", [10, 1000, 4097, 32000, 70001])
def test_forced_kernel_paths(monkeypatch, kernel, C):
    """The streaming kernel (any row length) and the cluster-free resident kernel."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    else:
        monkeypatch.setenv("MEMFAST_CE_CLUSTER", "0")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = random_case(rows_for(C), C, dtype)
        check_forward(x, y, eps=0.05, adjustment=torch.randn(4, C, device=DEV), groups=torch.randint(0, 4, y.shape,
                                                                                                        device=DEV))
        check_forward(x, y, reduction=1, lse_square_scale=1e-2)
        check_forward(x, y, adjustment=torch.randn(C, device=DEV).expand(y.numel(), C), softcap=4.0)


@pytest.mark.parametrize("kernel", ["auto", "stream", "no-cluster"])
@pytest.mark.parametrize("C", [10, 1000, 70001])
@pytest.mark.parametrize("offset", [1e4, -3e5])
def test_logits_far_from_zero_keep_the_loss_exact(monkeypatch, kernel, C, offset):
    """Logits of a large magnitude: the loss and the tracker's values come from z - max (as
    log_softmax forms them), not from lse rounded to ulp(max); the truth is fp64 PyTorch. The
    smoothing term too: the streaming kernel keeps each thread's sum w * (z - its running max)
    (a sum w * z shifted afterwards lost 1.5e-3 at -3e5, which the emulator showed)."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    elif kernel == "no-cluster":
        monkeypatch.setenv("MEMFAST_CE_CLUSTER", "0")
    R = rows_for(C, 1 << 19)
    x = torch.randn(R, C, device=DEV) * 2 + offset
    y = torch.randint(0, C, (R,), device=DEV)
    truth = x.double()
    weight = torch.rand(C, device=DEV) + 0.5
    for eps, w in ((0.0, None), (0.1, None), (0.1, weight)):
        got = memfast.cross_entropy(x, y, weight=w, reduction="none", label_smoothing=eps)
        want = F.cross_entropy(truth, y, weight=None if w is None else w.double(), reduction="none",
                               label_smoothing=eps)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=f"eps={eps} weight={w is not None}")
    t = memfast.SampleTracker(R, stats="all", device=DEV)
    memfast.cross_entropy(x, y, sample_ids=torch.arange(R, device=DEV), tracker=t)
    p = truth.softmax(1)
    for name, value in (("csl", F.cross_entropy(truth, y, reduction="none")),
                        ("inconf", 1 - p.gather(1, y[:, None])[:, 0]), ("last_maxprob", p.max(1).values)):
        torch.testing.assert_close(t.stat(name).double(), value, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("kernel", ["auto", "stream"])
@pytest.mark.parametrize("C", [11, 1000, 70001])
def test_nan_in_a_row_gives_nan_loss(monkeypatch, kernel, C):
    """A NaN the online max skips must still reach the sum (the streaming kernel
    once dropped a chunk of NaNs seen before any finite value)."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = random_case(4, C, dtype, ignore_every=0)
        x[0, 4:8] = math.nan  # the first vector of lane 1
        x[1, :1] = math.nan   # a scalar head element when the row starts misaligned
        x[2, :] = -math.inf
        x[2, 5] = math.nan
        for rows, target in ((x, y), (x[:, 1:], y.clamp(max=C - 2))):  # aligned, then a misaligned start
            got = torch.ops.memfast.cross_entropy_fwd(rows, target, None, -100, 0.0, None, None, True, 0)[0]
            want = ref.cross_entropy_fwd(rows, target, None, -100, 0.0, None, None, True, 0)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
            assert want[0].isnan() and want[2].isnan() and want[3].isfinite()  # the test's own premise


@pytest.mark.parametrize("kernel", ["auto", "stream", "no-cluster"])
@pytest.mark.parametrize("C", [3, 100, 1000, 32000, 140001])
def test_nan_logits_row_stats_match_reference(monkeypatch, kernel, C):
    """NaN logits count as -inf for the largest other logit and correctness; a NaN target
    logit is never correct (tests/test_cross_entropy.py checks the CPU the same way)."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    elif kernel == "no-cluster":
        monkeypatch.setenv("MEMFAST_CE_CLUSTER", "0")
    R = 24
    x, y = random_case(R, C, torch.float32, ignore_every=0)
    x[1::3].scatter_(1, y[1::3, None], 50.0)  # the target wins unless a NaN lands on it
    for r in range(R):
        x[r, torch.randint(0, C, (3,), device=DEV)] = math.nan
        if r % 5 == 0:
            x[r, y[r]] = math.nan
        if r % 7 == 0:  # -inf elsewhere: a NaN before the target ties it
            x[r] = torch.where(x[r].isnan(), x[r], torch.full_like(x[r], -math.inf))
    for dtype in (torch.float32, torch.bfloat16):
        args = (x.to(dtype), y, None, -100, 0.0, None, None, True, 0)
        got, want = torch.ops.memfast.cross_entropy_fwd(*args), ref.cross_entropy_fwd(*args)
        for name in ("target_logit", "max_other", "weight", "correct"):
            torch.testing.assert_close(got[1][ROW[name]], want[1][ROW[name]], equal_nan=True, msg=name)
        assert got[1][ROW["log_sum"]].isnan().all() and got[0].isnan().all()


@pytest.mark.parametrize("kernel", ["auto", "stream"])
@pytest.mark.parametrize("C", [11, 1000, 70001])
@pytest.mark.parametrize("target_at", ["first", "middle"])
def test_all_minus_inf_row_has_nan_lse(monkeypatch, kernel, C, target_at):
    """A row of only -inf logits: sum exp(z - max) is NaN (-inf - -inf), so lse is NaN on every kernel
    path (the streaming kernel's online sum once skipped them and gave -inf); argmax is index 0."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = random_case(4, C, dtype, ignore_every=0)
        x[1] = -math.inf
        y[1] = 0 if target_at == "first" else C // 2
        got = check_forward(x, y)
        assert got[1][ROW["log_sum"], 1].isnan()
        assert int(got[1][ROW["correct"], 1]) == (1 if target_at == "first" else 0)


@pytest.mark.parametrize("kernel", ["auto", "stream"])
@pytest.mark.parametrize("C", [37, 1000, 70001])
def test_masked_classes_get_exactly_zero_gradient(monkeypatch, kernel, C):
    """Masked classes (-inf, a finite -1e30 or finfo.min as HF masks with, or so far below the
    maximum that exp underflows) get exactly zero gradient and a finite loss, on every kernel path;
    a masked target gives loss +inf, which the tracker counts as non-finite and does not add.
    (Mutation testing of the CPU kernels found these exact values untested.)"""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, C, device=DEV)
        x[:, 5:31] = -math.inf
        x[:, 0] = 60.0
        x[:, 31] = -90.0
        x[:, 32] = -1e30
        x[:, 33] = torch.finfo(torch.float32).min
        x = x.to(dtype)
        y = torch.tensor([0, 1, 2, 3, 4], device=DEV)
        loss, _, g = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 0, 0.0, 0.0)
        assert torch.equal(g[:, 5:34].float(), torch.zeros(5, 29, device=DEV))
        assert torch.isfinite(loss).all()
        want = ref.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 0, 0.0, 0.0)
        torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-5)
        # the target masked: +inf loss, counted as non-finite, not accumulated
        t = memfast.SampleTracker(5, stats="all", device=DEV)
        masked = x.clone()
        masked[1, 1] = -math.inf
        memfast.cross_entropy(masked.float(), y, sample_ids=torch.arange(5, device=DEV), tracker=t, reduction="none")
        t.check()
        assert t.stat("nonfinite").tolist() == [0, 1, 0, 0, 0]
        assert torch.isfinite(t.stat("csl")).all() and t.stat("csl")[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeta", [0.0, 1e-3])
def test_mean_over_zero_weight_rows_has_zero_gradient(dtype, zeta):
    """A mean over rows that all weigh 0 divides by 0: NaN loss, as PyTorch, and zero gradient."""
    x = torch.randn(6, 19, device=DEV, dtype=dtype)
    w = torch.ones(19, device=DEV, dtype=dtype)
    w[[0, 4]] = 0
    y = torch.tensor([0, 4, 0, 4, 0, 4], device=DEV)
    args = (x, y, w, -100, 0.0, None, None, True, 1, zeta, 0.0)
    got = torch.ops.memfast.cross_entropy_fwd(*args)
    assert torch.isnan(got[0])
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_rounds_to_nearest_even_bitwise(dtype):
    """The backward's bf16 / fp16 rounding of g * grad_loss (in fp32) is round-to-nearest-even,
    bit for bit torch's .to() (ties are common: a factor of 1.5 or 0.75)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    grad = (torch.randn(64, 1037, device=DEV, generator=gen) * 1e-2).to(dtype)
    grad[:, 3] = 0
    grad_loss = torch.randn(64, device=DEV, generator=gen)
    grad_loss[:8] = torch.tensor([1.5, 0.75, 3.0, 1.25, -1.5, 2.5, 1.0078125, 0.5], device=DEV)
    grad_loss[8] = math.inf
    want = ref.cross_entropy_bwd(grad, grad_loss)
    got = torch.ops.memfast.cross_entropy_bwd(grad, grad_loss)
    inplace = grad.clone()
    torch.ops.memfast.cross_entropy_bwd_(inplace, grad_loss)
    for out in (got, inplace):
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [7, 1001, 32003, 50257, 140001])
def test_strided_and_misaligned_rows(dtype, C):
    """Rows with a stride > C and a start that is not 16-byte aligned (scalar head and tail)."""
    R = rows_for(C)
    wide = (torch.randn(R, C + 5, device=DEV) * 2).to(dtype)
    y = torch.randint(0, C, (R,), device=DEV)
    y[0] = -100
    for x in (wide[:, :C], wide[:, 1:C + 1], wide[:, 3:C + 3]):
        check_forward(x, y)
        check_forward(x, y, compute_grad=False)
    x = wide[:, 1:C + 1].contiguous()[1:]  # dense rows starting C (odd) elements in: not 16-byte aligned
    check_forward(x, y[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [10, 1000, 32000, 50257])
@pytest.mark.parametrize("form", ["dense", "expanded", "table"])
def test_adjustment(dtype, C, form):
    R = rows_for(C)
    x, y = random_case(R, C, dtype)
    acc = acc_dtype(dtype)
    groups = None
    if form == "dense":
        adjustment = torch.randn(R, C, device=DEV, dtype=acc)
    elif form == "expanded":
        adjustment = torch.randn(C, device=DEV, dtype=acc).expand(R, C)
    else:
        adjustment = torch.randn(8, C, device=DEV, dtype=acc)
        groups = torch.randint(0, 8, (R,), device=DEV)
    check_forward(x, y, adjustment=adjustment, groups=groups)
    check_forward(x, y, eps=0.1, adjustment=adjustment, groups=groups)


@cuda_semantics("the CPU kernels raise on bad targets / groups instead")
def test_bad_targets_and_groups_give_nan_rows_without_error():
    """On CUDA an out-of-range target / group cannot raise without a sync: NaN loss and stats, zero gradient."""
    C = 100
    x, y = random_case(6, C, torch.float32, ignore_every=0)
    y[1], y[4] = C, -7
    groups = torch.tensor([0, 1, 5, 0, 1, 0], device=DEV)
    loss, stats, grad = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, torch.randn(2, C, device=DEV),
                                                            groups, True, 0)
    synchronize()
    bad = torch.tensor([False, True, True, False, True, False], device=DEV)
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    assert torch.isnan(stats[:, bad]).all()
    assert (grad[bad] == 0).all() and (grad[~bad] != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 10, 1000, 32003])
def test_backward_matches_reference(dtype, C):
    R = rows_for(C)
    g = torch.randn(R, C, device=DEV).to(dtype)
    g[2] = 0
    go = torch.randn(R, device=DEV, dtype=acc_dtype(dtype))
    go[2] = math.inf  # a zero gradient row stays zero

    def direct(g, grad_loss):  # a zero stays zero even under an inf / NaN upstream gradient
        acc = g.to(acc_dtype(dtype))
        return torch.where(acc == 0, torch.zeros_like(acc), acc * grad_loss[:, None]).to(dtype)

    for grad_loss in (go, go[:1].expand(R), torch.randn(2 * R, device=DEV, dtype=acc_dtype(dtype))[::2]):
        got = torch.ops.memfast.cross_entropy_bwd(g, grad_loss)
        assert got.dtype == dtype and got.shape == g.shape
        torch.testing.assert_close(got, direct(g, grad_loss), atol=0, rtol=0, equal_nan=True)
    strided = torch.randn(R, C + 3, device=DEV).to(dtype)[:, 1:C + 1]
    torch.testing.assert_close(torch.ops.memfast.cross_entropy_bwd(strided, go), direct(strided, go), atol=0, rtol=0,
                               equal_nan=True)
    # A 0-d grad_loss (mean / sum), functional and in place; rows times exactly 1 are skipped in place.
    for s in (1.0, 0.5):
        scalar = torch.tensor(s, device=DEV, dtype=acc_dtype(dtype))
        want = direct(g, scalar.expand(R))
        torch.testing.assert_close(torch.ops.memfast.cross_entropy_bwd(g, scalar), want, atol=0, rtol=0)
        inplace = g.clone()
        torch.ops.memfast.cross_entropy_bwd_(inplace, scalar)
        torch.testing.assert_close(inplace, want, atol=0, rtol=0)
    ones = torch.ones(R, device=DEV, dtype=acc_dtype(dtype))
    ones[1] = 2.0
    inplace = g.clone()
    torch.ops.memfast.cross_entropy_bwd_(inplace, ones)
    torch.testing.assert_close(inplace, direct(g, ones), atol=0, rtol=0)
    if acc_dtype(dtype) == dtype:  # a grad_loss viewing the gradient it scales in place is refused
        with pytest.raises(ValueError, match="grad_loss shares the memory"):
            torch.ops.memfast.cross_entropy_bwd_(inplace, inplace[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("C", [10, 1000, 32000])
def test_api_matches_pytorch(dtype, reduction, C):
    R = rows_for(C, 1 << 20)
    x, y = random_case(R, C, dtype)
    w = torch.rand(C, device=DEV) + 0.1
    for kw in ({}, dict(weight=w), dict(label_smoothing=0.1), dict(weight=w, label_smoothing=0.2, ignore_index=3)):
        if kw.get("ignore_index") == 3:
            y = torch.where(y == -100, 3, y)
        xa = x.detach().clone().requires_grad_(True)
        xb = x.detach().double().requires_grad_(True)  # fp64 PyTorch: fp32 PyTorch is less exact than the kernel
        a = memfast.cross_entropy(xa, y, reduction=reduction, **kw)
        kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
        b = F.cross_entropy(xb, y, reduction=reduction, **kw64)
        tol = max(TOL[dtype], 2e-5)
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
        up = torch.randn_like(b)
        (ga,) = torch.autograd.grad(a, xa, up.to(a.dtype))
        (gb,) = torch.autograd.grad(b, xb, up)
        torch.testing.assert_close(ga.double(), gb, atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["auto", "stream", "no-cluster"])
@pytest.mark.parametrize("C", [1, 10, 1001, 4097, 32000, 50257, 140001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_inplace_matches_reference(monkeypatch, kernel, C, dtype):
    """cross_entropy_fwd_ (inplace_backward) writes the reference's gradient over the logits on every
    kernel path: each element is read before its gradient is written (odd C: misaligned rows)."""
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    elif kernel == "no-cluster":
        monkeypatch.setenv("MEMFAST_CE_CLUSTER", "0")
    x, y = random_case(rows_for(C), C, dtype)
    table, groups = torch.randn(3, C, device=DEV, dtype=acc_dtype(dtype)), torch.randint(0, 3, y.shape, device=DEV)
    # (..., reduction, lse_square_scale, softcap): plain, adjusted, a z-loss, a softcap with all of them
    for args in ((y, None, -100, 0.0, None, None, 1, 0.0, 0.0), (y, None, -100, 0.1, table, groups, 0, 0.0, 0.0),
                 (y, None, -100, 0.0, None, None, 1, 1e-2, 0.0), (y, None, -100, 0.1, table, groups, 0, 1e-2, 2.0)):
        want_loss, want_stats, want_grad = ref.cross_entropy_fwd(x, *args[:-3], True, *args[-3:])
        buffer = x.clone()
        loss, stats = torch.ops.memfast.cross_entropy_fwd_(buffer, *args)
        tol = max(TOL[dtype], 1e-5) if dtype != torch.float64 else TOL[dtype]
        torch.testing.assert_close(loss, want_loss, atol=tol, rtol=tol, equal_nan=True)
        torch.testing.assert_close(stats, want_stats, atol=tol, rtol=tol, equal_nan=True)
        torch.testing.assert_close(buffer.to(acc_dtype(dtype)), want_grad.to(acc_dtype(dtype)), atol=TOL[dtype],
                                   rtol=TOL[dtype])


@pytest.mark.parametrize("inplace", [False, True])
def test_z_loss_through_api(inplace):
    """lse_square_scale on an LM-sized bf16 row block, allocating and in place, against the formula in fp32."""
    N, V = 512, 32000
    x = (torch.randn(N, V, device=DEV) * 2).bfloat16()
    y = torch.randint(0, V, (N,), device=DEV)
    y[::9] = -100
    xa = x.clone().requires_grad_()
    xb = x.float().requires_grad_()
    a = memfast.cross_entropy(xa * 1, y, lse_square_scale=1e-4, inplace_backward=inplace)
    valid = y != -100
    b = F.cross_entropy(xb, y) + 1e-4 * (torch.logsumexp(xb, 1)[valid] ** 2).mean()
    torch.testing.assert_close(a.float(), b, atol=1e-3, rtol=1e-3)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad.float(), xb.grad, atol=1e-6, rtol=2e-2)


@pytest.mark.parametrize("inplace", [False, True])
def test_softcap_through_api(inplace):
    """softcap=30 (Gemma 2) on an LM-sized bf16 row block whose logits reach well past the cap, allocating
    and in place, with a tracker, against PyTorch's cap * tanh(x / cap) in fp32."""
    N, V, cap = 512, 32000, 30.0
    x = (torch.randn(N, V, device=DEV) * 25).bfloat16()
    y = torch.randint(0, V, (N,), device=DEV)
    y[::9] = -100
    ids = torch.arange(N, device=DEV) // 4
    tracker = memfast.SampleTracker(N // 4, stats="all", device=DEV)
    xa = x.clone().requires_grad_()
    xb = x.float().requires_grad_()
    a = memfast.cross_entropy(xa * 1, y, softcap=cap, inplace_backward=inplace, sample_ids=ids, tracker=tracker)
    capped = cap * torch.tanh(xb / cap)
    b = F.cross_entropy(capped, y)
    torch.testing.assert_close(a.float(), b, atol=1e-3, rtol=1e-3)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad.float(), xb.grad, atol=1e-6, rtol=2e-2)
    want = memfast.SampleTracker(N // 4, stats="all", device=DEV)
    want.update(capped.detach(), y, ids)
    for name in ("csl", "count", "margin", "correct", "last_maxprob"):
        torch.testing.assert_close(tracker.stat(name), want.stat(name), atol=1e-3, rtol=1e-4)


@cuda_only("CUDA memory statistics")
def test_inplace_backward_needs_no_gradient_buffer():
    """inplace_backward's training step allocates no [R, C] buffer (the issue's memory target: 0 extra)."""
    R, H, C = 2048, 64, 32000
    h = torch.randn(R, H, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(H, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, C, (R,), device=DEV)
    grad_bytes = R * C * 2

    def extra_peak(inplace):
        w.grad = None
        logits = h @ w
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        memfast.cross_entropy(logits, y, inplace_backward=inplace).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert extra_peak(False) >= grad_bytes
    assert extra_peak(True) < grad_bytes / 8  # w's gradient (4 MiB) and small per-row buffers only


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", ["index", "probability", "probability, kernel off"])
def test_linear_cross_entropy_matches_pytorch(monkeypatch, reduction, dtype, targets):
    """Class indices, and a teacher's probabilities (through the CUDA kernel with MEMFAST_CUDA_PROB=1,
    else the reference ops chunk by chunk)."""
    B, T, H, V = 2, 96, 64, 32000
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, H, generator=g).to(DEV, dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) / 8).to(DEV, dtype).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g).to(DEV)
    y[:, :5] = -100
    if targets != "index":
        if targets == "probability":
            monkeypatch.setenv("MEMFAST_CUDA_PROB", "1")
        probs = torch.softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1) * (y != -100).cpu()[..., None]
        y = probs.to(DEV, dtype)
    tracker = memfast.SampleTracker(B, device=DEV)
    got = memfast.linear_cross_entropy(x, w, y, reduction=reduction, sample_ids=torch.arange(B, device=DEV),
                                       tracker=tracker, chunk_size=50)
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    flat = y.reshape(-1) if targets == "index" else y.double().reshape(-1, V)
    want = F.cross_entropy(F.linear(xr, wr).reshape(-1, V), flat, reduction=reduction)
    want = want.reshape(B, T) if reduction == "none" else want
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    up = torch.rand_like(want) if reduction == "none" else None
    ga = torch.autograd.grad(got, (x, w), None if up is None else up.to(got.dtype))
    gb = torch.autograd.grad(want, (xr, wr), up)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
    assert tracker.stat("count").tolist() == [T - 5] * B


@cuda_only("CUDA memory statistics")
def test_linear_cross_entropy_never_holds_the_logits():
    B, T, H, V = 4, 1024, 256, 32000
    x = torch.randn(B, T, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (B, T), device=DEV)
    logits_bytes = B * T * V * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    memfast.linear_cross_entropy(x, w, y).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < logits_bytes / 4


def test_api_spatial_and_adjustment_table():
    B, T, V = 4, 33, 1000
    x = torch.randn(B, T, V, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, V, (B, T), device=DEV)
    table = torch.randn(8, V, device=DEV)
    groups = torch.randint(0, 8, (B, T), device=DEV)
    xa = x.clone().requires_grad_(True)
    xb = x.float().requires_grad_(True)
    a = memfast.cross_entropy(xa.transpose(1, 2), y, adjustment=table, groups=groups)
    b = F.cross_entropy(xb.transpose(1, 2) + table[groups].transpose(1, 2), y)
    torch.testing.assert_close(a.float(), b, atol=1e-2, rtol=1e-2)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad.float(), xb.grad, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------- tracking
def reference_track(tracker, row_stats, y, ids, ignore_index, C):
    torch.ops.memfast_ref.track_(tracker.state, tracker.counters, row_stats, y, ids, ignore_index, C,
                                 tracker._stat_rows)


def fresh_pair(N, stats="all"):
    return memfast.SampleTracker(N, stats=stats, device=DEV), memfast.SampleTracker(N, stats=stats, device=DEV)


def assert_trackers_close(got, want):
    torch.testing.assert_close(got.state, want.state, atol=1e-4, rtol=1e-5, equal_nan=True)
    assert torch.equal(got.counters, want.counters)


@pytest.mark.parametrize("stats", ["all", ("csl", "count"), ("last_loss", "forgetting", "learn_time")])
def test_track_matches_reference_over_epochs(stats):
    N, C, B = 300, 50, 128
    got, want = fresh_pair(N, stats)
    for epoch in range(3):
        for _ in range(4):
            x, y = random_case(B, C, torch.float32, ignore_every=7)
            ids = torch.randint(0, N, (B,), device=DEV)
            ids[10:20] = ids[0]  # repeated ids add; the last finite row sets the state
            x[5, 3] = math.nan   # a non-finite row only counts
            _, row_stats, _ = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
            got._scatter(row_stats, y, ids, -100, C)
            reference_track(want, row_stats, y, ids, -100, C)
        got.end_epoch()
        want.end_epoch()
    assert_trackers_close(got, want)
    assert got.stat("nonfinite").sum() == 12  # row 5 of every batch


def test_track_sorted_and_shuffled_repeats():
    """Runs of equal ids inside a warp, across warps, and interleaved (A B A) all add."""
    N, C = 40, 10
    got, want = fresh_pair(N)
    for ids in (torch.arange(1000, device=DEV) // 37 % N, torch.randint(0, 3, (1000,), device=DEV),
                torch.arange(1000, device=DEV) % 3, torch.full((1000,), 7, device=DEV)):
        x, y = random_case(1000, C, torch.float32, ignore_every=9)
        _, row_stats, _ = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
        got._scatter(row_stats, y, ids, -100, C)
        reference_track(want, row_stats, y, ids, -100, C)
    assert_trackers_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_sequence_ids(dtype):
    """[B, T, V] token rows with one id per sequence: the tokens add into their sample."""
    B, T, V, N = 8, 300, 1000, 20
    got, want = fresh_pair(N)
    for _ in range(3):
        x = torch.randn(B, T, V, device=DEV).to(dtype)
        y = torch.randint(0, V, (B, T), device=DEV)
        y[:, -17:] = -100  # padding
        y[3] = -100        # a fully padded sequence
        ids = torch.randint(0, N, (B,), device=DEV)
        ids[5] = ids[6]
        memfast.cross_entropy(x.view(-1, V), y.view(-1), sample_ids=ids, tracker=got)
        _, row_stats, _ = ref.cross_entropy_fwd(x.view(-1, V), y.view(-1), None, -100, 0.0, None, None, False, 0)
        reference_track(want, row_stats, y.view(-1), ids, -100, V)
    torch.testing.assert_close(got.state, want.state, atol=5e-3, rtol=1e-4, equal_nan=True)
    assert torch.equal(got.counters, want.counters)


def test_tracked_values_match_through_api():
    N, C = 64, 1000
    got, want = fresh_pair(N)
    x, y = random_case(256, C, torch.bfloat16)
    ids = torch.randint(0, N, (256,), device=DEV)
    memfast.cross_entropy(x, y, sample_ids=ids, tracker=got, label_smoothing=0.1)
    _, row_stats, _ = ref.cross_entropy_fwd(x, y, None, -100, 0.1, None, None, False, 0)
    reference_track(want, row_stats, y, ids, -100, C)
    torch.testing.assert_close(got.state, want.state, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_probability_targets_track_the_most_probable_class():
    N, C = 256, 1000
    got, want = fresh_pair(64)
    x = torch.randn(N, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    q = torch.softmax(torch.randn(N, C, device=DEV) * 3, 1)
    q[::7] = 0  # no mass: not tracked
    ids = torch.randint(0, 64, (N,), device=DEV)
    loss = memfast.cross_entropy(x, q.bfloat16(), sample_ids=ids, tracker=got, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(x, q.bfloat16(), label_smoothing=0.1))
    top, most_probable = q.bfloat16().max(1)  # (bf16 ties: max's index, as memfast takes it)
    label = torch.where(top > 0, most_probable, -100)
    want.update(x.detach(), label, ids)
    assert_trackers_close(got, want)


def prob_case(R, C, dtype, gen_seed, empty_every=5):
    g = torch.Generator().manual_seed(gen_seed)
    x = (3 * torch.randn(R, C, generator=g)).to(device=DEV, dtype=dtype)
    t = torch.softmax(2 * torch.randn(R, C, generator=g), 1)
    t[t < 0.5 / C] = 0  # zeros and near-ties
    if empty_every:
        t[::empty_every] = 0  # no mass: not tracked
    return x, t.to(device=DEV)


@pytest.fixture(params=["one-sweep", "sweeps"])
def prob_kernel(request, monkeypatch):
    """Both CUDA kernels of cross_entropy_prob_fwd: the default one-sweep summary and the first
    version's sweeps (MEMFAST_CUDA_PROB_KERNEL=sweeps)."""
    if request.param == "sweeps":
        monkeypatch.setenv("MEMFAST_CUDA_PROB_KERNEL", "sweeps")
    return request.param


def check_prob_op(args):
    """cross_entropy_prob_fwd on DEV against the reference on the same arguments."""
    got = torch.ops.memfast.cross_entropy_prob_fwd(*args)
    want = ref.cross_entropy_prob_fwd(*args)
    dtype = args[0].dtype
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], **tol, equal_nan=True)
    assert torch.equal(got[2], want[2])
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[3].double(), want[3].double(), **gtol, equal_nan=True)
    if args[6]:  # cross_entropy_prob_fwd_ (inplace_backward): the same results, the gradient over the logits
        buffer = args[0].detach().clone(memory_format=torch.contiguous_format)
        inplace = torch.ops.memfast.cross_entropy_prob_fwd_(buffer, *args[1:6], *args[7:])
        for a, b in zip((*inplace, buffer), got):
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 1000, 32000, 50257, 128256])  # (128256: 500 elements a thread)
def test_probability_op_matches_reference(prob_kernel, dtype, C):
    R = 64 if C <= 1000 else 8
    x, t = prob_case(R, C, dtype, C)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for reduction in (0, 1, 2):
        check_prob_op((x, t.to(dtype), None, 0.0, None, None, True, reduction))
    check_prob_op((x, t.to(acc), None, 0.0, None, None, True, 1))  # fp32 targets for half logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("opts", ["weight+smoothing", "dense", "vector", "table", "zloss+softcap", "strided rows",
                                  "strided classes", "no gradient"])
def test_probability_op_options(prob_kernel, opts, dtype):
    C, R = 777, 40
    x, t = prob_case(R, C, dtype, 7)
    t = t.to(dtype)
    w = adj = groups = None
    eps, zeta, cap, compute_grad = 0.0, 0.0, 0.0, True
    if opts == "weight+smoothing":
        w, eps = torch.rand(C, device=DEV) + 0.1, 0.2
    elif opts == "dense":
        adj = torch.randn(R, C, device=DEV)
    elif opts == "vector":  # one [C] shift for every row: an expanded (stride-0) table
        adj = torch.randn(C, device=DEV).expand(R, C)
    elif opts == "table":
        adj, groups = torch.randn(3, C, device=DEV), torch.randint(0, 3, (R,), device=DEV)
    elif opts == "zloss+softcap":
        zeta, cap = 1e-2, 2.0
    elif opts == "strided rows":  # rows further apart than C, classes dense
        x = torch.randn(R, C + 9, device=DEV).to(dtype)[:, 3:C + 3]
        t = torch.softmax(torch.randn(R, C + 5, device=DEV), 1).to(dtype)[:, :C]
        assert t.stride(0) != C and t.stride(1) == 1
    elif opts == "strided classes":  # a non-dense class dimension (copied by the op)
        t = torch.softmax(torch.randn(R, 2 * C, device=DEV), 1).to(dtype)[:, ::2]
        assert t.stride(1) == 2
    else:
        compute_grad = False
    for reduction in (0, 1, 2):
        check_prob_op((x, t, w, eps, adj, groups, compute_grad, reduction, zeta, cap))


@pytest.mark.parametrize("C", [3, 1000])
def test_probability_op_ties_and_odd_rows(prob_kernel, C):
    """Ties decide the label (the first maximal target, across the threads' strides) and the
    correctness (the first maximal logit); NaN / inf logits and targets, rows without mass; and the
    shapes R = 1, R = 0 and C = 0."""
    R = 12
    x = torch.randn(R, C, device=DEV)
    t = torch.rand(R, C, device=DEV)
    far = C - 1 if C < 600 else 599
    t[:, 0] = t[:, far] = 2.0  # a tie for the most probable class: label 0
    t[1, :] = 0  # no mass
    t[2, 1] = math.nan  # a NaN target: not tracked
    x[3:6, 0] = x[3:6].max(1).values + 1  # the target logit is the largest ...
    x[4, far] = x[4, 0]  # ... tied after it (still correct)
    x[5, far] = x[5, 0] + 0.5  # ... or beaten after it
    t[9, far] = 3.0  # label far, with a tie before it (not correct)
    x[9, 0] = x[9, far] = x[9].max() + 1
    x[6, 0] = math.nan
    x[7, 2] = math.inf
    x[8, :] = -math.inf
    x[10] = torch.linspace(-50, 50, C, device=DEV)  # rising: the one-sweep kernel's shift moves at every element
    x[11] = torch.linspace(1e4, -1e4, C, device=DEV)  # huge and falling
    for reduction in (0, 1, 2):
        check_prob_op((x, t, None, 0.1, None, None, True, reduction))
    _, row_stats, label, _ = torch.ops.memfast.cross_entropy_prob_fwd(x, t, None, 0.0, None, None, False, 0)
    assert label[[0, 3, 4, 5]].tolist() == [0] * 4 and label[1] == -100 and label[2] == -100 and label[9] == far
    assert row_stats[ROW["correct"], [3, 4, 5, 9]].tolist() == [1, 1, 0, 0]
    for rows, classes in ((1, C), (0, C), (R, 0)):
        xs, ts = torch.randn(rows, classes, device=DEV), torch.rand(rows, classes, device=DEV)
        for reduction in (0, 1, 2):
            check_prob_op((xs, ts, None, 0.0, None, None, True, reduction))


@cuda_semantics("the CPU kernel raises on a bad group")
def test_probability_op_bad_group_gives_a_nan_row(prob_kernel):
    x, t = prob_case(6, 50, torch.float32, 1, empty_every=0)
    groups = torch.tensor([0, 1, 7, 0, -1, 1], device=DEV)
    loss, row_stats, label, grad = torch.ops.memfast.cross_entropy_prob_fwd(
        x, t, None, 0.0, torch.randn(2, 50, device=DEV), groups, True, 0)
    bad = torch.tensor([False, False, True, False, True, False], device=DEV)
    assert loss[bad].isnan().all() and not loss[~bad].isnan().any()
    assert row_stats[:, bad].isnan().all() and (label[bad] == -100).all()
    assert (grad[bad] == 0).all()


def test_probability_op_through_api(monkeypatch):
    """With MEMFAST_CUDA_PROB=1 the API runs the fused op on CUDA: PyTorch's loss and gradient, and
    the tracker of the old path (PyTorch's loss + a pass against the most probable class)."""
    monkeypatch.setenv("MEMFAST_CUDA_PROB", "1")
    assert _ops.prob_ops(DEV) is torch.ops.memfast
    if ON_CUDA:
        monkeypatch.delenv("MEMFAST_CUDA_PROB")
        assert _ops.prob_ops(DEV) is None  # off by default until tested on a GPU
        monkeypatch.setenv("MEMFAST_CUDA_PROB", "1")
    N, C = 256, 1000
    x, q = prob_case(N, C, torch.float32, 3)
    x.requires_grad_()
    ids = torch.randint(0, 64, (N,), device=DEV)
    got, want = fresh_pair(64)
    loss = memfast.cross_entropy(x, q, sample_ids=ids, tracker=got, label_smoothing=0.1)
    ref_loss = F.cross_entropy(x, q, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref_loss, x)[0])
    top, most_probable = q.max(1)
    want.update(x.detach(), torch.where(top > 0, most_probable, -100), ids)
    assert_trackers_close(got, want)
    torch.library.opcheck(torch.ops.memfast.cross_entropy_prob_fwd, (x, q, None, 0.1, None, None, True, 1))
    torch.library.opcheck(torch.ops.memfast.cross_entropy_prob_fwd_, (x.detach().clone(), q, None, 0.1, None, None, 1))
    # inplace_backward: the fused op writes the gradient over the logits, and autograd passes them on
    rows = x.detach().clone().requires_grad_() * 1
    loss = memfast.cross_entropy(rows, q, label_smoothing=0.1, inplace_backward=True)
    assert rows._version > 0
    (want_grad,) = torch.autograd.grad(F.cross_entropy(x, q, label_smoothing=0.1), x)
    (got_grad,) = torch.autograd.grad(loss, rows)
    assert got_grad.data_ptr() == rows.data_ptr()
    torch.testing.assert_close(got_grad, want_grad)


@cuda_semantics("the CPU kernels raise on bad ids / targets instead of counting them")
@pytest.mark.parametrize("what", ["id", "id-per-sequence", "target"])
def test_bad_values_write_nothing_and_raise_at_check(what):
    N, C = 16, 10
    tracker = memfast.SampleTracker(N, stats="all", device=DEV)
    x, y = random_case(8, C, torch.float32, ignore_every=0)
    ids = torch.arange(8, device=DEV)
    memfast.cross_entropy(x, y, sample_ids=ids, tracker=tracker)
    before = tracker.state.clone()
    if what == "id":
        ids = ids.clone()
        ids[3] = N
    elif what == "id-per-sequence":
        ids = torch.tensor([0, -1], device=DEV)
    else:
        y = y.clone()
        y[2] = C + 3
    _, row_stats, _ = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
    tracker._scatter(row_stats, y, ids, -100, C)  # no exception here: no host sync
    synchronize()
    assert torch.equal(tracker.state, before)
    c = tracker.counters.tolist()
    assert c[COUNTER["calls"]] == 2
    if what == "id":
        assert c[COUNTER["bad_ids"]] == 1
    elif what == "id-per-sequence":
        assert c[COUNTER["bad_ids"]] == 4  # the 4 rows of the bad sequence
    else:
        assert c[COUNTER["bad_targets"]] == 1
    with pytest.raises(IndexError, match="out of range"):
        tracker.check()
    tracker.check()  # the flags were cleared


def test_empty_batch_counts_a_call():
    tracker = memfast.SampleTracker(4, stats="all", device=DEV)
    memfast.cross_entropy(torch.randn(0, 3, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV),
                          sample_ids=torch.zeros(0, dtype=torch.long, device=DEV), tracker=tracker)
    assert int(tracker.counters[COUNTER["calls"]]) == 1


@cuda_semantics("the CPU kernels raise on bad ids instead of counting them")
def test_bad_id_in_empty_batch_raises_at_check():
    """0 rows and one per-sequence id (0 % 1 == 0 passes the shape checks): the CPU raises, so check() must."""
    N = 4
    tracker = memfast.SampleTracker(N, stats="all", device=DEV)
    before = tracker.state.clone()
    memfast.cross_entropy(torch.randn(0, 3, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV),
                          sample_ids=torch.tensor([N], device=DEV), tracker=tracker)  # no host sync, no raise
    synchronize()
    assert torch.equal(tracker.state, before)
    counters = tracker.counters.tolist()
    assert counters[COUNTER["calls"]] == 1 and counters[COUNTER["bad_ids"]] >= 1
    with pytest.raises(IndexError, match="out of range"):
        tracker.check()
    tracker.check()  # the flags were cleared


# -------------------------------------------------------- torch integration
def test_opcheck():
    # No ignored rows: opcheck's AOT comparison treats their NaN statistics as a mismatch.
    C = 37
    x, y = random_case(12, C, torch.bfloat16, ignore_every=0)
    w = torch.rand(C, device=DEV) + 0.5
    table, groups = torch.randn(3, C, device=DEV), torch.randint(0, 3, (12,), device=DEV)
    for args in ((x, y, None, -100, 0.0, None, None, True, 0), (x.float(), y, w, -100, 0.1, None, None, True, 0),
                 (x, y, None, -100, 0.0, table, groups, False, 0),
                 (x, y, None, -100, 0.0, None, None, True, 1), (x.float(), y, w, -100, 0.1, None, None, True, 2)):
        torch.library.opcheck(torch.ops.memfast.cross_entropy_fwd, args)
    torch.library.opcheck(torch.ops.memfast.cross_entropy_fwd_, (x.clone(), y, None, -100, 0.0, None, None, 1))
    torch.library.opcheck(torch.ops.memfast.cross_entropy_fwd_, (x.float(), y, w, -100, 0.1, table, groups, 0))
    torch.library.opcheck(torch.ops.memfast.cross_entropy_bwd, (x, torch.randn(12, device=DEV)))
    torch.library.opcheck(torch.ops.memfast.cross_entropy_bwd, (x, torch.tensor(0.5, device=DEV)))
    t = memfast.SampleTracker(8, stats="all", device=DEV)
    _, row_stats, _ = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
    for ids in (torch.tensor([0, 1, 1, 7, 3, 1, 0, 0, 2, 2, 5, 6], device=DEV), torch.tensor([2, 5], device=DEV)):
        torch.library.opcheck(torch.ops.memfast.track_, (t.state, t.counters, row_stats, y, ids, -100, C,
                                                         t._stat_rows))


@cuda_only("CUDA graphs and streams")
def test_cuda_graph_replay():
    """Forward + backward + tracking captured once, replayed on new data."""
    N, B, C = 100, 64, 1000
    tracker = memfast.SampleTracker(N, stats="all", device=DEV)
    want = memfast.SampleTracker(N, stats="all", device=DEV)
    static_x = torch.randn(B, C, device=DEV, requires_grad=True)
    static_y = torch.randint(0, C, (B,), device=DEV)
    static_ids = torch.randint(0, N, (B,), device=DEV)

    def step():
        loss = memfast.cross_entropy(static_x, static_y, sample_ids=static_ids, tracker=tracker)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    tracker.reset()
    for _ in range(5):
        x = torch.randn(B, C, device=DEV)
        y = torch.randint(0, C, (B,), device=DEV)
        y[::11] = -100
        ids = torch.randint(0, N, (B,), device=DEV)
        with torch.no_grad():
            static_x.copy_(x)
        static_y.copy_(y)
        static_ids.copy_(ids)
        graph.replay()
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(xr, y)
        loss.backward()
        torch.testing.assert_close(static_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(static_x.grad, xr.grad, atol=1e-6, rtol=1e-5)
        _, row_stats, _ = ref.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
        reference_track(want, row_stats, y, ids, -100, C)
    assert_trackers_close(tracker, want)
    assert int(tracker.counters[COUNTER["calls"]]) == 5


def _loss_step(model, x, y, ids, tracker):
    return memfast.cross_entropy(model(x).float(), y, sample_ids=ids, tracker=tracker, label_smoothing=0.1)


def test_torch_compile_fullgraph_matches_eager():
    """Forward + tracker scatter compiled as one graph (backward through the compiled graph)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).to(DEV)
    x, y = torch.randn(256, 64, device=DEV), torch.randint(0, 1000, (256,), device=DEV)
    ids = torch.randint(0, 100, (256,), device=DEV)
    y[1] = -100
    eager_tracker = memfast.SampleTracker(100, stats="all", device=DEV)
    compiled_tracker = memfast.SampleTracker(100, stats="all", device=DEV)
    step = torch.compile(_loss_step, fullgraph=True)
    torch._dynamo.reset()
    for _ in range(3):
        model.zero_grad()
        eager_loss = _loss_step(model, x, y, ids, eager_tracker)
        eager_loss.backward()
        eager_grad = model.weight.grad.clone()
        model.zero_grad()
        compiled_loss = step(model, x, y, ids, compiled_tracker)
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss)
        torch.testing.assert_close(model.weight.grad, eager_grad)
    torch.testing.assert_close(compiled_tracker.state, eager_tracker.state)
    assert torch.equal(compiled_tracker.counters, eager_tracker.counters)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["auto", "stream"])
def test_64bit_indexing_bf16(monkeypatch, kernel):
    """R * C >= 2^31 elements: rows past the 32-bit boundary are right."""
    if EMULATED:
        pytest.skip("emulating 2^31 elements takes ~20 minutes; MEMFAST_TEST_CUDA_DEVICE=emulator")
    if kernel == "stream":
        if not ON_CUDA:
            pytest.skip(f"CUDA-only (MEMFAST_CE_KERNEL=stream picks a CUDA kernel); MEMFAST_TEST_CUDA_DEVICE={DEV}")
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    C = 131072 + 3
    R = (1 << 31) // C + 64
    assert R * C >= 1 << 31
    if ON_CUDA:
        available = torch.cuda.get_device_properties(0).total_memory
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if available < 3 * R * C * 2 + (4 << 30):
        pytest.skip(f"not enough {'GPU ' if ON_CUDA else ''}memory")
    x = torch.empty(R, C, device=DEV, dtype=torch.bfloat16).normal_(0, 2)
    y = torch.randint(0, C, (R,), device=DEV)
    loss, stats, grad = torch.ops.memfast.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, True, 0)
    for rows in (slice(0, 4), slice(R - 70, R)):
        want = ref.cross_entropy_fwd(x[rows], y[rows], None, -100, 0.0, None, None, True, 0)
        torch.testing.assert_close(loss[rows], want[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad[rows].float(), want[2].float(), atol=1e-2, rtol=1e-2)
    go = torch.randn(R, device=DEV)
    out = torch.ops.memfast.cross_entropy_bwd(grad, go)
    rows = slice(R - 70, R)
    torch.testing.assert_close(out[rows], ref.cross_entropy_bwd(grad[rows], go[rows]), atol=0, rtol=0)
    del x, grad, out
    if ON_CUDA:
        torch.cuda.empty_cache()
