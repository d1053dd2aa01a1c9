"""The CPU emulator of the CUDA sources (tests/cuda_emu): the faults it reports and the device
semantics it implements (its own kernels, tests/cuda_emu/selftest.cu), the source rewrites it
compiles with, and the CUDA kernels it runs against the CPU kernels (curvature ops; a property
test of the cross-entropy forward). tests/test_cuda_cross_entropy.py checks the CUDA cross-entropy
and tracker ops in depth: `make test` runs it a second time under the emulator
(MEMFAST_TEST_CUDA_DEVICE=emulator)."""
import pathlib
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfast import _ops

sys.path.insert(0, str(pathlib.Path(__file__).parent / "cuda_emu"))
import emulator as cuda_emu  # noqa: E402

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not built")


@pytest.fixture(scope="module")
def emu():
    cuda_emu.load()
    return torch.ops.memfast_emu


def run_selftest(kernel, threads, blocks):
    out = torch.full((max(blocks, 1) * threads * 8,), -1.0)
    torch.ops.memfast_emu_selftest.run(out, kernel, threads, blocks)
    return out


# ------------------------------------------------------------------ the emulator itself
def test_a_barrier_publishes_shared_memory_and_its_absence_shows(emu):
    threads, blocks = 256, 3
    assert run_selftest("publish", threads, blocks)[: threads * blocks].eq(42).all()
    # Without the barrier some threads run before thread 0 wrote: they read the 0xff fill (NaN).
    seen = run_selftest("publish_without_barrier", threads, blocks)[: threads * blocks]
    assert seen.isnan().any() and seen.eq(42).any()


@pytest.mark.parametrize("kernel,threads,blocks,message", [
    ("shuffle_after_exit", 32, 1, r"a shuffle with mask 0xffffffff names lane (1[6-9]|2\d|3[01]), which has exited"),
    ("deadlock", 64, 1, r"deadlock: no thread can go on .*__syncthreads\(\).*a shuffle"),
    ("trap", 32, 2, r"__trap\(\) \(trap_kernel block \([01],0,0\) thread \(3,0,0\)\)"),
    ("bounded", 256, 1, r"launched with 256 threads per block, over its __launch_bounds__ of 128"),
    ("cluster_leave", 64, 8, r"map_shared_rank to block rank 0, which has exited"),
    ("publish", 256, 0, r"invalid launch configuration: a grid of no blocks"),
    ("publish", 2048, 1, r"invalid launch configuration: a block of 2048 threads"),
    ("cluster", 64, 6, r"invalid launch configuration: a cluster of 4 blocks for a grid of 6"),
])
def test_faults_raise_and_leave_the_next_launch_alone(emu, kernel, threads, blocks, message):
    with pytest.raises(RuntimeError, match=message):
        run_selftest(kernel, threads, blocks)
    assert run_selftest("bounded", 128, 1)[:128].eq(1).all()


def test_shuffle_ballot_and_clz_semantics(emu):
    got = run_selftest("shuffles", 32, 1).view(32, 8)
    for lane in range(32):
        own = lane * 10

        def src(s, lo, width):
            return s * 10 if lo <= s < lo + width else own

        seg4, seg8 = lane & ~3, lane & ~7
        want = [(lane ^ 5) * 10, src(lane - 3, 0, 32), src(lane + 3, 0, 32), src(lane ^ 2, seg4, 4),
                src(lane + 3, seg8, 8), sum(1 << i for i in range(16) if i % 3 == 0), (lane ^ 4) * 10,
                32 if lane == 0 else 32 - lane.bit_length()]
        assert got[lane].tolist() == want, lane


def test_cluster_blocks_read_each_others_shared_memory(emu):
    threads, blocks = 64, 8
    got = run_selftest("cluster", threads, blocks)[: threads * blocks].view(blocks, threads)
    want = torch.tensor([(b % 4 + 1) % 4 for b in range(blocks)], dtype=torch.float32)
    assert torch.equal(got, want[:, None].expand(blocks, threads))


def test_source_rewrites():
    text = ("  k<T, 2><<<static_cast<unsigned>(n), 256, 0, s>>>(a, b);\n"
            "  (f ? x<T> : y<T>)\n      <<<1, 32>>>(c);\n"
            "  __shared__ double p[4], q[2][3];\n"
            "__global__ void __launch_bounds__(G > 32 ? G : 256) kern(int a) { body; }\n"
            "#if defined(__CUDA_ARCH__)\n#include <c10/cuda/CUDAGuard.h>\n")
    out = cuda_emu.rewrite_cuda(text)
    assert ('::memfast_emu_rt::launch("k<T, 2>", ::memfast_emu_rt::LaunchConfig(static_cast<unsigned>(n), 256, 0, s),'
            " k<T, 2>, a, b);") in out
    assert ('::memfast_emu_rt::launch("(f ? x<T> : y<T>)", ::memfast_emu_rt::LaunchConfig(1, 32), '
            "(f ? x<T> : y<T>), c);") in out
    assert "auto& p = ::memfast_emu_rt::shared<double[4]>(&memfast_emu_shared_key_1);" in out
    assert "auto& q = ::memfast_emu_rt::shared<double[2][3]>(&memfast_emu_shared_key_2);" in out
    assert "kern(int a) { ::memfast_emu_rt::check_launch_bounds(G > 32 ? G : 256); body; }" in out
    assert "MEMFAST_EMU_ARCH" in out and "__CUDA_ARCH__" not in out and "c10/cuda" not in out.split("//")[0]


# ------------------------------------------------------------------ the CUDA ops against the CPU kernels
@pytest.mark.parametrize("shape,dtype", [((5, 3, 7, 11), torch.float32), ((4, 300), torch.float64),
                                         ((3, 128), torch.float16), ((2, 3, 5, 5), torch.bfloat16),
                                         ((7,), torch.float32), ((0, 4), torch.float32), ((2, 1000), torch.float32)])
@pytest.mark.parametrize("seed", [0, -3, 2**62 + 17])
def test_curvature_perturb_is_the_cpu_kernels_bitwise(emu, shape, dtype, seed):
    x = (torch.randn(shape) * 3).to(dtype)
    for offset, probes in [(0, 3), (5, 2), (0, 0)]:
        assert torch.equal(emu.curvature_perturb(x, seed, offset, probes, 1e-3),
                           torch.ops.memfast.curvature_perturb(x, seed, offset, probes, 1e-3))
    xt = x.transpose(0, -1) if x.dim() > 1 else x
    assert torch.equal(emu.curvature_perturb(xt, seed, 1, 2, 0.5), torch.ops.memfast.curvature_perturb(xt, seed, 1, 2, 0.5))


@pytest.mark.parametrize("shape,dtype,probes", [((4, 3, 7, 11), torch.float32, 3), ((3, 300), torch.float64, 2),
                                                ((5, 130), torch.float16, 4), ((2, 3, 5, 5), torch.bfloat16, 1),
                                                ((6,), torch.float32, 3), ((0, 4), torch.float32, 2),
                                                ((3, 8), torch.float32, 0), ((2, 5000), torch.float32, 2)])
def test_curvature_reduce_matches_the_cpu_kernel(emu, shape, dtype, probes):
    B = shape[0]
    g0 = torch.randn(shape).to(dtype)
    grads = torch.randn((probes * B,) + shape[1:]).to(dtype)
    for seed, offset in [(3, 0), (-11, 7)]:
        got = emu.curvature_reduce(grads, g0, seed, offset)
        want = torch.ops.memfast.curvature_reduce(grads, g0, seed, offset)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_curvature_bad_arguments_raise_as_on_the_cpu(emu):
    x = torch.randn(3, 4)
    for op, args in (("curvature_perturb", (x, 0, -1, 2, 1e-3)), ("curvature_perturb", (x, 0, 0, -2, 1e-3)),
                     ("curvature_reduce", (torch.randn(5, 4), x, 0, 0)),
                     ("curvature_reduce", (torch.randn(6, 4), x.double(), 0, 0))):
        with pytest.raises(Exception) as cpu:
            getattr(torch.ops.memfast, op)(*args)
        with pytest.raises(type(cpu.value)) as cuda:
            getattr(emu, op)(*args)
        assert str(cuda.value).splitlines()[0] == str(cpu.value).splitlines()[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(R=st.integers(0, 9), C=st.sampled_from([1, 2, 3, 7, 8, 9, 33, 255, 1000, 2049, 4100, 9000]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       eps=st.sampled_from([0.0, 0.1]), weighted=st.booleans(), reduction=st.integers(0, 2),
       adjust=st.sampled_from(["none", "dense", "table"]), zeta=st.sampled_from([0.0, 1e-2]),
       cap=st.sampled_from([0.0, 5.0]), offset=st.integers(0, 3), kernel=st.sampled_from(["auto", "stream", "no-cluster"]),
       seed=st.integers(0, 2**31 - 1))
def test_forward_matches_the_cpu_kernel(emu, monkeypatch, R, C, dtype, eps, weighted, reduction, adjust, zeta, cap,
                                        offset, kernel, seed):
    """Any shape and option: the CUDA forward (each kernel path) against the CPU kernel on the same
    inputs; `offset` starts the rows at an element offset in their storage (unaligned heads)."""
    monkeypatch.delenv("MEMFAST_CE_KERNEL", raising=False)
    monkeypatch.delenv("MEMFAST_CE_CLUSTER", raising=False)
    if kernel == "stream":
        monkeypatch.setenv("MEMFAST_CE_KERNEL", "stream")
    elif kernel == "no-cluster":
        monkeypatch.setenv("MEMFAST_CE_CLUSTER", "0")
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    storage = (torch.randn(R * C + offset, generator=g) * 4).to(dtype)
    x = storage[offset:].view(R, C)
    y = torch.randint(0, C, (R,), generator=g)
    if R > 2:
        y[1] = -100
    w = torch.rand(C, generator=g, dtype=acc) + 0.5 if weighted else None
    adj = groups = None
    if adjust == "dense":
        adj = torch.randn(R, C, generator=g, dtype=acc)
    elif adjust == "table":
        adj, groups = torch.randn(3, C, generator=g, dtype=acc), torch.randint(0, 3, (R,), generator=g)
    args = (x, y, w, -100, eps, adj, groups, True, reduction, zeta, cap)
    got, want = emu.cross_entropy_fwd(*args), torch.ops.memfast.cross_entropy_fwd(*args)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1], want[1], equal_nan=True, **tol)
    gtol = tol if acc == dtype else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[2].to(acc), want[2].to(acc), **gtol)
    go = torch.randn(R, generator=g, dtype=acc)
    if reduction == 0 and R:
        torch.testing.assert_close(emu.cross_entropy_bwd(got[2], go).to(acc),
                                   torch.ops.memfast.cross_entropy_bwd(want[2], go).to(acc), **gtol)
