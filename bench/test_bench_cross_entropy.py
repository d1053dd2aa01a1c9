"""CPU benchmark: forward + backward + per-sample loss tracking.

    make bench        (or: .venv/bin/python -m pytest bench -q --benchmark-enable)

memfast (one fused op + tracker scatter) against eager PyTorch doing the same
job: F.cross_entropy(reduction='none') + index_add_ into a per-sample buffer +
mean().backward().
"""
import pytest
import torch
import torch.nn.functional as F

import memfast

SHAPES = [(256, 10), (4096, 1000), (1024, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_SAMPLES = 100_000


def _inputs(R, C, dtype):
    logits = (torch.randn(R, C) * 2).to(dtype).requires_grad_(True)
    target = torch.randint(0, C, (R,))
    ids = torch.randint(0, NUM_SAMPLES, (R,))
    return logits, target, ids


def eager_step(logits, target, ids, csl):
    per_sample = F.cross_entropy(logits, target, reduction="none")
    csl.index_add_(0, ids, per_sample.detach().float())
    per_sample.mean().backward()


def memfast_step(logits, target, ids, tracker):
    memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker).backward()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["eager", "memfast"])
def test_cross_entropy_step(benchmark, impl, shape, dtype):
    logits, target, ids = _inputs(*shape, DTYPES[dtype])
    if impl == "eager":
        csl = torch.zeros(NUM_SAMPLES)
        benchmark(eager_step, logits, target, ids, csl)
    else:
        tracker = memfast.SampleTracker(NUM_SAMPLES, device=logits.device)
        benchmark(memfast_step, logits, target, ids, tracker)
    benchmark.extra_info["shape"] = f"{shape[0]}x{shape[1]} {dtype}"
