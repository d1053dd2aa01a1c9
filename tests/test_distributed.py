"""SampleTracker.all_reduce over 2 processes (gloo, 127.0.0.1) equals one process."""
import os
import socket
import subprocess
import sys

import torch

import memfast

sys.path.insert(0, os.path.dirname(__file__))
from _distributed_worker import epochs_of_batches  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_equals_single_process(tmp_path):
    world, port = 2, _free_port()
    worker = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    # The workers import the memfast this process imported, installed or not (a source tree on the GPU image).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(memfast.__file__)))
    paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(port), outs[r]], env=env)
             for r in range(world)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    single = memfast.SampleTracker(40, stats="all")
    for shards in epochs_of_batches(40, 5, epochs=3, steps=4, world=world, seed=0):
        if shards is None:
            single.end_epoch()
            continue
        single.update(*(torch.cat(parts) for parts in zip(*shards)))
    for out in outs:
        merged = memfast.SampleTracker.from_state_dict(torch.load(out, weights_only=True))
        torch.testing.assert_close(merged.state, single.state, atol=1e-4, rtol=1e-5)
        assert torch.equal(merged.counters, single.counters)
