"""Memorization-aware training (MAT; Bayat et al., ICLR 2025) and its phase 1,
XRM twins with label flipping (Pezeshki et al., ICML 2024).

Phase 1 trains two twins on a fixed random half of the data each, with
labels that flip towards the held-out twin's prediction, so that the twins'
held-out predictions amplify whatever shortcut the data offers. Phase 2
trains the real model with cross entropy on logits shifted by
``log p_ho(y | x) = log Σ_a p(a | x) p(y | a)``, where ``a`` is the held-out
prediction; the shift is constant per sample, so it is precomputed once as a
table and gathered inside memfast's fused cross-entropy kernel.

    xrm = memfast.mat.XRM(twin_a, twin_b, num_samples=N, num_classes=K)
    opt = torch.optim.SGD(xrm.parameters(), lr=...)
    for epoch in range(E):
        for x, y, ids in loader:
            xrm.step(x, y, ids, opt)
    shift = memfast.mat.shift_table(xrm.held_out_logits(eval_loader), labels)
    loss_fn = memfast.MATLoss(shift)           # loss_fn(model(x), y, ids)
"""
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import describe_batch
from .loss import cross_entropy

__all__ = ["XRM", "InferredGroups", "ArgmaxShift", "shift_table", "argmax_shift_table", "MATLoss",
           "class_balanced_cross_entropy", "flip_probability"]

_LOG_FLOOR = 1e-6  # inside log(p + 1e-6), as in the reference: bounds the shift at about -13.8


def _check_ids(sample_ids, num_samples, name="sample_ids"):
    if not isinstance(sample_ids, Tensor) or sample_ids.is_floating_point() or sample_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(sample_ids, 'dtype', type(sample_ids))}")
    if sample_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(sample_ids.shape)}")
    # (usually a loader's CPU tensor: no device sync; out of range, indexing would fail on the device)
    if sample_ids.numel() and bool((sample_ids.min() < 0) | (sample_ids.max() >= num_samples)):
        raise IndexError(f"{name} must be in [0, {num_samples}), got values in [{int(sample_ids.min())}, "
                         f"{int(sample_ids.max())}]")


def flip_probability(probs: Tensor) -> Tensor:
    """XRM's label-flip probability from held-out class probabilities [B, K]:
    (p_max − 1/K)·K/(K−1), 0 for a uniform prediction and 1 for a certain one."""
    K = probs.shape[-1]
    if K < 2:
        raise ValueError(f"flip_probability: needs at least 2 classes, got probabilities of {K}")
    p_max = probs.max(-1).values
    return ((p_max - 1.0 / K) * (K / (K - 1))).clamp_(0.0, 1.0)


def class_balanced_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ over the classes present of the mean cross entropy of that class's
    rows (XRM's loss; its scale grows with the number of classes present).
    One fused memfast.cross_entropy call with class weights 1/count."""
    K = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the loss's own precision
    if targets.device.type == "cpu":
        _check_ids(targets, K, "targets")
        counted = targets
    else:  # no host sync: out of range, the loss's kernel reports them (a NaN loss); counted as clamped
        counted = targets.clamp(0, K - 1)
    # index_add rather than bincount: no host synchronisation on CUDA
    counts = torch.zeros(K, dtype=acc, device=logits.device).index_add_(
        0, counted, torch.ones(targets.shape, dtype=acc, device=logits.device))
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return cross_entropy(logits, targets, weight=weight, reduction="sum")


class InferredGroups(NamedTuple):
    """XRM's inferred groups: ``labels`` (the original ones; -1 where the loader
    did not visit the id) and ``mistakes`` (True where either twin's argmax is
    wrong). Unpacks as ``labels, mistakes = ...``."""

    labels: Tensor
    mistakes: Tensor

    @property
    def groups(self) -> Tensor:
        """Group index 2·y + mistake (the reference's num_m·y + m̂); -1 where unvisited."""
        return torch.where(self.labels >= 0, 2 * self.labels + self.mistakes.long(), -torch.ones_like(self.labels))

    @property
    def degenerate_classes(self) -> list:
        """Classes that do not split into two groups (all right or all wrong)."""
        seen = self.labels >= 0
        y, m = self.labels[seen], self.mistakes[seen]
        bad = []
        for c in torch.unique(y).tolist():
            in_c = m[y == c]
            if bool(in_c.all()) or not bool(in_c.any()):
                bad.append(int(c))
        return bad

    @property
    def valid(self) -> bool:
        """Every class present splits into a right and a wrong group (XRM's
        check; the reference discards a run that fails it)."""
        return not self.degenerate_classes


class XRM(nn.Module):
    """Phase 1 of MAT: two twins, each trained on a fixed Bernoulli(0.5) half of
    the sample ids, with labels that flip towards the held-out twin.

    ``twin_a`` and ``twin_b`` are any two modules mapping the same input to
    ``[B, num_classes]`` logits (two linear heads on precomputed frozen
    features, as in the reference, or two small nets). The module's
    parameters are the twins'; give them to one optimizer.

    When both twins are ``nn.Linear`` of the same shape, one matmul computes
    both (a ``[2K, D]`` weight). Otherwise identical modules without buffers
    can run as one ``torch.func.vmap`` forward (``fuse="vmap"``); "auto" uses
    it for CUDA inputs only, since on the CPU it measured ~35% slower than two
    plain forwards for a small MLP. Else the twins run one after the other
    (``fuse="none"``).

    State, persistent by sample id (buffers, in ``state_dict``):
    ``assignment`` (True: twin a trains on the id), ``labels`` (original,
    -1 until seen) and ``dynamic_labels`` (-1 until seen).
    """

    def __init__(self, twin_a: nn.Module, twin_b: nn.Module, num_samples: int, num_classes: int, seed: int = 0,
                 *, fuse: str = "auto"):
        super().__init__()
        if not isinstance(twin_a, nn.Module) or not isinstance(twin_b, nn.Module):
            raise TypeError("twin_a and twin_b must be nn.Modules")
        if twin_a is twin_b:
            raise ValueError("twin_a and twin_b must be two different modules")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.twin_a, self.twin_b = twin_a, twin_b
        self.num_samples, self.num_classes, self.seed = int(num_samples), int(num_classes), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.register_buffer("assignment", torch.rand(self.num_samples, generator=gen, dtype=torch.float32) < 0.5)
        self.register_buffer("labels", torch.full((self.num_samples,), -1, dtype=torch.long))
        self.register_buffer("dynamic_labels", torch.full((self.num_samples,), -1, dtype=torch.long))
        self.fuse = self._choose_fuse(fuse)
        self._flip_generator = None
        self._flip_generator_device = None

    # -- the twins' forward ------------------------------------------------------------------------
    def _choose_fuse(self, fuse):
        a, b = self.twin_a, self.twin_b
        linear_ok = (isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.weight.shape == b.weight.shape
                     and (a.bias is None) == (b.bias is None))
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        vmap_ok = (type(a) is type(b) and list(pa) == list(pb)
                   and all(pa[k].shape == pb[k].shape for k in pa)
                   and not list(a.buffers()) and not list(b.buffers()))
        self._vmap_ok = vmap_ok
        if fuse == "auto":
            return "linear" if linear_ok else "auto" if vmap_ok else "none"
        if fuse == "linear" and not linear_ok:
            raise ValueError("fuse='linear' needs two nn.Linear twins of the same shape")
        if fuse == "vmap" and not vmap_ok:
            raise ValueError("fuse='vmap' needs two modules of the same type and parameter shapes, without buffers")
        if fuse not in ("linear", "vmap", "none"):
            raise ValueError(f"fuse must be 'auto', 'linear', 'vmap' or 'none', got {fuse!r}")
        return fuse

    def twin_logits(self, x):
        """(logits of twin a, logits of twin b) for the same input, in one
        forward when the twins allow it."""
        mode = self.fuse
        if mode == "auto":
            mode = "vmap" if isinstance(x, Tensor) and x.is_cuda else "none"
        if mode == "linear":
            K = self.twin_a.out_features
            weight = torch.cat([self.twin_a.weight, self.twin_b.weight])
            bias = None if self.twin_a.bias is None else torch.cat([self.twin_a.bias, self.twin_b.bias])
            both = F.linear(x, weight, bias)
            return both[..., :K], both[..., K:]
        if mode == "vmap":
            names = [n for n, _ in self.twin_a.named_parameters()]
            pa, pb = dict(self.twin_a.named_parameters()), dict(self.twin_b.named_parameters())
            stacked = {n: torch.stack([pa[n], pb[n]]) for n in names}

            def one(params):
                return torch.func.functional_call(self.twin_a, params, (x,))

            both = torch.func.vmap(one, randomness="different")(stacked)
            return both[0], both[1]
        return self.twin_a(x), self.twin_b(x)

    def forward(self, x):
        """Both twins' logits stacked on a new last dimension: [B, K, 2]."""
        la, lb = self.twin_logits(x)
        return torch.stack([la, lb], -1)

    def _check_batch_logits(self, logits, batch):
        if logits.dim() != 2 or logits.shape != (batch, self.num_classes):
            raise ValueError(f"the twins must return logits [{batch}, {self.num_classes}], got {tuple(logits.shape)}")

    # -- phase 1 training --------------------------------------------------------------------------
    def _flip_rng(self, device):
        if self._flip_generator is None or self._flip_generator_device != device:
            self._flip_generator = torch.Generator(device=device).manual_seed(self.seed + 1)
            self._flip_generator_device = device
        return self._flip_generator

    def step(self, x, y, sample_ids, optimizer):
        """One XRM step on a batch; returns the (detached) class-balanced loss.

        Each sample's loss comes from the twin that owns it, on its dynamic
        label; after the optimizer step the dynamic labels of the batch flip
        to the held-out twin's argmax with probability (p_max − 1/K)·K/(K−1),
        from the held-out prediction of this (pre-step) forward. ``y`` are
        the original labels (they initialise the dynamic ones). The flips
        draw ``torch.rand(B)`` from a generator on the buffers' device seeded
        with ``seed + 1`` (reproducible runs)."""
        _check_ids(sample_ids, self.num_samples)
        device = self.assignment.device
        ids = sample_ids.to(device=device, dtype=torch.long)
        y = y.to(device=device, dtype=torch.long).reshape(-1)
        if y.shape != ids.shape:
            raise ValueError(f"y has shape {tuple(y.shape)} but sample_ids has {tuple(ids.shape)}")
        _check_ids(y, self.num_classes, "y")  # (before anything is written)
        self.train()
        self.labels[ids] = y
        stored = self.dynamic_labels[ids]
        dyn = torch.where(stored >= 0, stored, y)

        optimizer.zero_grad(set_to_none=True)
        logits_a, logits_b = self.twin_logits(x)
        self._check_batch_logits(logits_a, ids.shape[0])
        owner_a = self.assignment[ids].unsqueeze(1)
        trained = torch.where(owner_a, logits_a, logits_b)
        held_out = torch.where(owner_a, logits_b, logits_a).detach()
        loss = class_balanced_cross_entropy(trained, dyn)
        loss.backward()
        optimizer.step()

        probs = torch.softmax(held_out.float(), dim=1)
        flip = torch.rand(ids.shape[0], generator=self._flip_rng(device), device=device,
                          dtype=torch.float32) < flip_probability(probs)
        self.dynamic_labels[ids] = torch.where(flip, probs.argmax(1), dyn)
        return loss.detach()

    @property
    def flip_rate(self) -> float:
        """Fraction of the seen samples whose dynamic label differs from the
        original one (the reference's model-selection criterion: larger is better)."""
        seen = self.labels >= 0
        n = int(seen.sum())
        return 0.0 if n == 0 else float((self.dynamic_labels[seen] != self.labels[seen]).sum()) / n

    # -- after training ----------------------------------------------------------------------------
    @torch.no_grad()
    def _scan(self, loader, fn):
        was_training = self.training
        self.eval()
        try:
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise ValueError(f"the loader must yield (x, y, sample_ids) batches, got {describe_batch(batch)}; "
                                     "wrap a dataset of (x, y) pairs in memfast.data.WithIndex")
                x, y, ids = batch
                _check_ids(ids, self.num_samples)
                _check_ids(y.reshape(-1) if isinstance(y, Tensor) else y, self.num_classes, "y")
                if ids.numel() == 0:
                    continue
                la, lb = self.twin_logits(x)
                self._check_batch_logits(la, ids.shape[0])
                fn(la, lb, y.to(la.device).long().reshape(-1), ids.to(la.device).long())
        finally:
            self.train(was_training)

    def held_out_logits(self, loader) -> Tensor:
        """[num_samples, K] fp32 logits, each sample scored (eval mode) by the
        twin that did not train on it. Rows the loader never visits are NaN."""
        out = torch.full((self.num_samples, self.num_classes), math.nan, dtype=torch.float32,
                         device=self.assignment.device)

        def record(la, lb, y, ids):
            if int(ids.max()) >= self.num_samples or int(ids.min()) < 0:
                raise IndexError(f"sample_ids must be in [0, {self.num_samples})")
            owner_a = self.assignment[ids].unsqueeze(1)
            out[ids] = torch.where(owner_a, lb, la).float()

        self._scan(loader, record)
        missing = int(out[:, 0].isnan().sum())
        if missing:
            warnings.warn(f"held_out_logits: the loader did not visit {missing} of {self.num_samples} sample ids "
                          "(their rows are NaN)", stacklevel=2)
        return out

    def inferred_groups(self, loader, num_samples=None, *, strict=False) -> InferredGroups:
        """XRM's groups: (original label, wrong by either twin), indexed by
        sample id (ids in [0, num_samples), default this XRM's N; any dataset,
        e.g. a validation set). Warns, or raises ValueError with
        ``strict=True``, when a class does not split into two groups."""
        n = self.num_samples if num_samples is None else int(num_samples)
        device = self.assignment.device
        labels = torch.full((n,), -1, dtype=torch.long, device=device)
        mistakes = torch.zeros(n, dtype=torch.bool, device=device)

        def record(la, lb, y, ids):
            if int(ids.max()) >= n or int(ids.min()) < 0:
                raise IndexError(f"sample_ids must be in [0, {n})")
            labels[ids] = y
            mistakes[ids] = (la.argmax(1) != y) | (lb.argmax(1) != y)

        self._scan(loader, record)
        result = InferredGroups(labels, mistakes)
        bad = result.degenerate_classes
        if bad:
            msg = f"inferred_groups: classes {bad} do not split into two groups (XRM found no mistakes or only mistakes)"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        return result


# -- phase 2: the shift ----------------------------------------------------------------------------
def _check_held_out(held_out_logits, labels):
    if not isinstance(held_out_logits, Tensor) or not held_out_logits.is_floating_point() or \
            held_out_logits.dim() != 2:
        raise ValueError("held_out_logits must be a floating-point tensor [N, K]")
    N, K = held_out_logits.shape
    if K < 2:
        raise ValueError(f"held_out_logits must have at least 2 classes, got {K}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (N,):
        raise ValueError(f"labels must be an integer tensor of shape ({N},), got {getattr(labels, 'shape', labels)}")
    if not bool(torch.isfinite(held_out_logits).all()):
        raise ValueError("held_out_logits has non-finite entries (were all sample ids visited?)")
    labels = labels.to(held_out_logits.device).long()
    if N and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"labels must be in [0, {K})")
    return held_out_logits.float(), labels, K


def _label_given_attribute(p_attr, labels, K):
    """Q[a, y] = p(y | a) from soft attributes p(a | x) [n, K]: all K columns,
    a class absent from these rows gets probability 0 (not a missing column)."""
    joint_t = torch.zeros(K, K, dtype=p_attr.dtype, device=p_attr.device).index_add_(0, labels, p_attr)  # [y, a]
    joint = joint_t.t()
    total = joint.sum(1, keepdim=True)
    return torch.where(total > 0, joint / total.clamp_min(torch.finfo(joint.dtype).tiny), torch.zeros_like(joint))


def shift_table(held_out_logits: Tensor, labels: Tensor, temperature: float = 0.1, *, per_batch: bool = False,
                batch_size=None) -> Tensor:
    """MAT's logit shift, [N, K] fp32: log(P·Q + 1e-6) with
    P = softmax(held_out_logits / temperature) (p(a | x), a = the held-out
    prediction) and Q[a, y] = p(y | a) = Σ_{i: y_i = y} P[i, a] / Σ_i P[i, a].

    By default Q is estimated once over all N rows (the paper's Algorithm 1).
    ``per_batch=True`` reproduces the reference main.py, which estimates Q in
    every minibatch: the rows are taken as consecutive minibatches of
    ``batch_size`` (default: all rows form one batch, e.g. pass
    ``held_out[ids], y`` of the current batch) and each row's shift uses its
    own batch's Q (with all K columns, so an absent class does not break it).
    """
    ho, labels, K = _check_held_out(held_out_logits, labels)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p_attr = torch.softmax(ho / float(temperature), dim=1)
    if not per_batch:
        if batch_size is not None:
            raise ValueError("batch_size is only used with per_batch=True")
        return torch.log(p_attr @ _label_given_attribute(p_attr, labels, K) + _LOG_FLOOR)
    N = ho.shape[0]
    step = N if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = torch.empty_like(p_attr)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        out[rows] = torch.log(p_attr[rows] @ _label_given_attribute(p_attr[rows], labels[rows], K) + _LOG_FLOOR)
    return out


class ArgmaxShift(NamedTuple):
    """The argmax form of the shift for large K: ``table[a, y] = log(p(y | a) + 1e-6)``
    [K, K] with a = ``attribute[i]`` = argmax of sample i's held-out logits [N]."""

    table: Tensor
    attribute: Tensor


def argmax_shift_table(held_out_logits: Tensor, labels: Tensor) -> ArgmaxShift:
    """Shift with p(a | x) one-hot at a* = argmax held-out prediction (the
    paper's approximation, the temperature → 0 limit of :func:`shift_table`):
    p(y | a*) = count(y, a*) / count(a*). Memory K² + N instead of N·K."""
    ho, labels, K = _check_held_out(held_out_logits, labels)
    attribute = ho.argmax(1)
    counts = torch.zeros(K * K, dtype=torch.float32, device=ho.device)
    counts.index_add_(0, attribute * K + labels, torch.ones_like(ho[:, 0]))
    counts = counts.view(K, K)
    q = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
    return ArgmaxShift(torch.log(q + _LOG_FLOOR), attribute)


class MATLoss(nn.Module):
    """MAT's training loss: ``loss(logits, targets, sample_ids)`` =
    cross entropy of ``logits + shift[sample_ids]`` with the true labels,
    the table gathered inside memfast's fused kernel (no [B, K] copy).

    ``shift`` is the [N, K] table of :func:`shift_table`, or an
    :class:`ArgmaxShift` / a [K, K] table with ``attribute`` [N] (then each row
    gathers ``table[attribute[sample_id]]``). The shift is constant (no
    gradient). Evaluate with the unshifted logits, ``model(x)``. With a
    ``tracker`` the per-sample statistics are those of the shifted logits.
    """

    def __init__(self, shift, attribute=None, *, tracker=None, reduction="mean"):
        super().__init__()
        if isinstance(shift, ArgmaxShift):
            if attribute is not None:
                raise ValueError("attribute is already part of the ArgmaxShift")
            shift, attribute = shift
        if not isinstance(shift, Tensor) or not shift.is_floating_point() or shift.dim() != 2:
            raise ValueError("shift must be a floating-point table [N, K] (or [A, K] with attribute)")
        if attribute is not None:
            if not isinstance(attribute, Tensor) or attribute.is_floating_point() or attribute.dim() != 1:
                raise ValueError("attribute must be a 1-D integer tensor of per-sample table rows")
            if attribute.numel() and (int(attribute.min()) < 0 or int(attribute.max()) >= shift.shape[0]):
                raise ValueError(f"attribute must index the table's {shift.shape[0]} rows")
            attribute = attribute.long()
        self.register_buffer("shift", shift.detach().float().contiguous())
        self.register_buffer("attribute", attribute)
        self.tracker = tracker
        self.reduction = reduction

    @property
    def num_samples(self) -> int:
        return self.shift.shape[0] if self.attribute is None else self.attribute.shape[0]

    def forward(self, logits, targets, sample_ids):
        if not isinstance(sample_ids, Tensor) or sample_ids.is_floating_point() or sample_ids.is_complex() \
                or sample_ids.dtype == torch.bool:
            raise TypeError(f"MATLoss: sample_ids must be an integer tensor, got "
                            f"{getattr(sample_ids, 'dtype', type(sample_ids).__name__)}")
        ids = sample_ids.to(logits.device).long()
        if ids.device.type == "cpu" and ids.numel():  # (on CUDA the kernel's own check, without a host sync)
            flat = ids.reshape(-1)
            bad = (flat < 0) | (flat >= self.num_samples)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise IndexError(f"MATLoss: sample_ids (flattened) [{i}] = {int(flat[i])} is out of range for a shift "
                                 f"table of {self.num_samples} samples")
        groups = ids if self.attribute is None else self.attribute[ids]
        return cross_entropy(logits, targets, reduction=self.reduction, adjustment=self.shift, groups=groups,
                             sample_ids=ids if self.tracker is not None else None, tracker=self.tracker)
