"""Side-by-side GPU benchmark of the fused cross entropy + per-sample tracking.

    python bench/gpu.py            # full run (a few minutes on an H100)
    python bench/gpu.py --quick    # smoke run: few iterations, small shapes only

Every row times one training step's loss work: forward + backward of the mean
cross entropy, plus (tracking on) the per-sample loss accumulated into a [1e6]
fp32 buffer. Methods:
  memfast  memfast.cross_entropy(..., sample_ids=, tracker=) (a SampleTracker
           keeping csl + count), then loss.backward()
  eager    F.cross_entropy(reduction='none') + index_add_ into the buffer +
           mean().backward()
  compile  torch.compile of the eager function
  liger    Liger-Kernel's cross entropy (reduction='none') + index_add_, when
           liger_kernel is importable
and the floor: reading the logits once and writing the gradient once at the
measured device-to-device copy rate. Times are the median over CUDA events
after warm-up, inputs rotate through copies bigger than L2 and are refreshed
outside the timed region (Liger overwrites its input with the gradient).
"extra MiB" is the peak memory a step allocates beyond its inputs.
Without a CUDA device it prints a message and exits.
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

BUFFER = 1_000_000
L2_BYTES = 50 << 20


def copy_rate(nbytes=1 << 30, iters=20):
    """Device-to-device copy rate in bytes (read + written) per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times)


def load_liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as e:  # not installed, or Triton missing
        return None, f"{type(e).__name__}: {e}"
    return liger_cross_entropy, None


class Case:
    def __init__(self, name, rows, classes, dtype, tracking=True, table=False, seq_len=None):
        self.name, self.rows, self.classes, self.dtype = name, rows, classes, dtype
        self.tracking, self.table, self.seq_len = tracking, table, seq_len

    @property
    def logits_bytes(self):
        return self.rows * self.classes * torch.empty((), dtype=self.dtype).element_size()


def make_inputs(case, copies):
    g = torch.Generator(device="cuda").manual_seed(0)
    pristine = [torch.randn(case.rows, case.classes, device="cuda", generator=g).mul_(2).to(case.dtype)
                for _ in range(copies)]
    targets = [torch.randint(0, case.classes, (case.rows,), device="cuda", generator=g) for _ in range(copies)]
    if case.seq_len:
        n_seq = case.rows // case.seq_len
        ids = [torch.randint(0, BUFFER, (n_seq,), device="cuda", generator=g) for _ in range(copies)]
    else:
        ids = [torch.randint(0, BUFFER, (case.rows,), device="cuda", generator=g) for _ in range(copies)]
    table = torch.randn(8, case.classes, device="cuda", generator=g) if case.table else None
    groups = [torch.randint(0, 8, (case.rows,), device="cuda", generator=g) for _ in range(copies)] if case.table else None
    return pristine, targets, ids, table, groups


def row_ids(case, ids):
    return ids.repeat_interleave(case.seq_len) if case.seq_len else ids


def make_methods(case, liger):
    import memfast

    tracker = memfast.SampleTracker(BUFFER, stats=("csl", "count"), device="cuda")
    buf = torch.zeros(BUFFER, device="cuda")

    def mf(x, y, ids, table, groups):
        kw = dict(sample_ids=ids, tracker=tracker) if case.tracking else {}
        if case.table:
            kw.update(adjustment=table, groups=groups)
        return memfast.cross_entropy(x, y, **kw)

    def eager_loss(x, y, ids, table, groups):
        z = x.float() + table[groups] if case.table else x
        loss = F.cross_entropy(z, y, reduction="none")
        if case.tracking:
            buf.index_add_(0, row_ids(case, ids), loss.detach().float())
        return loss.mean()

    torch._dynamo.reset()  # a fresh cache per case: no recompile limit across the cases
    compiled_loss = torch.compile(eager_loss, dynamic=False)
    methods = {"memfast": mf, "eager": eager_loss, "compile": compiled_loss}
    if liger is not None and not case.table:
        def liger_loss(x, y, ids, table, groups):
            loss = liger(x, y, reduction="none")
            if case.tracking:
                buf.index_add_(0, row_ids(case, ids), loss.detach().float())
            return loss.mean()

        methods["liger"] = liger_loss
    return methods


def time_method(fn, case, inputs, warmup, iters):
    pristine, targets, ids, table, groups = inputs
    copies = len(pristine)
    work = [p.clone() for p in pristine]

    def run(i):
        k = i % copies
        x = work[k]
        x.grad = None
        x.requires_grad_(True)
        loss = fn(x, targets[k], ids[k], table, groups[k] if groups else None)
        loss.backward()
        return loss

    def refresh(i):
        k = i % copies
        with torch.no_grad():
            work[k].copy_(pristine[k])  # outside the timed region

    for i in range(warmup):
        refresh(i)
        run(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        refresh(i)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    # Peak memory of one more step beyond what is allocated before it.
    refresh(0)
    for w in work:
        w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = run(0)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    value = float(loss.detach())
    del work
    return statistics.median(times), extra, value


def kernel_times(case, inputs, warmup, iters, rate):
    """The forward and backward ops alone, with each forward variant (env switches),
    as ms and as a fraction of the copy rate (bytes: logits read + gradient written)."""
    import os

    pristine, targets, _, _, _ = inputs
    copies = len(pristine)
    out = {}

    def timed(fn):
        for i in range(warmup):
            fn(i % copies)
        torch.cuda.synchronize()
        times = []
        for i in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i % copies)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    nbytes = 2 * case.logits_bytes
    variants = {"fwd": {}, "fwd cluster=0": {"MEMFAST_CE_CLUSTER": "0"}, "fwd stream": {"MEMFAST_CE_KERNEL": "stream"}}
    for name, env in variants.items():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ms = timed(lambda k: torch.ops.memfast.cross_entropy_fwd(pristine[k], targets[k], None, -100, 0.0, None,
                                                                      None, True, 1))
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        out[name] = (ms, nbytes / (ms / 1e3) / rate)
    grads = [torch.ops.memfast.cross_entropy_fwd(p, t, None, -100, 0.0, None, None, True, 0)[2]
             for p, t in zip(pristine, targets)]
    scale = torch.rand(case.rows, device="cuda")
    ms = timed(lambda k: torch.ops.memfast.cross_entropy_bwd(grads[k], scale))
    out["bwd"] = (ms, nbytes / (ms / 1e3) / rate)
    return out


def cases(quick):
    bf16, fp32 = torch.bfloat16, torch.float32
    full = [
        Case("256 x 10 bf16", 256, 10, bf16),
        Case("4096 x 1000 bf16", 4096, 1000, bf16),
        Case("8192 x 32000 fp32", 8192, 32000, fp32),
        Case("8192 x 32000 bf16", 8192, 32000, bf16),
        Case("4096 x 128256 bf16", 4096, 128256, bf16),
    ]
    out = list(full)
    out += [Case(c.name + ", table A=8", c.rows, c.classes, c.dtype, table=True) for c in full]
    out += [Case(c.name + ", no tracking", c.rows, c.classes, c.dtype, tracking=False) for c in full]
    out.append(Case("B8 T2048 V32000 bf16, per-sequence ids", 8 * 2048, 32000, bf16, seq_len=2048))
    if quick:
        out = [c for c in out if c.logits_bytes <= 64 << 20]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, few iterations")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per method (default 30, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5, quick 2)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine (see bench/NOTES.md).")
        return 0
    import memfast
    from memfast import _ops

    if not _ops.extension_available("cuda"):
        print("bench/gpu.py: memfast was built without CUDA kernels; rebuild with "
              "MEMFAST_CUDA=1 pip install --no-build-isolation --no-deps -e .")
        return 1
    iters = args.iters or (3 if args.quick else 30)
    warmup = args.warmup or (2 if args.quick else 5)
    liger, liger_error = load_liger()
    props = torch.cuda.get_device_properties(0)
    rate = copy_rate(256 << 20 if args.quick else 1 << 30)
    print(f"device: {props.name}, torch {torch.__version__}, memfast {memfast.__version__} "
          f"{memfast.build_info()}")
    print(f"device-to-device copy: {rate / 1e12:.2f} TB/s (bytes read + written)")
    if liger is None:
        print(f"liger: not available ({liger_error})")
    results = []
    for case in cases(args.quick):
        if args.only and args.only not in case.name:
            continue
        copies = max(2, -(-3 * L2_BYTES // case.logits_bytes))
        inputs = make_inputs(case, copies)
        floor_ms = 2 * case.logits_bytes / rate * 1e3
        row = {"case": case.name, "floor_ms": floor_ms}
        for name, fn in make_methods(case, liger).items():
            try:
                ms, extra, value = time_method(fn, case, inputs, warmup, iters)
                row[name] = {"ms": ms, "extra_mib": extra, "loss": value}
            except Exception as e:  # a peer failing on a shape must not stop the run
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        if not case.table and case.tracking and not case.seq_len:
            try:
                row["kernels"] = kernel_times(case, inputs, warmup, iters, rate)
            except Exception as e:
                row["kernels"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results.append(row)
        print(json.dumps(row))
        del inputs
        torch.cuda.empty_cache()

    print()
    print("Ops alone: median ms (fraction of the copy rate for logits read + gradient written)")
    print()
    names = ["fwd", "fwd cluster=0", "fwd stream", "bwd"]
    print("| case | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in results:
        k = row.get("kernels")
        if not k or "error" in k:
            continue
        print(f"| {row['case']} | " + " | ".join(f"{k[n][0]:.3f} ({100 * k[n][1]:.0f}%)" for n in names) + " |")
    methods = ["memfast", "eager", "compile", "liger"]
    print()
    print(f"{props.name}, copy {rate / 1e12:.2f} TB/s; median ms of forward + backward (+ tracking); "
          f"`python bench/gpu.py{' --quick' if args.quick else ''}`")
    print()
    print("| case | floor ms | " + " | ".join(methods) + " | memfast % of floor | extra MiB (" + " / ".join(methods) + ") |")
    print("|---|---|" + "---|" * len(methods) + "---|---|")
    for row in results:
        def cell(m, key="ms", fmt="{:.3f}"):
            r = row.get(m)
            if r is None:
                return "-"
            return "err" if "error" in r else fmt.format(r[key])
        mf = row.get("memfast", {})
        frac = f"{100 * row['floor_ms'] / mf['ms']:.0f}%" if "ms" in mf else "-"
        extras = " / ".join(cell(m, "extra_mib", "{:.0f}") for m in methods)
        print(f"| {row['case']} | {row['floor_ms']:.3f} | " + " | ".join(cell(m) for m in methods)
              + f" | {frac} | {extras} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_bytes_per_s": rate, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
