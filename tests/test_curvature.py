"""Input curvature: the Philox probes, the fused ops against their reference
twins, and memfast.input_curvature against the analytic input Hessian of a
linear softmax model and against the reference code's probe loop."""
import math
import os

import pytest
import torch
import torch.nn as nn

import memfast
from memfast import _ops
from memfast.curvature import _batch_seed
from memfast.reference import curvature as ref

HAS_KERNELS = _ops.extension_available("cpu")
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not built")
# The device test_cpu_and_cuda_agree compares the CPU with: "cpu" (set
# MEMFAST_TEST_CUDA_DEVICE=cpu) dry-runs the test's own logic without a GPU.
OTHER_DEVICE = torch.device(os.environ.get("MEMFAST_TEST_CUDA_DEVICE", "cuda"))
needs_other_device = pytest.mark.skipif(OTHER_DEVICE.type == "cuda" and not HAS_CUDA, reason="needs a CUDA device")


def kernel_ops(device):
    if device == "cuda" and not _ops.extension_available("cuda"):
        pytest.skip("extension built without CUDA kernels")
    return torch.ops.memfast


class SmallCNN(nn.Module):
    """ReLU + max-pool (kinks), BatchNorm and Dropout (mode-dependent)."""

    def __init__(self, classes=5, channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
        )
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def small_cnn(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def cnn_batch(B=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (B,), generator=g)


# ----------------------------------------------------------------- the probes
@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    words = ref.philox4x32_10(*[torch.tensor(c, dtype=torch.int64) for c in ctr], *key)
    assert tuple(int(w) for w in words) == expected


def test_probe_signs_are_balanced_and_distinct():
    v = ref.probe_signs(seed=7, batch=4, numel=1000, probe_offset=0, num_probes=8).double()
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    # 32000 fair coin flips: the mean is within 5 standard deviations of 0.
    assert abs(v.mean().item()) < 5 / math.sqrt(v.numel())
    flat = v.reshape(32, 1000)
    agree = (flat @ flat.T / 1000).fill_diagonal_(0)
    assert agree.abs().max() < 0.2  # no two (probe, sample) rows are alike
    # Keyed by probe index: an offset selects later probes of the same stream.
    later = ref.probe_signs(seed=7, batch=4, numel=1000, probe_offset=3, num_probes=2)
    assert torch.equal(later, v[3:5].to(torch.int8))
    assert not torch.equal(ref.probe_signs(8, 4, 1000, 0, 8), v.to(torch.int8))


# -------------------------------------------------------- kernels vs reference
PERTURB_CASES = [  # (shape, dtype)
    ((5, 3, 7, 11), torch.float32),
    ((4, 300), torch.float64),
    ((3, 128), torch.float16),
    ((2, 3, 5, 5), torch.bfloat16),
    ((7,), torch.float32),  # one element per sample
    ((0, 4), torch.float32),
]


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", PERTURB_CASES)
@pytest.mark.parametrize("seed", [0, 12345, -3, 2**62 + 17])
def test_perturb_matches_reference_bitwise(device, shape, dtype, seed):
    ops = kernel_ops(device)
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    for offset, probes in [(0, 3), (5, 2), (0, 0)]:
        got = ops.curvature_perturb(x, seed, offset, probes, 1e-3)
        want = torch.ops.memfast_ref.curvature_perturb(x, seed, offset, probes, 1e-3)
        assert got.shape == (probes * shape[0],) + shape[1:] and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_perturb_steps_are_plus_minus_h(device):
    ops = kernel_ops(device)
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64, device=device)
    h = 0.25  # exact in binary: x +- h - x == +-h
    out = ops.curvature_perturb(x, 99, 2, 3, h).reshape(3, 4, -1)
    v = ref.probe_signs(99, 4, 162, 2, 3, device).double()
    torch.testing.assert_close(out - x.reshape(1, 4, -1), h * v, rtol=0, atol=1e-15)
    # Non-contiguous input: same values as the contiguous copy.
    xt = torch.randn(9, 9, 2, 4, dtype=torch.float64, device=device).permute(3, 2, 0, 1)
    assert torch.equal(ops.curvature_perturb(xt, 5, 0, 2, h), ops.curvature_perturb(xt.contiguous(), 5, 0, 2, h))


REDUCE_CASES = [
    ((4, 3, 7, 11), torch.float32, 3),
    ((3, 300), torch.float64, 2),
    ((5, 130), torch.float16, 4),
    ((2, 3, 5, 5), torch.bfloat16, 1),
    ((6,), torch.float32, 3),
    ((0, 4), torch.float32, 2),
    ((3, 8), torch.float32, 0),
]


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,probes", REDUCE_CASES)
def test_reduce_matches_reference(device, shape, dtype, probes):
    ops = kernel_ops(device)
    B = shape[0]
    g0 = torch.randn(shape).to(dtype).to(device)
    grads = torch.randn((probes * B,) + shape[1:]).to(dtype).to(device)
    for seed, offset in [(3, 0), (-11, 7)]:
        got = ops.curvature_reduce(grads, g0, seed, offset)
        want = torch.ops.memfast_ref.curvature_reduce(grads, g0, seed, offset)
        assert got.shape == (3, B) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-5)
    # The direct formula, with the probes the perturb op adds.
    if B and probes and dtype == torch.float32:
        v = ref.probe_signs(3, B, g0[0].numel(), 0, probes, device).double()
        d = (grads.double().reshape(probes, B, -1) - g0.double().reshape(1, B, -1))
        direct = torch.stack([d.norm(dim=2).sum(0), (d * d).sum((0, 2)), (d * v).sum((0, 2))]).float()
        torch.testing.assert_close(ops.curvature_reduce(grads, g0, 3, 0), direct, rtol=2e-6, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_reduce_noncontiguous(device):
    ops = kernel_ops(device)
    g0 = torch.randn(5, 4, 3, device=device).transpose(1, 2)
    grads = torch.randn(10, 4, 3, device=device).transpose(1, 2)
    torch.testing.assert_close(ops.curvature_reduce(grads, g0, 1, 0),
                               ops.curvature_reduce(grads.contiguous(), g0.contiguous(), 1, 0))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_opcheck(device, ns):
    if ns == "memfast":
        kernel_ops(device)
    ops = getattr(torch.ops, ns)
    x = torch.randn(3, 2, 5, 5, device=device)
    torch.library.opcheck(ops.curvature_perturb.default, (x, 42, 1, 2, 1e-3))
    grads = torch.randn(6, 2, 5, 5, device=device)
    torch.library.opcheck(ops.curvature_reduce.default, (grads, x, 42, 1))


@needs_kernels
def test_op_argument_errors():
    x = torch.randn(3, 4)
    for ops in (torch.ops.memfast, torch.ops.memfast_ref):
        with pytest.raises(ValueError, match="floating"):
            ops.curvature_perturb(torch.ones(3, 4, dtype=torch.int64), 0, 0, 2, 1e-3)
        with pytest.raises(ValueError, match="probe_offset"):
            ops.curvature_perturb(x, 0, -1, 2, 1e-3)
        with pytest.raises(ValueError, match="do not fit"):  # 2^32 probes of 2^31 empty samples: 2^63 rows
            ops.curvature_perturb(torch.empty(2**31, 0), 0, 0, 2**32, 1e-3)
        with pytest.raises(ValueError, match="multiple of the batch"):
            ops.curvature_reduce(torch.randn(7, 4), x, 0, 0)
        with pytest.raises(ValueError, match="trailing shape"):
            ops.curvature_reduce(torch.randn(6, 5), x, 0, 0)
        with pytest.raises(ValueError, match="dtype"):
            ops.curvature_reduce(torch.randn(6, 4, dtype=torch.float64), x, 0, 0)


# -------------------------------------------- analytic input Hessian (softmax)
def linear_softmax_case(B=4, D=6, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    W = model.weight.detach()
    p = torch.softmax(model(x).detach(), dim=1)
    # H_b = W^T (diag p - p p^T) W
    hess = torch.einsum("ci,bcd,dj->bij", W, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], W)
    return model, x, y, hess


def test_linear_softmax_same_probes_exact():
    """With the probes it used, the estimate equals h ||H v|| etc. up to the
    O(h^2) finite-difference error."""
    model, x, y, hess = linear_softmax_case()
    n, h, seed = 7, 1e-6, 2024
    score, trace = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, return_trace=True)
    squared = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, squared=True)
    v = ref.probe_signs(seed, 4, 6, 0, n).double()  # [n, B, D]
    hv = torch.einsum("bij,nbj->nbi", hess, v)
    assert score.dtype == torch.float32 and score.shape == (4,)
    torch.testing.assert_close(score.double(), h * hv.norm(dim=2).mean(0), rtol=2e-5, atol=0)
    torch.testing.assert_close(squared.double(), h * h * (hv * hv).sum(2).mean(0), rtol=4e-5, atol=0)
    torch.testing.assert_close(trace.double(), h * (v * hv).sum(2).mean(0), rtol=2e-5, atol=0)


def test_linear_softmax_converges_to_traces():
    """Many probes: mean ||g_k - g0||^2 / h^2 -> tr(H^2), mean v.(g_k - g0) / h
    -> tr(H), within 5 Monte-Carlo standard errors."""
    model, x, y, hess = linear_softmax_case(seed=3)
    n, h, seed = 2000, 1e-4, 5
    squared = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, squared=True, chunk_size=500)
    _, trace = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, return_trace=True, chunk_size=500)
    v = ref.probe_signs(seed, 4, 6, 0, n).double()
    hv = torch.einsum("bij,nbj->nbi", hess, v)
    tr_h = hess.diagonal(dim1=1, dim2=2).sum(1)
    tr_h2 = (hess * hess).sum((1, 2))
    se_sq = (hv * hv).sum(2).std(0) / math.sqrt(n)
    se_tr = (v * hv).sum(2).std(0) / math.sqrt(n)
    assert ((squared.double() / h**2 - tr_h2).abs() <= 5 * se_sq + 1e-3 * tr_h2).all()
    assert ((trace.double() / h - tr_h).abs() <= 5 * se_tr + 1e-3 * tr_h).all()
    # The softmax Hessian is positive semi-definite: the trace estimate is positive.
    assert (trace > 0).all()


# ----------------------------------------------- against the reference's loop
def test_matches_reference_loop_fp64():
    model = small_cnn()
    x, y = cnn_batch()
    n, h, seed = 5, 1e-3, 77
    probes = ref.probe_signs(seed, 6, 3 * 8 * 8, 0, n).double().reshape(n, 6, 3, 8, 8)
    model.eval()
    curv, eig = ref.reference_probe_loop(model, x, y, n, h, probes=probes, reduction="sum", offset=0.0)
    score, trace = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, return_trace=True)
    torch.testing.assert_close(score.double(), curv, rtol=1e-5, atol=0)
    torch.testing.assert_close(trace.double(), eig / h, rtol=1e-5, atol=1e-9)


def test_matches_reference_loop_fp32_mean_reduction():
    """The reference scorers' setting: fp32, mean-reduced loss, v = h (v + 1e-7):
    memfast with scale=1/B gives the same scores."""
    model = small_cnn(torch.float32)
    x, y = cnn_batch(B=8, dtype=torch.float32)
    n, h, seed = 4, 1e-3, 1
    probes = ref.probe_signs(seed, 8, 3 * 8 * 8, 0, n).float().reshape(n, 8, 3, 8, 8)
    model.eval()
    curv, _ = ref.reference_probe_loop(model, x, y, n, h, probes=probes)
    score = memfast.input_curvature(model, x, y, n_probes=n, h=h, seed=seed, scale=1 / 8)
    # fp32 finite differences of O(1) gradients: ~1e-4 relative noise.
    torch.testing.assert_close(score, curv, rtol=5e-3, atol=0)


# ------------------------------------------------------------ API behaviour
@pytest.mark.parametrize("chunks", [(1, 3, 7), (2, 5)])
def test_chunk_size_invariance(chunks):
    model = small_cnn()
    x, y = cnn_batch()
    results = [memfast.input_curvature(model, x, y, n_probes=7, seed=11, chunk_size=c, return_trace=True)
               for c in chunks]
    for score, trace in results[1:]:
        torch.testing.assert_close(score, results[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(trace, results[0][1], rtol=1e-6, atol=1e-9)


def test_channels_last_inputs_keep_probes():
    model = small_cnn().eval()  # the spy is a plain function: input_curvature cannot set its mode
    x, y = cnn_batch()
    seen = []

    def spy(t):
        seen.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        return model(t)

    plain = memfast.input_curvature(model, x, y, n_probes=4, seed=8, chunk_size=2)
    last = memfast.input_curvature(spy, x.contiguous(memory_format=torch.channels_last), y, n_probes=4, seed=8,
                                   chunk_size=2)
    assert seen == [True, True, True]
    torch.testing.assert_close(last, plain, rtol=1e-6, atol=0)



class _LayoutSpy(nn.Module):
    """Records whether each batch the model sees is channels_last."""

    def __init__(self, model, flatten_with_view=False):
        super().__init__()
        self.model, self.flatten_with_view, self.seen = model, flatten_with_view, []

    def forward(self, t):
        self.seen.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        if self.flatten_with_view:
            t.view(t.shape[0], -1)  # fails on channels_last: input_curvature must fall back
        return self.model(t)


def test_conv_model_runs_channels_last_on_cpu():
    """NCHW image batches for a conv model run channels_last on the CPU (faster),
    with the same scores; a model that needs the standard layout still works."""
    x, y = cnn_batch()
    base = small_cnn().eval()
    plain = memfast.input_curvature(lambda t: base(t), x, y, n_probes=4, seed=8, chunk_size=2)  # not a Module: NCHW
    spy = _LayoutSpy(small_cnn())
    auto = memfast.input_curvature(spy, x, y, n_probes=4, seed=8, chunk_size=2)
    assert spy.seen == [True, True, True]
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=0)
    picky = _LayoutSpy(small_cnn(), flatten_with_view=True)
    fallback = memfast.input_curvature(picky, x, y, n_probes=4, seed=8, chunk_size=2)
    assert picky.seen == [True, False, False, False]  # the first try, then the standard layout
    torch.testing.assert_close(fallback, plain, rtol=1e-6, atol=0)

def test_determinism_and_seed():
    model = small_cnn(torch.float32)
    x, y = cnn_batch(dtype=torch.float32)
    a = memfast.input_curvature(model, x, y, n_probes=3, seed=5)
    b = memfast.input_curvature(model, x, y, n_probes=3, seed=5)
    c = memfast.input_curvature(model, x, y, n_probes=3, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Seeds are taken modulo 2^64, like the generator's key.
    assert torch.equal(memfast.input_curvature(model, x, y, n_probes=3, seed=5 + 2**64), a)
    assert torch.equal(memfast.input_curvature(model, x, y, n_probes=3, seed=-1),
                       memfast.input_curvature(model, x, y, n_probes=3, seed=2**64 - 1))
    torch.manual_seed(0)
    d = memfast.input_curvature(model, x, y, n_probes=3)
    torch.manual_seed(0)
    e = memfast.input_curvature(model, x, y, n_probes=3)
    assert torch.equal(d, e)


def test_scale_and_squared():
    model = small_cnn()
    x, y = cnn_batch()
    base = memfast.input_curvature(model, x, y, n_probes=3, seed=2)
    torch.testing.assert_close(memfast.input_curvature(model, x, y, n_probes=3, seed=2, scale=0.25), base / 4)
    sq = memfast.input_curvature(model, x, y, n_probes=1, seed=2, squared=True)
    one = memfast.input_curvature(model, x, y, n_probes=1, seed=2)
    torch.testing.assert_close(sq, one * one, rtol=1e-5, atol=0)


@needs_kernels
def test_reference_backend_agrees():
    model = small_cnn(torch.float32)
    x, y = cnn_batch(dtype=torch.float32)
    kernels = memfast.input_curvature(model, x, y, n_probes=3, seed=9, return_trace=True)
    previous = memfast.get_backend()
    memfast.set_backend("reference")
    try:
        reference = memfast.input_curvature(model, x, y, n_probes=3, seed=9, return_trace=True)
    finally:
        memfast.set_backend(previous)
    torch.testing.assert_close(kernels, reference, rtol=1e-5, atol=1e-6)


def test_modes_restored_and_eval_used():
    model = small_cnn()
    x, y = cnn_batch()
    model.train()
    model.head.eval()  # a submodule's own mode must survive too
    score = memfast.input_curvature(model, x, y, n_probes=2, seed=4)
    assert model.training and model.features.training and model.features[1].training and not model.head.training
    model.eval()
    torch.testing.assert_close(memfast.input_curvature(model, x, y, n_probes=2, seed=4), score, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_tf32_and_autocast_state():
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen["cudnn"] = torch.backends.cudnn.allow_tf32
            seen["matmul"] = torch.backends.cuda.matmul.allow_tf32
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            seen["grad"] = torch.is_grad_enabled()
            return self.lin(x)

    model = Spy()
    x, y = torch.randn(3, 4), torch.tensor([0, 2, 1])
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            under = memfast.input_curvature(model, x, y, n_probes=2, seed=1)
        assert seen == {"cudnn": False, "matmul": False, "autocast": False, "grad": True}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        torch.testing.assert_close(under, memfast.input_curvature(model, x, y, n_probes=2, seed=1), rtol=0, atol=0)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without the fp32_precision switches")
def test_tf32_new_api_state_restored():
    switches = [torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
    saved = [s.fp32_precision for s in switches]
    seen = []
    model = nn.Linear(4, 3)

    def spy(x):
        seen.append([s.fp32_precision for s in switches])
        return model(x)

    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"  # mixed: the legacy switch can no longer be read
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        before = [s.fp32_precision for s in switches]
        memfast.input_curvature(spy, torch.randn(2, 4), torch.tensor([0, 1]), n_probes=1, seed=0)
        assert seen[0] == ["ieee", "ieee", "ieee"]
        assert [s.fp32_precision for s in switches] == before
    finally:
        for s, value in zip(switches, saved):
            s.fp32_precision = value


def test_inference_mode_and_callable_model():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    plain = memfast.input_curvature(lambda t: model(t), x, y, n_probes=3, seed=3)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        inside = memfast.input_curvature(model, xi, yi, n_probes=3, seed=3)
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    assert memfast.input_curvature(model, x[:0], y[:0], n_probes=3).shape == (0,)


def test_bad_input_raises_naming_the_argument():
    model = nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(TypeError, match="inputs"):
        memfast.input_curvature(model, torch.ones(2, 4, dtype=torch.int64), y)
    with pytest.raises(TypeError, match="targets"):
        memfast.input_curvature(model, x, y.float())
    with pytest.raises(ValueError, match="targets"):
        memfast.input_curvature(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError, match="targets"):
        memfast.input_curvature(model, x, torch.tensor([0, 3]))
    with pytest.raises(IndexError, match="targets"):
        memfast.input_curvature(model, x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="model"):
        memfast.input_curvature(nn.Linear(4, 3, device="meta"), x, y)
    with pytest.raises(ValueError, match="model"):
        memfast.input_curvature(nn.Linear(4, 3).half(), x, y)
    with pytest.raises(ValueError, match="n_probes"):
        memfast.input_curvature(model, x, y, n_probes=0)
    with pytest.raises(ValueError, match="h must"):
        memfast.input_curvature(model, x, y, h=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        memfast.input_curvature(model, x, y, chunk_size=0)
    with pytest.raises(TypeError, match="seed"):
        memfast.input_curvature(model, x, y, seed=1.5)
    with pytest.raises(ValueError, match="logits"):
        memfast.input_curvature(lambda t: t.sum(1), x, y)


# ------------------------------------------------------------- over a dataset
def _shuffled_id_loader():
    """A small CNN and 10 samples in two batches whose sample ids are shuffled."""
    model = small_cnn(torch.float32)
    x, y = cnn_batch(B=10, dtype=torch.float32)
    ids = torch.tensor([3, 0, 9, 4, 1, 8, 2, 7, 6, 5])
    return model, x, y, ids, [(x[:4], y[:4], ids[:4]), (x[4:], y[4:], ids[4:])]


def test_score_curvature_accumulates_mean_over_calls():
    model, x, y, ids, loader = _shuffled_id_loader()
    tracker = memfast.SampleTracker(12, stats=("csl", "count", "curv"))
    memfast.score_curvature(model, loader, tracker, n_probes=3, seed=1, progress=False)
    memfast.score_curvature(model, loader, tracker, n_probes=3, seed=2, progress=False)
    expected = torch.zeros(12)
    for base in (1, 2):
        for i, (xb, yb, ib) in enumerate(loader):
            expected[ib] += memfast.input_curvature(model, xb, yb, n_probes=3, seed=_batch_seed(base, i)) / 2
    scores = tracker.scores()
    torch.testing.assert_close(scores["curv"][ids], expected[ids])
    assert tracker.stat("curv_count")[ids].eq(2).all() and tracker.stat("curv_count")[10:].eq(0).all()
    # Unseen samples have no score (0 / 0).
    assert torch.isnan(scores["curv"][10:]).all()


def test_score_curvature_needs_curv_stat():
    tracker = memfast.SampleTracker(4)
    with pytest.raises(ValueError, match="curv"):
        memfast.score_curvature(nn.Linear(2, 2), [], tracker, progress=False)
    tracker = memfast.SampleTracker(4, stats="curv")
    batch = (torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([1, 4]))
    with pytest.raises(IndexError, match="sample_ids"):
        memfast.score_curvature(nn.Linear(2, 2), [batch], tracker, progress=False)


# ------------------------------------------ input-gradient norm (loss sensitivity)
def test_input_gradient_norm_is_the_analytic_one():
    """Linear softmax: grad_x CE(Wx + b, y) = W^T (p - e_y), per sample."""
    model, x, y, _ = linear_softmax_case(B=7, D=6, C=5)
    p = torch.softmax(model(x).detach(), dim=1)
    grad = (p - torch.nn.functional.one_hot(y, 5).double()) @ model.weight.detach()
    got = memfast.input_gradient_norm(model, x, y)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got.double(), grad.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(memfast.input_gradient_norm(model, x, y, squared=True).double(),
                               grad.pow(2).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(memfast.input_gradient_norm(model, x, y, scale=1 / 7).double(),
                               grad.norm(dim=1) / 7, rtol=1e-6, atol=0)


def test_input_gradient_norm_per_sample_in_eval_mode():
    """Each sample's norm equals the one computed alone (eval mode: BatchNorm and Dropout do not couple
    the batch), the modes are restored and the parameters get no gradient."""
    model = small_cnn(torch.float64)
    x, y = cnn_batch(B=5)
    model.train()
    got = memfast.input_gradient_norm(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_()
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi), y[i:i + 1], reduction="sum"), xi)
        torch.testing.assert_close(got[i].double(), g.norm().double(), rtol=1e-6, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(memfast.input_gradient_norm(model, x, y), got, rtol=0, atol=0)
    assert memfast.input_gradient_norm(model, x[:0], y[:0]).shape == (0,)


def test_input_gradient_norm_bad_input():
    model = nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(TypeError, match="input_gradient_norm: targets"):
        memfast.input_gradient_norm(model, x, y.float())
    with pytest.raises(IndexError, match="input_gradient_norm: targets contain 3"):
        memfast.input_gradient_norm(model, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="input_gradient_norm: model parameter"):
        memfast.input_gradient_norm(nn.Linear(4, 3).half(), x, y)
    with pytest.raises(ValueError, match="scale"):
        memfast.input_gradient_norm(model, x, y, scale=math.inf)


def test_score_grad_norm_returns_this_pass_and_accumulates():
    model, x, y, ids, loader = _shuffled_id_loader()
    tracker = memfast.SampleTracker(12, stats=("csl", "count", "grad_norm"))
    first = memfast.score_grad_norm(model, loader, tracker, progress=False)
    expected = torch.full((12,), math.nan)
    expected[ids] = memfast.input_gradient_norm(model, x, y)
    torch.testing.assert_close(first, expected, equal_nan=True)
    with torch.no_grad():
        model.head.weight.mul_(2)  # another checkpoint
    second = memfast.score_grad_norm(model, loader, tracker, progress=False)
    scores = tracker.scores()
    torch.testing.assert_close(scores["grad_norm"][ids], (first[ids] + second[ids]) / 2)
    assert torch.isnan(scores["grad_norm"][10:]).all() and tracker.stat("grad_norm_count")[ids].eq(2).all()
    alone = memfast.score_grad_norm(model, loader, num_samples=12, progress=False)
    torch.testing.assert_close(alone, second, equal_nan=True)
    with pytest.raises(ValueError, match="grad_norm"):
        memfast.score_grad_norm(model, loader, memfast.SampleTracker(12), progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        memfast.score_grad_norm(model, loader, progress=False)
    with pytest.raises(IndexError, match="sample_ids"):
        memfast.score_grad_norm(model, loader, num_samples=9, progress=False)


def test_score_curvature_also_fills_grad_norm():
    model = small_cnn(torch.float32)
    x, y = cnn_batch(B=6, dtype=torch.float32)
    loader = [(x, y, torch.arange(6))]
    tracker = memfast.SampleTracker(6, stats=("curv", "grad_norm"))
    memfast.score_curvature(model, loader, tracker, n_probes=2, seed=0, progress=False)
    assert tracker.stat("grad_norm_count").eq(0).all()  # opt-in: score_grad_norm may fill it too
    memfast.score_curvature(model, loader, tracker, n_probes=2, seed=0, progress=False, grad_norm=True)
    torch.testing.assert_close(tracker.scores()["grad_norm"], memfast.input_gradient_norm(model, x, y),
                               rtol=1e-5, atol=1e-7)
    assert tracker.stat("curv_count").eq(2).all() and tracker.stat("grad_norm_count").eq(1).all()
    with pytest.raises(ValueError, match="grad_norm"):
        memfast.score_curvature(model, loader, memfast.SampleTracker(6, stats="curv"), grad_norm=True,
                                progress=False)


# ------------------------------------------------------------------- devices
@needs_other_device
@needs_kernels
def test_cpu_and_cuda_agree():
    dev = OTHER_DEVICE
    kernel_ops(dev.type)
    model = small_cnn(torch.float32)
    x, y = cnn_batch(B=16, dtype=torch.float32)
    assert torch.equal(torch.ops.memfast.curvature_perturb(x, 3, 0, 4, 1e-3),
                       torch.ops.memfast.curvature_perturb(x.to(dev), 3, 0, 4, 1e-3).cpu())
    cpu = memfast.input_curvature(model, x, y, n_probes=4, seed=3, return_trace=True)
    model.to(dev)
    gpu = memfast.input_curvature(model, x.to(dev), y.to(dev), n_probes=4, seed=3, return_trace=True)
    assert gpu[0].device.type == gpu[1].device.type == dev.type
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-2, atol=1e-5)
    if dev.type != "cpu":
        with pytest.raises(ValueError, match="model"):
            memfast.input_curvature(model, x, y)


def test_float64_inputs_for_a_float32_model():
    """fp64 inputs (tabular data from NumPy) for an fp32 model are cast to the model's dtype: the same
    scores as fp32 inputs (a raw dtype-mismatch error before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    for fn in (lambda inputs: memfast.input_curvature(model, inputs, y, n_probes=3, seed=0),
               lambda inputs: memfast.input_gradient_norm(model, inputs, y)):
        want = fn(x)
        got = fn(x.double())
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_scoring_under_a_float64_default_dtype():
    """torch.set_default_dtype(torch.float64) (an fp64 model): score_curvature and score_grad_norm
    still add into the tracker's fp32 buffers (they crashed in index_add_)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(4, 3)
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        tracker = memfast.SampleTracker(6, stats=("curv", "grad_norm"))
        loader = [(x, y, torch.arange(6))]
        memfast.score_curvature(model, loader, tracker, n_probes=2, seed=0, progress=False, grad_norm=True)
        memfast.score_grad_norm(model, loader, tracker, progress=False)
    finally:
        torch.set_default_dtype(before)
    scores = tracker.scores()
    assert scores["curv"].dtype == torch.float32 and not scores["curv"].isnan().any()
    torch.testing.assert_close(scores["grad_norm"], memfast.input_gradient_norm(model, x, y).float())


def test_loader_of_dicts_is_named_in_the_error():
    model, x, y, ids, _ = _shuffled_id_loader()
    for batch, what in (({"x": x, "y": y, "idx": ids}, r"a dict with keys \['x', 'y', 'idx'\]"),
                        (({"x": x, "y": y}, ids), r"a tuple of 2 \(dict with keys \['x', 'y'\], Tensor\)")):
        with pytest.raises(ValueError, match=f"score_curvature: the loader must yield .* got {what}"):
            memfast.score_curvature(model, [batch], memfast.SampleTracker(10, stats=("curv",)), progress=False)


def test_a_bad_batch_leaves_the_tracker_unscored():
    """The pass is added to the tracker once it has run: a bad batch later in the loader leaves no
    samples scored once more than the others."""
    model, x, y, ids, loader = _shuffled_id_loader()
    tracker = memfast.SampleTracker(10, stats=("curv", "grad_norm"))
    bad = loader + [(x[:2], y[:2], torch.tensor([3, 10]))]
    with pytest.raises(IndexError, match="score_curvature: sample_ids out of range"):
        memfast.score_curvature(model, bad, tracker, n_probes=2, seed=0, progress=False, grad_norm=True)
    with pytest.raises(IndexError, match="score_grad_norm: sample_ids out of range"):
        memfast.score_grad_norm(model, bad, tracker, progress=False)
    assert not tracker.state.any()
    memfast.score_curvature(model, loader, tracker, n_probes=2, seed=0, progress=False, grad_norm=True)
    assert tracker.stat("curv_count").tolist() == [1.0] * 10
