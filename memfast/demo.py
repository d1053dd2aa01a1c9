"""`memfast demo`: find mislabeled and duplicated samples in scikit-learn's
digits with memorization proxies collected for free in the training loss.

The recipe (the CSL paper's Tables 2-3 on a dataset that trains in seconds):
symmetric label noise plus conflicting duplicates, a network trained without
weight decay until it fits every noisy label (memorizes), a SampleTracker in
the loss (free CSL and every tracker statistic), an optional eval-mode scoring
pass per epoch (the reference code's CSL), the input-gradient norm of every
sample per epoch (loss sensitivity and the paper's theory learning time),
input curvature every k epochs and confident learning (cleanlab, when
installed) as an external baseline.
"""
import time

import numpy as np
import torch
from torch import nn

import memfast

from . import noise as noise_mod
from . import report
from .data import tensor_batches

# Adam learning rate per model: both fit every noisy label well before epoch 200.
DEFAULT_LR = {"mlp": 2e-2, "cnn": 3e-2}
DEFAULTS = dict(model="mlp", epochs=200, lr=None, width=256, batch_size=0, noise=0.1, duplicates=20,
                curv_every=10, curv_probes=10, curv_h=1e-3, cl_epochs=50, seeds=[0], device="cpu", threads=1)


def add_arguments(parser):
    d = DEFAULTS
    parser.add_argument("--model", choices=("mlp", "cnn"), default=d["model"], help="network (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d["lr"],
                        help=f"Adam learning rate (default: {DEFAULT_LR['mlp']} for mlp, {DEFAULT_LR['cnn']} for cnn)")
    parser.add_argument("--width", type=int, default=d["width"], help="hidden width (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="minibatch size; 0 = full batch (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=d["noise"],
                        help="fraction of labels flipped to another class (default: %(default)s)")
    parser.add_argument("--duplicates", type=int, default=d["duplicates"],
                        help="conflicting duplicate pairs injected (default: %(default)s)")
    parser.add_argument("--no-eval-pass", dest="eval_pass", action="store_false",
                        help="skip the eval-mode scoring pass per epoch (the CSL (eval) row)")
    parser.add_argument("--no-grad-norm", dest="grad_norm", action="store_false",
                        help="skip the per-epoch input-gradient norms (loss sensitivity, theory learning time rows)")
    parser.add_argument("--curv-every", type=int, default=d["curv_every"],
                        help="score input curvature every k epochs; 0 = never (default: %(default)s)")
    parser.add_argument("--curv-probes", type=int, default=d["curv_probes"],
                        help="Rademacher probes per curvature estimate (default: %(default)s)")
    parser.add_argument("--curv-h", type=float, default=d["curv_h"],
                        help="finite-difference step of the curvature estimate (default: %(default)s)")
    parser.add_argument("--no-cl", dest="confident_learning", action="store_false",
                        help="skip the confident-learning baseline (3 extra trainings)")
    parser.add_argument("--cl-epochs", type=int, default=d["cl_epochs"],
                        help="epochs of each confident-learning fold model (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=d["seeds"],
                        help="seeds; several give mean ± std (default: 0)")
    parser.add_argument("--device", default=d["device"], help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d["threads"],
                        help="CPU threads; the models are tiny, so more threads mostly add overhead "
                        "(default: %(default)s)")
    parser.add_argument("--out", help="write scores.csv, summary.json and PNG plots here")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="with --out, write scores.csv and summary.json only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------- data
def load_digits():
    """scikit-learn's 8x8 digits: inputs [1797, 64] in [0, 1], labels [1797]."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def corrupt(x, y, noise_rate, num_pairs, seed):
    """Symmetric noise, then duplicate pairs among the samples left clean (so
    each sample is clean, noisy or a duplicate). Returns a dict of tensors:
    x, given (training labels), true (class of the input each sample holds),
    noisy, duplicate."""
    given, noisy = noise_mod.symmetric(y, noise_rate, seed=seed, num_classes=10)
    x2, given, duplicate, pairs = noise_mod.duplicates(x, given, num_pairs, seed=seed + 10_000, num_classes=10,
                                                       exclude=noisy)
    true = y.clone()
    true[pairs[:, 0]] = y[pairs[:, 1]]
    return {"x": x2, "given": given, "true": true, "noisy": noisy, "duplicate": duplicate}


# --------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """Two 3x3 conv blocks on the 8x8 digit, then two linear layers."""

    def __init__(self, width=128, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 2 * 2, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def make_model(kind, width, in_features=64, num_classes=10):
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, num_classes))
    if kind == "cnn":
        return SmallCNN(width=min(width, 128), num_classes=num_classes)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {kind!r}")


def train(cfg, x, y, seed, *, epochs=None, tracker=None, eval_tracker=None, curv_tracker=None, grad_norms=None,
          fit_mask=None, desc="train", quiet=True):
    """Train a fresh model with Adam (no weight decay) on (x, y); with trackers,
    the loss feeds `tracker` (free statistics), an eval-mode pass per epoch
    feeds `eval_tracker`, input curvature every cfg.curv_every epochs feeds
    `curv_tracker`, and with a list `grad_norms` each epoch appends the [N]
    input-gradient norms (score_grad_norm). With `fit_mask`, the eval pass also
    records the first epoch at which every sample in the mask is fitted (its
    training label is the argmax): returns (model, that epoch or None)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = x.device
    model = make_model(cfg.model, cfg.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = tensor_batches(x, y, cfg.batch_size, shuffle=True, seed=seed)
    score_loader = tensor_batches(x, y, 4096)
    memorized_at = None
    score_each_epoch = eval_tracker is not None or fit_mask is not None
    bar = tqdm(range(cfg.epochs if epochs is None else epochs), desc=desc, disable=quiet, leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        model.train()
        for xb, yb, sid in loader:
            xb, yb, sid = xb.to(device), yb.to(device), sid.to(device)
            if tracker is not None:
                loss = memfast.cross_entropy(model(xb), yb, sample_ids=sid, tracker=tracker)
            else:
                loss = memfast.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if tracker is not None:
            tracker.end_epoch()
        if score_each_epoch:
            model.eval()
            fitted = torch.zeros(len(y), dtype=torch.bool, device=device)
            with torch.no_grad():
                for xb, yb, sid in score_loader:
                    xb, yb, sid = xb.to(device), yb.to(device), sid.to(device)
                    logits = model(xb)
                    if eval_tracker is not None:
                        eval_tracker.update(logits, yb, sid)
                    fitted[sid] = logits.argmax(1) == yb
            if eval_tracker is not None:
                eval_tracker.end_epoch()
            train_acc = float(fitted.float().mean())
            if fit_mask is not None and memorized_at is None and bool(fitted[fit_mask].all()):
                memorized_at = epoch + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", train_acc=f"{train_acc:.3f}", refresh=False)
        if grad_norms is not None:
            grad_norms.append(memfast.score_grad_norm(model, score_loader, num_samples=len(y), progress=False))
        if curv_tracker is not None and cfg.curv_every > 0 and (epoch + 1) % cfg.curv_every == 0:
            model.eval()
            memfast.score_curvature(model, score_loader, curv_tracker, n_probes=cfg.curv_probes, h=cfg.curv_h,
                                    progress=False)
    model.eval()
    return model, memorized_at


@torch.no_grad()
def _probabilities(model, x):
    model.eval()
    return torch.softmax(model(x).float(), dim=1).cpu().numpy()


def confident_learning(cfg, x, given, seed, folds=3, quiet=True):
    """Confident learning (cleanlab) on `folds`-fold out-of-sample
    probabilities of the same network and recipe trained for cfg.cl_epochs
    (the CSL paper's baseline; fewer epochs than the main run because
    held-out probabilities from a model that has not yet memorized its own
    noise are the better ones for CL, and to keep the demo fast). The ranked
    label issues become a score: the first-ranked issue 1, falling linearly
    over the flagged samples; unflagged samples 0.
    Returns None when cleanlab is not installed."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    y = given.cpu().numpy()
    n = y.shape[0]
    probs = np.zeros((n, int(y.max()) + 1))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), y)
    for k, (tr, ho) in enumerate(tqdm(list(split), desc="confident learning", disable=quiet, leave=False)):
        tr_t, ho_t = torch.as_tensor(tr, device=x.device), torch.as_tensor(ho, device=x.device)
        model, _ = train(cfg, x[tr_t], given[tr_t], seed=seed * 1000 + k + 1, epochs=cfg.cl_epochs, quiet=True)
        probs[ho] = _probabilities(model, x[ho_t])
    ranked = find_label_issues(y, probs, filter_by="confident_learning", return_indices_ranked_by="self_confidence")
    score = np.zeros(n)
    if len(ranked):
        score[ranked] = 1.0 - np.arange(len(ranked)) / len(ranked)
    return score


# ----------------------------------------------------------------------- runs
def run_seed(cfg, seed):
    """One corrupted dataset, one training with trackers, the baselines.
    Returns a dict: proxies, rows (detection_table), masks, labels, images and timings."""
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    x, y = load_digits()
    data = corrupt(x, y, cfg.noise, cfg.duplicates, seed)
    n = len(y)
    xd, given = data["x"].to(device), data["given"].to(device)
    tracker = memfast.SampleTracker(n, stats="all", device=device)
    eval_tracker = memfast.SampleTracker(n, stats=("csl", "count"), device=device) if cfg.eval_pass else None
    curv_tracker = memfast.SampleTracker(n, stats=("curv",), device=device) if cfg.curv_every > 0 else None
    grad_norms = [] if cfg.grad_norm else None
    # A conflicting duplicate pair has one input and two labels: at most one
    # member can be fitted, so memorization means fitting every other sample.
    fit_mask = ~data["duplicate"].to(device)
    model, memorized_at = train(cfg, xd, given, seed, tracker=tracker, eval_tracker=eval_tracker,
                                curv_tracker=curv_tracker, grad_norms=grad_norms, fit_mask=fit_mask,
                                desc=f"train (seed {seed})", quiet=cfg.quiet)
    with torch.no_grad():
        fitted = model(xd).argmax(1) == given
    train_acc = float(fitted.float().mean())
    train_acc_nondup = float(fitted[fit_mask].float().mean())
    t_train = time.perf_counter() - t0
    cl = confident_learning(cfg, xd, given, seed, quiet=cfg.quiet) if cfg.confident_learning else None
    scores = {k: v.cpu() for k, v in tracker.scores().items()}
    eval_scores = {k: v.cpu() for k, v in eval_tracker.scores().items()} if eval_tracker is not None else None
    curv = curv_tracker.scores()["curv"].cpu() if curv_tracker is not None else None
    sensitivity = theory_lt = None
    if grad_norms:
        history = torch.stack(grad_norms).cpu()
        sensitivity, theory_lt = history.mean(0), memfast.metrics.theory_learning_time(history)
    proxy_dict = report.proxies(scores, eval_scores, curvature=curv, confident_learning=cl, csl_key="csl_free",
                                loss_sensitivity=sensitivity, theory_learning_time=theory_lt)
    masks = {"noisy": data["noisy"].numpy() if cfg.noise > 0 else None,
             "duplicates": data["duplicate"].numpy() if cfg.duplicates > 0 else None}
    rows = report.detection_table(proxy_dict, masks["noisy"], masks["duplicates"])
    return {"seed": seed, "proxies": proxy_dict, "rows": rows, "scores": scores, "masks": masks, "given": data["given"].numpy(),
            "true": data["true"].numpy(), "images": data["x"].reshape(n, 8, 8).numpy(),
            "train_accuracy": train_acc, "train_accuracy_non_duplicates": train_acc_nondup,
            "memorized_at_epoch": memorized_at, "seconds_train": t_train, "seconds": time.perf_counter() - t0,
            "num_noisy": int(data["noisy"].sum()), "num_duplicates": int(data["duplicate"].sum()), "num_samples": n}


def _config(args):
    keys = ("model", "epochs", "lr", "width", "batch_size", "noise", "duplicates", "eval_pass", "grad_norm",
            "curv_every", "curv_probes", "curv_h", "confident_learning", "cl_epochs", "seeds", "device", "threads")
    return {k: getattr(args, k) for k in keys}


def _check(args):
    if args.lr is not None and not args.lr > 0:
        raise SystemExit("memfast demo: --lr must be positive")
    if args.epochs < 1 or args.cl_epochs < 1:
        raise SystemExit("memfast demo: --epochs and --cl-epochs must be at least 1")
    if not 0.0 <= args.noise < 1.0:
        raise SystemExit("memfast demo: --noise must be in [0, 1)")
    if args.duplicates < 0 or args.curv_every < 0 or args.batch_size < 0:
        raise SystemExit("memfast demo: --duplicates, --curv-every and --batch-size must be >= 0")
    if args.threads < 1 or args.curv_probes < 1 or not args.curv_h > 0:
        raise SystemExit("memfast demo: --threads and --curv-probes must be >= 1, --curv-h > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("memfast demo: --device cuda but CUDA is not available")


def run(args):
    import os

    _check(args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.model]
    old_threads = torch.get_num_threads()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        results = [run_seed(args, s) for s in args.seeds]
    finally:
        torch.set_num_threads(old_threads)
    elapsed = time.perf_counter() - t0
    table = report.aggregate([r["rows"] for r in results])
    r0 = results[0]
    print(f"digits: {r0['num_samples']} samples, {r0['num_noisy']} noisy labels ({args.noise:.0%}), "
          f"{r0['num_duplicates']} duplicates ({args.duplicates} pairs); {args.model}, {args.epochs} epochs, "
          f"backend {memfast.get_backend(args.device)}, device {args.device}")
    for r in results:
        mem = (f"memorized at epoch {r['memorized_at_epoch']}" if r["memorized_at_epoch"]
               else "NOT memorized")
        print(f"seed {r['seed']}: {mem}: train accuracy on the given labels {r['train_accuracy_non_duplicates']:.4f} "
              f"outside the duplicate pairs, {r['train_accuracy']:.4f} overall (one input, two labels: only one "
              f"member of a pair can be fitted); {r['seconds']:.1f} s")
    print(report.format_table(table))
    if len(args.seeds) > 1:
        print(f"mean ± std over seeds {args.seeds}")
    if args.out:
        extra = {"command": "demo", "config": _config(args), "backend": memfast.get_backend(args.device),
                 "num_samples": r0["num_samples"], "num_noisy": r0["num_noisy"],
                 "num_duplicates": r0["num_duplicates"], "seconds": elapsed,
                 "seeds": [{k: r[k] for k in ("seed", "train_accuracy", "train_accuracy_non_duplicates",
                                              "memorized_at_epoch", "seconds")}
                           for r in results]}
        written = []
        for r in results:
            folder = args.out if len(results) == 1 else os.path.join(args.out, f"seed{r['seed']}")
            written += report.write_report(folder, r["proxies"], r["rows"] if len(results) > 1 else table,
                                           given_labels=r["given"], true_labels=r["true"],
                                           noisy=r["masks"]["noisy"], duplicates=r["masks"]["duplicates"],
                                           images=r["images"], top_key="csl_free", extra={**extra, "seed": r["seed"]},
                                           plots=args.plots, tracker_scores=r["scores"])
        if len(results) > 1:
            path = os.path.join(args.out, "summary.json")
            report.write_summary_json(path, table, **extra)
            written.append(path)
        print(f"wrote {len(written)} files under {args.out}")
    return 0
