import os
import pathlib
import sys

import pytest
import torch

import memfast
from memfast import _ops

BACKENDS = ["kernels", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run a test once with the compiled kernels and once with the reference backend."""
    if request.param == "kernels" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    before = memfast.get_backend()
    memfast.set_backend(request.param)
    yield request.param
    memfast.set_backend(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def requires_cuda(f):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(f)


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread (tiny models only pay for threading)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["default", "generic"])
def cpu_kernel(request, monkeypatch):
    """Run a test with the CPU build's AVX-512 loops (where it has them) and with the portable
    loops (MEMFAST_CPU_KERNEL=generic)."""
    if request.param == "generic":
        monkeypatch.setenv("MEMFAST_CPU_KERNEL", "generic")
    return request.param


@pytest.fixture
def fwd_matches_reference():
    """check(args): the compiled cross_entropy_fwd against the reference's on the same arguments, to
    the logits dtype's tolerance (a bf16 / fp16 gradient is one rounding of an fp32 value); returns
    the kernel's (loss, row_stats, grad)."""
    from memfast import reference

    def check(args):
        dtype = args[0].dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        got, want = torch.ops.memfast.cross_entropy_fwd(*args), reference.cross_entropy_fwd(*args)
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got[2].to(acc), want[2].to(acc), **gtol)
        return got

    return check


def pytest_configure(config):
    """MEMFAST_TEST_CUDA_DEVICE=emulator: the CPU kernels of torch.ops.memfast become the CUDA
    sources compiled for the CPU emulator (tests/cuda_emu), for the whole run. Meant for
    tests/test_cuda_cross_entropy.py, which then checks the CUDA code on CPU tensors (the CPU
    kernels' own tests expect their errors, where the CUDA kernels give NaN rows)."""
    if os.environ.get("MEMFAST_TEST_CUDA_DEVICE") == "emulator":
        sys.path.insert(0, str(pathlib.Path(__file__).parent / "cuda_emu"))
        import emulator as cuda_emu

        config.memfast_cuda_emulator = cuda_emu.route_cpu_kernels()
