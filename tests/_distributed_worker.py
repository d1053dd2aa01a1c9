"""One rank of tests/test_distributed.py (run as a subprocess)."""
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


def main(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tracker = memfast.SampleTracker(40, stats="all")
    for shards in epochs_of_batches(40, 5, epochs=3, steps=4, world=world, seed=0):
        if shards is None:
            tracker.all_reduce()
            tracker.end_epoch()
            continue
        logits, target, ids = shards[rank]
        tracker.update(logits, target, ids)
    tracker.all_reduce()  # a second merge with nothing new must not double count
    torch.save(tracker.state_dict(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
