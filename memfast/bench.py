"""`memfast bench`: time one training step's loss (forward + backward +
per-sample loss tracking) with memfast beside eager PyTorch doing the same job,
and memfast with inplace_backward=True (the gradient written over the logits).

The step functions here are also what bench/test_bench_cross_entropy.py times.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import memfast
from memfast.cli import positive_int

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(rows, classes, dtype, num_samples, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, classes, (rows,), generator=g).to(device)
    ids = torch.randint(0, num_samples, (rows,), generator=g).to(device)
    return logits, target, ids


def eager_step(logits, target, ids, csl):
    """What a user writes without memfast: per-sample CE, index_add_, mean, backward.
    (logits.grad is reset first, as optimizer.zero_grad() does between steps.)"""
    logits.grad = None
    per_sample = F.cross_entropy(logits, target, reduction="none")
    csl.index_add_(0, ids, per_sample.detach().float())
    per_sample.mean().backward()


def memfast_step(logits, target, ids, tracker):
    logits.grad = None
    memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker).backward()


class ModelOutput(torch.autograd.Function):
    """Logits as a model gives them, at no cost: a non-leaf that requires grad (a leaf is refused
    by inplace_backward) -- a view of x, with no gradient going back. anchor: any scalar that
    requires grad."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def memfast_inplace_step(work, anchor, target, ids, tracker):
    """memfast_step with inplace_backward=True: overwrites `work` (restore it between steps)."""
    logits = ModelOutput.apply(work, anchor)
    memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker, inplace_backward=True).backward()


def time_step(fn, args, device, repeats=20, warmup=3):
    """Median seconds of fn(*args) over `repeats` runs after warm-up."""
    return time_steps([(fn, args)], device, repeats, warmup)[0]


def time_steps(steps, device, repeats=20, warmup=3):
    """Median seconds of each (fn, args) or (fn, args, before) in `steps`, run
    in turn (interleaved), so that a slow spell of a shared machine slows all of
    them alike; before() runs untimed ahead of each call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    steps = [step if len(step) == 3 else (*step, None) for step in steps]
    for fn, args, before in steps:
        for _ in range(warmup):
            if before:
                before()
            fn(*args)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for (fn, args, before), out in zip(steps, times):
            if before:
                before()
            sync()
            t0 = time.perf_counter()
            fn(*args)
            sync()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def process_table(script, methods, argv):
    """Run `script --method M argv...` for each method in a fresh process (so that each one's peak
    memory is its own) and print the markdown table of the JSON line {"ms", "extra_mib"} each
    prints last (bench/linear_memory.py, bench/hf_memory.py)."""
    import json
    import subprocess
    import sys

    print("| method | ms | peak extra MiB |")
    print("|---|---|---|")
    for method in methods:
        out = subprocess.run([sys.executable, script, "--method", method] + list(argv), capture_output=True, text=True)
        if out.returncode:
            print(f"| {method} | error | {out.stderr.strip().splitlines()[-1][:120]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {method} | {r['ms']:.1f} | {r['extra_mib']:.0f} |")


def add_arguments(parser):
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(256, 10), (4096, 1000), (1024, 32000)],
                        help="ROWSxCLASSES, e.g. 4096x1000")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--num-samples", type=positive_int, default=100_000, help="tracker size")


def _shape(text):
    """argparse type: ROWSxCLASSES, both positive."""
    try:
        rows, classes = (positive_int(v) for v in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES with positive sizes, e.g. 4096x1000, got "
                                         f"{text!r}") from None
    return rows, classes


def run(args):
    print(f"memfast {memfast.__version__} ({memfast.get_backend(args.device)}), torch {torch.__version__}, "
          f"device {args.device}, {torch.get_num_threads()} threads; median of {args.repeats}, interleaved")
    print("| shape | dtype | eager ms | memfast ms | speed-up | memfast inplace_backward ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for rows, classes in args.shapes:
        for name in args.dtypes:
            logits, target, ids = make_inputs(rows, classes, DTYPES[name], args.num_samples, args.device)
            csl = torch.zeros(args.num_samples, device=args.device)
            tracker = memfast.SampleTracker(args.num_samples, device=args.device)
            work, anchor = logits.detach().clone(), torch.zeros((), device=args.device, requires_grad=True)
            eager, fast, inplace = time_steps(
                [(eager_step, (logits, target, ids, csl)), (memfast_step, (logits, target, ids, tracker)),
                 (memfast_inplace_step, (work, anchor, target, ids, tracker), lambda: work.copy_(logits.detach()))],
                args.device, args.repeats)
            print(f"| {rows}x{classes} | {name} | {eager * 1e3:.3f} | {fast * 1e3:.3f} | {eager / fast:.2f}x | "
                  f"{inplace * 1e3:.3f} | {eager / inplace:.2f}x |")
    return 0
