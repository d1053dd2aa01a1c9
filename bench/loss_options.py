"""What three loss options cost in a tracked training step (forward + backward), beside
what a user writes without memfast. Interleaved medians.

- the z-loss: memfast.cross_entropy without and with lse_square_scale (allocating,
  and in place) vs F.cross_entropy + logsumexp()^2 with index_add_ for the CSL;
- the softcap: memfast.cross_entropy(softcap=30) (allocating, and in place) vs
  memfast on 30 * tanh(logits / 30) and F.cross_entropy of it with index_add_;
- class-probability targets: memfast (the fused cross_entropy_prob_fwd: loss, gradient and
  tracking in one pass; untracked; and in place) vs F.cross_entropy with index_add_, and
  F.cross_entropy untracked.

    .venv/bin/python bench/loss_options.py [--rows 2048 --classes 32000 --dtype fp32 --device cpu]
                                           [--only zloss,softcap,soft]
"""
import argparse

import torch
import torch.nn.functional as F

import memfast
from memfast.bench import DTYPES, ModelOutput, make_inputs, time_steps

ZETA = 1e-4
CAP = 30.0


def eager_z_step(logits, target, ids, csl):
    logits.grad = None
    per_sample = F.cross_entropy(logits, target, reduction="none")
    csl.index_add_(0, ids, per_sample.detach().float())
    (per_sample.mean() + ZETA * logits.logsumexp(-1).pow(2).mean()).backward()


def memfast_step(logits, target, ids, tracker, options):
    logits.grad = None
    memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker, **options).backward()


def memfast_inplace_step(work, anchor, target, ids, tracker, options):
    logits = ModelOutput.apply(work, anchor)
    memfast.cross_entropy(logits, target, sample_ids=ids, tracker=tracker, inplace_backward=True,
                          **options).backward()


def memfast_tanh_step(logits, target, ids, tracker):
    logits.grad = None
    memfast.cross_entropy(CAP * torch.tanh(logits / CAP), target, sample_ids=ids, tracker=tracker).backward()


def eager_cap_step(logits, target, ids, csl):
    logits.grad = None
    per_sample = F.cross_entropy(CAP * torch.tanh(logits / CAP), target, reduction="none")
    csl.index_add_(0, ids, per_sample.detach().float())
    per_sample.mean().backward()


def soft_memfast_step(logits, soft, ids, tracker):
    logits.grad = None
    memfast.cross_entropy(logits, soft, sample_ids=ids, tracker=tracker).backward()


def soft_eager_step(logits, soft, ids, csl):
    logits.grad = None
    per_sample = F.cross_entropy(logits, soft, reduction="none")
    csl.index_add_(0, ids, per_sample.detach().float())
    per_sample.mean().backward()


def soft_memfast_untracked_step(logits, soft):
    logits.grad = None
    memfast.cross_entropy(logits, soft).backward()


def soft_untracked_step(logits, soft):
    logits.grad = None
    F.cross_entropy(logits, soft).backward()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", default="zloss,softcap,soft", help="comma-separated sections")
    a = p.parse_args()
    sections = set(a.only.split(","))
    logits, target, ids = make_inputs(a.rows, a.classes, DTYPES[a.dtype], a.rows, a.device)
    tracker = memfast.SampleTracker(a.rows, device=a.device)
    csl = torch.zeros(a.rows, device=a.device)
    pristine = logits.detach().clone()
    work = pristine.clone()
    anchor = torch.zeros((), device=a.device, requires_grad=True)
    refresh = lambda: work.copy_(pristine)  # noqa: E731  (the in-place steps overwrite their logits)
    z_loss, cap = {"lse_square_scale": ZETA}, {"softcap": CAP}
    steps = [
        (memfast_step, (logits, target, ids, tracker, {})),
        (memfast_step, (logits, target, ids, tracker, z_loss)),
        (memfast_inplace_step, (work, anchor, target, ids, tracker, z_loss), refresh),
        (eager_z_step, (logits, target, ids, csl)),
    ]
    names = ["memfast", f"memfast, lse_square_scale={ZETA:g}", "same, inplace_backward", "eager + z-loss"]
    if "zloss" in sections:
        report(f"z-loss: {a.rows} x {a.classes} {a.dtype} on {a.device}, tracked step, median of {a.repeats}", names,
               time_steps(steps, a.device, repeats=a.repeats, warmup=2))

    steps = [
        (memfast_step, (logits, target, ids, tracker, {})),
        (memfast_step, (logits, target, ids, tracker, cap)),
        (memfast_inplace_step, (work, anchor, target, ids, tracker, cap), refresh),
        (memfast_tanh_step, (logits, target, ids, tracker)),
        (eager_cap_step, (logits, target, ids, csl)),
    ]
    names = ["memfast", f"memfast, softcap={CAP:g}", "same, inplace_backward", "memfast of cap * tanh(x / cap)",
             "eager of cap * tanh(x / cap)"]
    if "softcap" in sections:
        report(f"softcap: {a.rows} x {a.classes} {a.dtype} on {a.device}, tracked step, median of {a.repeats}", names,
               time_steps(steps, a.device, repeats=a.repeats, warmup=2))

    g = torch.Generator(device="cpu").manual_seed(1)
    soft = torch.softmax(torch.randn(a.rows, a.classes, generator=g), 1).to(device=a.device, dtype=logits.dtype)
    steps = [(soft_memfast_step, (logits, soft, ids, tracker)), (soft_memfast_untracked_step, (logits, soft)),
             (memfast_inplace_step, (work, anchor, soft, ids, tracker, {}), refresh),
             (soft_eager_step, (logits, soft, ids, csl)), (soft_untracked_step, (logits, soft))]
    names = ["memfast (tracked: csl, count)", "memfast, untracked", "memfast tracked, inplace_backward",
             "eager + index_add_ (CSL only)", "eager, untracked"]
    if "soft" in sections:
        report(f"class-probability targets: {a.rows} x {a.classes} {a.dtype} on {a.device}, median of {a.repeats}",
               names, time_steps(steps, a.device, repeats=a.repeats, warmup=2))


def report(title, names, times):
    print(title)
    print("| step | ms |\n|---|---|")
    for name, t in zip(names, times):
        print(f"| {name} | {1e3 * t:.1f} |")
    print()


if __name__ == "__main__":
    main()
