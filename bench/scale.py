"""Scale figures for the README: tracker memory, update throughput on a large
tracker, and the cost of SampleTracker.all_reduce on gloo.

    .venv/bin/python bench/scale.py                       # CPU: 10M-sample tracker, all_reduce at 1M
    python bench/scale.py --device cuda --samples 100000000  # on a GPU
    .venv/bin/python bench/scale.py --smoke               # checks the script runs: 1000 samples, 2 updates

Update time: wall time of one tracker.update (the device synchronised before
and after, so on CUDA it includes the launches and one synchronisation).
all_reduce always runs on the CPU (gloo), whatever --device.
"""
import argparse
import os
import queue
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

import memfast


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def update_throughput(num_samples, device, batch=4096, classes=10, repeats=20):
    tracker = memfast.SampleTracker(num_samples, stats="all", device=device)
    logits = torch.randn(batch, classes, device=device)
    target = torch.randint(0, classes, (batch,), device=device)
    ids = [torch.randint(0, num_samples, (batch,), device=device) for _ in range(repeats)]
    tracker.update(logits, target, ids[0])
    times = []
    for i in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tracker.update(logits, target, ids[i])
        _sync(device)
        times.append(time.perf_counter() - t0)
    return tracker.memory_bytes, statistics.median(times)


def _all_reduce_worker(rank, world, port, num_samples, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tracker = memfast.SampleTracker(num_samples, stats="all")
    tracker.update(torch.randn(1024, 10), torch.randint(0, 10, (1024,)), torch.randint(0, num_samples, (1024,)))
    times = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        tracker.all_reduce()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        result.put(statistics.median(times))
    dist.destroy_process_group()


def all_reduce_cost(num_samples, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, world, port, num_samples, result)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    value = None
    try:
        while value is None:  # wait for rank 0's figure, but not for a worker that died
            try:
                value = result.get(timeout=1)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"all_reduce workers failed (exit codes {failed})" if failed
                                       else "all_reduce workers timed out after 300 s")
    finally:
        for p in procs:
            p.join(timeout=30 if value is not None else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="check that the script runs: 1000 samples (all_reduce too), batch 64, 2 updates "
                         "(unless given)")
    ap.add_argument("--samples", type=int, default=None, help="tracker size (default 10,000,000; smoke 1000)")
    ap.add_argument("--allreduce-samples", type=int, default=None,
                    help="tracker size for all_reduce, 0 to skip it (default 1,000,000; smoke 1000)")
    ap.add_argument("--batch", type=int, default=None, help="rows per update (default 4096; smoke 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed updates (default 20; smoke 2)")
    args = ap.parse_args(argv)
    defaults = dict(samples=1000, allreduce_samples=1000, batch=64, repeats=2) if args.smoke else \
        dict(samples=10_000_000, allreduce_samples=1_000_000, batch=4096, repeats=20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/scale.py: no CUDA device here (use --device cpu)")
        return 0
    t = memfast.SampleTracker(1, stats="all")
    print(f"memfast {memfast.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, device {device}")
    print(f"tracker memory: 4 B per sample per stored statistic; stats='all' stores {len(t.stored_stats)} "
          f"-> {4 * len(t.stored_stats)} B per sample")
    mem, dt = update_throughput(args.samples, device, batch=args.batch, repeats=args.repeats)
    print(f"update: {args.samples:,} samples ({mem / 2**20:.0f} MiB), batch {args.batch}x10: "
          f"{dt * 1e3:.3f} ms per update, {args.batch / dt / 1e6:.2f} M rows/s")
    if args.allreduce_samples:
        cost = all_reduce_cost(args.allreduce_samples)
        print(f"all_reduce (gloo, 2 processes, stats='all'): {args.allreduce_samples:,} samples: {cost * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
