"""Datasets that return each sample's index, the key a SampleTracker needs."""
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset


class WithIndex(Dataset):
    """Wrap a dataset so that item i is ``(*dataset[i], i)``: a dataset of
    (x, y) yields (x, y, sample_id). The default collate stacks the ids into
    an int64 tensor, ready for ``memfast.cross_entropy(..., sample_ids=sid)``.

    Indexing with a list or tensor of indices (a whole batch, as
    ``DataLoader(ds, sampler=BatchSampler(...), batch_size=None)`` does) is
    passed through in one call when the wrapped dataset supports it, e.g.
    ``TensorDataset``; the ids are then an int64 tensor of those indices.
    """

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must support len() and indexing, got {type(dataset)}")
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if isinstance(index, (list, tuple, torch.Tensor)):
            sample_id = torch.as_tensor(index, dtype=torch.long)
        else:
            sample_id = index
        if isinstance(item, tuple):
            return (*item, sample_id)
        if isinstance(item, list):
            return [*item, sample_id]
        return item, sample_id

    def __repr__(self):
        return f"WithIndex({self.dataset!r})"


def describe_batch(batch):
    """What a loader yielded, for an error message that says what (inputs, targets, sample_ids) it got."""
    from collections.abc import Mapping

    if isinstance(batch, Mapping):
        return f"a dict with keys {list(batch)} (have the dataset return (input, target) pairs)"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(type(b).__name__ + (" with keys " + str(list(b)) if isinstance(b, Mapping) else "")
                          for b in batch)
        return f"a {type(batch).__name__} of {len(batch)} ({inner})"
    return f"a {type(batch).__name__}"


def tensor_batches(inputs, targets, batch_size, *, shuffle=False, seed=0):
    """A DataLoader of (inputs, targets, sample_ids) batches over in-memory
    tensors, each batch indexed in one call (no per-sample collate);
    batch_size <= 0 means one full batch."""
    ds = WithIndex(TensorDataset(inputs, targets))
    size = len(ds) if batch_size <= 0 else batch_size
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, max(size, 1), drop_last=False), batch_size=None)
