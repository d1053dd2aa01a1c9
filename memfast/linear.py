"""memfast.linear_cross_entropy: an LM head's projection and cross entropy in
chunks of rows, so that the [N, C] logits never exist at once, with the
per-sample tracking of memfast.cross_entropy in the same pass.

For mean and sum, each chunk's logits are computed, the fused op writes the
chunk's gradient over them (cross_entropy_fwd_, or cross_entropy_prob_fwd_ for
class-probability targets) and the input / weight / bias gradients are formed
right away (two matmuls), all in the forward: memory of one chunk's logits, three
matmuls in all, as without chunking. For reduction='none' the per-row upstream
gradient is only known in the backward, which recomputes each chunk's logits (one
matmul more).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops
from ._stats import ROW_STATS
from .loss import (_REDUCTIONS, _check_ignore_index, _check_label_smoothing, _check_lse_square_scale, _check_softcap,
                   _legacy_reduction)

_NONE, _MEAN, _SUM = range(3)


_MIN_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 logits: below that the matmuls get small for little gain


def _chunk_rows(rows, hidden, classes, chunk_size):
    """Rows per chunk: by default a chunk's logits hold as many elements as the input rows do (an
    LM head's logits are then ~1/30 of their full size), or 2^24 if that is more."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"memfast.linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
        return chunk_size
    return max(1, min(rows, -(-max(rows * hidden, _MIN_CHUNK_ELEMENTS) // max(classes, 1))))


def _autocast_dtype(input):
    """Autocast's dtype for input when autocast is on for its device and casts it, else None
    (autocast leaves float64 alone: F.linear of fp64 tensors stays fp64 under it)."""
    if input.dtype == torch.float64:
        return None
    kind = input.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type autocast does not know
        pass
    return None


def _dtypes(input):
    """(what F.linear computes the logits in, what F.cross_entropy of them returns): autocast's
    dtype and float32 (autocast runs cross entropy in fp32) when autocast is on, else the input's."""
    autocast = _autocast_dtype(input)
    return (input.dtype, input.dtype) if autocast is None else (autocast, torch.float32)


def _check(input, linear_weight, target, linear_bias, weight, ignore_index):
    if not isinstance(input, Tensor) or not input.is_floating_point() or input.dim() < 1:
        raise TypeError("memfast.linear_cross_entropy: input must be a floating-point tensor [..., in_features]")
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"memfast.linear_cross_entropy: linear_weight must be [classes, {input.shape[-1]}], got "
                         f"{getattr(linear_weight, 'shape', type(linear_weight))}")
    C = linear_weight.shape[0]
    if linear_bias is not None and (not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (C,)):
        raise ValueError(f"memfast.linear_cross_entropy: linear_bias must be [{C}], got "
                         f"{getattr(linear_bias, 'shape', type(linear_bias))}")
    if not isinstance(target, Tensor) or target.dtype == torch.bool or target.is_complex():
        raise TypeError("memfast.linear_cross_entropy: target must hold class indices (an integer tensor) or class "
                        "probabilities (a floating-point one)")
    if target.is_floating_point():
        expected = tuple(input.shape[:-1]) + (C,)
        what = "a floating-point target holds class probabilities: input.shape[:-1] + (classes,)"
        if ignore_index >= 0:  # as memfast.cross_entropy / F.cross_entropy with such targets
            raise ValueError(f"memfast.linear_cross_entropy: ignore_index ({ignore_index}) applies to class-index "
                             "targets only")
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError("memfast.linear_cross_entropy: target requires grad, but the loss gives no gradient "
                             "into class-probability targets; pass target.detach() (or memfast.cross_entropy on "
                             "the logits, which does)")
    else:
        expected, what = tuple(input.shape[:-1]), "class indices"
        if tuple(target.shape) == expected + (C,):
            what += "; class probabilities must be a floating-point tensor"
    if tuple(target.shape) != expected:
        raise ValueError(f"memfast.linear_cross_entropy: target has shape {tuple(target.shape)}, expected "
                         f"{expected} for input of shape {tuple(input.shape)} ({what})")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias), ("target", target),
                    ("weight", weight)):
        if t is not None and t.device != input.device:
            raise ValueError(f"memfast.linear_cross_entropy: {name} is on {t.device} but input is on {input.device}")
    if weight is not None:
        if not weight.is_floating_point() or tuple(weight.shape) != (C,):
            raise ValueError(f"memfast.linear_cross_entropy: weight must be a floating-point [{C}] tensor")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("memfast.linear_cross_entropy: weight requires grad, but the loss is not differentiable "
                             "in the class weights (as in F.cross_entropy); pass weight.detach()")


def _chunk_loss(lib, z, y, weight, ignore_index, eps, reduction, scalars, grad_over_logits):
    """One chunk's logits z through the fused op (class indices y [n], or probabilities y [n, C]):
    (loss, row_stats, the tracked labels: y itself for indices). grad_over_logits: the gradient is
    written over z (the _ ops); otherwise none is computed."""
    if y.is_floating_point():
        if grad_over_logits:
            return lib.cross_entropy_prob_fwd_(z, y, weight, eps, None, None, reduction, *scalars)
        loss, row_stats, label, _ = lib.cross_entropy_prob_fwd(z, y, weight, eps, None, None, False, reduction,
                                                               *scalars)
        return loss, row_stats, label
    if grad_over_logits:
        loss, row_stats = lib.cross_entropy_fwd_(z, y, weight, ignore_index, eps, None, None, reduction, *scalars)
    else:
        loss, row_stats, _ = lib.cross_entropy_fwd(z, y, weight, ignore_index, eps, None, None, False, reduction,
                                                   *scalars)
    return loss, row_stats, y


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, lib, target, weight, ignore_index, eps, scalars, reduction,
                rows, track, dtype, accum_dtype):
        # input: [N, H]; target: [N] class indices or [N, C] probabilities; scalars: (lse_square_scale,
        # softcap); track: None or (state, counters, sample_ids, stat_rows);
        # dtype: what the logits are computed in (autocast's, else the input's)
        N, C = input.shape[0], linear_weight.shape[0]
        soft = target.is_floating_point()
        acc = _ops._acc_dtype(dtype)
        need = ctx.needs_input_grad[:3]
        with _explicit_dtypes(input):
            x, w, b = _cast(input, linear_weight, linear_bias, dtype)
            grads = _gradient_buffers(x, w, b, need, acc, accum_dtype)
            losses = torch.empty(N, dtype=acc, device=x.device) if reduction == _NONE else None
            total = torch.zeros((), dtype=acc, device=x.device)
            # The chunks' row statistics ([5, N]: 20 bytes a row), for one tracker update of the whole
            # batch after the loop: the same result as memfast.cross_entropy on all the logits.
            stats = torch.empty((len(ROW_STATS), N), dtype=acc, device=x.device) if track is not None else None
            labels = torch.empty(N, dtype=torch.long, device=x.device) if track is not None and soft else target
            chunk_weight, chunk_scalars = weight, scalars
            if reduction == _MEAN:
                # The mean over all the rows, chunk by chunk: each chunk's sum with the class weights
                # divided by the whole batch's denominator -- sum(weight[target]) for class indices, the
                # number of rows for probabilities (PyTorch's mean of those), whose z-loss is not weighted
                # and so is divided too. Loss and gradient are linear in both, so the kernel forms the
                # mean's gradient in fp32 and rounds it once (scaling a bf16 gradient afterwards would
                # round the scale too).
                w_full = weight if weight is not None else torch.ones(C, dtype=acc, device=x.device)
                if soft:
                    den = torch.full((), float(N if C else 0), dtype=acc, device=x.device)  # (a fill: no copy)
                    chunk_scalars = (scalars[0] / N if N else 0.0, scalars[1])
                else:
                    valid = target != ignore_index
                    # (clamped: an out-of-range target is the kernel's to report, naming it; no device assert)
                    den = (w_full[torch.where(valid, target, 0).clamp(0, max(C - 1, 0))] * valid).sum()
                chunk_weight = (w_full / den).contiguous()
            in_forward = reduction != _NONE and any(need)  # the gradient now; 'none' recomputes it later
            for s in range(0, N, rows):
                e = min(N, s + rows)
                z = F.linear(x[s:e], w, b)
                loss, row_stats, label = _chunk_loss(lib, z, target[s:e], chunk_weight, ignore_index, eps,
                                                     _NONE if reduction == _NONE else _SUM, chunk_scalars,
                                                     grad_over_logits=in_forward)
                if in_forward:
                    _accumulate(grads, z, x[s:e], w, s, e)
                if reduction == _NONE:
                    losses[s:e] = loss
                else:
                    total += loss
                if stats is not None:
                    stats[:, s:e] = row_stats
                    if soft:
                        labels[s:e] = label
            if track is not None:
                state, counters, ids, stat_rows = track
                _ops.track_rows(lib, state, counters, stats, labels, ids, -100 if soft else ignore_index, C,
                                stat_rows)
            if reduction == _MEAN:  # over no rows: NaN, as in PyTorch (the gradient of no rows stays 0)
                total = torch.where(den == 0, torch.full_like(total, float("nan")), total)
        ctx.reduction, ctx.lib, ctx.rows, ctx.dtype = reduction, lib, rows, dtype
        ctx.args = (weight, ignore_index, eps, scalars)
        ctx.accum_dtype = accum_dtype
        ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        if reduction == _NONE:
            ctx.save_for_backward(input, linear_weight, linear_bias, target)
        else:
            ctx.grads = grads
        return losses if reduction == _NONE else total

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled() and type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling():
            # the gradients are formed by in-place products with no history: a gradient penalty would
            # silently miss this loss's part
            raise RuntimeError("memfast.linear_cross_entropy: a differentiable gradient (create_graph=True) is "
                               "not supported; use memfast.cross_entropy(F.linear(input, linear_weight, "
                               "linear_bias), target, ...) for a gradient penalty")
        if ctx.reduction == _NONE:
            grads = _recompute_grads(ctx, grad_loss)
        else:
            grads, ctx.grads = ctx.grads, None  # they are scaled in place: a second backward must not reuse them
            if grads is None:
                raise RuntimeError("memfast.linear_cross_entropy: backward twice through one mean / sum loss (its "
                                   "gradients were formed in the forward and are used up); compute the loss again")
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        grads = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)]
        return (*grads,) + (None,) * 11


def _accum_dtype(accum_dtype, compute_dtype):
    """None where accum_dtype adds nothing (no wider than the compute dtype)."""
    if accum_dtype is None or torch.finfo(accum_dtype).bits <= torch.finfo(compute_dtype).bits:
        return None
    return accum_dtype


def _explicit_dtypes(input):
    """Autocast off inside: the Function casts to its compute dtype itself (in-place addmm_ has no autocast)."""
    return torch.autocast(input.device.type, enabled=False)


def _cast(input, linear_weight, linear_bias, dtype):
    return input.to(dtype), linear_weight.to(dtype), None if linear_bias is None else linear_bias.to(dtype)


def _gradient_buffers(x, w, b, need, acc, accum_dtype):
    """Input gradient [N, H]; weight gradient [C, H], accumulated over the chunks in accum_dtype
    (None: the compute dtype, by addmm_; each chunk's product is accumulated in fp32 inside the
    matmul either way); bias gradient [C] in acc."""
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) if need[0] else None,
            torch.zeros(w.shape, dtype=accum_dtype or w.dtype, device=w.device) if need[1] else None,
            torch.zeros(w.shape[0], dtype=acc, device=x.device) if need[2] and b is not None else None]


def _accumulate(grads, dz, x, w, s, e):
    """The chunk's share of the input, weight and bias gradients from d loss / d logits (dz)."""
    grad_input, grad_weight, grad_bias = grads
    if grad_input is not None:
        torch.mm(dz, w, out=grad_input[s:e])
    if grad_weight is not None:
        if grad_weight.dtype == dz.dtype:
            grad_weight.addmm_(dz.t(), x)
        else:  # a wider accumulator: the chunk's product rounded once, the running sum not at all
            grad_weight += torch.mm(dz.t(), x)
    if grad_bias is not None:
        grad_bias += dz.sum(0, dtype=grad_bias.dtype)


def _recompute_grads(ctx, grad_loss):
    """reduction='none': each chunk's logits again, its gradient scaled row by row by grad_loss."""
    input, linear_weight, linear_bias, target = ctx.saved_tensors
    weight, ignore_index, eps, scalars = ctx.args
    acc = _ops._acc_dtype(ctx.dtype)
    with _explicit_dtypes(input):
        x, w, b = _cast(input, linear_weight, linear_bias, ctx.dtype)
        grads = _gradient_buffers(x, w, b, ctx.needs_input_grad[:3], acc, ctx.accum_dtype)
        grad_loss = grad_loss.to(acc)
        for s in range(0, x.shape[0], ctx.rows):
            e = min(x.shape[0], s + ctx.rows)
            z = F.linear(x[s:e], w, b)
            _chunk_loss(ctx.lib, z, target[s:e], weight, ignore_index, eps, _NONE, scalars, grad_over_logits=True)
            ctx.lib.cross_entropy_bwd_(z, grad_loss[s:e].contiguous())
            _accumulate(grads, z, x[s:e], w, s, e)
    return grads


def _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, sample_ids,
             tracker, zeta, cap):
    """memfast.cross_entropy of the whole logits, for torch.func transforms and forward-mode AD, which
    the chunked Function (gradients formed in its forward) cannot serve."""
    from .loss import cross_entropy

    H, C = input.shape[-1], linear_weight.shape[0]
    logits = F.linear(input.reshape(-1, H), linear_weight, linear_bias)
    rows = target.reshape(-1, C) if target.is_floating_point() else target.reshape(-1)
    loss = cross_entropy(logits, rows, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, sample_ids=sample_ids, tracker=tracker,
                         lse_square_scale=zeta, softcap=cap or None)
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, sample_ids=None, tracker=None, chunk_size=None,
                         size_average=None, reduce=None, lse_square_scale=0.0, accum_dtype=None,
                         softcap=None):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    The argument names follow ``torch.nn.functional.linear_cross_entropy``
    (PyTorch 2.13+). input ``[..., H]``, linear_weight ``[C, H]`` (an LM
    head's weight), target ``input.shape[:-1]`` (class indices) or
    ``input.shape[:-1] + (C,)`` (class probabilities, e.g. a teacher's, in the
    logits' dtype, or fp32 for bf16 / fp16 logits: PyTorch's soft-target loss,
    the mean over rows; a tracker scores each row against its most probable
    class). The projection and the loss run ``chunk_size`` rows at a time
    (default: a chunk's logits hold as many elements as ``input``, and at
    least 2^24), so the ``[N, C]`` logits never exist at once. ``sample_ids`` / ``tracker``: as in
    :func:`memfast.cross_entropy` (one id per row, or per leading index, e.g.
    ``[B]`` for ``[B, T]`` targets: the tokens of a sequence add into its
    sample). ``lse_square_scale`` (the z-loss) and ``softcap`` (Gemma 2's
    ``final_logit_softcapping``): as in :func:`memfast.cross_entropy`.
    With ``reduction`` mean or sum all gradients are formed in the
    forward (no second pass; a second backward through the loss raises);
    ``'none'`` recomputes each chunk's logits in the backward. The weight
    gradient is accumulated over chunks in ``accum_dtype`` (None: the compute
    dtype, bf16 under bf16 autocast, which rounds the running sum once per
    chunk; ``torch.float32`` rounds only each chunk's product, for a [C, H]
    product buffer and an add per chunk). Traceable by torch.compile.
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"memfast.linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (sample_ids is None) != (tracker is None):
        raise ValueError("memfast.linear_cross_entropy: sample_ids and tracker must be given together")
    ignore_index = _check_ignore_index(ignore_index, "memfast.linear_cross_entropy")
    label_smoothing = _check_label_smoothing(label_smoothing, "memfast.linear_cross_entropy")
    zeta = _check_lse_square_scale(lse_square_scale, "memfast.linear_cross_entropy")
    cap = _check_softcap(softcap, "memfast.linear_cross_entropy")
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"memfast.linear_cross_entropy: accum_dtype must be None, torch.float32 or torch.float64, "
                         f"got {accum_dtype!r}")
    _check(input, linear_weight, target, linear_bias, weight, ignore_index)
    if _ops._forward_ad_active():
        return _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                        sample_ids, tracker, zeta, cap)
    if not torch.is_grad_enabled():  # (an autograd Function would still see the parameters' requires_grad)
        input, linear_weight = input.detach(), linear_weight.detach()
        linear_bias = None if linear_bias is None else linear_bias.detach()
    H, C = input.shape[-1], linear_weight.shape[0]
    x = input.reshape(-1, H)
    dtype, out_dtype = _dtypes(input)
    acc = _ops._acc_dtype(dtype)
    if target.is_floating_point():
        if target.dtype not in (dtype, acc):  # the op reads them in place: no silent [N, C] conversion
            allowed = f"the logits' dtype ({dtype})" + ("" if acc == dtype else f" or {acc}")
            raise TypeError(f"memfast.linear_cross_entropy: class-probability targets must be in {allowed}, got "
                            f"{target.dtype}; convert them first")
        y = target.detach().reshape(x.shape[0], C)
        if _autocast_dtype(input) is None:  # F.cross_entropy's promotion (fp32 under autocast)
            out_dtype = torch.promote_types(out_dtype, target.dtype)
            if weight is not None:
                out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        y = target.reshape(-1).long().contiguous()
    track = None
    if tracker is not None:
        ids = tracker._check_batch(x, sample_ids, x.shape[0])
        if not _ops.in_backward():  # a checkpoint's recompute: tracked by the first forward already
            track = (tracker.state, tracker.counters, ids, tracker._stat_rows)
    w = None if weight is None else weight.detach().to(acc).contiguous()
    rows = _chunk_rows(x.shape[0], H, C, chunk_size)
    lib = _ops.ops(input.device)
    if y.is_floating_point() and _ops.prob_ops(input.device) is None:
        # the CUDA kernel of probability targets runs only with MEMFAST_CUDA_PROB=1 until it has been
        # run on a GPU (as in memfast.cross_entropy): the reference ops meanwhile, chunk by chunk
        lib = torch.ops.memfast_ref
    loss = _LinearCrossEntropy.apply(x, linear_weight, linear_bias, lib, y, w, ignore_index,
                                     float(label_smoothing), (zeta, cap), _REDUCTIONS.index(reduction), rows, track,
                                     dtype, _accum_dtype(accum_dtype, dtype))
    return (loss.reshape(input.shape[:-1]) if reduction == "none" else loss).to(out_dtype)
