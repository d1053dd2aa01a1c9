"""One rank of tests/test_distributed.py (run as a subprocess), and the single-process run it must equal."""
import sys

import torch
import torch.distributed as dist

import memfast


def epochs_of_batches(num_samples, num_classes, epochs, steps, world, seed):
    """Per epoch and step, each rank's (logits, target, ids): every sample once per epoch."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(num_samples, generator=g)
        for chunk in perm.chunk(steps):
            shards = []
            for ids in chunk.chunk(world):
                logits = torch.randn(ids.numel(), num_classes, generator=g) * 2
                target = torch.randint(0, num_classes, (ids.numel(),), generator=g)
                shards.append((logits, target, ids))
            yield shards
        yield None  # epoch end


def scripted_steps(world):
    """Two ranks, written out: a forgetting event on rank 0 of a sample that rank 1 updates last
    (forgetting is a sum, not the last updater's), and a sample both ranks update in one step (a
    tie: the highest rank's update is the latest, as the ranks' batches concatenated in order)."""
    assert world == 2
    right, wrong, y = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([0])
    yield [(right, y, torch.tensor([0])), (right, y, torch.tensor([1]))]
    yield None
    yield [(wrong, y, torch.tensor([0])), (right, y, torch.tensor([1]))]
    yield [(right, y, torch.tensor([2])), (right, y, torch.tensor([0]))]
    yield [(torch.tensor([[2.0, 0.0]]), y, torch.tensor([3])), (torch.tensor([[0.0, 2.0]]), y, torch.tensor([3]))]


# name: (samples, steps(world), per rank the passes it scores at the end: {rank: {stat: (ids, values)}})
# scripted: curvature on disjoint samples, input-gradient norms of every sample on both ranks (the
# counts add: a mean over 2 passes, not a sum over a count of 1)
SCENARIOS = {
    "random": (40, lambda world: epochs_of_batches(40, 5, epochs=3, steps=4, world=world, seed=0), {}),
    "scripted": (4, scripted_steps, {0: {"curv": ([0, 1], [1.0, 2.0]), "grad_norm": ([0, 1, 2, 3], [1.0] * 4)},
                                     1: {"curv": ([2, 3], [3.0, 4.0]), "grad_norm": ([0, 1, 2, 3], [2.0] * 4)}}),
}


def add_scored_passes(tracker, passes):
    """What score_curvature / score_grad_norm add for one pass over these samples."""
    for stat, (ids, values) in passes.items():
        ids, values = torch.tensor(ids), torch.tensor(values)
        tracker.stat(stat).index_add_(0, ids, values)
        tracker.stat(stat + "_count").index_add_(0, ids, torch.ones_like(values))


def single_process(scenario, world):
    """The same batches in one process: each step's shards concatenated in rank order."""
    num_samples, steps, scored = SCENARIOS[scenario]
    tracker = memfast.SampleTracker(num_samples, stats="all")
    for shards in steps(world):
        if shards is None:
            tracker.end_epoch()
        else:
            tracker.update(*(torch.cat(parts) for parts in zip(*shards)))
    for rank in sorted(scored):
        add_scored_passes(tracker, scored[rank])
    return tracker


def main(scenario, rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    num_samples, steps, scored = SCENARIOS[scenario]
    tracker = memfast.SampleTracker(num_samples, stats="all")
    for shards in steps(world):
        if shards is None:
            tracker.all_reduce()
            tracker.end_epoch()
            continue
        tracker.update(*shards[rank])
    if rank in scored:
        add_scored_passes(tracker, scored[rank])
    tracker.all_reduce()  # (random: a second merge with nothing new must not double count)
    torch.save(tracker.state_dict(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
