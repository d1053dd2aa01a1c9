"""CPU benchmark: one training step's loss, forward + backward + per-sample loss
tracking, memfast against eager PyTorch doing the same job
(F.cross_entropy(reduction='none') + index_add_ + mean().backward()).

    make bench     (or: .venv/bin/python -m pytest bench -q --benchmark-enable)
"""
import pytest
import torch

import memfast
from memfast.bench import DTYPES, eager_step, make_inputs, memfast_step

SHAPES = [(256, 10), (4096, 1000), (1024, 32000)]
NUM_SAMPLES = 100_000


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["eager", "memfast"])
def test_cross_entropy_step(benchmark, impl, shape, dtype):
    logits, target, ids = make_inputs(*shape, DTYPES[dtype], NUM_SAMPLES)
    if impl == "eager":
        benchmark(eager_step, logits, target, ids, torch.zeros(NUM_SAMPLES))
    else:
        benchmark(memfast_step, logits, target, ids, memfast.SampleTracker(NUM_SAMPLES))
