"""Controlled corruption of a labelled dataset, for measuring how well a
memorization proxy finds the corrupted samples (the CSL paper's Tables 2 and 3).

Both functions take NumPy arrays or torch tensors and return the same kind.
They draw from their own NumPy generator seeded by `seed`, so a seed gives the
same corruption on every machine (not the reference code's Python `random`
sequence, so the exact noisy set differs from theirs)."""
import numpy as np
import torch


def _as_numpy(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy(), True
    if isinstance(x, np.ndarray):
        return x, False
    try:
        return np.asarray(x), False
    except Exception:
        raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(x)}") from None


def _check_labels(labels, num_classes):
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    inferred = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        num_classes = inferred
    elif num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but labels hold class {inferred - 1}")
    if num_classes < 2:
        raise ValueError(f"relabelling needs at least 2 classes, got num_classes={num_classes}")
    return int(num_classes)


def _other_class(rng, labels, num_classes):
    """A class drawn uniformly from the num_classes - 1 classes other than each label."""
    shift = rng.integers(1, num_classes, size=labels.shape)
    return (labels + shift) % num_classes


def _back(x, like_tensor, device=None):
    return torch.from_numpy(np.ascontiguousarray(x)).to(device) if like_tensor else x


def symmetric(labels, rate, seed=0, num_classes=None):
    """Symmetric label noise: exactly ``int(rate * N)`` samples, chosen
    uniformly without replacement, get a label drawn uniformly from the other
    classes (never their own).

    Returns ``(noisy_labels, noisy_mask)``; the input is not modified.
    `num_classes` defaults to ``labels.max() + 1``.
    """
    y, is_tensor = _as_numpy(labels, "labels")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    num_classes = _check_labels(y, num_classes)
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    flipped = rng.choice(n, size=int(rate * n), replace=False)
    noisy = y.copy()
    noisy[flipped] = _other_class(rng, y[flipped], num_classes)
    mask = np.zeros(n, dtype=bool)
    mask[flipped] = True
    device = labels.device if is_tensor else None
    return _back(noisy, is_tensor, device), _back(mask, is_tensor, device)


def duplicates(inputs, labels, num_pairs, seed=0, num_classes=None, exclude=None):
    """Inject conflicting duplicates, as in the CSL paper's duplicate experiment:
    draw `num_pairs` disjoint pairs (a, b); sample a's input is replaced by a
    copy of b's and its label is drawn uniformly from the classes other than
    b's label. Both members are positives (``duplicate_mask``).

    `exclude` (an optional boolean mask) keeps those samples out of the pairs,
    e.g. samples already given a noisy label.

    Returns ``(new_inputs, new_labels, duplicate_mask, pairs)`` where `pairs`
    is an int64 array [num_pairs, 2] of (a, b); the inputs are not modified.
    The true class of the input a now holds is ``labels[b]``.
    """
    x, x_tensor = _as_numpy(inputs, "inputs")
    y, y_tensor = _as_numpy(labels, "labels")
    num_classes = _check_labels(y, num_classes)
    n = y.shape[0]
    if x.shape[0] != n:
        raise ValueError(f"inputs and labels differ in length: {x.shape[0]} vs {n}")
    if isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 0:
        raise ValueError(f"num_pairs must be a non-negative int, got {num_pairs!r}")
    num_pairs = int(num_pairs)
    candidates = np.arange(n)
    if exclude is not None:
        ex, _ = _as_numpy(exclude, "exclude")
        ex = ex.astype(bool).reshape(-1)
        if ex.shape[0] != n:
            raise ValueError(f"exclude has {ex.shape[0]} entries, expected {n}")
        candidates = candidates[~ex]
    if 2 * num_pairs > candidates.size:
        raise ValueError(f"num_pairs={num_pairs} needs {2 * num_pairs} distinct samples; only {candidates.size} "
                         f"are available")
    rng = np.random.default_rng(seed)
    pairs = rng.choice(candidates, size=2 * num_pairs, replace=False).reshape(num_pairs, 2).astype(np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    new_x = x.copy()
    new_x[a] = x[b]
    new_y = y.copy()
    new_y[a] = _other_class(rng, y[b], num_classes)
    mask = np.zeros(n, dtype=bool)
    mask[pairs.reshape(-1)] = True
    x_dev = inputs.device if x_tensor else None
    y_dev = labels.device if y_tensor else None
    return (_back(new_x, x_tensor, x_dev), _back(new_y, y_tensor, y_dev), _back(mask, y_tensor, y_dev),
            _back(pairs, y_tensor, y_dev))
