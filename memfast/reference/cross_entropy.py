"""Pure-PyTorch twins of every memfast op: the test oracle, and the backend
used when MEMFAST_BACKEND=reference or the compiled extension is missing.

Each function has exactly the signature and results of its op in
csrc/memfast.cpp; the math is written the plain way (whole-tensor ops).
"""
import math

import torch

from .._stats import COUNTER, COUNTERS, KERNEL_STATS, ROW, ROW_STATS

_S = {name: i for i, name in enumerate(KERNEL_STATS)}

# -1 outside a backward pass (a private torch API; where it is missing, the checkpoint rule is off)
current_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_targets(target, num_classes, ignore_index, who):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        raise IndexError(f"{who}: target {int(target[r])} (row {r}) is out of bounds for {num_classes} classes")


def _nonzero_times(c, s):
    """c * s with a zero c staying zero when s is inf (grad_coefficients in ce_math.h)."""
    return torch.where(c == 0, torch.zeros_like(c), c * s)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, compute_grad,
                      reduction, lse_square_scale=0.0, softcap=0.0):
    """The loss (per row for reduction 0, else the mean (1) or sum (2)), per-row
    statistics [5, R] and (when compute_grad) d loss / d logits. lse_square_scale
    adds the z-loss lse_square_scale * weight[target] * lse^2 to each row's loss;
    softcap > 0 replaces the logits by softcap * tanh(logits / softcap) first."""
    return _forward(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, compute_grad,
                    reduction, lse_square_scale, softcap, validate=True)


def cross_entropy_fwd_(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, reduction,
                       lse_square_scale=0.0, softcap=0.0):
    """cross_entropy_fwd with the gradient written over the logits (contiguous [R, C]), which are
    then the gradient; returns the loss and the row statistics."""
    _check_inplace_logits(logits, target=target, weight=weight, adjustment=adjustment, groups=groups)
    loss, row_stats, grad = cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, adjustment,
                                              groups, True, reduction, lse_square_scale, softcap)
    logits.copy_(grad)
    return loss, row_stats


def _check_inplace_logits(logits, **inputs):
    """The kernels' checks of logits the gradient is written over (csrc/common/checks.h): contiguous
    [R, C], and no other input sharing their memory (the kernels read it while writing)."""
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError("memfast.cross_entropy: inplace_backward=True writes the gradient into the logits, which "
                         f"must be contiguous [rows, classes]; got sizes {list(logits.shape)} and strides "
                         f"{list(logits.stride())} (call .contiguous() first, or leave inplace_backward off)")
    if logits.device.type == "cuda" and logits.numel() and logits.data_ptr() % 16:
        raise ValueError("memfast.cross_entropy: inplace_backward=True on CUDA needs 16-byte-aligned logits (an "
                         "offset view is not); call .clone() first, or leave inplace_backward off")
    storage = logits.untyped_storage().data_ptr()
    for name, t in inputs.items():
        if t is not None and t.numel() and t.untyped_storage().data_ptr() == storage:
            raise ValueError(f"memfast.cross_entropy: inplace_backward=True writes the gradient into the logits, and "
                             f"{name} shares their memory; pass a copy of it (.clone()), or leave inplace_backward "
                             "off")


def cross_entropy_grad(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, reduction,
                       lse_square_scale=0.0, softcap=0.0):
    """d loss / d logits as a differentiable function of the logits (create_graph,
    torch.func); the indices were validated by the forward, and no host reads
    here keep it usable under vmap."""
    return _forward(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, True, reduction,
                    lse_square_scale, softcap, validate=False)[2]


def _check_common(logits, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale, softcap):
    """(zeta, cap) after the checks both forward ops make of their arguments (csrc/common/checks.h's
    check_common_forward_args)."""
    if logits.dim() != 2:
        raise ValueError(f"memfast.cross_entropy: logits must be 2-D [rows, classes], got {logits.dim()}-D")
    if not logits.is_floating_point():
        raise ValueError(f"memfast.cross_entropy: logits must be floating point, got {logits.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"memfast.cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    dtype, (R, C) = logits.dtype, logits.shape
    acc = _acc_dtype(dtype)
    if weight is not None and (weight.shape != (C,) or weight.dtype != acc or weight.device != logits.device):
        raise ValueError(f"memfast.cross_entropy: weight must be a contiguous {acc} vector of {C} entries on "
                         f"{logits.device}")
    if adjustment is not None:
        if adjustment.dim() != 2 or adjustment.shape[1] != C or adjustment.dtype != acc \
                or adjustment.device != logits.device:
            raise ValueError(f"memfast.cross_entropy: adjustment must be a {acc} [rows or groups, {C}] tensor on "
                             f"{logits.device}, got {list(adjustment.shape)} {adjustment.dtype}")
        if groups is None and adjustment.shape[0] != R:
            raise ValueError(f"memfast.cross_entropy: a dense adjustment needs one row per logits row ({R}), got "
                             f"{adjustment.shape[0]}")
    if groups is not None:
        if adjustment is None:
            raise ValueError("memfast.cross_entropy: groups needs an adjustment table")
        if groups.shape != (R,) or groups.dtype != torch.int64 or groups.device != logits.device:
            raise ValueError(f"memfast.cross_entropy: groups must be a contiguous int64 vector with one entry per "
                             f"row ({R}) on {logits.device}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"memfast.cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    zeta = float(lse_square_scale)
    if not (math.isfinite(zeta) and zeta >= 0):
        raise ValueError(f"memfast.cross_entropy: lse_square_scale must be finite and >= 0, got {lse_square_scale}")
    cap = float(softcap)
    tiny = torch.finfo(_acc_dtype(dtype)).tiny  # the kernels compute in acc and multiply by 1 / softcap
    if not (cap == 0 or tiny <= cap <= 1 / tiny):
        raise ValueError(f"memfast.cross_entropy: softcap must be 0 (off) or in [{tiny}, {1 / tiny}] for "
                         f"{dtype} logits, got {softcap}")
    return zeta, cap


def _loss_logits(logits, adjustment, groups, cap, validate):
    """The logits the loss sees, in the accumulation dtype: capped, then shifted; and the cap's
    slope d capped / d logits (None without a cap)."""
    z = logits.to(_acc_dtype(logits.dtype))
    slope = None
    if cap > 0:  # Gemma 2's final_logit_softcapping; d/dz cap tanh(z / cap) = 1 - tanh^2 = 4e / (1 + e)^2
        u = z / cap
        e = torch.exp(-2 * u.abs())
        slope = 4 * e / (1 + e) ** 2
        z = cap * torch.tanh(u)
    if adjustment is not None:
        if groups is not None:
            if validate and z.shape[0] and ((groups < 0) | (groups >= adjustment.shape[0])).any():
                raise IndexError("memfast.cross_entropy: groups is out of bounds for the adjustment table")
            z = z + adjustment.to(z.dtype)[groups]
        else:
            z = z + adjustment.to(z.dtype)
    return z, slope


def _forward(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, compute_grad, reduction,
             lse_square_scale, softcap, validate):
    zeta, cap = _check_common(logits, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale,
                              softcap)
    acc = _acc_dtype(logits.dtype)
    R, C = logits.shape
    if validate:
        _check_targets(target, C, ignore_index, "memfast.cross_entropy")
    z, slope = _loss_logits(logits, adjustment, groups, cap, validate)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=z.device)
    if R == 0:
        grad = logits.new_empty((0, C) if compute_grad else (0, 0))
        loss = z.new_empty(0) if reduction == 0 else z.new_tensor(math.nan if reduction == 1 else 0.0)
        return loss, z.new_empty((len(ROW), 0)), grad
    m = z.max(1).values
    e = torch.exp(z - m[:, None])
    s = e.sum(1)
    log_sum = torch.log(s)
    lse = m + log_sum
    z_y = z.gather(1, y[:, None])[:, 0]
    w_y = torch.where(valid, w[y], torch.zeros_like(lse))
    eps = float(label_smoothing)
    # lse - z_y as log_softmax forms it: z_y - m is exact nearby, m + log_sum is rounded to ulp(m)
    loss = w_y * (log_sum - (z_y - m))
    if eps > 0:
        smooth = w.sum() * log_sum - ((z - m[:, None]) * w).sum(1)
        loss = (1 - eps) * loss + eps / C * smooth
    if zeta > 0:  # the z-loss, weighted like the row (zero for a zero weight, however large lse)
        loss = loss + _nonzero_times(w_y, zeta * lse * lse)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    # For the largest other logit and correctness a NaN logit counts as -inf, and a NaN target
    # logit is never correct (the kernels' comparisons; the loss of such a row is NaN anyway).
    z_num = torch.where(z.isnan(), torch.full_like(z, -math.inf), z)
    if C > 1:
        others = z_num.scatter(1, y[:, None], -math.inf)
        max_other = others.max(1).values
    else:
        max_other = torch.full_like(lse, -math.inf)
    correct = ((z_num.argmax(1) == y) & ~z_y.isnan()).to(acc)
    # Ignored rows: zeros everywhere (the tracker skips them by target).
    row_stats = torch.stack([log_sum, z_y, max_other, w_y, correct])
    row_stats = torch.where(valid[None], row_stats, torch.zeros_like(row_stats))
    grad_scale = z.new_ones(())
    if reduction == 1:
        den = w_y.sum()
        grad_scale = 1 / den
        loss = loss.sum() / den
    elif reduction == 2:
        loss = loss.sum()
    if not compute_grad:
        return loss, row_stats, logits.new_empty((0, 0))
    p = e / s[:, None]
    scale_p = (1 - eps) * w_y + eps / C * w.sum()
    if zeta > 0:  # d(zeta w_y lse^2) / dz_c = 2 zeta w_y lse p_c
        scale_p = scale_p + _nonzero_times(w_y, 2 * zeta * lse)
    scale_p = _nonzero_times(scale_p, grad_scale)
    eps_w = _nonzero_times(z.new_tensor(eps / C), grad_scale)
    target_w = _nonzero_times((1 - eps) * w_y, grad_scale)
    g = p * scale_p[:, None] - eps_w * w[None, :]
    is_target = torch.arange(C, device=z.device) == y[:, None]  # not one_hot: it reads y on the host (vmap)
    g = g - is_target.to(acc) * target_w[:, None]
    if slope is not None:
        g = g * slope
    g = torch.where(valid[:, None], g, torch.zeros_like(g))
    return loss, row_stats, g.to(logits.dtype)


def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, adjustment, groups, compute_grad, reduction,
                           lse_square_scale=0.0, softcap=0.0):
    """Cross entropy against class probabilities ([R, C], the logits' dtype or their
    accumulation dtype) with F.cross_entropy's semantics: loss = -sum_c w_c t'_c log p_c,
    t' = (1 - eps) t + eps / C, the mean over rows; the z-loss lse_square_scale * lse^2 for rows
    with target mass. Returns the loss, cross_entropy_fwd's row statistics against each row's
    first most probable class (label; -100 for a row with no positive mass or a NaN target,
    whose statistics are zero), label, and (when compute_grad) d loss / d logits."""
    zeta, cap = _check_common(logits, weight, label_smoothing, adjustment, groups, reduction, lse_square_scale,
                              softcap)
    acc = _acc_dtype(logits.dtype)
    if (logits.dim() != 2 or tuple(target.shape) != tuple(logits.shape)
            or target.dtype not in (logits.dtype, acc)):
        raise ValueError(f"memfast.cross_entropy: class-probability targets must have the logits' shape "
                         f"{list(logits.shape)} and their dtype {logits.dtype} or {acc}, got "
                         f"{list(target.shape)} {target.dtype}")
    return _prob_forward(logits, target, weight, label_smoothing, adjustment, groups, compute_grad, reduction, zeta,
                         cap, validate=True)


def cross_entropy_prob_fwd_(logits, target, weight, label_smoothing, adjustment, groups, reduction,
                            lse_square_scale=0.0, softcap=0.0):
    """cross_entropy_prob_fwd with the gradient written over the logits (contiguous [R, C], sharing
    no memory with the other inputs); returns the loss, the row statistics and the labels."""
    _check_inplace_logits(logits, target=target, weight=weight, adjustment=adjustment, groups=groups)
    loss, row_stats, label, grad = cross_entropy_prob_fwd(logits, target, weight, label_smoothing, adjustment,
                                                          groups, True, reduction, lse_square_scale, softcap)
    logits.copy_(grad)
    return loss, row_stats, label


def cross_entropy_prob_grad(logits, target, weight, label_smoothing, adjustment, groups, reduction,
                            lse_square_scale=0.0, softcap=0.0):
    """cross_entropy_prob_fwd's d loss / d logits as a differentiable function of the logits."""
    return _prob_forward(logits, target, weight, label_smoothing, adjustment, groups, True, reduction,
                         float(lse_square_scale), float(softcap), validate=False)[3]


def _prob_forward(logits, target, weight, label_smoothing, adjustment, groups, compute_grad, reduction, zeta, cap,
                  validate):
    R, C = logits.shape
    z, slope = _loss_logits(logits, adjustment, groups, cap, validate)
    t = target.to(z.dtype)
    if C:
        top = t.max(1).values  # NaN propagates: a NaN target is not tracked
        has_mass = top > 0
        label = torch.where(has_mass, t.argmax(1), -100)
        # the statistics of index targets against the label (the rows without one: zeros)
        row_stats = _forward(logits, label, None, -100, 0.0, adjustment, groups, False, 0, 0.0, cap,
                             validate=False)[1]
    else:  # no classes: nothing to track, a loss of 0 per row (PyTorch's)
        has_mass = torch.zeros(R, dtype=torch.bool, device=t.device)
        label = torch.full((R,), -100, dtype=torch.long, device=t.device)
        row_stats = z.new_zeros((len(ROW), R))
    row_stats[ROW["weight"]] = 1  # every row counts in the mean
    eps = float(label_smoothing)
    w = weight.to(z.dtype) if weight is not None else torch.ones(C, dtype=z.dtype, device=z.device)
    wt = w * ((1 - eps) * t + (eps / C if C else 0.0))
    log_p = torch.log_softmax(z, 1)
    loss = -(wt * log_p).sum(1)
    lse = torch.logsumexp(z, 1)
    if zeta > 0:
        loss = loss + torch.where(has_mass, zeta * lse * lse, torch.zeros_like(lse))
    grad_scale = 1.0 / R if reduction == 1 and R else 1.0
    if reduction == 1:  # PyTorch's: over input.numel() / C rows (NaN for no rows or no classes)
        loss = loss.sum() / R if R and C else z.new_tensor(math.nan)
    elif reduction == 2:
        loss = loss.sum()
    if not compute_grad:
        return loss, row_stats, label, logits.new_empty((0, 0))
    scale_p = wt.sum(1)
    if zeta > 0:
        scale_p = scale_p + torch.where(has_mass, 2 * zeta * lse, torch.zeros_like(lse))
    g = (torch.softmax(z, 1) * scale_p[:, None] - wt) * grad_scale
    if slope is not None:
        g = g * slope
    return loss, row_stats, label, g.to(logits.dtype)


def cross_entropy_bwd(grad, grad_loss):
    acc = _acc_dtype(grad.dtype)
    g = grad.to(acc)
    # A zero stays zero (ignored rows) even when grad_loss is inf/NaN, e.g. a mean over no rows.
    s = grad_loss.to(acc).reshape(-1, 1) if grad_loss.dim() else grad_loss.to(acc)
    return torch.where(g == 0, torch.zeros_like(g), g * s).to(grad.dtype)


def cross_entropy_bwd_(grad, grad_loss):
    # The kernels scale the gradient row by row while still reading grad_loss (checks.h).
    if grad_loss.numel() and grad_loss.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr():
        raise ValueError("memfast.cross_entropy backward: grad_loss shares the memory of the gradient that the "
                         "in-place backward overwrites; pass a copy of it (.clone())")
    grad.copy_(cross_entropy_bwd(grad, grad_loss))


def track_unless_backward_(state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows):
    """track_, unless autograd is running a backward pass on this thread (activation
    checkpointing's recompute of a compiled loss)."""
    if current_graph_task_id() == -1:
        track_(state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows)


def _check_track_args(state, counters, row_stats, target, sample_ids, stat_rows):
    """The kernels' check_track_args (csrc/common/checks.h): everything is checked before anything is written."""
    if state.dim() != 2 or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("memfast tracker: state must be a contiguous float32 [stats, samples] tensor")
    if counters.shape != (len(COUNTERS),) or counters.dtype != torch.int64 or not counters.is_contiguous():
        raise ValueError(f"memfast tracker: counters must be a contiguous int64 vector of {len(COUNTERS)} entries")
    if len(stat_rows) != len(KERNEL_STATS):
        raise ValueError(f"memfast tracker: stat_rows must have {len(KERNEL_STATS)} entries")
    for s, row in enumerate(stat_rows):
        if not -1 <= row < state.shape[0]:
            raise ValueError(f"memfast tracker: stat_rows[{s}] = {row} does not name a row of the state")
    R = target.numel()
    if (row_stats.shape != (len(ROW_STATS), R) or not row_stats.is_contiguous()
            or row_stats.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"memfast tracker: row_stats must be a contiguous [{len(ROW_STATS)}, {R}] float32 or "
                         f"float64 tensor (the forward's), got {row_stats.dtype}")
    if target.dim() != 1 or target.dtype != torch.int64 or not target.is_contiguous():
        raise ValueError("memfast tracker: target must be a contiguous int64 vector")
    if sample_ids.dim() != 1 or sample_ids.dtype != torch.int64 or not sample_ids.is_contiguous():
        raise ValueError("memfast tracker: sample_ids must be a contiguous int64 vector")
    if not (sample_ids.numel() == R or (sample_ids.numel() > 0 and R % sample_ids.numel() == 0)):
        raise ValueError(f"memfast tracker: sample_ids has {sample_ids.numel()} entries, which must equal or divide "
                         f"the {R} rows")
    for t in (counters, row_stats, target, sample_ids):
        if t.device != state.device:
            raise ValueError(f"memfast tracker: the tracker is on {state.device} but an input is on {t.device}")


def track_(state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows):
    """Scatter per-row statistics into a tracker's [S, N] state by sample id.

    Sums add over every finite row (repeated ids add); per-sample state
    (latest loss, correctness transitions) comes from each sample's last
    finite row in the batch; non-finite rows only count in `nonfinite`.
    """
    _check_track_args(state, counters, row_stats, target, sample_ids, stat_rows)
    N = state.shape[1]
    R = target.numel()
    if sample_ids.numel() and ((sample_ids < 0) | (sample_ids >= N)).any():
        i = int(((sample_ids < 0) | (sample_ids >= N)).nonzero()[0, 0])
        raise IndexError(f"memfast tracker: sample_ids[{i}] = {int(sample_ids[i])} is out of range "
                         f"for a tracker of {N} samples")
    _check_targets(target, num_classes, ignore_index, "memfast tracker")
    counters[COUNTER["calls"]] += 1
    if R == 0:
        return

    def row(name):
        r = stat_rows[_S[name]]
        return state[r] if r >= 0 else None

    ids = sample_ids.repeat_interleave(R // sample_ids.numel())
    # nll = lse - z_y and the margin in the statistics' own type (fp64 ones subtracted before rounding),
    # with the row max m = max(z_y, max_other) as the kernels form them (a NaN in either: nll NaN)
    log_sum, z_y, max_other = row_stats[ROW["log_sum"]], row_stats[ROW["target_logit"]], row_stats[ROW["max_other"]]
    m = torch.where(z_y >= max_other, z_y, max_other)
    nll = (log_sum - (z_y - m)).float()
    max_prob = torch.exp(-log_sum.float())  # exp(m - lse): the top class's probability
    margin = torch.where(max_other == -math.inf, torch.zeros_like(nll), (z_y - max_other).float())
    correct = row_stats[ROW["correct"]].float()
    valid = target != ignore_index
    finite = torch.isfinite(nll)
    if row("nonfinite") is not None:
        bad = valid & ~finite
        row("nonfinite").index_add_(0, ids[bad], torch.ones_like(nll[bad]))
    keep = valid & finite
    ids, nll, max_prob, margin, correct = (t[keep] for t in (ids, nll, max_prob, margin, correct))
    p_true = torch.exp(-nll)
    for name, v in (("csl", nll), ("count", torch.ones_like(nll)), ("loss_sq", nll * nll),
                    ("inconf", 1 - p_true), ("ptrue_sq", p_true * p_true), ("margin", margin),
                    ("correct", correct)):
        if row(name) is not None:
            row(name).index_add_(0, ids, v)
    if ids.numel() == 0:
        return
    uniq, inverse = torch.unique(ids, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=ids.device)
    last.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), "amax")
    for name, v in (("last_loss", nll), ("last_maxprob", max_prob)):
        if row(name) is not None:
            row(name)[uniq] = v[last]
    if row("last_update") is not None:
        row("last_update")[uniq] = float(counters[COUNTER["calls"]])
    last_correct = row("last_correct")
    if last_correct is not None:
        c = correct[last]
        before = last_correct[uniq]
        if row("forgetting") is not None:
            row("forgetting").index_add_(0, uniq, ((before == 1) & (c == 0)).float())
        if row("learned_epoch") is not None:
            epoch = float(counters[COUNTER["epoch"]])
            cur = row("learned_epoch")[uniq]
            new = torch.where(c == 0, torch.full_like(cur, -1.0),
                              torch.where(before != 1, torch.full_like(cur, epoch), cur))
            row("learned_epoch")[uniq] = new
        last_correct[uniq] = c
