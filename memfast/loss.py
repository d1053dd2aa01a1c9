"""memfast.cross_entropy: a drop-in for torch.nn.functional.cross_entropy
that can also track per-sample statistics and shift the logits (MAT's
adjusted softmax) inside the same fused op (class-index targets, and
class-probability targets through an op of their own)."""
import functools
import math
import numbers
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops

_REDUCTIONS = ("none", "mean", "sum")  # the op's reduction codes, as at::Reduction


def _legacy_reduction(size_average, reduce, reduction):
    if size_average is None and reduce is None:
        return reduction
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


def _check_lse_square_scale(value, who):
    """The z-loss factor as a float: finite and >= 0 (a bool or a tensor is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: lse_square_scale must be a finite number >= 0 (e.g. 1e-4), got {value!r}")
    return float(value)


def _check_ignore_index(value, who):
    """ignore_index as an int (None: -100); F.cross_entropy refuses other types too."""
    if value is None:
        return -100
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: ignore_index must be an int, got {value!r}")
    if not -2 ** 63 <= int(value) < 2 ** 63:
        raise ValueError(f"{who}: ignore_index must fit in int64, got {value}")
    return int(value)


def _check_label_smoothing(value, who):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{who}: label_smoothing must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_softcap(value, who):
    """The logit cap as the op's float: None is off (0.0); else a finite number > 0 (Gemma 2 uses 30)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{who}: softcap must be None (off) or a finite number > 0 (e.g. 30.0), got {value!r}")
    return float(value)


def _loss_dtype(input):
    """F.cross_entropy's output dtype: the input's, except under autocast, whose policy runs
    cross entropy in fp32 and so returns an fp32 loss for fp16 / bf16 logits (the op computes
    in fp32 either way; a GradScaler-scaled fp16 loss would overflow in its backward)."""
    if input.dtype in (torch.float16, torch.bfloat16):
        try:
            if torch.is_autocast_enabled(input.device.type):
                return torch.float32
        except RuntimeError:  # a device type autocast does not know (meta)
            pass
    return input.dtype


def _check_input(input):
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"memfast.cross_entropy: input must be a floating-point tensor, got "
                        f"{getattr(input, 'dtype', type(input))}")


_warned_adjustment_grad = []


def _caller_stacklevel():
    """warnings.warn's stacklevel of the first frame outside memfast and torch (the user's call,
    through nn.Module.__call__ and memfast's own layers), counted from the caller of this."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _prepare(input, target, weight, ignore_index, label_smoothing, adjustment, groups, rows=True,
             weight_grad=False):
    """Validate arguments (host metadata only) and bring them to the op's row layout (rows=False:
    no logits rows, which for [N, C, d...] inputs are a copy; None is returned for them)."""
    _check_input(input)
    if not isinstance(target, Tensor):
        raise TypeError(f"memfast.cross_entropy: target must be a tensor, got {type(target)}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError("memfast.cross_entropy: target must hold class indices (an integer tensor) or class "
                        f"probabilities (a floating-point tensor of the input's shape); got {target.dtype}")
    if input.dim() == 0:
        raise ValueError("memfast.cross_entropy: input must have a class dimension, got a 0-d tensor")
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        target = target.reshape(1)
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if target.shape != expected:
        raise ValueError(f"memfast.cross_entropy: target has shape {tuple(target.shape)}, expected {expected} "
                         f"for input of shape {tuple(input.shape)}")
    if target.device != input.device:
        raise ValueError(f"memfast.cross_entropy: target is on {target.device} but input is on {input.device}")
    C = input.shape[1]
    acc = _ops._acc_dtype(input.dtype)
    logits = _ops.as_rows(input) if rows else None
    target_rows = target if target.dim() == 1 else target.reshape(-1)
    if target_rows.dtype != torch.long:
        target_rows = target_rows.long()
    target_rows = target_rows.contiguous()
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != (C,) or not weight.is_floating_point():
            raise ValueError(f"memfast.cross_entropy: weight must be a floating-point tensor of shape ({C},), got "
                             f"{getattr(weight, 'shape', type(weight))}")
        if weight.device != input.device:
            raise ValueError(f"memfast.cross_entropy: weight is on {weight.device} but input is on {input.device}")
        if weight.requires_grad and torch.is_grad_enabled() and not weight_grad:  # F.cross_entropy refuses it too
            raise ValueError("memfast.cross_entropy: weight requires grad, but the loss is not differentiable in the "
                             "class weights (as in F.cross_entropy); pass weight.detach()")
        weight = weight.detach().to(acc).contiguous()
    groups_rows = None
    if adjustment is not None:
        if not isinstance(adjustment, Tensor) or not adjustment.is_floating_point():
            raise TypeError("memfast.cross_entropy: adjustment must be a floating-point tensor")
        if adjustment.device != input.device:
            raise ValueError(f"memfast.cross_entropy: adjustment is on {adjustment.device} but input is on "
                             f"{input.device}")
        if adjustment.requires_grad and torch.is_grad_enabled() and not _warned_adjustment_grad:
            _warned_adjustment_grad.append(True)
            warnings.warn("memfast.cross_entropy: adjustment requires grad, but it is a constant shift of the "
                          "logits: no gradient flows into it (detach it to silence this warning)",
                          stacklevel=_caller_stacklevel())
        adjustment = adjustment.detach().to(acc)
        if groups is not None:
            if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.dtype == torch.bool:
                raise TypeError("memfast.cross_entropy: groups must be an integer tensor")
            if adjustment.dim() != 2 or adjustment.shape[1] != C:
                raise ValueError(f"memfast.cross_entropy: with groups, adjustment must be a table [A, {C}], got "
                                 f"{tuple(adjustment.shape)}")
            if groups.numel() != target.numel():  # one group per target, in the target's order
                raise ValueError(f"memfast.cross_entropy: groups must have the target's shape {tuple(target.shape)}, "
                                 f"got {tuple(groups.shape)}")
            if groups.device != input.device:
                raise ValueError(f"memfast.cross_entropy: groups is on {groups.device} but input is on {input.device}")
            groups_rows = groups.reshape(-1).long().contiguous()
        elif tuple(adjustment.shape) == (C,):
            adjustment = adjustment.expand(target_rows.numel(), C)  # one shift for every row, no copy
        elif tuple(adjustment.shape) == tuple(input.shape):
            adjustment = _ops.as_rows(adjustment.reshape(input.shape))
        else:
            raise ValueError(f"memfast.cross_entropy: adjustment must have the input's shape, be a [{C}] vector, "
                             f"or be a table [A, {C}] with groups; got {tuple(adjustment.shape)}")
        if adjustment.shape[-1] > 1 and adjustment.stride(-1) != 1:
            adjustment = adjustment.contiguous()
    elif groups is not None:
        raise ValueError("memfast.cross_entropy: groups was given without an adjustment table")
    return logits, target_rows, weight, adjustment, groups_rows, target.shape, unbatched


def _probability_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, sample_ids, tracker,
                               adjustment, groups, zeta, cap, track_in_backward, inplace_backward):
    """Class-probability targets: the fused cross_entropy_prob_fwd where it exists and gives
    PyTorch's results (_fused_probability_cross_entropy). Otherwise the loss is PyTorch's
    (autograd included, into the target too) and the tracker gets one memfast pass over the
    detached logits with each row's most probable class as its label, so its statistics mean
    what they mean for index targets (the smoothing and the target's own entropy stay out of
    CSL). Rows with no positive target probability (or a NaN one) are not tracked. A softcap
    caps the logits first, as the fused op does."""
    _check_input(input)
    if target.is_complex():
        raise TypeError(f"memfast.cross_entropy: target must be real, got {target.dtype}")
    if ignore_index >= 0:  # as F.cross_entropy, which ignores a negative one with such targets
        raise ValueError(f"memfast.cross_entropy: ignore_index ({ignore_index}) applies to class-index targets "
                         "only; class-probability targets have no ignored rows (a row with no probability mass is "
                         "not tracked, but still counts in the mean)")
    if input.dim() == 0 or target.shape != input.shape:
        raise ValueError(f"memfast.cross_entropy: target is floating point, so it holds class probabilities and "
                         f"needs the input's shape {tuple(input.shape)}; got {tuple(target.shape)} (class indices "
                         "must be an integer tensor)")
    class_dim = 0 if input.dim() == 1 else 1
    lib = _ops.prob_ops(input.device)
    # PyTorch's soft-target loss is differentiable in the target and the class weights: then it runs
    weight_grad = isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled()
    if (lib is not None and target.dtype in (input.dtype, _ops._acc_dtype(input.dtype)) and not weight_grad
            and not (target.requires_grad and torch.is_grad_enabled()) and not _ops._forward_ad_active()):
        return _fused_probability_cross_entropy(lib, input, target, weight, reduction, label_smoothing, sample_ids,
                                                tracker, adjustment, groups, zeta, cap, track_in_backward,
                                                inplace_backward)
    has_mass = None  # rows with some target mass: tracked, and given the z-loss
    if tracker is not None or zeta:
        with torch.no_grad():  # one pass (max, not argmax + sum: half the time on the CPU)
            top, most_probable = target.max(class_dim)
            has_mass = top > 0
    if tracker is not None:
        label = torch.where(has_mass, most_probable, -100)
    else:  # only for _prepare's checks (shapes, devices)
        label = torch.zeros(target.shape[:class_dim] + target.shape[class_dim + 1:], dtype=torch.long,
                            device=target.device)
    # Validates weight, label_smoothing, adjustment and groups as for index targets; the rows (a
    # copy for [N, C, d...]) only where the shift, the cap or the tracker needs them.
    logits, label_rows, weight_acc, shift, groups_rows, label_shape, unbatched = _prepare(
        input, label, weight, -100, label_smoothing, adjustment, groups,
        rows=adjustment is not None or bool(cap) or tracker is not None, weight_grad=weight_grad)
    if adjustment is None and not cap:
        loss = F.cross_entropy(input, target, weight, reduction=reduction, label_smoothing=label_smoothing)
        if zeta:
            z_loss = zeta * torch.logsumexp(input.to(_ops._acc_dtype(input.dtype)), class_dim) ** 2 * has_mass
            loss = loss + _reduce(z_loss, reduction).to(loss.dtype)
    else:  # on rows, in fp32 (fp64 for fp64 logits) as the fused op: the cap, then the shift (its rows' layout)
        shifted = logits.to(_ops._acc_dtype(input.dtype))
        if cap:
            shifted = cap * torch.tanh(shifted / cap)
        if shift is not None:
            shifted = shifted + (shift if groups_rows is None else shift[groups_rows])
        loss = F.cross_entropy(shifted, _ops.as_rows(target).to(shifted.dtype),
                               weight.to(shifted.dtype) if weight_grad else weight_acc, reduction=reduction,
                               label_smoothing=label_smoothing)
        if zeta:
            loss = loss + _reduce(zeta * torch.logsumexp(shifted, 1) ** 2 * has_mass.reshape(-1), reduction)
        if reduction == "none":
            loss = loss.reshape(() if unbatched else label_shape)
    if tracker is not None and (track_in_backward or not _ops.in_backward()):
        # the rows and the shift as prepared above (no second copy of [N, C, d...] logits)
        _cross_entropy(logits.detach(), label_rows, None, -100, "none", 0.0, sample_ids, tracker, shift, groups_rows,
                       False, 0.0, cap or None, track_in_backward=True)
    dtype = _probability_loss_dtype(input, target, weight)
    return loss if loss.dtype == dtype else loss.to(dtype)


def _probability_loss_dtype(input, target, weight):
    """F.cross_entropy's dtype for probability targets: the promotion of input, target and weight
    (under autocast: of fp32 and any fp64 among them)."""
    dtypes = [input.dtype, target.dtype] + ([] if weight is None else [weight.dtype])
    if _loss_dtype(input) != input.dtype:  # autocast runs it in fp32, casting all but fp64 tensors
        dtypes = [d if d == torch.float64 else torch.float32 for d in dtypes]
    return functools.reduce(torch.promote_types, dtypes)


def _fused_probability_cross_entropy(lib, input, target, weight, reduction, label_smoothing, sample_ids, tracker,
                                     adjustment, groups, zeta, cap, track_in_backward, inplace_backward):
    """Class-probability targets in one pass (cross_entropy_prob_fwd, or cross_entropy_prob_fwd_
    for inplace_backward): loss, gradient and the row statistics against each row's most probable
    class; target in the input's dtype or its accumulation dtype, and taking no gradient (the
    caller checked)."""
    class_dim = 0 if input.dim() == 1 else 1
    no_label = torch.zeros(target.shape[:class_dim] + target.shape[class_dim + 1:], dtype=torch.long,
                           device=target.device)  # only for _prepare's checks (shapes, devices)
    logits, _, weight_acc, shift, groups_rows, label_shape, unbatched = _prepare(
        input, no_label, weight, -100, label_smoothing, adjustment, groups)
    target_rows = _ops.as_rows(target.detach())
    track = None
    if tracker is not None:
        ids = tracker._check_batch(logits, sample_ids, target_rows.shape[0])
        if track_in_backward or not _ops.in_backward():
            track = (tracker.state, tracker.counters, ids, tracker._stat_rows)
    inplace, logits = _inplace_rows(input, logits, inplace_backward)
    _check_ids_before_writing(inplace, track, tracker)
    loss, _ = _ops.cross_entropy_prob(lib, logits, target_rows, weight_acc, float(label_smoothing), shift,
                                      groups_rows, _REDUCTIONS.index(reduction), track,
                                      source=input if logits is not input else None, lse_square_scale=zeta,
                                      softcap=cap, inplace=inplace)
    if reduction == "none":
        loss = loss.reshape(() if unbatched else label_shape)
    dtype = _probability_loss_dtype(input, target, weight)
    return loss if loss.dtype == dtype else loss.to(dtype)


def _reduce(per_row, reduction):
    """A per-row term reduced as PyTorch reduces class-probability losses (the mean over rows)."""
    return per_row if reduction == "none" else per_row.mean() if reduction == "mean" else per_row.sum()


def _check_ids_before_writing(inplace, track, tracker):
    """The tracker checks the ids after the forward, which in place has overwritten the logits by
    then: on the CPU (no device sync) they are checked first, so a bad id leaves the logits as they
    were. (On CUDA the device flags them and writes no statistics, as always.)"""
    if inplace and track is not None and tracker.device.type == "cpu":
        ids = track[2]
        if ids.numel() and bool((ids.min() < 0) | (ids.max() >= tracker.num_samples)):
            i = int(((ids < 0) | (ids >= tracker.num_samples)).nonzero()[0, 0])
            raise IndexError(f"memfast tracker: sample_ids[{i}] = {int(ids[i])} is out of range for a tracker of "
                             f"{tracker.num_samples} samples")


def _inplace_rows(input, logits, inplace_backward):
    """(whether the op writes the gradient over the rows, the rows it gets) for inplace_backward:
    only in eager mode with a gradient to compute and the compiled extension. input's own storage
    (<= 2-D) must be something an in-place op may write; [N, C, d...] rows that happen to be a view
    of input get a copy of their own."""
    inplace = (bool(inplace_backward) and torch.is_grad_enabled() and input.requires_grad
               and not torch.compiler.is_compiling())
    if not inplace:
        return False, logits
    if input.dim() <= 2:  # the rows are the caller's storage
        base = input._base if input._base is not None else input
        if base.is_leaf and base.requires_grad:
            what = "a view of a leaf" if base is not input else "a leaf"
            raise ValueError(f"memfast.cross_entropy: inplace_backward=True would write the gradient over input, which "
                             f"is {what} tensor that requires grad (a parameter, or made with requires_grad=True); "
                             "pass the model's output (or a clone), or leave inplace_backward off")
        # (non-contiguous logits: the op refuses them, check_inplace_logits)
    elif logits._is_view():
        logits = logits.clone(memory_format=torch.contiguous_format)
    # Without the compiled extension the gradient is allocated as usual (index targets have no
    # in-place path there; probability targets follow them), after the same refusals.
    return _ops._C is not None, logits


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, sample_ids=None, tracker=None,
                  adjustment=None, groups=None, inplace_backward=False, lse_square_scale=0.0, softcap=None):
    """Cross entropy with the semantics of ``torch.nn.functional.cross_entropy``.

    Extra keyword arguments:
      sample_ids, tracker: accumulate per-sample statistics into a
        :class:`memfast.SampleTracker` in the same pass. ``sample_ids`` has
        one id per row (the target's shape), or one id per leading index
        (e.g. ``[B]`` for ``[B*T]`` token rows: the tokens of a sequence add
        into its sample). Rows whose target is ``ignore_index`` are not
        tracked. A forward re-run inside a backward pass (activation
        checkpointing's recompute) is not tracked again. The tracked loss is
        the unsmoothed, unweighted cross entropy of the logits the loss sees
        (the adjusted ones when ``adjustment`` is given).
      adjustment, groups: an additive, constant shift of the logits:
        dense (the input's shape), a ``[C]`` vector for every row, or a table
        ``[A, C]`` gathered per row by ``groups`` (the target's shape).
        ``loss = CE(input + shift, target)``; no gradient flows into it.
      lse_square_scale: the z-loss (PaLM; Liger's and flash-attn's argument
        of this name): ``lse_square_scale * weight[target] * logsumexp(row)**2``
        is added to each row's loss inside the fused op (reduced with it; no
        extra pass), e.g. 1e-4. Not tracked: the tracker's loss stays the
        cross entropy.
      softcap: logit softcapping (Gemma 2's ``final_logit_softcapping``,
        e.g. 30.0; None: off): the loss sees ``softcap * tanh(input /
        softcap)`` (then the adjustment), computed inside the fused op (no
        extra pass or buffer; works with inplace_backward), and the gradient
        flows through the tanh. The tracker's statistics are those of the
        capped logits.
      Class-probability targets (floating point, the input's shape) give
        PyTorch's loss, fused on the CPU (with inplace_backward too; where
        PyTorch's own loss runs instead -- targets that require grad, CUDA
        for now -- it does not apply); a tracker records each row's
        statistics against its most probable class, and skips rows with no
        positive probability (all zeros).
      inplace_backward: write the gradient over ``input`` in the forward
        instead of allocating it (zero extra memory: for a [B*T, V] LM head
        that is the size of the logits). Afterwards ``input`` holds
        d loss / d input, so read anything else from it first; a backward
        that saved it (e.g. a hand-written z-loss on the same logits: use
        lse_square_scale instead) raises, as after any in-place op.
        Contiguous inputs only; a leaf (or a view of a leaf) that
        requires grad is refused, and so is a weight, adjustment or
        probability target that shares the input's memory. Only in eager
        mode with a gradient to compute: under torch.compile / torch.func
        the gradient is allocated as usual. [N, C, d...] inputs are copied
        to rows, so the copy gets it.
    """
    return _cross_entropy(input, target, weight, ignore_index, _legacy_reduction(size_average, reduce, reduction),
                          label_smoothing, sample_ids, tracker, adjustment, groups, inplace_backward, lse_square_scale,
                          softcap)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, sample_ids, tracker, adjustment,
                   groups, inplace_backward, lse_square_scale, softcap=None, track_in_backward=False):
    """cross_entropy's body. track_in_backward: track even inside a backward pass (tracker.update,
    an explicit call, e.g. from a hook); the loss itself skips it there (a checkpoint's recompute)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"memfast.cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (sample_ids is None) != (tracker is None):
        raise ValueError("memfast.cross_entropy: sample_ids and tracker must be given together")
    zeta = _check_lse_square_scale(lse_square_scale, "memfast.cross_entropy")
    cap = _check_softcap(softcap, "memfast.cross_entropy")
    ignore_index = _check_ignore_index(ignore_index, "memfast.cross_entropy")
    label_smoothing = _check_label_smoothing(label_smoothing, "memfast.cross_entropy")
    if isinstance(target, Tensor) and target.is_floating_point():
        return _probability_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, sample_ids,
                                          tracker, adjustment, groups, zeta, cap, track_in_backward, inplace_backward)
    logits, target_rows, weight, adjustment, groups_rows, target_shape, unbatched = _prepare(
        input, target, weight, ignore_index, label_smoothing, adjustment, groups)
    track = None
    if tracker is not None:
        ids = tracker._check_batch(logits, sample_ids, target_rows.numel())
        if track_in_backward or not _ops.in_backward():  # a checkpoint's recompute was tracked the first time
            track = (tracker.state, tracker.counters, ids, tracker._stat_rows)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    inplace, logits = _inplace_rows(input, logits, inplace_backward)
    _check_ids_before_writing(inplace, track, tracker)
    # The reduction happens inside the op: for the mean its gradient already
    # carries 1 / sum(weight[target]), so the usual backward has nothing to scale.
    dtype = _loss_dtype(input)
    loss, _ = _ops.cross_entropy(
        _ops.ops(input.device), logits, target_rows, weight, int(ignore_index), float(label_smoothing), adjustment,
        groups_rows, compute_grad, _REDUCTIONS.index(reduction), track, None if logits is input else input, inplace,
        dtype, zeta, cap)
    if reduction == "none":
        loss = loss.reshape(() if unbatched else target_shape)
    return loss if loss.dtype == dtype else loss.to(dtype)


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` with memfast's extras: an optional tracker (then
    call it as ``loss_fn(logits, target, sample_ids)``; a training call
    without sample_ids is not tracked and warns once), adjustment,
    inplace_backward, lse_square_scale and softcap (see memfast.cross_entropy)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, tracker=None, inplace_backward=False, lse_square_scale=0.0, softcap=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.tracker = tracker
        self.inplace_backward = inplace_backward
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self._warned_untracked = False

    def forward(self, input, target, sample_ids=None, *, adjustment=None, groups=None):
        if (self.tracker is not None and sample_ids is None and not self._warned_untracked
                and torch.is_grad_enabled() and input.requires_grad):
            self._warned_untracked = True  # evaluation calls (no gradient) leave ids out on purpose
            warnings.warn("memfast.CrossEntropyLoss has a tracker but got no sample_ids: this training step is not "
                          "tracked; call loss_fn(logits, target, sample_ids)", UserWarning,
                          stacklevel=_caller_stacklevel())
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing,
                             sample_ids=sample_ids if self.tracker is not None else None,
                             tracker=self.tracker if sample_ids is not None else None,
                             adjustment=adjustment, groups=groups, inplace_backward=self.inplace_backward,
                             lse_square_scale=self.lse_square_scale, softcap=self.softcap)
