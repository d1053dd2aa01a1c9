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
