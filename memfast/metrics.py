"""Evaluation metrics, in NumPy (no scikit-learn at import time).

Detection metrics take a score per sample (larger = more likely positive,
e.g. mislabeled) and binary labels; they match scikit-learn's
roc_auc_score, precision_recall_curve + auc, and roc_curve.
"""
import numpy as np


def _np(x, dtype=None):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _scores_labels(scores, labels):
    s = _np(scores, np.float64).reshape(-1)
    y = _np(labels).reshape(-1)
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0 / 1 or bool: 1 = positive, e.g. a mislabeled mask), got values "
                         f"{np.unique(y)[:5].tolist()}")
    y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.all() or not y.any():
        raise ValueError("labels must contain both positives and negatives")
    return s, y


def _curve(scores, labels):
    """Cumulative true / false positives at each distinct threshold, highest first."""
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(s[1:] != s[:-1])[0], s.size - 1]  # (not np.diff: inf - inf is NaN, not a tie)
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def roc_curve(scores, labels):
    tps, fps = _curve(scores, labels)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr


def auroc(scores, labels):
    """Area under the ROC curve (ties count one half)."""
    fpr, tpr = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def aupr(scores, labels):
    """Area under the precision-recall curve by the trapezoidal rule, as
    sklearn's ``auc(*precision_recall_curve(...)[1::-1])`` (the CSL code's AUPR)."""
    tps, fps = _curve(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    # sklearn stops once full recall is reached and appends (recall 0, precision 1).
    last = np.searchsorted(tps, tps[-1])
    precision = np.r_[precision[: last + 1][::-1], 1.0]
    recall = np.r_[recall[: last + 1][::-1], 0.0]
    area = np.sum((recall[:-1] - recall[1:]) * (precision[:-1] + precision[1:]) / 2)
    return float(abs(area))


def fpr_at_tpr(scores, labels, tpr=0.95):
    """False-positive rate at the first threshold whose true-positive rate reaches `tpr`."""
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.floating)) or not 0.0 <= tpr <= 1.0:
        raise ValueError(f"fpr_at_tpr: tpr must be a number in [0, 1], got {tpr!r}")
    f, t = roc_curve(scores, labels)
    return float(f[np.argmax(t >= tpr)])


def cosine(a, b):
    a, b = _np(a, np.float64).reshape(-1), _np(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def pearson(a, b):
    a, b = _np(a, np.float64).reshape(-1), _np(b, np.float64).reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _classes(pred):
    """Predicted classes [N] from logits [N, K] (K >= 2) or classes [N]."""
    p = _np(pred)
    if p.ndim == 2:
        if p.shape[1] == 1:
            raise ValueError("pred is [N, 1]: a single-logit (sigmoid) head's classes are (logit > 0); pass those")
        p = p.argmax(1)
    return p.reshape(-1)


def accuracy(pred, y):
    """Plain accuracy; `pred` may be logits [N, K] or predicted classes [N]."""
    p, y = _classes(pred), _np(y).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"pred and y differ in length: {p.shape[0]} vs {y.shape[0]}")
    return float((p == y).mean())


def group_accuracy(pred, y, groups):
    """{group: accuracy} over the groups present; `pred` logits or classes."""
    p, y, g = _classes(pred), _np(y).reshape(-1), _np(groups).reshape(-1)
    if not (p.shape == y.shape == g.shape):
        raise ValueError(f"pred, y and groups differ in length: {p.shape}, {y.shape}, {g.shape}")
    return {int(k): float((p[g == k] == y[g == k]).mean()) for k in np.unique(g)}


def worst_group_accuracy(pred, y, groups):
    """Minimum accuracy over the groups present (the XRM/MAT papers' WGA)."""
    return min(group_accuracy(pred, y, groups).values())


def theory_learning_time(grad_norms, tau=None):
    """The CSL paper's learning time (Sec. 5, Eq. 7), as its notebook computes it.

    grad_norms: [E, N] per-epoch input-gradient norms g[e, i] = ||grad_x L(w_e, z_i)||
    (e.g. the stacked returns of memfast.score_grad_norm, one call per epoch),
    or a list of E [N] vectors. The sample learning condition is the running mean
    cond[e, i] = mean of g[0..e, i]; tau defaults to the mean of cond over all
    epochs and samples; LT_i = 1 - mean_e 1[cond[e, i] < tau]. Returns an [N]
    float64 array in [0, 1]: larger = learned later (more memorized).
    """
    if isinstance(grad_norms, (list, tuple)):
        g = np.stack([_np(v, np.float64).reshape(-1) for v in grad_norms]) if grad_norms else np.zeros((0, 0))
    else:
        g = _np(grad_norms, np.float64)
    if g.ndim != 2 or g.shape[0] == 0:
        raise ValueError(f"theory_learning_time: grad_norms must be [epochs, samples] with at least one epoch, got "
                         f"shape {list(g.shape)}")
    if not np.isfinite(g).all():
        raise ValueError("theory_learning_time: grad_norms has NaN / inf entries (a sample not scored at some epoch?)")
    cond = np.cumsum(g, axis=0) / np.arange(1, g.shape[0] + 1)[:, None]
    threshold = cond.mean() if tau is None else float(tau)
    if not np.isfinite(threshold):
        raise ValueError(f"theory_learning_time: tau must be a finite number, got {tau!r}")
    return 1.0 - (cond < threshold).mean(axis=0)
