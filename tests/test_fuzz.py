"""Property tests: the compiled kernels against the reference on random shapes,
dtypes, options, adjustments and repeated / per-sequence ids."""
import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfast import SampleTracker, _ops, reference

pytestmark = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def cases(draw):
    R = draw(st.integers(0, 24))
    C = draw(st.integers(1, 70))
    return dict(
        R=R, C=C,
        dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.sampled_from([1e-3, 1.0, 10.0, 300.0])),
        weighted=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0])),
        ignore_frac=draw(st.sampled_from([0.0, 0.2, 1.0])),
        adjustment=draw(st.sampled_from(["none", "dense", "vector", "table"])),
        rows_per_id=draw(st.sampled_from([1, 1, 2, 3])),
        num_samples=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
        reduction=draw(st.sampled_from([0, 1, 2])),
        kernel=draw(st.sampled_from(["default", "generic"])),
    )


@contextlib.contextmanager
def _cpu_kernel(name):
    """MEMFAST_CPU_KERNEL=generic: the portable loops where the build also has AVX-512 ones."""
    old = os.environ.get("MEMFAST_CPU_KERNEL")
    os.environ["MEMFAST_CPU_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["MEMFAST_CPU_KERNEL"]
        else:
            os.environ["MEMFAST_CPU_KERNEL"] = old


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernels_match_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    R, C, dtype = case["R"], case["C"], case["dtype"]
    if R % case["rows_per_id"]:
        R -= R % case["rows_per_id"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(R, C, generator=g) * case["scale"]).to(dtype)
    target = torch.randint(0, C, (R,), generator=g)
    target[torch.rand(R, generator=g) < case["ignore_frac"]] = -100
    weight = torch.rand(C, generator=g, dtype=acc) + 0.1 if case["weighted"] else None
    adjustment = groups = None
    if case["adjustment"] == "dense":
        adjustment = torch.randn(R, C, generator=g, dtype=acc)
    elif case["adjustment"] == "vector":
        adjustment = torch.randn(C, generator=g, dtype=acc).expand(R, C)
    elif case["adjustment"] == "table":
        adjustment, groups = torch.randn(3, C, generator=g, dtype=acc), torch.randint(0, 3, (R,), generator=g)
    args = (logits, target, weight, -100, case["eps"], adjustment, groups, True, case["reduction"])
    with _cpu_kernel(case["kernel"]):
        got = torch.ops.memfast.cross_entropy_fwd(*args)
    want = reference.cross_entropy_fwd(*args)
    exact = dtype == torch.float64
    tol = dict(atol=1e-9, rtol=1e-9) if exact else dict(atol=2e-4 * max(1.0, case["scale"]), rtol=2e-4)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)  # the mean over no rows is NaN
    # row stats: the target logit and max are exact; lse to tolerance
    torch.testing.assert_close(got[1], want[1], **tol, equal_nan=True)
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[2].double(), want[2].double(), **gtol)

    n_ids = R // case["rows_per_id"]
    ids = torch.randint(0, case["num_samples"], (n_ids,), generator=g)
    trackers = [SampleTracker(case["num_samples"], stats="all") for _ in range(2)]
    for t, track in zip(trackers, (torch.ops.memfast.track_, reference.track_)):
        track(t.state, t.counters, want[1], target, ids, -100, C, t._stat_rows)
    torch.testing.assert_close(trackers[0].state, trackers[1].state, atol=1e-4, rtol=1e-4)
    assert torch.equal(trackers[0].counters, trackers[1].counters)
