"""`memfast mat-demo`: memorization-aware training (MAT) on two small problems.

--dataset spurious (default): the MAT paper's interpretable experiment
  (Setup 2.1 / Figure 1) with its official code's parameters: ERM without
  input noise generalises, ERM with noise memorises the minority and fails on
  minority test samples, MAT with noise recovers them. Prints majority /
  minority train and test accuracy and saves the figure (accuracy curves and
  the decision boundary in the (x_y, x_a) plane) as DIR/mat_spurious.png.

--dataset colored-digits: ColoredMNIST in miniature (scikit-learn's digits,
  label = digit ≥ 5, a colour that agrees with the label for 90% of training
  samples and 50% at test) with a small MLP: average and worst-group test
  accuracy of ERM, MAT (XRM-inferred shift, no group labels) and GroupDRO
  with the true groups (the oracle), mean ± std over seeds.
"""
import json
import math
import os
import time

import torch
from torch import nn

__all__ = ["add_arguments", "run", "spurious_experiment", "colored_digits_experiment", "GroupDROLoss"]


def add_arguments(parser):
    parser.add_argument("--dataset", choices=("spurious", "colored-digits"), default="spurious",
                        help="the paper's interpretable setup (default) or colored digits")
    parser.add_argument("--out", default="mat-demo-out", help="directory for the figure and results_DATASET.json")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per phase (default: 1000 spurious, 40 colored-digits)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="colored-digits: number of seeds")
    parser.add_argument("--temperature", type=float, default=0.1, help="MAT's temperature on held-out logits")
    parser.add_argument("--n", type=int, default=1000, help="spurious: samples per split")
    parser.add_argument("--dim", type=int, default=1800, help="spurious: input dimension")
    parser.add_argument("--noise-std", type=float, default=0.5, help="spurious: std of the noise features")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are too small to gain from more)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--no-plot", action="store_true", help="spurious: do not save the figure")


# -- the interpretable experiment ------------------------------------------------------------------------
def _linear(dim, seed, device):
    torch.manual_seed(seed)
    return nn.Linear(dim, 2, bias=False).to(device)  # the paper's bias-free linear model


def _group_acc(net, data):
    with torch.no_grad():
        ok = net(data.x).argmax(1) == data.y
    maj, mino = ok[~data.minority], ok[data.minority]
    return (maj.float().mean().item() if maj.numel() else math.nan,
            mino.float().mean().item() if mino.numel() else math.nan)


def _full_batch_sgd(net, train, test, epochs, lr, loss_fn):
    """Full-batch SGD; accuracies recorded before each step (as the reference)."""
    import memfast

    opt = torch.optim.SGD(net.parameters(), lr=lr)
    ids = torch.arange(len(train), device=train.x.device)
    curves = {"maj_train": [], "min_train": [], "maj_test": [], "min_test": []}
    for _ in range(epochs):
        for split, data in (("train", train), ("test", test)):
            maj, mino = _group_acc(net, data)
            curves[f"maj_{split}"].append(maj)
            curves[f"min_{split}"].append(mino)
        opt.zero_grad(set_to_none=True)
        loss = memfast.cross_entropy(net(train.x), train.y) if loss_fn is None else loss_fn(net(train.x), train.y, ids)
        loss.backward()
        opt.step()
    final = {}
    for split, data in (("train", train), ("test", test)):
        final[f"maj_{split}"], final[f"min_{split}"] = _group_acc(net, data)
    return curves, final


def spurious_experiment(n=1000, dim=1800, noise_std=0.5, epochs=1000, temperature=0.1, seed=0, device="cpu",
                        lr_noiseless=3e-2, lr=1e-2):
    """Runs ERM (no noise), ERM (noise) and MAT (noise); returns {name: result}
    with the final accuracies, the per-epoch curves and the trained model."""
    import memfast
    from memfast import mat
    from memfast.datasets import spurious_features

    def data(noise):
        tr = spurious_features(n, dim, minority_fraction=0.1, noise_std=noise, seed=seed)
        te = spurious_features(n, dim, minority_fraction=0.5, noise_std=noise, seed=seed + 1000)
        return tuple(type(d)(*(t.to(device) for t in d)) for d in (tr, te))

    results = {}
    train, test = data(0.0)
    net = _linear(dim, seed, device)
    curves, final = _full_batch_sgd(net, train, test, epochs, lr_noiseless, None)
    results["ERM, no noise"] = {"final": final, "curves": curves, "net": net, "train": train}

    train, test = data(noise_std)
    net = _linear(dim, seed, device)
    curves, final = _full_batch_sgd(net, train, test, epochs, lr, None)
    results[f"ERM, noise {noise_std:g}"] = {"final": final, "curves": curves, "net": net, "train": train}

    # MAT phase 1: XRM twins, full batch, same optimiser as ERM
    xrm = mat.XRM(_linear(dim, seed + 1, device), _linear(dim, seed + 2, device), len(train), 2, seed=seed)
    opt = torch.optim.SGD(xrm.parameters(), lr=lr)
    ids = torch.arange(len(train), device=device)
    for _ in range(epochs):
        xrm.step(train.x, train.y, ids, opt)
    loader = [(train.x, train.y, ids)]
    held_out = xrm.held_out_logits(loader)
    groups = xrm.inferred_groups(loader)
    # phase 2: ERM on shifted logits; evaluation on the plain logits
    loss_fn = memfast.MATLoss(mat.shift_table(held_out, train.y, temperature))
    net = _linear(dim, seed, device)
    curves, final = _full_batch_sgd(net, train, test, epochs, lr, loss_fn)
    results[f"MAT, noise {noise_std:g}"] = {
        "final": final, "curves": curves, "net": net, "train": train,
        "xrm": {"flip_rate": xrm.flip_rate, "groups_valid": groups.valid,
                "minority_recall": groups.mistakes[train.minority].float().mean().item(),
                "minority_precision": train.minority[groups.mistakes].float().mean().item()
                if bool(groups.mistakes.any()) else math.nan}}
    return results


def _plot_spurious(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 8), gridspec_kw={"height_ratios": [2, 3]})
    for col, name in enumerate(names):
        res = results[name]
        ax = axes[0, col]
        epochs = range(1, len(res["curves"]["maj_train"]) + 1)
        for key, label, color, style in (("maj_train", "majority train", "k", "-"),
                                         ("min_train", "minority train", "k", "--"),
                                         ("maj_test", "majority test", "tab:red", "-"),
                                         ("min_test", "minority test", "tab:red", "--")):
            ax.plot(epochs, res["curves"][key], color=color, ls=style, lw=2, alpha=0.8, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(frameon=False, fontsize=9)

        # decision boundary in the (x_y, γ x_a) plane, noise coordinates at 0
        ax = axes[1, col]
        net, train = res["net"], res["train"]
        xs, ys = torch.linspace(-2, 2, 150), torch.linspace(-10, 10, 150)
        gy, ga = torch.meshgrid(xs, ys, indexing="xy")
        grid = torch.zeros(gy.numel(), train.x.shape[1], device=train.x.device)
        grid[:, 0], grid[:, 1] = gy.reshape(-1).to(grid.device), ga.reshape(-1).to(grid.device)
        with torch.no_grad():
            logits = net(grid)
            score = torch.sigmoid(10 * (logits[:, 1] - logits[:, 0])).reshape(gy.shape).cpu()
        ax.contourf(gy, ga, score, levels=20, cmap="coolwarm", alpha=0.6, vmin=0, vmax=1)
        ax.contour(gy, ga, score, levels=[0.5], colors="k", linewidths=1)
        pts = train.x[:, :2].cpu()
        y, minority = train.y.cpu(), train.minority.cpu()
        for sel, marker, label in ((~minority, "o", "majority"), (minority, "x", "minority")):
            ax.scatter(pts[sel, 0], pts[sel, 1], c=y[sel], cmap="coolwarm", vmin=0, vmax=1, marker=marker, s=14,
                       linewidths=1, edgecolors="none" if marker == "o" else None, label=label)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-10, 10)
        ax.set_xlabel(r"$x_y$ (core)")
        ax.set_ylabel(r"$\gamma x_a$ (spurious)")
        if col == 0:
            ax.legend(frameon=False, fontsize=9, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- colored digits --------------------------------------------------------------------------------------
class GroupDROLoss(nn.Module):
    """Online GroupDRO (Sagawa et al., 2020) with known groups: the loss is
    Σ_g q_g · mean loss of group g in the batch, with q ← q·exp(η·loss_g)
    (groups present in the batch), renormalised, after each batch."""

    def __init__(self, groups, num_groups, eta=0.01):
        super().__init__()
        self.register_buffer("groups", groups.long())
        self.register_buffer("q", torch.full((num_groups,), 1.0 / num_groups))
        self.num_groups, self.eta = num_groups, float(eta)

    def forward(self, logits, targets, sample_ids):
        import memfast

        losses = memfast.cross_entropy(logits, targets, reduction="none")
        g = self.groups[sample_ids]
        counts = torch.zeros(self.num_groups, dtype=losses.dtype, device=losses.device).index_add(
            0, g, torch.ones_like(losses))
        group_loss = torch.zeros(self.num_groups, dtype=losses.dtype, device=losses.device).index_add(0, g, losses)
        group_loss = group_loss / counts.clamp_min(1)
        with torch.no_grad():
            self.q *= torch.exp(self.eta * group_loss.detach() * (counts > 0))
            self.q /= self.q.sum()
        return (self.q * group_loss).sum()


def _mlp(seed, device, hidden=128):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(128, hidden), nn.ReLU(), nn.Linear(hidden, 2)).to(device)


def _minibatches(n, batch_size, gen, device):
    perm = torch.randperm(n, generator=gen).to(device)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _train_minibatch(net, train, epochs, lr, loss_fn, seed, batch_size):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for ids in _minibatches(len(train), batch_size, gen, train.x.device):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(train.x[ids]), train.y[ids], ids).backward()
            opt.step()
    return net


def colored_digits_experiment(seeds=(0, 1, 2), epochs=40, temperature=0.1, lr=1e-3, batch_size=64, eta=0.01,
                              device="cpu"):
    """ERM, MAT (XRM-inferred, no group labels) and GroupDRO (true groups) on
    colored digits; returns {method: {"avg": [per seed], "worst": [...]}} and XRM diagnostics."""
    import memfast
    from memfast import mat
    from memfast.datasets import colored_digits
    from memfast.metrics import accuracy, worst_group_accuracy

    methods = ("ERM", "MAT (XRM groups)", "GroupDRO (true groups)")
    out = {m: {"avg": [], "worst": []} for m in methods}
    out["XRM"] = {"flip_rate": [], "minority_recall": [], "minority_precision": [], "groups_valid": []}

    def record(method, net, test):
        with torch.no_grad():
            logits = net(test.x).cpu()
        out[method]["avg"].append(accuracy(logits, test.y.cpu()))
        out[method]["worst"].append(worst_group_accuracy(logits, test.y.cpu(), test.groups.cpu()))

    for seed in seeds:
        train, test = (type(d)(*(t.to(device) for t in d))
                       for d in (colored_digits("train", seed=seed), colored_digits("test", seed=seed)))

        net = _train_minibatch(_mlp(seed, device), train, epochs, lr,
                               lambda lg, y, ids: memfast.cross_entropy(lg, y), seed, batch_size)
        record("ERM", net, test)

        xrm = mat.XRM(_mlp(seed + 101, device), _mlp(seed + 202, device), len(train), 2, seed=seed)
        opt = torch.optim.Adam(xrm.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for ids in _minibatches(len(train), batch_size, gen, device):
                xrm.step(train.x[ids], train.y[ids], ids, opt)
        loader = [(train.x, train.y, torch.arange(len(train), device=device))]
        held_out = xrm.held_out_logits(loader)
        groups = xrm.inferred_groups(loader)
        out["XRM"]["flip_rate"].append(xrm.flip_rate)
        out["XRM"]["groups_valid"].append(groups.valid)
        out["XRM"]["minority_recall"].append(groups.mistakes[train.minority].float().mean().item())
        out["XRM"]["minority_precision"].append(train.minority[groups.mistakes].float().mean().item()
                                                if bool(groups.mistakes.any()) else math.nan)
        loss_fn = memfast.MATLoss(mat.shift_table(held_out, train.y, temperature))
        net = _train_minibatch(_mlp(seed, device), train, epochs, lr, loss_fn, seed, batch_size)
        record("MAT (XRM groups)", net, test)

        dro = GroupDROLoss(train.groups, 4, eta=eta).to(device)
        net = _train_minibatch(_mlp(seed, device), train, epochs, lr, dro, seed, batch_size)
        record("GroupDRO (true groups)", net, test)
    return out


def _mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


# -- command line ----------------------------------------------------------------------------------------
def run(args):
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.dataset == "spurious":
        epochs = 1000 if args.epochs is None else args.epochs
        results = spurious_experiment(args.n, args.dim, args.noise_std, epochs, args.temperature, args.seed,
                                      args.device)
        print(f"Interpretable experiment (MAT paper Setup 2.1): n={args.n}, dim={args.dim}, {epochs} epochs "
              f"full-batch SGD, temperature {args.temperature:g}")
        print(f"{'method':<18} {'maj train':>9} {'min train':>9} {'maj test':>9} {'min test':>9}")
        for name, res in results.items():
            f = res["final"]
            print(f"{name:<18} {f['maj_train']:>9.3f} {f['min_train']:>9.3f} {f['maj_test']:>9.3f} "
                  f"{f['min_test']:>9.3f}")
        xrm = next(r["xrm"] for r in results.values() if "xrm" in r)
        print(f"XRM: flip rate {xrm['flip_rate']:.3f}, inferred minority recall {xrm['minority_recall']:.3f}, "
              f"precision {xrm['minority_precision']:.3f}")
        summary = {name: dict(res["final"], **({"xrm": res["xrm"]} if "xrm" in res else {}))
                   for name, res in results.items()}
        if not args.no_plot:
            path = os.path.join(args.out, "mat_spurious.png")
            _plot_spurious(results, path)
            print(f"figure: {path}")
    else:
        epochs = 40 if args.epochs is None else args.epochs
        seeds = tuple(range(args.seed, args.seed + args.seeds))
        summary = colored_digits_experiment(seeds, epochs, args.temperature, device=args.device)
        print(f"Colored digits (label = digit >= 5, color agrees 90% train / 50% test): MLP, {epochs} epochs, "
              f"seeds {list(seeds)}; test accuracy, mean ± std")
        print(f"{'method':<24} {'average':>15} {'worst group':>15}")
        for name, res in summary.items():
            if name == "XRM":
                continue
            (am, asd), (wm, wsd) = _mean_std(res["avg"]), _mean_std(res["worst"])
            print(f"{name:<24} {am:>8.3f} ± {asd:.3f} {wm:>8.3f} ± {wsd:.3f}")
        x = summary["XRM"]
        print(f"XRM: flip rate {_mean_std(x['flip_rate'])[0]:.3f}, inferred minority recall "
              f"{_mean_std(x['minority_recall'])[0]:.3f}, precision {_mean_std(x['minority_precision'])[0]:.3f}, "
              f"valid groups {sum(x['groups_valid'])}/{len(seeds)}")
    wall = time.perf_counter() - start
    print(f"wall time {wall:.1f} s")
    with open(os.path.join(args.out, f"results_{args.dataset}.json"), "w") as fh:
        json.dump({"args": vars(args), "wall_s": wall, "results": summary}, fh, indent=1, default=str)
    return 0
