"""Where a CPU training step's loss time goes: the figures quoted in the README,
bench/NOTES.md and the comments of csrc/cpu/.

    .venv/bin/python bench/cpu_breakdown.py            # the machine's threads
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_breakdown.py

Each line times two variants alternately (medians of --repeats):
  forward op, AVX-512 loops vs the portable ones (MEMFAST_CPU_KERNEL=generic);
  step with tracking vs without;
  step through memfast's C++ eager autograd Function (csrc/autograd.cpp) vs
  through torch.library's registered Python autograd (calling the op
  directly, as traced code does);
  a forward without gradient (tracker.update, eval) below autograd, as
  memfast calls it, vs through torch.library's Python autograd kernel;
  at the tiny 8x4 shape, where every figure is host time: the eager
  PyTorch step (bench's eager_step), memfast.cross_entropy without gradient
  (its Python checks + the op) and the op alone below autograd;
  the softcap's cost in a forward without gradient (1024 x 32000 fp32): no cap,
  softcap=30 with the AVX-512 loops (its own cap loop included), softcap=30 with
  the portable ones.
"""
import argparse
import os

import torch

import memfast
from memfast.bench import DTYPES, eager_step, make_inputs, time_steps


def forward(logits, target, kernel, compute_grad=True, softcap=0.0):
    os.environ["MEMFAST_CPU_KERNEL"] = kernel
    torch.ops.memfast.cross_entropy_fwd(logits, target, None, -100, 0.0, None, None, compute_grad, 1, 0.0, softcap)


def step(logits, target, ids, tracker):
    logits.grad = None
    if tracker is None:
        memfast.cross_entropy(logits, target).backward()
    else:
        memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker).backward()


def step_registered(logits, target):
    logits.grad = None
    torch.ops.memfast.cross_entropy_fwd(logits, target, None, -100, 0.0, None, None, True, 1)[0].backward()


def forward_below_autograd(logits, target):
    with torch._C._AutoDispatchBelowAutograd():
        torch.ops.memfast.cross_entropy_fwd(logits, target, None, -100, 0.0, None, None, False, 1)


def forward_through_autograd(logits, target):
    torch.ops.memfast.cross_entropy_fwd(logits, target, None, -100, 0.0, None, None, False, 1)


def memfast_no_grad(logits, target):
    with torch.no_grad():
        memfast.cross_entropy(logits, target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} thread(s), median of {args.repeats}, interleaved (ms)")
    for shape, dtype in (((4096, 1000), "fp32"), ((4096, 1000), "bf16"), ((256, 10), "fp32"), ((8, 4), "fp32")):
        logits, target, ids = make_inputs(*shape, DTYPES[dtype], 100_000)
        name = f"{shape[0]}x{shape[1]} {dtype}"
        fast, generic = time_steps([(forward, (logits.detach(), target, "default")),
                                    (forward, (logits.detach(), target, "generic"))], "cpu", args.repeats)
        os.environ.pop("MEMFAST_CPU_KERNEL")
        print(f"{name:16} forward op: AVX-512 {fast * 1e3:.3f}, generic {generic * 1e3:.3f}")
        tracker = memfast.SampleTracker(100_000)
        tracked, plain, registered = time_steps([(step, (logits, target, ids, tracker)),
                                                 (step, (logits, target, ids, None)),
                                                 (step_registered, (logits, target))], "cpu", args.repeats)
        print(f"{name:16} step: tracked {tracked * 1e3:.3f}, untracked {plain * 1e3:.3f}, "
              f"untracked via torch.library's autograd {registered * 1e3:.3f}")
        below, through = time_steps([(forward_below_autograd, (logits.detach(), target)),
                                     (forward_through_autograd, (logits.detach(), target))], "cpu", args.repeats)
        print(f"{name:16} forward without gradient: below autograd {below * 1e3:.3f}, through torch.library's "
              f"autograd kernel {through * 1e3:.3f}")
        if shape == (8, 4):
            eager, no_grad = time_steps([(eager_step, (logits, target, ids, torch.zeros(100_000))),
                                         (memfast_no_grad, (logits, target))], "cpu", args.repeats)
            print(f"{name:16} eager step {eager * 1e3:.4f}; memfast.cross_entropy without gradient "
                  f"{no_grad * 1e3:.4f} (the op alone {below * 1e3:.4f})")
    logits, target, _ = make_inputs(1024, 32000, torch.float32, 100_000)
    plain, capped, capped_generic = time_steps(
        [(forward, (logits.detach(), target, "default", False)),
         (forward, (logits.detach(), target, "default", False, 30.0)),
         (forward, (logits.detach(), target, "generic", False, 30.0))], "cpu", max(3, args.repeats // 10))
    os.environ.pop("MEMFAST_CPU_KERNEL")
    print(f"1024x32000 fp32   forward without gradient: no cap {plain * 1e3:.1f}, softcap=30 {capped * 1e3:.1f} "
          f"(portable loops: {capped_generic * 1e3:.1f})")


if __name__ == "__main__":
    main()
