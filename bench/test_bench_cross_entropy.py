"""CPU benchmark: one training step's loss, forward + backward + per-sample loss
tracking, memfast (also with inplace_backward=True) against eager PyTorch doing
the same job (F.cross_entropy(reduction='none') + index_add_ + mean().backward()).

    make bench     (or: .venv/bin/python -m pytest bench -q --benchmark-enable)
"""
import pytest
import torch

import memfast
from memfast.bench import DTYPES, eager_step, make_inputs, memfast_inplace_step, memfast_step

SHAPES = [(256, 10), (4096, 1000), (1024, 32000)]
NUM_SAMPLES = 100_000


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["eager", "memfast", "memfast-inplace"])
def test_cross_entropy_step(benchmark, impl, shape, dtype):
    logits, target, ids = make_inputs(*shape, DTYPES[dtype], NUM_SAMPLES)
    if impl == "eager":
        benchmark(eager_step, logits, target, ids, torch.zeros(NUM_SAMPLES))
    elif impl == "memfast":
        benchmark(memfast_step, logits, target, ids, memfast.SampleTracker(NUM_SAMPLES))
    else:  # the step overwrites its logits: restored before each round, untimed
        work, anchor = logits.detach().clone(), torch.zeros((), requires_grad=True)
        args = (work, anchor, target, ids, memfast.SampleTracker(NUM_SAMPLES))
        benchmark.pedantic(memfast_inplace_step, setup=lambda: (work.copy_(logits.detach()), (args, {}))[1],
                           rounds=20 if shape[1] > 1000 else 200, warmup_rounds=2)
