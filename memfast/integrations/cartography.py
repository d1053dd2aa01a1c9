"""Dataset cartography (Swayamdipta et al., 2020): each training sample placed
by the mean (confidence) and standard deviation (variability) of the
probability the model gave its label over training, coloured by how often it
was predicted correctly. Easy-to-learn samples sit top left, ambiguous ones to
the right, hard-to-learn ones (often mislabeled) bottom left.

The tracker keeps what the map needs when created with
``stats=("inconf", "ptrue_sq", "count", "correct")`` (or "all"):
``tracker.scores()`` then has ``confidence``, ``variability`` and ``accuracy``.
"""
import numpy as np

REGIONS = ("easy_to_learn", "ambiguous", "hard_to_learn")


def _to_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def cartography_table(scores):
    """The map's coordinates as NumPy arrays: confidence, variability,
    correctness (accuracy over training) and the region of each sample.

    Regions, by confidence in thirds: easy_to_learn above 2/3, hard_to_learn
    below 1/3, ambiguous between. The standard deviation of a probability
    with mean m is at most sqrt(m (1 - m)), so the high-variability samples
    the paper calls ambiguous are the middle band; fixed cuts keep the
    counts comparable across runs (a quantile split would put a third of
    any dataset in each region). "" for samples never seen."""
    if hasattr(scores, "scores") and callable(scores.scores):  # a SampleTracker
        scores = scores.scores()
    missing = [k for k in ("confidence", "variability", "accuracy") if k not in scores]
    if missing:
        raise ValueError(f"cartography needs {missing} in the scores; create the tracker with "
                         f"stats=('inconf', 'ptrue_sq', 'count', 'correct') or stats='all'")
    conf = _to_numpy(scores["confidence"]).astype(np.float64)
    var = _to_numpy(scores["variability"]).astype(np.float64)
    acc = _to_numpy(scores["accuracy"]).astype(np.float64)
    seen = np.isfinite(conf) & np.isfinite(var)
    region = np.full(conf.shape, "", dtype=object)
    region[seen] = "ambiguous"
    region[seen & (conf > 2 / 3)] = "easy_to_learn"
    region[seen & (conf < 1 / 3)] = "hard_to_learn"
    return {"confidence": conf, "variability": var, "correctness": acc, "region": region, "seen": seen}


def cartography_plot(scores, path, labels=None, noisy=None, *, title="Data map", max_points=20000, seed=0):
    """Draw the data map to ``path`` (any format matplotlib writes; rendered
    with Agg, without touching pyplot).

    Args:
      scores: ``tracker.scores()`` with confidence / variability / accuracy
        (or the tracker itself).
      path: the image file to write.
      labels: optional given labels ``[N]``: adds a panel with the share of
        each class in each region (which classes hold the hard-to-learn
        samples).
      noisy: optional boolean mask ``[N]`` of known (e.g. injected) label
        errors: drawn as red crosses, and the density panels split clean vs
        noisy.
      max_points: at most this many points are drawn (a seeded random subset;
        all noisy points are kept); the summary counts use every sample.

    Returns a summary dict: the number of samples per region and, with
    ``noisy``, the number of noisy samples per region.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend and figures alone.
    from matplotlib.figure import Figure

    table = cartography_table(scores)
    conf, var, acc, region, seen = (table[k] for k in ("confidence", "variability", "correctness", "region", "seen"))
    n = conf.shape[0]
    noisy_mask = None
    if noisy is not None:
        noisy_mask = _to_numpy(noisy).astype(bool)
        if noisy_mask.shape != (n,):
            raise ValueError(f"cartography_plot: noisy must be a boolean mask of shape ({n},), got {noisy_mask.shape}")
    given = None
    if labels is not None:
        given = _to_numpy(labels)
        if given.shape != (n,):
            raise ValueError(f"cartography_plot: labels must have shape ({n},), got {given.shape}")

    summary = {r: int((region == r).sum()) for r in REGIONS}
    summary["seen"] = int(seen.sum())
    if noisy_mask is not None:
        summary["noisy_per_region"] = {r: int(((region == r) & noisy_mask).sum()) for r in REGIONS}

    shown = np.flatnonzero(seen)
    if shown.size > max_points:
        rng = np.random.default_rng(seed)
        keep = rng.choice(shown, size=max_points, replace=False)
        if noisy_mask is not None:
            keep = np.union1d(keep, shown[noisy_mask[shown]])
        shown = np.sort(keep)

    panels = 2 + (given is not None)
    fig = Figure(figsize=(6 + 4 * (panels - 1), 5))
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": [3] + [2] * (panels - 1)})
    ax = axes[0]
    clean_shown = shown if noisy_mask is None else shown[~noisy_mask[shown]]
    sc = ax.scatter(var[clean_shown], conf[clean_shown], c=acc[clean_shown], cmap="viridis", vmin=0, vmax=1,
                    s=8, alpha=0.7, linewidths=0)
    if noisy_mask is not None:
        noisy_shown = shown[noisy_mask[shown]]
        ax.scatter(var[noisy_shown], conf[noisy_shown], marker="x", c="red", s=14, linewidths=0.8,
                   label=f"known label errors ({int(noisy_mask[seen].sum())})")
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(sc, ax=ax, label="correctness (fraction of updates predicted right)")
    ax.set_xlabel("variability (std of p(given label) over training)")
    ax.set_ylabel("confidence (mean p(given label) over training)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=-0.01)
    ax.set_title(f"{title}: {summary['seen']} samples")
    for y in (1 / 3, 2 / 3):
        ax.axhline(y, color="0.6", linewidth=0.6, linestyle="--")
    for text, y in (("easy-to-learn", 5 / 6), ("ambiguous", 1 / 2), ("hard-to-learn", 1 / 6)):
        ax.text(0.98, y, f"{text}\n{summary[text.replace('-', '_')]}", transform=ax.get_yaxis_transform(),
                ha="right", va="center", fontsize=9, color="0.25",
                bbox=dict(facecolor="white", alpha=0.7, edgecolor="none"))

    ax = axes[1]
    bins = np.linspace(0, 1, 31)
    if noisy_mask is None:
        ax.hist(conf[seen], bins=bins, alpha=0.6, label="confidence")
        ax.hist(acc[seen & np.isfinite(acc)], bins=bins, alpha=0.6, label="correctness")
    else:
        for mask, name, color in ((~noisy_mask, "clean", "tab:blue"), (noisy_mask, "noisy", "tab:red")):
            m = seen & mask
            ax.hist(conf[m], bins=bins, alpha=0.6, color=color, density=True, label=f"confidence, {name}")
    ax.set_xlabel("value" if noisy_mask is None else "confidence")
    ax.set_ylabel("samples" if noisy_mask is None else "density")
    ax.legend(fontsize=8)
    ax.set_title("confidence distribution" if noisy_mask is not None else "confidence and correctness")

    if given is not None:
        ax = axes[2]
        classes = np.unique(given[seen])
        bottom = np.zeros(len(classes))
        for r, color in zip(REGIONS, ("tab:green", "tab:orange", "tab:red")):
            share = np.array([((given == c) & (region == r)).sum() / max(((given == c) & seen).sum(), 1)
                              for c in classes])
            ax.bar([str(c) for c in classes], share, bottom=bottom, color=color, label=r.replace("_", "-"))
            bottom += share
        ax.set_xlabel("given label")
        ax.set_ylabel("share of the class's samples")
        ax.legend(fontsize=8)
        ax.set_title("regions per class")

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return summary
