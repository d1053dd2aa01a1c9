"""SampleTracker.all_reduce over 2 processes (gloo, 127.0.0.1) equals one process."""
import math
import os
import socket
import subprocess
import sys

import torch

import memfast

sys.path.insert(0, os.path.dirname(__file__))
from _distributed_worker import single_process  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merged_on_each_rank(tmp_path, scenario, world=2):
    """Run the scenario on `world` gloo processes; each rank's tracker after its last all_reduce."""
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    # The workers import the memfast this process imported, installed or not (a source tree on the GPU image).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(memfast.__file__)))
    paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    procs = [subprocess.Popen([sys.executable, worker, scenario, str(r), str(world), str(port), outs[r]], env=env)
             for r in range(world)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    return [memfast.SampleTracker.from_state_dict(torch.load(out, weights_only=True)) for out in outs]


def test_all_reduce_equals_single_process(tmp_path):
    single = single_process("random", world=2)
    for merged in _merged_on_each_rank(tmp_path, "random"):
        torch.testing.assert_close(merged.state, single.state, atol=1e-4, rtol=1e-5)
        assert torch.equal(merged.counters, single.counters)


def test_all_reduce_keeps_every_ranks_events_and_breaks_ties_by_highest_rank(tmp_path):
    """The scripted scenario (_distributed_worker.scripted_steps): a forgetting event seen on rank 0
    survives although rank 1 updated the sample last, curvature passes scored on different ranks
    average over both (curv_count is a sum), gradient norms that both ranks score average over the
    two passes (grad_norm_count is a sum too), and a sample both ranks update in one step takes
    rank 1's loss. (Found by mutation testing: the random scenario has no ties and no passes.)"""
    single = single_process("scripted", world=2)
    assert single.stat("forgetting").tolist() == [1.0, 0.0, 0.0, 0.0]
    for merged in _merged_on_each_rank(tmp_path, "scripted"):
        s, want = merged.scores(), single.scores()
        for name in ("csl", "count", "forgetting", "curv", "grad_norm", "last_loss", "correct"):
            torch.testing.assert_close(s[name], want[name], msg=name)
        torch.testing.assert_close(s["curv"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
        torch.testing.assert_close(s["grad_norm"], torch.tensor([1.5] * 4))
        torch.testing.assert_close(s["last_loss"][3], torch.tensor(2.0 + math.log1p(math.exp(-2.0))))
