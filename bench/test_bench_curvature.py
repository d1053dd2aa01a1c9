"""CPU benchmark of memfast.input_curvature against the reference code's probe
loop (two forwards and one backward per probe) on a small CNN.

    .venv/bin/python -m pytest bench/test_bench_curvature.py --benchmark-enable \
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

Setting (the CIFAR scorers'): 32x32 RGB inputs, B = 64, 10 probes, h = 1e-3,
eval mode, fp32. test_speedup_report prints the speedup over the reference
loop (add -s to see it; -k speedup runs only that). On a shared machine
OMP_NUM_THREADS=1 gives the steadiest numbers.
"""
import time

import pytest
import torch
import torch.nn as nn

import memfast
from memfast.reference import reference_probe_loop

B, N_PROBES, H = 64, 10, 1e-3


class SmallCNN(nn.Module):
    """Two 3x3 conv layers with ReLU and 2x2 max-pooling, then a linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(64 * 8 * 8, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(B, 3, 32, 32)
    y = torch.randint(0, 10, (B,))
    return model, x, y


def _interleaved_best(fns, rounds=5, clock=time.perf_counter):
    """Fastest of `rounds` timings of each function, run alternately (on a
    shared machine other load only adds time, so the minimum is the steadiest
    estimate)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


@pytest.mark.benchmark(group="curvature-cpu")
def test_reference_loop(benchmark, setup):
    model, x, y = setup
    benchmark.pedantic(reference_probe_loop, args=(model, x, y, N_PROBES, H), rounds=3, iterations=1,
                       warmup_rounds=1)


@pytest.mark.benchmark(group="curvature-cpu")
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5, 10], ids=lambda c: f"chunk={c}")
def test_memfast(benchmark, setup, chunk_size):
    model, x, y = setup
    benchmark.pedantic(memfast.input_curvature, args=(model, x, y),
                       kwargs=dict(n_probes=N_PROBES, h=H, chunk_size=chunk_size, seed=0),
                       rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_speedup_report(setup, capsys, layout):
    """Both methods timed alternately, best of 5, and the speedup printed
    (measured, not asserted), as wall time and as process CPU time (the
    latter is steadier on a shared machine, with OMP_NUM_THREADS=1)."""
    model, x, y = setup
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    reference = lambda: reference_probe_loop(model, x, y, N_PROBES, H)  # noqa: E731
    fast = lambda: memfast.input_curvature(model, x, y, n_probes=N_PROBES, h=H, seed=0)  # noqa: E731
    wall = _interleaved_best([reference, fast])
    cpu = _interleaved_best([reference, fast], clock=time.process_time)
    with capsys.disabled():
        print(f"\ncurvature CPU, {layout}, B={B}, {N_PROBES} probes, {torch.get_num_threads()} thread(s): "
              f"wall: reference {wall[0] * 1e3:.0f} ms, memfast {wall[1] * 1e3:.0f} ms, {wall[0] / wall[1]:.2f}x; "
              f"CPU time: reference {cpu[0] * 1e3:.0f} ms, memfast {cpu[1] * 1e3:.0f} ms, {cpu[0] / cpu[1]:.2f}x")
