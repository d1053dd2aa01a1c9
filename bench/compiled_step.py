"""What the checkpoint guard costs a compiled step: a torch.compile'd tracked
memfast.cross_entropy step (forward + backward), with traced code calling
track_unless_backward_ (what memfast does) and with it calling track_ directly
(what it did before; wrong under activation checkpointing), interleaved medians.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compiled_step.py [--rows 256 --classes 10 --steps 500]
"""
import argparse
import statistics
import time

import torch

import memfast
from memfast import _ops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.classes, generator=g).requires_grad_()
    y = torch.randint(0, a.classes, (a.rows,), generator=g)
    ids = torch.arange(a.rows)
    guarded = _ops.track_rows

    def direct(lib, *args):
        lib.track_(*args)

    variants = {"track_unless_backward_ (memfast)": guarded, "track_ directly": direct}
    compiled = {}
    for name, track_rows in variants.items():
        _ops.track_rows = track_rows  # read when the step is traced
        tracker = memfast.SampleTracker(a.rows)
        torch._dynamo.reset()
        step = torch.compile(lambda x, t=tracker: memfast.cross_entropy(x, y, sample_ids=ids, tracker=t),
                             fullgraph=True)
        for _ in range(20):
            step(x).backward()
        compiled[name] = step
    _ops.track_rows = guarded
    times = {name: [] for name in compiled}
    for _ in range(a.repeats):
        for name, step in compiled.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(x).backward()
            times[name].append((time.perf_counter() - t0) / a.steps)
    print(f"compiled tracked step, {a.rows} x {a.classes} fp32, {torch.get_num_threads()} thread(s), "
          f"median of {a.repeats} x {a.steps} steps")
    print("| traced tracking | us a step |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e6 * statistics.median(t):.1f} |")


if __name__ == "__main__":
    main()
