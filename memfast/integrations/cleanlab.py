"""Label issues from training dynamics, in cleanlab's output convention.

cleanlab's `Datalab.get_issues("label")` returns one row per sample with
``is_label_issue``, ``label_score`` (in [0, 1], lower = more likely
mislabeled) and ``given_label``. :func:`label_issues` returns the same columns,
computed from a :class:`memfast.SampleTracker`'s statistics instead of
out-of-sample predicted probabilities, plus memfast's raw per-sample scores.
"""
import math

import numpy as np

# How each ranking score maps to cleanlab's label_score (in [0, 1], lower = more
# likely mislabeled). The ranking score itself is "higher = more suspicious".
#   name: (column the ranking uses, direction, label_score transform or None for rank-based)
_SCORES = {
    # mean loss per update; exp(-mean loss) = geometric mean of p(given label) over training.
    "csl": ("csl_mean", 1.0, lambda v: np.exp(-v)),
    "csl_mean": ("csl_mean", 1.0, lambda v: np.exp(-v)),
    "csl_sum": ("csl", 1.0, None),
    # mean of 1 - p(given label): label_score = mean p(given label) (cartography's confidence)
    "inconf": ("inconf_mean", 1.0, lambda v: 1.0 - v),
    "inconf_mean": ("inconf_mean", 1.0, lambda v: 1.0 - v),
    # fraction of updates where the given label was not the argmax: label_score = accuracy
    "cum_01_loss": ("cum_01_loss", 1.0, lambda v: 1.0 - v),
    # normalised learning time (1 = never learned)
    "learn_time": ("learn_time", 1.0, lambda v: 1.0 - v),
    # area under the margin: low margin = suspicious
    "aum": ("aum", -1.0, None),
    "forgetting": ("forgetting", 1.0, None),
    "loss_var": ("loss_var", 1.0, None),
    "inconf_final": ("inconf_final", 1.0, lambda v: 1.0 - v),
}
# Loss-valued scores are heavy-tailed (a few samples have very large losses); Otsu's
# split runs on log(1 + value) for them so that the tail does not take the split.
_LOG_FOR_OTSU = ("csl", "csl_mean", "csl_sum", "loss_var")


def _to_numpy(x):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(x)


def _scores_dict(scores):
    if hasattr(scores, "scores") and callable(scores.scores):  # a SampleTracker
        scores = scores.scores()
    if not isinstance(scores, dict):
        raise TypeError(f"label_issues: scores must be the dict from tracker.scores() (or a SampleTracker), got "
                        f"{type(scores)}")
    return {k: _to_numpy(v) for k, v in scores.items()}


def otsu_threshold(values):
    """Otsu's threshold on a 1-D sample, computed exactly (no histogram): the
    split of the sorted values into a low and a high group that maximises the
    between-group variance w0 * w1 * (mean1 - mean0)^2. Returns the midpoint
    between the two groups' nearest values (``values > threshold`` is the high
    group), or +inf when there are fewer than two distinct finite values."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    v = v[np.isfinite(v)]
    n = v.size
    if n < 2 or v[0] == v[-1]:
        return math.inf
    # Candidate split after position i (low = v[:i+1]); only between distinct values.
    csum = np.cumsum(v)
    n_low = np.arange(1, n, dtype=np.float64)
    n_high = n - n_low
    mean_low = csum[:-1] / n_low
    mean_high = (csum[-1] - csum[:-1]) / n_high
    between = n_low * n_high * (mean_high - mean_low) ** 2
    between[v[1:] == v[:-1]] = -1.0  # not a split: equal values on both sides
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def _rank_score(suspicion):
    """label_score from ranks: 1 for the least suspicious sample, 0 for the most
    (ties share their average rank; NaN stays NaN)."""
    out = np.full(suspicion.shape, np.nan)
    finite = np.isfinite(suspicion)
    v = suspicion[finite]
    if v.size == 0:
        return out
    if v.size == 1:
        out[finite] = 1.0
        return out
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    # average the ranks of ties
    uniq, inverse = np.unique(v, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    ranks = (sums / counts)[inverse]
    out[finite] = 1.0 - ranks / (v.size - 1)
    return out


def label_issues(scores, labels, *, score="csl", num_issues="otsu", pred_probs=None):
    """Flag likely label errors from training dynamics; cleanlab's output convention.

    Args:
      scores: the dict from ``tracker.scores()`` (or the ``SampleTracker``
        itself). With the default ``score="csl"`` the tracker must keep
        ``("csl", "count")`` (its default).
      labels: the given (possibly noisy) labels, ``[N]``.
      score: the training-dynamics score that ranks samples: ``"csl"``
        (cumulative sample loss per update, default), ``"csl_sum"`` (total,
        for trackers without ``count``), ``"inconf"``,
        ``"cum_01_loss"``, ``"learn_time"``, ``"aum"``, ``"forgetting"``,
        ``"loss_var"`` or ``"inconf_final"``.
      num_issues: how many samples to flag (the threshold rule):

        * ``"otsu"`` (default): split the ranking score's distribution in two
          with Otsu's rule (the cut maximising the between-group variance,
          :func:`otsu_threshold`) and flag the high-suspicion group. For the
          loss-valued scores (csl, loss_var) the split is made on
          ``log(1 + score)``: their few very large values would otherwise
          take the split alone. It assumes the data has label errors that
          training finds hard (they form the upper mode of CSL); on clean
          data it still flags a tail.
        * a float in ``[0, 1)``: an estimated noise rate; flag the
          ``round(rate * N)`` most suspicious samples.
        * an int ``>= 0``: flag that many.

      pred_probs: optional ``[N, C]`` predicted probabilities (e.g. from the
        final model); adds cleanlab's ``predicted_label`` column.

    Returns:
      a ``pandas.DataFrame`` in dataset order with columns ``is_label_issue``
      (bool), ``label_score`` (float in [0, 1], lower = more likely
      mislabeled; NaN for samples never seen), ``given_label``,
      ``predicted_label`` (with ``pred_probs``), then every per-sample score
      of the tracker (``csl``, ``count``, ...). ``df.attrs`` records
      ``score``, ``rule``, ``threshold`` (flagged = ranking score above it;
      the ranking score is ``-aum`` for aum) and ``num_issues``.

    The label_score for each ranking score: csl: ``exp(-csl_mean)``, the
    geometric mean over training of the probability of the given label;
    inconf: the mean probability of the given label (cartography's
    confidence); cum_01_loss: training accuracy; learn_time / inconf_final:
    ``1 - value``; aum, forgetting, loss_var: ``1 - rank / (N - 1)``.
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("label_issues needs pandas: pip install pandas (or pip install memfast[demo])") from None
    table = _scores_dict(scores)
    if score not in _SCORES:
        raise ValueError(f"label_issues: unknown score {score!r}; choose from {sorted(_SCORES)}")
    column, direction, transform = _SCORES[score]
    if column not in table:
        raise ValueError(f"label_issues: score {score!r} needs {column!r} in the tracker's scores, which has "
                         f"{sorted(table)}; create the tracker with the statistics it needs (e.g. stats='all')")
    value = np.asarray(table[column], dtype=np.float64)
    n = value.shape[0]
    given = _to_numpy(labels)
    if given.shape != (n,):
        raise ValueError(f"label_issues: labels must have shape ({n},) like the scores, got {given.shape}")
    if given.dtype.kind not in "iu":
        raise TypeError(f"label_issues: labels must be integer class indices, got dtype {given.dtype}")

    suspicion = direction * value  # higher = more likely mislabeled
    seen = np.isfinite(suspicion)
    if transform is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            label_score = np.clip(transform(value), 0.0, 1.0)
        label_score[~seen] = np.nan
    else:
        label_score = _rank_score(suspicion)

    flagged = np.zeros(n, dtype=bool)
    if isinstance(num_issues, str):
        if num_issues != "otsu":
            raise ValueError(f"label_issues: num_issues must be 'otsu', a noise rate in [0, 1) or a count; got "
                             f"{num_issues!r}")
        space = np.log1p(np.maximum(suspicion, 0.0)) if score in _LOG_FOR_OTSU else suspicion
        cut = otsu_threshold(space[seen])
        flagged[seen] = space[seen] > cut
        threshold = float(np.expm1(cut)) if score in _LOG_FOR_OTSU else cut
        rule = "otsu"
    else:
        if isinstance(num_issues, (bool, np.bool_)):
            raise TypeError("label_issues: num_issues must be 'otsu', a float noise rate or an int count")
        if isinstance(num_issues, (int, np.integer)):
            if num_issues < 0:
                raise ValueError(f"label_issues: num_issues must be >= 0, got {num_issues}")
            k, rule = int(num_issues), "count"
        elif isinstance(num_issues, (float, np.floating)):
            if not 0.0 <= num_issues < 1.0:
                raise ValueError(f"label_issues: a noise rate must be in [0, 1), got {num_issues}")
            k, rule = int(round(float(num_issues) * n)), "noise_rate"
        else:
            raise TypeError(f"label_issues: num_issues must be 'otsu', a float noise rate or an int count, got "
                            f"{type(num_issues)}")
        idx = np.flatnonzero(seen)
        k = min(k, idx.size)
        threshold = math.inf
        if k > 0:
            top = idx[np.argsort(-suspicion[idx], kind="stable")[:k]]
            flagged[top] = True
            threshold = float(suspicion[top].min())

    data = {"is_label_issue": flagged, "label_score": label_score, "given_label": given}
    if pred_probs is not None:
        probs = _to_numpy(pred_probs)
        if probs.ndim != 2 or probs.shape[0] != n:
            raise ValueError(f"label_issues: pred_probs must have shape ({n}, C), got {probs.shape}")
        data["predicted_label"] = probs.argmax(axis=1)
    for name, v in table.items():
        if name not in data and np.ndim(v) == 1 and len(v) == n:
            data[name] = v
    df = pd.DataFrame(data)
    df.attrs.update(score=score, rule=rule, threshold=threshold, num_issues=int(flagged.sum()))
    return df
