"""GPU benchmark of memfast.input_curvature against the reference code's probe
loop on a ResNet18-like CIFAR model (defined here; no torchvision), 100
classes, 32x32 inputs, eval mode, fp32 with TF32 off for both.

    python bench/gpu_curvature.py [--batch 128] [--probes 10] [--reps 20] [--chunks 1,2,5,10,auto]
    python bench/gpu_curvature.py --device cpu --smoke   # checks the script runs (tiny model, B=4, 2 probes)

Prints, per method, the median time of one call (CUDA events) and the peak
memory allocated during it beyond what was allocated before (model, inputs),
and checks that memfast and the loop agree when given the same probes.
Exits with a message when no CUDA device is present (--device cpu runs the
same code on the CPU, timed with time.perf_counter, no memory figures;
--smoke makes it quick: a ResNet18 of width 8, B=4, 2 probes, 1 repetition).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import memfast
from memfast.reference import curvature as ref


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The usual CIFAR ResNet18: 3x3 stem, no max-pool, stages of 64-512."""

    def __init__(self, classes=100, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_model(device, classes=100, width=64):
    torch.manual_seed(0)
    model = ResNet18(classes, width).to(device)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def seconds(fn, device):
    """Seconds one call of fn takes: CUDA events around it (the device idle
    before: the caller synchronises), time.perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn, device, reps):
    """(median seconds per call, peak bytes allocated during a call above the
    start; None on the CPU, which keeps no allocator statistics)."""
    fn()  # warm-up: cuDNN algorithm choice, caching allocator
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return statistics.median([seconds(fn, device) for _ in range(reps)]), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true",
                   help="check that the script runs: width-8 ResNet18, B=4, 2 probes, 1 rep, chunks 1,2,auto "
                        "(unless given)")
    p.add_argument("--batch", type=int, default=None, help="default 128 (smoke 4)")
    p.add_argument("--probes", type=int, default=None, help="default 10 (smoke 2)")
    p.add_argument("--h", type=float, default=1e-3)
    p.add_argument("--reps", type=int, default=None, help="default 20 (smoke 1)")
    p.add_argument("--chunks", default=None,
                   help="comma-separated probes per chunk; auto = default (default 1,2,5,10,auto; smoke 1,2,auto)")
    p.add_argument("--width", type=int, default=None, help="ResNet18 base width (default 64, smoke 8)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    defaults = dict(batch=4, probes=2, reps=1, chunks="1,2,auto", width=8) if args.smoke else \
        dict(batch=128, probes=10, reps=20, chunks="1,2,5,10,auto", width=64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_curvature: no CUDA device here; nothing to measure (use --device cpu for a smoke test)")
        return 0
    if device.type == "cuda" and not memfast._ops.extension_available("cuda"):
        print("gpu_curvature: warning: memfast was built without CUDA kernels; timing the reference backend ops")
    # The reference ran on GPUs without TF32; the finite difference needs fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True

    model = make_model(device, width=args.width)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(device)
    n = args.probes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, memfast {memfast.__version__} "
          f"({'kernels' if memfast._ops.extension_available(device.type) else 'reference backend'}); "
          f"ResNet18 ({'' if args.width == 64 else f'width {args.width}, '}100 classes), B={args.batch}, "
          f"{n} probes, h={args.h}")

    rows = []
    t, mem = measure(lambda: ref.reference_probe_loop(model, x, y, n, args.h), device, args.reps)
    rows.append(("reference loop (2 fwd + 1 bwd per probe)", t, mem))
    for c in args.chunks.split(","):
        chunk = None if c.strip() == "auto" else int(c)
        if chunk is not None and chunk > n:
            continue
        t, mem = measure(lambda: memfast.input_curvature(model, x, y, n_probes=n, h=args.h, chunk_size=chunk, seed=0),
                         device, args.reps)
        rows.append((f"memfast chunk_size={c.strip()}", t, mem))

    reference_time = rows[0][1]
    print(f"{'method':44s} {'median ms':>10s} {'speedup':>8s} {'peak MiB':>9s}")
    for label, t, mem in rows:
        mib = "n/a" if mem is None else f"{mem / 2**20:.0f}"
        print(f"{label:44s} {t * 1e3:10.2f} {reference_time / t:7.2f}x {mib:>9s}")

    # Same probes: the loop (sum-reduced loss, v = h * v exactly) and memfast agree.
    seed = 123
    probes = ref.probe_signs(seed, args.batch, 3 * 32 * 32, 0, n, device).float().reshape((n,) + tuple(x.shape))
    loop, _ = ref.reference_probe_loop(model, x, y, n, args.h, probes=probes, reduction="sum", offset=0.0)
    fast = memfast.input_curvature(model, x, y, n_probes=n, h=args.h, seed=seed)
    rel = ((fast - loop).abs() / loop.abs().clamp_min(1e-30)).max().item()
    corr = torch.corrcoef(torch.stack([fast, loop]))[0, 1].item()
    print(f"agreement with the loop on identical probes: max relative difference {rel:.2e}, correlation {corr:.6f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "batch": args.batch, "probes": n, "width": args.width, "max_rel_diff": rel,
                       "correlation": corr,
                       "rows": [{"method": r[0], "median_ms": r[1] * 1e3,
                                 "peak_mib": None if r[2] is None else r[2] / 2**20} for r in rows]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
