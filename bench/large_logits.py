"""Loss and tracker accuracy for logits far from zero (an un-normalised head, a shared bias):
the largest absolute error against float64 PyTorch on the same rounded logits, for memfast
(kernels and reference) and F.cross_entropy in the logits' own dtype.

    .venv/bin/python bench/large_logits.py [--rows 4096 --classes 40 --device cpu]

Logits are offset + 2 randn; past 1e6 the spread is scaled with the offset so that fp32 still
resolves it (ulp(1e8) = 8).
"""
import argparse

import torch
import torch.nn.functional as F

import memfast


def max_error(a, b):
    return (a.double() - b).abs().max().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--classes", type=int, default=40)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    R, C, dev = args.rows, args.classes, args.device
    g = torch.Generator().manual_seed(0)
    print(f"{R} x {C} fp32 on {dev}; max |error| vs fp64 PyTorch")
    print(f"{'offset':>8} {'median loss':>11} {'F.cross_entropy':>15} {'memfast loss':>12} {'reference':>10} "
          f"{'tracker csl':>11} {'max_prob':>9}")
    for offset in (0.0, 1e4, 1e6, 1e8):
        x = torch.randn(R, C, generator=g, dtype=torch.float64) * 2 * max(1.0, offset * 2e-7) + offset
        x = x.float().to(dev)
        y = torch.randint(0, C, (R,), generator=g).to(dev)
        truth = F.cross_entropy(x.double(), y, reduction="none")
        top = x.double().softmax(1).max(1).values
        row = {"torch": max_error(F.cross_entropy(x, y, reduction="none"), truth)}
        for backend in ("kernels", "reference"):
            memfast.set_backend(backend)
            row[backend] = max_error(memfast.cross_entropy(x, y, reduction="none"), truth)
        memfast.set_backend("kernels")
        t = memfast.SampleTracker(R, stats="all", device=dev)
        memfast.cross_entropy(x, y, sample_ids=torch.arange(R, device=dev), tracker=t)
        print(f"{offset:>8.0e} {truth.median().item():>11.2f} {row['torch']:>15.1e} {row['kernels']:>12.1e} "
              f"{row['reference']:>10.1e} {max_error(t.stat('csl'), truth):>11.1e} "
              f"{max_error(t.stat('last_maxprob'), top):>9.1e}")


if __name__ == "__main__":
    main()
