"""Side-by-side GPU benchmark of the fused cross entropy + per-sample tracking.

    python bench/gpu.py            # full run (a few minutes on an H100)
    python bench/gpu.py --quick    # quick GPU run: few iterations, shapes up to 64 MiB
    python bench/gpu.py --device cpu --smoke   # tiny shapes, 2 iterations: checks the script runs
    python bench/gpu.py --methods memfast,eager,liger --budget-s 120   # no compile; stop starting cases after 120 s

Every row times one training step's loss work: forward + backward of the mean
cross entropy, plus (tracking on) the per-sample loss accumulated into a [1e6]
fp32 buffer. Methods:
  memfast  memfast.cross_entropy(..., sample_ids=, tracker=) (a SampleTracker
           keeping csl + count), then loss.backward()
  inplace  the same with inplace_backward=True: the gradient is written over the
           logits (extra memory: none of the logits' size)
  eager    F.cross_entropy(reduction='none') + index_add_ into the buffer +
           mean().backward()
  compile  torch.compile of the eager function
  liger    Liger-Kernel's cross entropy (reduction='none') + index_add_, when
           liger_kernel is importable
and the floor: reading the logits once and writing the gradient once at the
measured device-to-device copy rate. Times are the median over CUDA events
after warm-up (each step starts on an idle device, so host launch time counts),
inputs rotate through copies bigger than L2 and each is refreshed right after
its use, outside the timed region (Liger overwrites its input with the
gradient), so a step never finds its input in L2. "extra MiB" is the peak
memory a step allocates beyond its inputs. The "no tracking" rows give every
method the plain mean loss (reduction='mean'), with no per-row losses. The
"soft targets" rows take class probabilities (the floor then reads them too;
no Liger, which takes class indices only); their "sweeps kernel" row times
memfast's first CUDA kernel of them (MEMFAST_CUDA_PROB_KERNEL=sweeps) beside the
default one-sweep kernel.
Without a CUDA device it prints a message and exits; --device cpu runs the same
code on the CPU (time.perf_counter, no memory figures, no Liger), meant with
--smoke to check the script before a GPU session.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

BUFFER = 1_000_000
L2_BYTES = 50 << 20
SWEEPS = {"MEMFAST_CUDA_PROB_KERNEL": "sweeps"}  # the first CUDA kernel of soft targets, for comparison


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(milliseconds, result) of one call of fn. CUDA: events recorded around
    it on the current stream (start the call with the device idle: the time
    then includes the host's launches); CPU: time.perf_counter."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def copy_rate(device, nbytes=1 << 30, iters=20):
    """Device-to-device copy rate in bytes (read + written) per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = [timed(lambda: dst.copy_(src), device)[0] / 1e3 for _ in range(iters)]
    return 2 * nbytes / statistics.median(times)


def load_liger(device):
    if device.type != "cuda":
        return None, f"skipped on {device.type} (Liger's kernels are Triton, GPU only)"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as e:  # not installed, or Triton missing
        return None, f"{type(e).__name__}: {e}"
    return liger_cross_entropy, None


class Case:
    def __init__(self, name, rows, classes, dtype, tracking=True, table=False, seq_len=None, z_loss=0.0,
                 softcap=None, soft=False, env=None):
        self.name, self.rows, self.classes, self.dtype = name, rows, classes, dtype
        self.tracking, self.table, self.seq_len, self.z_loss = tracking, table, seq_len, z_loss
        self.softcap = softcap
        self.soft = soft  # class-probability targets of the logits' shape and dtype
        # environment variables set while the case runs (a kernel choice: memfast's methods only)
        self.env = env or {}

    @property
    def logits_bytes(self):
        return self.rows * self.classes * torch.empty((), dtype=self.dtype).element_size()


def make_inputs(case, copies, device):
    g = torch.Generator(device=device).manual_seed(0)
    pristine = [torch.randn(case.rows, case.classes, device=device, generator=g).mul_(2).to(case.dtype)
                for _ in range(copies)]
    targets = [torch.randint(0, case.classes, (case.rows,), device=device, generator=g) for _ in range(copies)]
    if case.soft:
        targets = [torch.softmax(torch.randn(case.rows, case.classes, device=device, generator=g), 1).to(case.dtype)
                   for _ in range(copies)]
    if case.seq_len:
        n_seq = case.rows // case.seq_len
        ids = [torch.randint(0, BUFFER, (n_seq,), device=device, generator=g) for _ in range(copies)]
    else:
        ids = [torch.randint(0, BUFFER, (case.rows,), device=device, generator=g) for _ in range(copies)]
    table = torch.randn(8, case.classes, device=device, generator=g) if case.table else None
    groups = [torch.randint(0, 8, (case.rows,), device=device, generator=g) for _ in range(copies)] if case.table else None
    return pristine, targets, ids, table, groups


def row_ids(case, ids):
    return ids.repeat_interleave(case.seq_len) if case.seq_len else ids


METHODS = ("memfast", "inplace", "eager", "compile", "liger")


def make_methods(case, liger, device, wanted=METHODS):
    import memfast
    from memfast.bench import ModelOutput  # a non-leaf as a model's output: inplace_backward refuses leaves

    tracker = memfast.SampleTracker(BUFFER, stats=("csl", "count"), device=device)
    buf = torch.zeros(BUFFER, device=device)
    # Per-row losses only where they are tracked; otherwise every method takes the plain mean.
    reduction = "none" if case.tracking else "mean"

    def mf(x, y, ids, table, groups, inplace=False):
        kw = dict(sample_ids=ids, tracker=tracker) if case.tracking else {}
        if case.table:
            kw.update(adjustment=table, groups=groups)
        return memfast.cross_entropy(x, y, inplace_backward=inplace, lse_square_scale=case.z_loss,
                                     softcap=case.softcap, **kw)

    anchor = torch.zeros((), device=device, requires_grad=True)

    def mf_inplace(x, y, ids, table, groups):
        return mf(ModelOutput.apply(x.detach(), anchor), y, ids, table, groups, inplace=True)

    def eager_loss(x, y, ids, table, groups):
        if case.softcap:  # as Gemma 2's modelling code writes it
            x = case.softcap * torch.tanh(x / case.softcap)
        z = x.float() + table[groups] if case.table else x
        loss = F.cross_entropy(z, y, reduction=reduction)
        if case.tracking:
            buf.index_add_(0, row_ids(case, ids), loss.detach().float())
        loss = loss.mean() if reduction == "none" else loss
        return loss + case.z_loss * z.float().logsumexp(-1).pow(2).mean() if case.z_loss else loss

    methods = {"memfast": mf, "inplace": mf_inplace, "eager": eager_loss}
    if "compile" in wanted:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across the cases
        methods["compile"] = torch.compile(eager_loss, dynamic=False)
    if liger is not None and not case.table and not case.soft:  # (Liger takes class indices only)
        def liger_loss(x, y, ids, table, groups):
            kw = {"lse_square_scale": case.z_loss} if case.z_loss else {}
            if case.softcap:
                kw["softcap"] = case.softcap
            loss = liger(x, y, reduction=reduction, **kw)
            if case.tracking:
                buf.index_add_(0, row_ids(case, ids), loss.detach().float())
            return loss.mean() if reduction == "none" else loss

        methods["liger"] = liger_loss
    return {name: fn for name, fn in methods.items() if name in wanted}


def time_method(fn, case, inputs, warmup, iters, device):
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
        # Right after copy k's use, outside the timed region: by its next use the
        # other copies have pushed it out of L2 (refreshed just before its use, its
        # last 50 MB would be read from L2). Then wait: the next step starts idle.
        k = i % copies
        with torch.no_grad():
            work[k].copy_(pristine[k])
        sync(device)

    for i in range(warmup):
        run(i)
        refresh(i)
    times = []
    for i in range(iters):
        times.append(timed(lambda: run(i), device)[0])
        refresh(i)
    # Peak memory of one more step beyond what is allocated before it.
    for w in work:
        w.grad = None
    extra = None  # no allocator statistics on the CPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = run(0)
        torch.cuda.synchronize(device)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        loss = run(0)
    value = float(loss.detach())
    del work
    return statistics.median(times), extra, value


def kernel_times(case, inputs, warmup, iters, rate, device):
    """The forward and backward ops alone, with each forward variant (env switches),
    as ms and as a fraction of the copy rate (bytes: logits read + gradient written)."""
    pristine, targets, _, _, _ = inputs
    copies = len(pristine)
    out = {}

    def median_ms(fn):
        for i in range(warmup):
            fn(i % copies)
        sync(device)
        return statistics.median([timed(lambda: fn(i % copies), device)[0] for i in range(iters)])

    nbytes = 2 * case.logits_bytes
    variants = {"fwd": {}, "fwd cluster=0": {"MEMFAST_CE_CLUSTER": "0"}, "fwd stream": {"MEMFAST_CE_KERNEL": "stream"}}
    for name, env in variants.items():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ms = median_ms(lambda k: torch.ops.memfast.cross_entropy_fwd(pristine[k], targets[k], None, -100, 0.0, None,
                                                                      None, True, 1, case.z_loss,
                                                                      case.softcap or 0.0))
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        out[name] = (ms, nbytes / (ms / 1e3) / rate)
    grads = [torch.ops.memfast.cross_entropy_fwd(p, t, None, -100, 0.0, None, None, True, 0)[2]
             for p, t in zip(pristine, targets)]
    scale = torch.rand(case.rows, device=device)
    ms = median_ms(lambda k: torch.ops.memfast.cross_entropy_bwd(grads[k], scale))
    out["bwd"] = (ms, nbytes / (ms / 1e3) / rate)
    return out


def cases(quick, smoke=False):
    bf16, fp32 = torch.bfloat16, torch.float32
    if smoke:  # every kind of case, tiny
        full = [Case("64 x 10 bf16", 64, 10, bf16), Case("32 x 1000 fp32", 32, 1000, fp32)]
    else:
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
    if smoke:
        out.append(Case("B2 T16 V100 bf16, per-sequence ids", 2 * 16, 100, bf16, seq_len=16))
        out.append(Case("64 x 10 bf16, z-loss 1e-4", 64, 10, bf16, z_loss=1e-4))
        out.append(Case("64 x 10 bf16, softcap 30", 64, 10, bf16, softcap=30.0))
        out.append(Case("64 x 10 bf16, soft targets", 64, 10, bf16, soft=True))
        out.append(Case("64 x 10 bf16, soft targets, sweeps kernel", 64, 10, bf16, soft=True, env=SWEEPS))
    else:
        out.append(Case("B8 T2048 V32000 bf16, per-sequence ids", 8 * 2048, 32000, bf16, seq_len=2048))
        out.append(Case("8192 x 32000 bf16, z-loss 1e-4", 8192, 32000, bf16, z_loss=1e-4))
        out.append(Case("8192 x 32000 bf16, softcap 30", 8192, 32000, bf16, softcap=30.0))
        # the CUDA kernel of cross_entropy_prob_fwd, which the API runs with MEMFAST_CUDA_PROB=1
        out.append(Case("8192 x 32000 bf16, soft targets", 8192, 32000, bf16, soft=True))
        out.append(Case("8192 x 32000 bf16, soft targets, sweeps kernel", 8192, 32000, bf16, soft=True, env=SWEEPS))
    if quick:
        out = [c for c in out if c.logits_bytes <= 64 << 20]
    return out


def main(argv=None):
    # The "soft targets" rows time the CUDA kernel of cross_entropy_prob_fwd, which the API runs only
    # when asked until it has been tested on a GPU.
    os.environ.setdefault("MEMFAST_CUDA_PROB", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script (with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes of every kind, 2 iterations, 1 warm-up: checks that the script runs")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles per case)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to time (default {','.join(METHODS)}); the floor and the "
                             "ops-alone table always come with memfast")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the tables show what was measured)")
    parser.add_argument("--quick", action="store_true", help="quick run: shapes up to 64 MiB, few iterations")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per method (default 30, quick 3, smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5, quick 2, smoke 1)")
    parser.add_argument("--only", default=None,
                        help="run only cases whose name matches this regular expression (re.search), e.g. 128256 "
                             "or '^[0-9]+ x [0-9]+ [a-z0-9]+$' for the plain cases")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if args.no_compile and "compile" in wanted:
        wanted.remove("compile")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine (see bench/NOTES.md), or check it "
              "with --device cpu --smoke.")
        return 0
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    import memfast
    from memfast import _ops

    if not _ops.extension_available(device.type):
        print(f"bench/gpu.py: memfast has no {device.type} kernels (build_info {memfast.build_info()}); rebuild with "
              f"{'MEMFAST_CUDA=1 ' if device.type == 'cuda' else ''}pip install --no-build-isolation --no-deps -e .")
        return 1
    iters = args.iters or (2 if args.smoke else 3 if args.quick else 30)
    warmup = args.warmup or (1 if args.smoke else 2 if args.quick else 5)
    liger, liger_error = load_liger(device) if "liger" in wanted else (None, "not asked for (--methods)")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_properties(device).name
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    rate = copy_rate(device, 16 << 20 if args.smoke else 256 << 20 if args.quick else 1 << 30)
    print(f"device: {device_name}, torch {torch.__version__}, memfast {memfast.__version__} "
          f"{memfast.build_info()}")
    print(f"device-to-device copy: {rate / 1e12:.3g} TB/s (bytes read + written)")
    if liger is None:
        print(f"liger: not available ({liger_error})")
    if "compile" not in wanted:
        print("compile: left out (--no-compile / --methods)")
    results = []
    todo = [c for c in cases(args.quick, args.smoke) if not args.only or re.search(args.only, c.name)]
    for index, case in enumerate(todo):
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:g} s reached; not run: " + "; ".join(c.name for c in todo[index:]))
            break
        # Enough copies that a step's input is out of L2 when it comes round again; no more
        # than the steps use (copy i % copies serves step i).
        copies = max(2, -(-3 * L2_BYTES // case.logits_bytes))
        copies = min(copies, max(2, warmup, iters))
        inputs = make_inputs(case, copies, device)
        floor_ms = (3 if case.soft else 2) * case.logits_bytes / rate * 1e3  # soft: the targets are read too
        row = {"case": case.name, "floor_ms": floor_ms}
        saved_env = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)
        case_methods = [m for m in wanted if m in ("memfast", "inplace")] if case.env else wanted
        for name, fn in make_methods(case, liger, device, case_methods).items():
            try:
                ms, extra, value = time_method(fn, case, inputs, warmup, iters, device)
                row[name] = {"ms": ms, "extra_mib": extra, "loss": value}
            except Exception as e:  # a peer failing on a shape must not stop the run
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "memfast" in wanted and not case.table and case.tracking and not case.seq_len and not case.soft:
            try:
                row["kernels"] = kernel_times(case, inputs, warmup, iters, rate, device)
            except Exception as e:
                row["kernels"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results.append(row)
        print(json.dumps(row), flush=True)
        del inputs
        if device.type == "cuda":
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
    methods = [m for m in METHODS if m in wanted]
    command = " ".join(["python bench/gpu.py"] + list(sys.argv[1:] if argv is None else argv))
    print()
    print(f"{device_name}, copy {rate / 1e12:.3g} TB/s; median ms of forward + backward (+ tracking); "
          f"`{command}`")
    print()
    print("| case | floor ms | " + " | ".join(methods) + " | memfast % of floor | extra MiB (" + " / ".join(methods) + ") |")
    print("|---|---|" + "---|" * len(methods) + "---|---|")
    for row in results:
        def cell(m, key="ms", fmt="{:.3f}"):
            r = row.get(m)
            if r is None:
                return "-"
            if "error" in r:
                return "err"
            return "n/a" if r[key] is None else fmt.format(r[key])
        mf = row.get("memfast") or {}
        frac = f"{100 * row['floor_ms'] / mf['ms']:.0f}%" if "ms" in mf else "-"
        extras = " / ".join(cell(m, "extra_mib", "{:.0f}") for m in methods)
        print(f"| {row['case']} | {row['floor_ms']:.3f} | " + " | ".join(cell(m) for m in methods)
              + f" | {frac} | {extras} |")
    errors = [(row["case"], m, row[m]["error"]) for row in results for m in methods + ["kernels"]
              if isinstance(row.get(m), dict) and "error" in row[m]]
    for case_name, m, err in errors:
        print(f"error: {case_name}, {m}: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "copy_bytes_per_s": rate, "results": results}, f, indent=1)
    return 0

if __name__ == "__main__":
    sys.exit(main())
