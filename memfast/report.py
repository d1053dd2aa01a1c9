"""Tables and plots of memorization proxies: `memfast.report` (the functions)
and `memfast report TRACKER.pt --labels LABELS` (the command).

Every proxy is oriented so that larger = more likely memorized / mislabeled
(e.g. ``-aum``, ``1 - accuracy``). A proxy is a [N] float NumPy array, or None
when it was not computed (shown as "n/a").

    scores = tracker.scores()
    proxies = memfast.report.proxies(scores)
    rows = memfast.report.detection_table(proxies, noisy=noisy_mask)
    print(memfast.report.format_table(rows))
    memfast.report.write_report("out", proxies, rows, given_labels=labels, noisy=noisy_mask)
"""
import csv
import json
import math
import os

import numpy as np

from . import metrics

# (key, table label, tracker score, orientation sign). The key names the
# column of scores.csv and the entry of summary.json.
TRACKER_PROXIES = (
    ("inconf_true", "in-confidence (true class)", "inconf_final", 1.0),
    ("inconf_max", "in-confidence (max class)", "inconf_max", 1.0),
    ("final_loss", "final loss", "last_loss", 1.0),
    ("learn_time", "learning time", "learn_time", 1.0),
    ("forgetting", "forgetting events", "forgetting", 1.0),
    ("cum_01_loss", "cumulative accuracy (1 - acc)", "cum_01_loss", 1.0),
    ("neg_aum", "AUM (-aum)", "aum", -1.0),
)
# Every row the demo prints, in order.
ROWS = (
    ("csl_free", "CSL (free)"),
    ("csl_eval", "CSL (eval)"),
    ("curvature", "input curvature"),
    ("loss_sensitivity", "loss sensitivity (grad norm)"),
    *((key, label) for key, label, _, _ in TRACKER_PROXIES),
    ("learn_time_theory", "learning time (theory, Eq. 7)"),
    ("confident_learning", "confident learning"),
)
LABELS = dict(ROWS)
LABELS["csl"] = "CSL"
METRICS = ("mislabeled_auroc", "mislabeled_aupr", "mislabeled_fpr95", "duplicate_auroc")
_HEADERS = ("mislabeled AUROC", "AUPR", "FPR@95%TPR", "duplicates AUROC")


def label_issues(scores, labels, **kwargs):
    """Label issues in cleanlab's convention (a pandas DataFrame); see
    memfast.integrations.cleanlab.label_issues."""
    from .integrations.cleanlab import label_issues as _label_issues

    return _label_issues(scores, labels, **kwargs)


def _numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _usable(x):
    """None for a missing proxy or one never computed (all NaN, e.g. curvature
    before any scoring pass)."""
    x = _numpy(x)
    return None if x is None or x.size == 0 or np.isnan(x).all() else x


def proxies(scores, eval_scores=None, curvature=None, confident_learning=None, csl_key="csl", *,
            loss_sensitivity=None, theory_learning_time=None):
    """The proxy table's inputs, oriented larger = more memorized.

    scores: ``tracker.scores()`` of the tracker in the loss (free statistics).
    eval_scores: ``scores()`` of a tracker fed by an eval-mode pass (CSL (eval)).
    curvature: [N] input curvature (default: ``scores["curv"]`` when kept).
    confident_learning: [N] confident-learning score.
    csl_key: the key of the first row; "csl_free" in the demo, "csl" for a
      single saved tracker.
    loss_sensitivity: [N] mean input-gradient norm over training (default:
      ``scores["grad_norm"]`` when kept).
    theory_learning_time: [N] ``memfast.metrics.theory_learning_time`` of the
      per-epoch input-gradient norms.
    """
    out = {csl_key: _usable(scores.get("csl"))}
    if csl_key == "csl_free" or eval_scores is not None:
        out["csl_eval"] = _usable(eval_scores.get("csl")) if eval_scores is not None else None
    if curvature is None:
        curvature = scores.get("curv")
        if curvature is None and eval_scores is not None:
            curvature = eval_scores.get("curv")
    out["curvature"] = _usable(curvature)
    if loss_sensitivity is None:
        loss_sensitivity = scores.get("grad_norm")
        if loss_sensitivity is None and eval_scores is not None:
            loss_sensitivity = eval_scores.get("grad_norm")
    out["loss_sensitivity"] = _usable(loss_sensitivity)
    for key, _, name, sign in TRACKER_PROXIES:
        value = _usable(scores.get(name))
        out[key] = None if value is None else sign * value
    out["learn_time_theory"] = _usable(theory_learning_time)
    out["confident_learning"] = _usable(confident_learning)
    return out


def _mask(mask, n, name):
    if mask is None:
        return None
    m = _numpy(mask).astype(bool)
    if m.shape[0] != n:
        raise ValueError(f"{name} has {m.shape[0]} entries, the scores have {n}")
    return m


def _num_samples(proxy_dict):
    sizes = {v.shape[0] for v in proxy_dict.values() if v is not None}
    if len(sizes) > 1:
        raise ValueError(f"proxies differ in length: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def _detect(score, positives, keep):
    """(AUROC, AUPR, FPR@95%TPR) of `score` for `positives` over the samples in `keep`."""
    s, y = score[keep], positives[keep]
    if np.isnan(s).any() or y.all() or not y.any():
        return None, None, None
    return metrics.auroc(s, y), metrics.aupr(s, y), metrics.fpr_at_tpr(s, y, 0.95)


def detection_table(proxy_dict, noisy=None, duplicates=None):
    """One row per proxy: AUROC, AUPR and FPR at 95% TPR for finding the noisy
    samples, AUROC for finding the duplicates (None where not computable).

    The two tasks are scored separately: mislabeled detection over the samples
    that are not duplicates, duplicate detection over the samples that are not
    noisy (the CSL paper runs them as separate experiments).
    """
    n = _num_samples(proxy_dict)
    noisy, duplicates = _mask(noisy, n, "noisy"), _mask(duplicates, n, "duplicates")
    rows = []
    for key, score in proxy_dict.items():
        row = {"key": key, "proxy": LABELS.get(key, key)}
        row.update(dict.fromkeys(METRICS))
        if score is not None and noisy is not None:
            keep = ~duplicates if duplicates is not None else np.ones(n, bool)
            row["mislabeled_auroc"], row["mislabeled_aupr"], row["mislabeled_fpr95"] = _detect(score, noisy, keep)
        if score is not None and duplicates is not None:
            keep = ~noisy if noisy is not None else np.ones(n, bool)
            row["duplicate_auroc"] = _detect(score, duplicates, keep)[0]
        rows.append(row)
    return rows


def mislabeled(scores, noisy, duplicates=None, **proxy_kwargs):
    """The detection table straight from ``tracker.scores()`` and a mask of
    known mislabeled samples (see proxies() for the optional inputs)."""
    return detection_table(proxies(scores, **proxy_kwargs), noisy, duplicates)


def aggregate(tables):
    """Mean ± std (ddof=1) over seeds of tables with the same rows. Each metric
    becomes {"mean", "std", "values"}; a metric missing in any seed is None."""
    out = []
    tables = list(tables)
    if len({len(rows) for rows in tables}) > 1:
        raise ValueError(f"tables differ in their number of rows: {[len(rows) for rows in tables]}")
    for rows in zip(*tables):
        keys = {r["key"] for r in rows}
        if len(keys) != 1:
            raise ValueError(f"tables differ in their rows: {sorted(keys)}")
        agg = {"key": rows[0]["key"], "proxy": rows[0]["proxy"]}
        for m in METRICS:
            values = [r[m] for r in rows]
            if any(v is None for v in values):
                agg[m] = None
            else:
                agg[m] = {"mean": float(np.mean(values)),
                          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                          "values": [float(v) for v in values]}
        out.append(agg)
    return out


def _cell(value):
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        if len(value["values"]) > 1:
            return f"{value['mean']:.4f} ± {value['std']:.4f}"
        value = value["mean"]
    return f"{value:.4f}"


def format_table(rows):
    """A plain-text table of detection_table() or aggregate() rows."""
    cells = [[r["proxy"]] + [_cell(r[m]) for m in METRICS] for r in rows]
    header = ["proxy (larger = more memorized)", *_HEADERS]
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
    line = lambda c: "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])  # noqa: E731
                               for i in range(len(c)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


def distribution_table(proxy_dict):
    """Without a ground-truth mask: the distribution of each proxy."""
    header = ["proxy", "mean", "median", "p95", "max"]
    cells = []
    for key, s in proxy_dict.items():
        if s is None:
            cells.append([LABELS.get(key, key)] + ["n/a"] * 4)
        else:
            s = s[~np.isnan(s)]
            cells.append([LABELS.get(key, key)] + [f"{v:.4g}" for v in
                                                   (s.mean(), np.median(s), np.quantile(s, 0.95), s.max())])
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
    line = lambda c: "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])  # noqa: E731
                               for i in range(len(c)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


# ----------------------------------------------------------------------- files
def write_scores_csv(path, proxy_dict, given_labels=None, true_labels=None, noisy=None, duplicates=None):
    """One row per sample: id, label (true), given_label, is_noisy, is_duplicate,
    then every proxy (empty where n/a)."""
    n = _num_samples(proxy_dict) or len(given_labels)
    cols = {"id": np.arange(n)}
    for name, values in (("label", true_labels), ("given_label", given_labels)):
        if values is not None:
            cols[name] = _numpy(values).astype(np.int64)
    for name, values in (("is_noisy", noisy), ("is_duplicate", duplicates)):
        if values is not None:
            cols[name] = _mask(values, n, name).astype(np.int64)
    for name, values in cols.items():
        if values.shape[0] != n:
            raise ValueError(f"{name} has {values.shape[0]} entries, the scores have {n}")
    keys = list(proxy_dict)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(cols) + keys)
        proxy_cols = [proxy_dict[k] for k in keys]
        for i in range(n):
            w.writerow([int(c[i]) for c in cols.values()]
                       + ["" if p is None else repr(float(p[i])) for p in proxy_cols])


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_summary_json(path, rows, **extra):
    with open(path, "w") as f:
        json.dump(_json_safe({**extra, "rows": rows}), f, indent=2)
        f.write("\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _available(proxy_dict):
    return [(k, v) for k, v in proxy_dict.items() if v is not None]


def plot_histograms(path, proxy_dict, noisy=None, duplicates=None, bins=40):
    """Histogram of every proxy, clean / noisy / duplicate samples apart, on a
    log count axis (the long tail)."""
    plt = _plt()
    items = _available(proxy_dict)
    n = _num_samples(proxy_dict)
    noisy, duplicates = _mask(noisy, n, "noisy"), _mask(duplicates, n, "duplicates")
    cols = min(4, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    clean = np.ones(n, bool)
    for m in (noisy, duplicates):
        if m is not None:
            clean &= ~m
    groups = [("clean", clean, "tab:blue"), ("noisy", noisy, "tab:red"), ("duplicate", duplicates, "tab:orange")]
    for ax, (key, s) in zip(axes.flat, items):
        finite = np.isfinite(s)
        edges = np.histogram_bin_edges(s[finite], bins=bins) if finite.any() else np.linspace(0, 1, bins + 1)
        for name, m, color in groups:
            if m is not None and m.any():
                counts, _ = np.histogram(s[m & finite], bins=edges)
                # one step outline per group: far cheaper to draw than ax.hist's bars
                ax.stairs(np.where(counts > 0, counts, np.nan), edges, color=color, lw=1.2, label=name)
        ax.set_yscale("log")
        ax.set_title(LABELS.get(key, key), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if items:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("proxy histograms (count, log scale)", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.9, wspace=0.3, hspace=0.5)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_roc(path, proxy_dict, noisy=None, duplicates=None):
    """ROC curves of every proxy: mislabeled detection and duplicate detection."""
    plt = _plt()
    n = _num_samples(proxy_dict)
    noisy, duplicates = _mask(noisy, n, "noisy"), _mask(duplicates, n, "duplicates")
    tasks = []
    if noisy is not None and noisy.any():
        tasks.append(("mislabeled", noisy, ~duplicates if duplicates is not None else np.ones(n, bool)))
    if duplicates is not None and duplicates.any():
        tasks.append(("duplicates", duplicates, ~noisy if noisy is not None else np.ones(n, bool)))
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    for ax, (title, pos, keep) in zip(axes.flat, tasks):
        colors = plt.get_cmap("tab20").colors
        for j, (key, s) in enumerate(_available(proxy_dict)):
            if np.isnan(s[keep]).any():
                continue
            fpr, tpr = metrics.roc_curve(s[keep], pos[keep])
            ax.plot(fpr, tpr, lw=2.0 if key.startswith("csl") else 1.1, color=colors[(2 * j) % 20 + (2 * j) // 20],
                    ls="-" if j < 10 else "--",
                    label=f"{LABELS.get(key, key)} ({metrics.auroc(s[keep], pos[keep]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"{title} detection (AUROC)")
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_top_images(path, score, images, given_labels, true_labels=None, k=32, title="highest CSL"):
    """A grid of the k highest-scoring images captioned 'given g / true t' (red
    when they differ). `images` is [N, H, W], [N, 1, H, W] or [N, H*W] square."""
    plt = _plt()
    imgs = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    imgs = imgs.astype(np.float64)
    if imgs.ndim == 2:
        side = int(round(math.sqrt(imgs.shape[1])))
        if side * side != imgs.shape[1]:
            raise ValueError(f"flat images of {imgs.shape[1]} values are not square")
        imgs = imgs.reshape(-1, side, side)
    if imgs.ndim == 4:
        imgs = imgs.mean(1)  # channels -> grey
    if imgs.ndim != 3:
        raise ValueError(f"images must be [N, H, W], [N, C, H, W] or [N, H*W], got shape {imgs.shape}")
    given = _numpy(given_labels).astype(int)
    true = _numpy(true_labels).astype(int) if true_labels is not None else None
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")[:k]
    cols = 8
    rows = max(1, math.ceil(len(order) / cols))
    h, w = imgs.shape[1:]
    pad = max(1, h // 4)
    cap = max(3, h // 2)  # caption band above each tile
    mosaic = np.full((rows * (h + pad + cap), cols * (w + pad)), np.nan)
    # One image in one axes (not one axes per tile): drawing stays fast.
    width = 1.3 * cols
    fig, ax = plt.subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.4))
    for j, i in enumerate(order):
        r, c = divmod(j, cols)
        top, left = r * (h + pad + cap) + cap, c * (w + pad)
        img = imgs[i]
        lo, hi = np.nanmin(img), np.nanmax(img)
        mosaic[top:top + h, left:left + w] = (img - lo) / (hi - lo) if hi > lo else 0.0
        text = f"#{i} given {given[i]}" if true is None else f"given {given[i]} / true {true[i]}"
        bad = true is not None and given[i] != true[i]
        ax.text(left + w / 2 - 0.5, top - 1, text, ha="center", va="bottom", fontsize=6.5,
                color="red" if bad else "black")
    ax.imshow(mosaic, cmap="gray_r", interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{len(order)} samples with the {title}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def binned(x, y, bins=20):
    """Mean and std of y in equal-width bins of x (the CSL paper's binned plots,
    App. B.4); empty bins are dropped. Returns (centers, means, stds, counts)."""
    x, y = _numpy(x), _numpy(y)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    lo, hi = (x.min(), x.max()) if x.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    which = np.clip(np.digitize(x, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=y, minlength=bins)
    sq = np.bincount(which, weights=y * y, minlength=bins)
    keep = counts > 0
    means = sums[keep] / counts[keep]
    stds = np.sqrt(np.maximum(sq[keep] / counts[keep] - means ** 2, 0.0))
    centers = ((edges[:-1] + edges[1:]) / 2)[keep]
    return centers, means, stds, counts[keep]


def plot_csl_vs_learning_time(path, csl, learn_time, bins=20):
    """The paper's Fig. 4: samples binned by learning time, mean CSL per bin
    (shaded: ± one std)."""
    plt = _plt()
    centers, means, stds, _ = binned(learn_time, csl, bins)
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(centers, means, "o-", ms=3)
    ax.fill_between(centers, means - stds, means + stds, alpha=0.25)
    ax.set_xlabel("learning time (fraction of training)")
    ax.set_ylabel("CSL (mean per bin)")
    ax.set_title("CSL vs learning time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out_dir, proxy_dict, rows=None, *, given_labels=None, true_labels=None, noisy=None,
                 duplicates=None, images=None, top_key=None, extra=None, plots=True, tracker_scores=None):
    """Write scores.csv, summary.json and the PNG plots into out_dir; return the
    paths written. `rows` defaults to detection_table(proxy_dict, noisy, duplicates).
    `tracker_scores` (``tracker.scores()`` with confidence and variability) adds
    the dataset-cartography map, cartography.png."""
    os.makedirs(out_dir, exist_ok=True)
    if rows is None:
        rows = detection_table(proxy_dict, noisy, duplicates)
    written = []
    p = os.path.join(out_dir, "scores.csv")
    write_scores_csv(p, proxy_dict, given_labels, true_labels, noisy, duplicates)
    written.append(p)
    p = os.path.join(out_dir, "summary.json")
    write_summary_json(p, rows, **(extra or {}))
    written.append(p)
    if not plots:
        return written
    top_key = top_key or next((k for k in ("csl_free", "csl", "csl_eval") if proxy_dict.get(k) is not None), None)
    p = os.path.join(out_dir, "histograms.png")
    plot_histograms(p, proxy_dict, noisy, duplicates)
    written.append(p)
    p = os.path.join(out_dir, "roc.png")
    if plot_roc(p, proxy_dict, noisy, duplicates):
        written.append(p)
    if images is not None and top_key is not None and given_labels is not None:
        p = os.path.join(out_dir, "top_csl.png")
        plot_top_images(p, proxy_dict[top_key], images, given_labels, true_labels,
                        title=f"highest {LABELS.get(top_key, top_key)}")
        written.append(p)
    if top_key is not None and proxy_dict.get("learn_time") is not None:
        p = os.path.join(out_dir, "csl_vs_learning_time.png")
        plot_csl_vs_learning_time(p, proxy_dict[top_key], proxy_dict["learn_time"])
        written.append(p)
    if tracker_scores is not None and {"confidence", "variability"} <= set(tracker_scores):
        from .integrations.cartography import cartography_plot

        p = os.path.join(out_dir, "cartography.png")
        cartography_plot(tracker_scores, p, labels=given_labels, noisy=noisy)
        written.append(p)
    return written


# --------------------------------------------------------------------- command
def load_array(path, name="file"):
    """A 1-D or N-D array from a .pt (tensor, or dict with one tensor) or .npy file."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if path.endswith(".pt") or path.endswith(".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{name} {path} must hold a tensor, got {type(obj).__name__}")
        return obj.numpy()
    raise ValueError(f"{name} {path}: expected a .pt or .npy file")


def add_arguments(parser):
    parser.add_argument("tracker", help="a SampleTracker file written by tracker.save(path)")
    parser.add_argument("--labels", help="given (training) labels, .pt or .npy [N]: a column of scores.csv and the "
                        "image grid's captions (an LM's per-sequence tracker has none)")
    parser.add_argument("--noisy", help="boolean mask [N] of known mislabeled samples (.pt/.npy): "
                        "enables the mislabeled-detection metrics")
    parser.add_argument("--duplicates", help="boolean mask [N] of known duplicates (.pt/.npy)")
    parser.add_argument("--true-labels", help="true labels [N] (.pt/.npy), for scores.csv and the image grid")
    parser.add_argument("--images", help="inputs [N, ...] (.pt/.npy): plot the highest-CSL images")
    parser.add_argument("--eval-tracker", help="a second tracker fed by an eval-mode pass: adds the CSL (eval) row")
    parser.add_argument("--grad-norm-history",
                        help="[epochs, N] per-epoch input-gradient norms (.pt/.npy; memfast score --history): adds "
                             "the theory learning time row")
    parser.add_argument("--out", help="folder for scores.csv, summary.json and the plots")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="with --out, write scores.csv and summary.json only")


def _readable(load, what, path):
    """load(path), with a missing or unreadable file turned into one line naming the argument."""
    try:
        return load(path)
    except FileNotFoundError:
        raise SystemExit(f"memfast report: {what}: no file {path}") from None
    except Exception as e:  # truncated, corrupted, of another format (pickle, struct, EOF, ... errors)
        message = str(e) if str(e).startswith(what) else f"{what}: {e}"
        raise SystemExit(f"memfast report: {message} ({type(e).__name__})") from None


def run(args):
    from .tracker import SampleTracker

    tracker = _readable(SampleTracker.load, "tracker", args.tracker)
    n = tracker.num_samples

    def array(path, what):
        return _readable(lambda p: load_array(p, what), what, path)

    labels = array(args.labels, "--labels").reshape(-1) if args.labels else None
    if labels is not None and labels.shape[0] != n:
        raise SystemExit(f"memfast report: --labels has {labels.shape[0]} entries, the tracker has {n} samples")
    if args.images and labels is None:
        raise SystemExit("memfast report: --images needs --labels (the grid shows each image's given label)")
    noisy = array(args.noisy, "--noisy").reshape(-1).astype(bool) if args.noisy else None
    duplicates = array(args.duplicates, "--duplicates").reshape(-1).astype(bool) if args.duplicates else None
    true_labels = array(args.true_labels, "--true-labels").reshape(-1) if args.true_labels else None
    images = array(args.images, "--images") if args.images else None
    for name, m in (("--noisy", noisy), ("--duplicates", duplicates), ("--true-labels", true_labels),
                    ("--images", images)):
        if m is not None and m.shape[0] != n:
            raise SystemExit(f"memfast report: {name} has {m.shape[0]} entries, the tracker has {n} samples")
    theory_lt = None
    if args.grad_norm_history:
        history = array(args.grad_norm_history, "--grad-norm-history")
        if history.ndim != 2 or history.shape[1] != n:
            raise SystemExit(f"memfast report: --grad-norm-history must be [epochs, {n}], got {list(history.shape)}")
        try:
            theory_lt = metrics.theory_learning_time(history)
        except ValueError as e:
            raise SystemExit(f"memfast report: --grad-norm-history: {e}") from None
    scores = tracker.scores()
    if args.eval_tracker:
        eval_tracker = _readable(SampleTracker.load, "--eval-tracker", args.eval_tracker)
        if eval_tracker.num_samples != n:
            raise SystemExit(f"memfast report: --eval-tracker has {eval_tracker.num_samples} samples, the tracker "
                             f"has {n}")
        eval_scores = eval_tracker.scores()
        proxy_dict = proxies(scores, eval_scores, csl_key="csl_free", theory_learning_time=theory_lt)
    else:
        proxy_dict = proxies(scores, theory_learning_time=theory_lt)
    proxy_dict.pop("confident_learning", None)
    print(f"{args.tracker}: {n} samples, {tracker.epoch} epochs, statistics {list(tracker.user_stats)}")
    rows = detection_table(proxy_dict, noisy, duplicates)
    if noisy is not None or duplicates is not None:
        print(format_table(rows))
    else:
        print(distribution_table(proxy_dict))
    top_key = next((k for k in ("csl_free", "csl") if proxy_dict.get(k) is not None), None)
    if top_key is not None:
        top = np.argsort(-proxy_dict[top_key], kind="stable")[:10]
        print(f"highest {LABELS[top_key]}: ids {top.tolist()}")
    if args.out:
        written = write_report(args.out, proxy_dict, rows, given_labels=labels, true_labels=true_labels,
                               noisy=noisy, duplicates=duplicates, images=images,
                               extra={"command": "report", "tracker": os.path.abspath(args.tracker),
                                      "num_samples": n, "epochs": tracker.epoch}, plots=args.plots,
                               tracker_scores=scores)
        print("wrote " + ", ".join(written))
    return 0
