"""Input-loss curvature (Garg, Ravikumar & Roy, ICML 2024): a Hutchinson
finite-difference estimate per sample, computed as the reference code does
but with the unperturbed gradient computed once and the probes batched.

For each sample x with label y, Rademacher probes v_k in {-1, +1} and step h:
    g0 = grad_x L(x),  g_k = grad_x L(x + h v_k),
    score = mean_k ||g_k - g0||_2          (the reference code's score)
    squared=True: mean_k ||g_k - g0||_2^2  (~ h^2 tr(H^2), the paper's form)
    trace:        mean_k v_k . (g_k - g0)  (~ h tr(H))
with L the sum-reduced cross entropy (exact per-sample gradients) times scale.

The same scoring mode gives the input-gradient norm ||g0|| ("loss
sensitivity", Arpit et al. 2017), whose running mean over training defines
the CSL paper's learning time (Sec. 5; memfast.metrics.theory_learning_time).
"""
import contextlib
import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import _ops
from .data import describe_batch

# On CPU a chunk holds about this many input elements (two CIFAR batches of
# 64): larger stacked chunks fall out of cache and run slower per probe
# (bench/test_bench_curvature.py compares chunk sizes).
CPU_CHUNK_ELEMENTS = 2 * 64 * 3 * 32 * 32
# On CUDA the chunk is all probes unless the activations of that many probes
# (estimated from the unperturbed pass) exceed this share of free memory.
CUDA_MEMORY_SHARE = 0.7


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls, restored after. Uses
    the legacy allow_tf32 switches, or the fp32_precision ones where the user
    set those (torch >= 2.9 refuses to read the legacy switches then)."""
    backends = torch.backends
    try:
        legacy = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        legacy = None
    if legacy is not None:
        backends.cudnn.allow_tf32 = False
        backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = legacy
        return
    switches = [backends.cudnn, backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn]
    saved = [s.fp32_precision for s in switches]
    for s in switches:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, value in reversed(list(zip(switches, saved))):
            s.fp32_precision = value


@contextlib.contextmanager
def _eval_mode(model):
    """Every submodule in eval mode, each restored to its own mode after."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _scoring_mode(model, device):
    """Eval mode, fp32 with TF32 off, no autocast, gradients on (also inside
    no_grad / inference_mode), all restored after."""
    autocast_off = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), autocast_off, _exact_fp32(), _eval_mode(model):
        yield


def _check_model_and_batch(who, model, inputs, targets, scale):
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        what = inputs.dtype if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise TypeError(f"{who}: inputs must be a floating-point tensor, got {what}")
    if inputs.dim() < 1:
        raise ValueError(f"{who}: inputs must have a batch dimension [B, ...], got a 0-d tensor")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"{who}: targets must be an integer tensor of class indices, got {what}")
    if targets.shape != inputs.shape[:1]:
        raise ValueError(f"{who}: targets must have shape [B] = [{inputs.shape[0]}] (one class index per "
                         f"sample), got {list(targets.shape)}")
    if targets.device != inputs.device:
        raise ValueError(f"{who}: targets are on {targets.device} but inputs are on {inputs.device}")
    if isinstance(model, torch.nn.Module):
        for name, p in model.named_parameters():
            if p.device != inputs.device:
                raise ValueError(f"{who}: model parameter {name!r} is on {p.device} but inputs are on "
                                 f"{inputs.device}; move the model or the inputs")
            if p.is_floating_point() and p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{who}: model parameter {name!r} is {p.dtype}; input gradients are computed in "
                                 f"fp32 (model.float())")
    elif not callable(model):
        raise TypeError(f"{who}: model must be an nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{who}: scale must be a finite number, got {scale!r}")


def _check_args(model, inputs, targets, n_probes, h, chunk_size, scale):
    _check_model_and_batch("input_curvature", model, inputs, targets, scale)
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral) or n_probes < 1:
        raise ValueError(f"input_curvature: n_probes must be a positive int, got {n_probes!r}")
    if not isinstance(h, numbers.Real) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"input_curvature: h must be a positive finite number, got {h!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"input_curvature: chunk_size must be None or a positive int, got {chunk_size!r}")


def _compute_dtype(inputs, model):
    """The model's parameters' dtype (fp32 or fp64: what it takes, e.g. fp64 tabular inputs for an fp32
    model); for a parameterless model or a function, fp64 for fp64 inputs, else fp32."""
    model_dtype = _model_dtype(model)
    if model_dtype is not None:
        return model_dtype
    return torch.float64 if inputs.dtype == torch.float64 else torch.float32


def _squared_norms(g):
    """[B] float64 sums of squares of each sample's gradient."""
    return g.reshape(g.shape[0], -1).double().pow(2).sum(1)


def _loss_and_grad(model, x, y, scale, check_targets=False, who="input_curvature"):
    """(grad_x of scale * sum-CE, bytes held by the forward graph)."""
    x = x.requires_grad_()
    before = torch.cuda.memory_allocated(x.device) if x.is_cuda else 0
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        what = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{who}: the model must return [batch, classes] logits, got {what}")
    if check_targets:
        num_classes = logits.shape[1]
        # One host read per call, before the loss can hit a device-side assert.
        if bool(((y < 0) | (y >= num_classes)).any()):
            bad = y[(y < 0) | (y >= num_classes)][0].item()
            raise IndexError(f"{who}: targets contain {bad}, out of range for {num_classes} classes")
    graph_bytes = (torch.cuda.memory_allocated(x.device) - before) if x.is_cuda else 0
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    loss = F.cross_entropy(logits, y, reduction="sum")
    if scale != 1.0:
        loss = loss * scale
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:  # the model ignores its input
        grad = torch.zeros_like(x)
    return grad, graph_bytes


def _default_chunk(device, n_probes, graph_bytes, input_numel):
    if device.type != "cuda":
        return max(1, min(n_probes, CPU_CHUNK_ELEMENTS // max(1, input_numel)))
    if graph_bytes <= 0:
        return n_probes
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # Forward activations plus about as much again in backward transients.
    per_probe = 2 * graph_bytes
    return max(1, min(n_probes, int(CUDA_MEMORY_SHARE * free // per_probe)))


def _prefers_channels_last(model, inputs):
    """Image batches for a convolutional model on the CPU run channels_last:
    oneDNN's convolutions are faster in that layout (the reference loop runs
    1.35-1.5x faster on bench/test_bench_curvature.py's CNN given channels_last
    inputs)."""
    return (inputs.device.type == "cpu" and inputs.dim() == 4 and inputs.is_contiguous()
            and isinstance(model, torch.nn.Module)
            and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))


def _model_dtype(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _new_seed():
    # From torch's default CPU generator: torch.manual_seed makes it
    # reproducible, and no device is touched.
    return int(torch.randint(0, 2**62, (1,)).item())


def input_curvature(model, inputs, targets, *, n_probes=10, h=1e-3, squared=False, return_trace=False,
                    chunk_size=None, seed=None, scale=1.0):
    """Per-sample input-loss curvature, as in the reference code (Garg et al.).

    Args:
      model: maps inputs [B, ...] to logits [B, C]. Runs in eval mode for the
        call (each submodule's mode is restored after), in fp32 with TF32 off
        and no autocast. Its parameters' .grad are not touched.
      inputs: [B, ...] floating tensor (cast to fp32, or fp64 when the inputs or
        the model are fp64).
      targets: [B] class indices.
      n_probes: Rademacher probes per sample (reference: 10).
      h: finite-difference step in input space (reference: 1e-3 CIFAR, 1e-4
        ImageNet).
      squared: average ||g_k - g0||^2 instead of ||g_k - g0||.
      return_trace: also return mean_k v_k . (g_k - g0) (~ h tr(H)).
      chunk_size: probes per forward/backward (memory is about chunk_size
        times one batch's activations). Default: on CPU about 400k input
        elements per chunk (2 probes of a CIFAR batch of 64), which stays in
        cache; on CUDA all probes unless that would not fit in free memory.
        On the CPU, image batches [B, C, H, W] for a model with Conv2d layers
        run in channels_last memory format (faster convolutions), as do inputs
        given in that format anywhere.
      seed: probe seed (same seed, same probes on CPU and CUDA, whatever the
        chunk size). Default: drawn from torch's default generator.
      scale: multiplies the loss; 1/B reproduces the reference scorers' mean
        reduction (their score is then scale times this one).

    Returns a [B] float32 tensor, or (score, trace) with return_trace.
    """
    sums, _ = _input_curvature(model, inputs, targets, n_probes, h, chunk_size, seed, scale, grad_norm=False)
    score = (sums[1] if squared else sums[0]) / n_probes
    if return_trace:
        return score, sums[2] / n_probes
    return score


def _input_curvature(model, inputs, targets, n_probes, h, chunk_size, seed, scale, grad_norm):
    """([3, B] float32 sums over the probes of ||g_k - g0||, ||g_k - g0||^2 and
    v_k . (g_k - g0); [B] float64 ||g0||^2 with grad_norm, else None)."""
    _check_args(model, inputs, targets, n_probes, h, chunk_size, scale)
    if seed is None:
        seed = _new_seed()
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"input_curvature: seed must be an int or None, got {seed!r}")
    seed = (int(seed) + 2**63) % 2**64 - 2**63  # any int, as the ops' int64 (the generator uses 64 bits)
    device = inputs.device
    dtype = _compute_dtype(inputs, model)
    B = inputs.shape[0]
    n_probes = int(n_probes)
    if B == 0:
        empty_norms = inputs.new_zeros(0, dtype=torch.float64) if grad_norm else None
        return inputs.new_zeros(3, 0, dtype=torch.float32), empty_norms
    op = _ops.ops(device)
    # The ops work on the standard layout, which keys the probes; the model sees
    # `layout` (channels_last where given, or chosen below on the CPU).
    given_cl = (inputs.dim() == 4 and not inputs.is_contiguous()
                and inputs.is_contiguous(memory_format=torch.channels_last))
    auto_cl = not given_cl and _prefers_channels_last(model, inputs)
    layout = torch.channels_last if given_cl or auto_cl else torch.contiguous_format
    x = inputs.detach().to(dtype).contiguous()
    y = targets.detach().long()
    with _scoring_mode(model, device):
        if x.is_inference():
            x = x.clone()
            y = y.clone()
        sums = torch.zeros(3, B, dtype=torch.float32, device=device)
        try:
            g0, graph_bytes = _loss_and_grad(model, x.detach().contiguous(memory_format=layout), y, scale,
                                             check_targets=True)
        except RuntimeError:
            if not auto_cl:
                raise
            # e.g. a model that calls x.view(...) on its input: the standard layout after all
            layout = torch.contiguous_format
            g0, graph_bytes = _loss_and_grad(model, x.detach().contiguous(), y, scale, check_targets=True)
        g0 = g0.detach().contiguous()  # the ops' layout
        chunk = int(chunk_size) if chunk_size is not None else _default_chunk(device, n_probes, graph_bytes, x.numel())
        for first in range(0, n_probes, chunk):
            count = min(chunk, n_probes - first)
            xp = op.curvature_perturb(x, seed, first, count, float(h)).contiguous(memory_format=layout)
            grads, _ = _loss_and_grad(model, xp, y.repeat(count), scale)
            sums += op.curvature_reduce(grads.detach().contiguous(), g0, seed, first)
            del xp, grads
    return sums, _squared_norms(g0) if grad_norm else None


def input_gradient_norm(model, inputs, targets, *, squared=False, scale=1.0):
    """Per-sample norm of the input gradient, ||grad_x L(x_i, y_i)||_2, in the
    scoring mode of input_curvature (eval mode, fp32 with TF32 off, no
    autocast; parameters' .grad untouched), with L the sum-reduced cross
    entropy times `scale` (exact per-sample gradients; 1/B gives the mean
    reduction's). This is "loss sensitivity" (Arpit et al. 2017), a baseline
    of the CSL paper, and the g of its learning time (Sec. 5, Eq. 7; see
    memfast.metrics.theory_learning_time). One forward and one backward.

    squared=True returns ||.||^2 (the paper's Eq. 6 form; its code uses the
    norm). Returns a [B] float32 tensor on the inputs' device.
    """
    who = "input_gradient_norm"
    _check_model_and_batch(who, model, inputs, targets, scale)
    if inputs.shape[0] == 0:
        return inputs.new_zeros(0, dtype=torch.float32)
    x = inputs.detach().to(_compute_dtype(inputs, model)).contiguous()
    y = targets.detach().long()
    with _scoring_mode(model, inputs.device):
        if x.is_inference():
            x, y = x.clone(), y.clone()
        g, _ = _loss_and_grad(model, x, y, scale, check_targets=True, who=who)
    sq = _squared_norms(g.detach())
    return (sq if squared else sq.sqrt()).float()


def _batch_seed(base, index):
    # Distinct, well-spread Philox keys per batch.
    return (base + index * 0x9E3779B97F4A7C15) % (1 << 63)


def _model_device(model, fallback):
    params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return params.device if params is not None else fallback


def _scored_batches(who, loader, num_samples, progress, desc):
    """(index, inputs, targets, sample_ids) of each batch, the ids checked
    against num_samples where the loader made them (usually the CPU: no
    device sync), with a tqdm progress bar."""
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    for index, batch in enumerate(tqdm(loader, total=total, desc=desc, disable=not progress)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 3 or isinstance(batch[0], Mapping):
            raise ValueError(f"{who}: the loader must yield (inputs, targets, sample_ids) batches, got "
                             f"{describe_batch(batch)}; wrap a dataset of (input, target) pairs in "
                             "memfast.data.WithIndex")
        x, y, ids = batch
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.shape != (len(x),):
            raise ValueError(f"{who}: sample_ids must be an integer vector with one id per sample, got "
                             f"{ids.dtype} {list(ids.shape)}")
        ids = ids.long()
        if len(ids) and bool((ids.min() < 0) | (ids.max() >= num_samples)):
            raise IndexError(f"{who}: sample_ids out of range [0, {num_samples}) in batch {index}")
        yield index, x, y, ids


class _ScoringPass:
    """A scoring pass's per-batch values, added to the tracker (`name` += value, `name`_count += 1 at
    the ids) once the whole pass has run: a bad batch later in the loader, or an interruption, leaves
    the tracker as it was rather than with some samples scored once more than the others."""

    def __init__(self, tracker):
        self.tracker, self.parts = tracker, []

    def add(self, name, ids, values):
        if self.tracker is not None:
            device = self.tracker.device
            self.parts.append((name, ids.to(device, non_blocking=True), values.to(device, torch.float32)))

    def commit(self):
        for name, ids, values in self.parts:
            self.tracker.stat(name).index_add_(0, ids, values)
            self.tracker.stat(f"{name}_count").index_add_(0, ids, torch.ones_like(values))
        self.parts = []


def score_curvature(model, loader, tracker, *, n_probes=10, h=1e-3, device=None, progress=True, squared=False,
                    chunk_size=None, seed=None, scale=1.0, grad_norm=False):
    """Score every sample of a loader and accumulate into tracker's "curv"
    statistic: tracker.stat("curv") += score and tracker.stat("curv_count") += 1
    on each batch's sample_ids rows. Call it once per checkpoint;
    tracker.scores()["curv"] is then the mean over the calls, as the reference
    averages over checkpoints. With grad_norm=True the input-gradient norm
    ||grad_x L|| that the estimate computes anyway is accumulated into the
    tracker's "grad_norm" too (as score_grad_norm would, at no extra cost;
    opt-in, so that calling both on one tracker does not count it twice).

    Args:
      loader: yields (inputs, targets, sample_ids), e.g. a DataLoader over
        memfast.data.WithIndex(dataset) (no augmentation, as the reference).
      tracker: a SampleTracker keeping "curv".
      device: where the model runs (default: the model's parameters' device,
        else the tracker's).
      progress: show a tqdm progress bar.
      Other arguments: as input_curvature (seed=None draws one base seed; each
      batch gets its own probe seed derived from it).

    Returns the tracker.
    """
    if "curv" not in getattr(tracker, "stored_stats", ()):
        kept = list(getattr(tracker, "stored_stats", ()))
        raise ValueError(f"score_curvature: the tracker does not keep 'curv' (it keeps {kept}); create it with "
                         f"SampleTracker(n, stats=(..., 'curv'))")
    if grad_norm and "grad_norm" not in tracker.stored_stats:
        raise ValueError(f"score_curvature: grad_norm=True but the tracker does not keep 'grad_norm' (it keeps "
                         f"{list(tracker.stored_stats)})")
    device = torch.device(device if device is not None else _model_device(model, tracker.device))
    if seed is None:
        seed = _new_seed()
    scored = _ScoringPass(tracker)
    for index, x, y, ids in _scored_batches("score_curvature", loader, tracker.num_samples, progress, "curvature"):
        sums, g0_sq = _input_curvature(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                       n_probes, h, chunk_size, _batch_seed(seed, index), scale, grad_norm)
        scored.add("curv", ids, (sums[1] if squared else sums[0]) / n_probes)
        if grad_norm:
            scored.add("grad_norm", ids, g0_sq.sqrt())
    scored.commit()
    return tracker


def score_grad_norm(model, loader, tracker=None, *, num_samples=None, device=None, progress=True, squared=False,
                    scale=1.0):
    """The input-gradient norm of every sample of a loader (input_gradient_norm,
    batch by batch): one forward and one backward per batch.

    Returns an [N] float32 tensor of this pass's norms by sample id (NaN for
    samples the loader did not yield), on the tracker's device (or the
    model's). Called once per epoch, the stacked returns are what
    memfast.metrics.theory_learning_time takes. With a tracker that keeps
    "grad_norm", the norms are also accumulated there:
    tracker.scores()["grad_norm"] is then the mean over the calls ("loss
    sensitivity").

    Args:
      loader: yields (inputs, targets, sample_ids), e.g. a DataLoader over
        memfast.data.WithIndex(dataset), unaugmented.
      tracker: optional SampleTracker keeping "grad_norm".
      num_samples: N, when no tracker is given.
      device: where the model runs (default: the model's parameters' device,
        else the tracker's, else the CPU).
      Other arguments: as input_gradient_norm.
    """
    if tracker is not None:
        if "grad_norm" not in getattr(tracker, "stored_stats", ()):
            kept = list(getattr(tracker, "stored_stats", ()))
            raise ValueError(f"score_grad_norm: the tracker does not keep 'grad_norm' (it keeps {kept}); create it "
                             f"with SampleTracker(n, stats=(..., 'grad_norm'))")
        if num_samples is not None and num_samples != tracker.num_samples:
            raise ValueError(f"score_grad_norm: num_samples={num_samples} but the tracker has {tracker.num_samples}")
        num_samples = tracker.num_samples
    elif isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 0:
        raise ValueError(f"score_grad_norm: give a tracker or num_samples (a non-negative int), got {num_samples!r}")
    fallback = tracker.device if tracker is not None else torch.device("cpu")
    device = torch.device(device if device is not None else _model_device(model, fallback))
    out_device = tracker.device if tracker is not None else device
    norms = torch.full((int(num_samples),), math.nan, dtype=torch.float32, device=out_device)
    scored = _ScoringPass(tracker)
    for _, x, y, ids in _scored_batches("score_grad_norm", loader, num_samples, progress, "input-gradient norm"):
        g = input_gradient_norm(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                squared=squared, scale=scale)
        norms[ids.to(out_device, non_blocking=True)] = g.to(out_device)
        scored.add("grad_norm", ids, g)
    scored.commit()
    return norms
