"""An LM head's loss step four ways, each in a fresh process: time and peak
memory (CPU: peak resident set growth; CUDA: peak allocated) beyond the inputs.

    .venv/bin/python bench/linear_memory.py                  # CPU, 4096 tokens, H=256, V=32000, fp32
    .venv/bin/python bench/linear_memory.py --soft           # distillation: a teacher's probabilities
    python bench/linear_memory.py --device cuda --dtype bf16 --vocab 128256 --hidden 4096 --tokens 16384

  eager    F.cross_entropy(F.linear(x, W), y) (+ index_add_ of the per-token losses)
  memfast  memfast.cross_entropy(F.linear(x, W), y, tracker)        (the [N, V] logits + their gradient)
  inplace  the same with inplace_backward=True                      (the logits, which become the gradient)
  chunked  memfast.linear_cross_entropy(x, W, y, tracker)           (a chunk of logits at a time)

--soft: y is a [N, V] tensor of a teacher's probabilities in the logits' dtype (an input, so not
counted).
"""
import argparse
import json
import resource
import sys
import time

METHODS = ("eager", "memfast", "inplace", "chunked")


def child(args):
    import torch
    import torch.nn.functional as F

    import memfast

    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(dev, dtype).requires_grad_(True)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(dev)
    if args.soft:  # made in place: no transient [N, V] buffer raises the resident set's mark before the steps
        y = torch.rand(args.tokens, args.vocab, generator=g, dtype=dtype).to(dev)
        y.div_(y.sum(1, keepdim=True))
    ids = torch.arange(args.tokens, device=dev) // 512  # sequences of 512 tokens
    tracker = memfast.SampleTracker(args.tokens // 512 + 1, device=dev)
    csl = torch.zeros(args.tokens // 512 + 1, device=dev)

    def step():
        x.grad = w.grad = None
        if args.method == "eager":
            per_token = F.cross_entropy(F.linear(x, w), y, reduction="none")
            csl.index_add_(0, ids, per_token.detach().float())
            per_token.mean().backward()
        elif args.method in ("memfast", "inplace"):
            memfast.cross_entropy(F.linear(x, w), y, sample_ids=ids, tracker=tracker,
                                  inplace_backward=args.method == "inplace").backward()
        else:
            memfast.linear_cross_entropy(x, w, y, sample_ids=ids, tracker=tracker).backward()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # CPU: the high-water mark of the resident set once the inputs exist (ru_maxrss, KiB on Linux)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    sync()
    if dev.type == "cuda":
        x.grad = w.grad = None  # measured like the CPU: beyond the inputs alone
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_inputs) / 1024
    print(json.dumps({"ms": 1e3 * sorted(times)[len(times) // 2], "extra_mib": extra}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--soft", action="store_true", help="class-probability targets (a teacher's)")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    logits_mib = args.tokens * args.vocab * (4 if args.dtype == "fp32" else 2) / 2**20
    print(f"{args.tokens} tokens x vocabulary {args.vocab}, hidden {args.hidden}, {args.dtype}, {args.device}"
          f"{', soft targets' if args.soft else ''}: the logits are {logits_mib:.0f} MiB; median of {args.repeats} "
          "steps, each method in its own process")
    from memfast.bench import process_table

    process_table(__file__, METHODS, sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
