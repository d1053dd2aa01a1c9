"""SampleTracker: statistics against a straightforward Python computation over a
scripted sequence of updates and epochs; persistence; bad input."""
import math
import os

import pytest
import torch

import memfast
from memfast import SampleTracker
from memfast._stats import COUNTER


class Oracle:
    """Every statistic computed the plain way, row by row, in float64."""

    def __init__(self, n):
        self.n = n
        z = lambda v=0.0: [v] * n  # noqa: E731
        self.s = dict(csl=z(), count=z(), last_loss=z(), loss_sq=z(), inconf=z(), ptrue_sq=z(), margin=z(),
                      correct=z(), forgetting=z(), learned_epoch=z(-1.0), last_correct=z(-1.0), last_maxprob=z(),
                      nonfinite=z(), last_update=z())
        self.epoch = 0
        self.calls = 0

    def update(self, logits, target, ids, ignore_index=-100, adjustment=None):
        self.calls += 1
        z = logits.double()
        if adjustment is not None:
            z = z + adjustment.double()
        R = z.shape[0]
        per = R // ids.numel()
        last = {}
        for r in range(R):
            y = int(target[r])
            if y == ignore_index:
                continue
            i = int(ids[r // per])
            row = z[r]
            lse = float(torch.logsumexp(row, 0))
            nll = lse - float(row[y])
            if not math.isfinite(nll):
                self.s["nonfinite"][i] += 1
                continue
            others = torch.cat([row[:y], row[y + 1:]])
            margin = float(row[y] - others.max()) if others.numel() else 0.0
            correct = float(int(row.argmax()) == y)
            p = math.exp(-nll)
            for k, v in (("csl", nll), ("count", 1), ("loss_sq", nll * nll), ("inconf", 1 - p),
                         ("ptrue_sq", p * p), ("margin", margin), ("correct", correct)):
                self.s[k][i] += v
            last[i] = (nll, correct, math.exp(float(row.max()) - lse))
        for i, (nll, correct, maxprob) in last.items():
            before = self.s["last_correct"][i]
            if before == 1 and correct == 0:
                self.s["forgetting"][i] += 1
            if correct == 0:
                self.s["learned_epoch"][i] = -1
            elif before != 1:
                self.s["learned_epoch"][i] = self.epoch
            self.s["last_correct"][i] = correct
            self.s["last_loss"][i] = nll
            self.s["last_maxprob"][i] = maxprob
            self.s["last_update"][i] = self.calls


def _assert_matches(tracker, oracle):
    for name in tracker.stored_stats:
        if name in oracle.s:
            torch.testing.assert_close(tracker.stat(name).double(), torch.tensor(oracle.s[name], dtype=torch.float64),
                                       atol=2e-4, rtol=1e-4, msg=name)


def _scripted_batches(n, C, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        R = int(torch.randint(1, 3 * n, (1,), generator=g))
        logits = torch.randn(R, C, generator=g) * 3
        # drift towards the targets so samples get learned and sometimes forgotten
        target = torch.randint(0, C, (R,), generator=g)
        logits[torch.arange(R), target] += float(torch.rand(1, generator=g) * 6 - 2)
        target[torch.rand(R, generator=g) < 0.1] = -100
        ids = torch.randint(0, n, (R,), generator=g)  # repeats within a batch
        if step % 4 == 3:
            logits[0, 0] = math.inf  # a non-finite row
        yield logits, target, ids, step % 3 == 2


@pytest.mark.parametrize("free_mode", [True, False])
def test_statistics_match_python(backend, free_mode):
    n, C = 13, 5
    tracker = SampleTracker(n, stats="all")
    oracle = Oracle(n)
    for logits, target, ids, end in _scripted_batches(n, C, 12, seed=3):
        if free_mode:
            x = logits.clone().requires_grad_(True)
            memfast.cross_entropy(x, target, sample_ids=ids, tracker=tracker).backward()
        else:
            tracker.update(logits, target, ids)
        oracle.update(logits, target, ids)
        if end:
            tracker.end_epoch()
            oracle.epoch += 1
    _assert_matches(tracker, oracle)
    assert tracker.epoch == oracle.epoch


def test_per_sequence_ids(backend):
    B, T, V = 3, 7, 11
    logits = torch.randn(B * T, V)
    target = torch.randint(0, V, (B * T,))
    target[5] = -100  # padding
    ids = torch.tensor([4, 0, 2])
    tracker = SampleTracker(5, stats="all")
    per_token = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    tracker.update(logits, target, ids)
    oracle = Oracle(5)
    oracle.update(logits, target, ids)
    _assert_matches(tracker, oracle)
    csl = tracker.stat("csl")
    for b in range(B):
        torch.testing.assert_close(csl[ids[b]], per_token[b * T:(b + 1) * T].sum(), atol=1e-4, rtol=1e-5)
    assert tracker.stat("count")[ids].tolist() == [6, 7, 7]


def test_adjusted_logits_are_tracked(backend):
    logits, target = torch.randn(6, 4), torch.randint(0, 4, (6,))
    table, groups = torch.randn(2, 4), torch.randint(0, 2, (6,))
    tracker = SampleTracker(6, stats="all")
    memfast.cross_entropy(logits, target, sample_ids=torch.arange(6), tracker=tracker, adjustment=table, groups=groups)
    oracle = Oracle(6)
    oracle.update(logits, target, torch.arange(6), adjustment=table[groups])
    _assert_matches(tracker, oracle)


def test_spatial_input_with_per_image_ids(backend):
    x = torch.randn(2, 3, 4)  # [N, C, d]
    y = torch.randint(0, 3, (2, 4))
    tracker = SampleTracker(2)
    memfast.cross_entropy(x, y, sample_ids=torch.tensor([1, 0]), tracker=tracker)
    per_pixel = torch.nn.functional.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(tracker.stat("csl"), per_pixel.sum(1).flip(0), atol=1e-5, rtol=1e-5)


def test_scores(backend):
    tracker = SampleTracker(3, stats="all")
    right = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    wrong = -right
    y = torch.tensor([0, 1, 0])
    ids = torch.arange(3)
    tracker.update(wrong, y, ids)          # epoch 0: all wrong
    tracker.end_epoch()
    tracker.update(torch.stack([right[0], wrong[1], right[2]]), y, ids)  # epoch 1: 0 and 2 right
    tracker.end_epoch()
    tracker.update(torch.stack([right[0], right[1], wrong[2]]), y, ids)  # epoch 2: 2 forgotten, 1 learned
    tracker.end_epoch()
    s = tracker.scores()
    assert s["forgetting"].tolist() == [0, 0, 1]
    torch.testing.assert_close(s["learn_time"], torch.tensor([1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(s["accuracy"], torch.tensor([2 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(s["cum_01_loss"], 1 - s["accuracy"])
    torch.testing.assert_close(s["csl_mean"], s["csl"] / 3)
    torch.testing.assert_close(s["aum"], torch.tensor([5 / 3, -5 / 3, -5 / 3]))
    p_hi = 1 / (1 + math.exp(-5))
    torch.testing.assert_close(s["inconf_final"], torch.tensor([1 - p_hi, 1 - p_hi, p_hi]))
    torch.testing.assert_close(s["inconf_max"], torch.full((3,), 1 - p_hi))
    q = 1 - p_hi  # p_true when wrong
    p = torch.tensor([[q, q, q], [p_hi, q, p_hi], [p_hi, p_hi, q]])  # [epoch, sample]
    torch.testing.assert_close(s["confidence"], p.mean(0))
    torch.testing.assert_close(s["variability"], p.std(0, unbiased=False), atol=1e-5, rtol=1e-5)


def test_learn_time_read_before_the_epoch_ends(backend):
    """Scores read mid-epoch (or after a run stopped mid-epoch): a sample learned in the current
    epoch is learned (below 1, as after end_epoch()), not the 1 of "never learned"."""
    tracker = SampleTracker(2, stats="all")
    y, ids = torch.zeros(2, dtype=torch.long), torch.arange(2)
    wrong = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    for _ in range(2):
        tracker.update(wrong, y, ids)
        tracker.end_epoch()
    tracker.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), y, ids)  # sample 0 learned in epoch 2
    mid_epoch = tracker.scores()["learn_time"]
    torch.testing.assert_close(mid_epoch, torch.tensor([2 / 3, 1.0]))
    tracker.end_epoch()
    assert torch.equal(tracker.scores()["learn_time"], mid_epoch)


def test_scores_of_samples_never_updated(backend):
    """A sample no batch named has count 0: NaN means and NaN latest-update values (not the zeros of
    an empty buffer, which would read as a confidently learned sample); never learned."""
    tracker = SampleTracker(3, stats="all")
    tracker.update(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    tracker.end_epoch()
    s = tracker.scores()
    assert s["count"].tolist() == [1, 0, 1]
    for name in ("csl_mean", "aum", "accuracy", "confidence", "last_loss", "inconf_final", "inconf_max"):
        assert s[name][1].isnan() and not s[name][[0, 2]].isnan().any(), name
    assert s["learn_time"][1] == 1 and s["csl"][1] == 0 and s["forgetting"][1] == 0


def test_default_stats_and_memory():
    t = SampleTracker(10)
    assert t.stored_stats == ("csl", "count", "nonfinite")
    assert t.memory_bytes == 3 * 10 * 4
    assert set(t.scores()) == {"csl", "count", "csl_mean", "nonfinite"}
    with pytest.raises(ValueError, match="unknown statistic"):
        SampleTracker(10, stats=("csl", "nope"))
    with pytest.raises(KeyError, match="margin"):
        t.stat("margin")


def test_save_load_round_trip(tmp_path, backend):
    t = SampleTracker(50, stats="all")
    for logits, target, ids, end in _scripted_batches(50, 4, 5, seed=1):
        t.update(logits, target, ids)
        if end:
            t.end_epoch()
    path = tmp_path / "tracker.pt"
    t.save(path)
    assert os.listdir(tmp_path) == ["tracker.pt"]  # no temp file left behind
    u = SampleTracker.load(path)
    assert torch.equal(u.state, t.state) and torch.equal(u.counters, t.counters)
    assert u.user_stats == t.user_stats and u.epoch == t.epoch
    v = SampleTracker(50, stats="all")
    v.load_state_dict(t.state_dict())
    assert torch.equal(v.state, t.state)


def test_load_into_the_same_statistics_named_in_another_order(backend):
    """A state loads into a tracker of the same statistics named in another order (they are stored
    in one canonical order), sums as of the last all_reduce too, with the same scores."""
    from memfast._stats import SUM_STATS

    stats = ("csl", "last_loss", "count", "margin", "forgetting")
    t = SampleTracker(20, stats=stats)
    for logits, target, ids, end in _scripted_batches(20, 4, 3, seed=2):
        t.update(logits, target, ids)
        if end:
            t.end_epoch()
    sums = [name for name in t.stored_stats if name in SUM_STATS]
    t._synced_sums = torch.stack([t.stat(name) * 0.5 for name in sums])  # as after an all_reduce
    u = SampleTracker(20, stats=tuple(reversed(stats)))
    u.load_state_dict(t.state_dict())
    for name in t.stored_stats:
        assert torch.equal(u.stat(name), t.stat(name)), name
    u_sums = [name for name in u.stored_stats if name in SUM_STATS]
    for name in sums:
        assert torch.equal(u._synced_sums[u_sums.index(name)], t.stat(name) * 0.5), name
    for name, value in t.scores().items():
        torch.testing.assert_close(u.scores()[name], value, equal_nan=True)
    with pytest.raises(ValueError, match="keeps"):
        SampleTracker(20, stats=stats[:-1]).load_state_dict(t.state_dict())


def test_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    t = SampleTracker(8)
    t.update(torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.arange(8))
    path = tmp_path / "t.pt"
    t.save(path)
    good = path.read_bytes()
    t.update(torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.arange(8))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["t.pt"]


def test_empty_batch_counts_a_call(backend):
    t = SampleTracker(4)
    t.update(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert t.state.abs().sum() == 0


@pytest.mark.parametrize("use_reentrant,early_stop", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_checkpoint_recompute_tracks_once(backend, loss, use_reentrant, early_stop):
    """Activation checkpointing re-runs the loss inside the backward: the tracker must
    count the step once, with the first forward's statistics, and the gradient be unchanged."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    head = torch.randn(4, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, -100, 1])
    ids = torch.tensor([0, 1, 1, 2, 3, 4])

    def step(checkpointed):
        tracker = SampleTracker(5, stats="all")
        inp = x.clone().requires_grad_()

        def f(inp):
            if loss == "cross_entropy":
                return memfast.cross_entropy(inp @ head.t(), target, sample_ids=ids, tracker=tracker)
            return memfast.linear_cross_entropy(inp, head, target, sample_ids=ids, tracker=tracker)

        if checkpointed:
            with set_checkpoint_early_stop(early_stop):
                out = checkpoint(f, inp, use_reentrant=use_reentrant)
                out.backward()
        else:
            out = f(inp)
            out.backward()
        return tracker, out.detach(), inp.grad

    plain, loss_plain, grad_plain = step(False)
    ckpt, loss_ckpt, grad_ckpt = step(True)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    torch.testing.assert_close(grad_ckpt, grad_plain)
    assert ckpt.stat("count").tolist() == [1.0, 2.0, 1.0, 0.0, 1.0]
    for name in plain.stored_stats:
        torch.testing.assert_close(ckpt.stat(name), plain.stat(name), msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_checkpoint_of_a_compiled_loss_tracks_once(backend, loss, use_reentrant):
    """A compiled loss inside a checkpointed region: the recompute runs the compiled graph inside
    the backward, so the skip is decided when the graph runs (the op track_unless_backward_)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    head = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, -100, 1])
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    tracker = SampleTracker(5)

    def f(inp):
        if loss == "cross_entropy":
            return memfast.cross_entropy(inp @ head.t(), target, sample_ids=ids, tracker=tracker)
        return memfast.linear_cross_entropy(inp, head, target, sample_ids=ids, tracker=tracker)

    torch._dynamo.reset()  # f is one code object for every parametrisation: no recompile limit
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with set_checkpoint_early_stop(False):
        checkpoint(compiled, x, use_reentrant=use_reentrant).backward()
    assert tracker.stat("count").tolist() == [1.0, 2.0, 1.0, 0.0, 1.0]
    assert int(tracker.counters[COUNTER["calls"]]) == 1  # one tracked call


def test_update_inside_a_backward_hook_is_recorded(backend):
    """tracker.update is an explicit call: it records even while autograd runs a backward."""
    tracker = SampleTracker(4)
    x = torch.randn(4, 3, requires_grad=True)
    z = x * 2
    y = torch.tensor([0, 1, 2, 0])

    def hook(grad):
        tracker.update(z.detach(), y, torch.arange(4))

    z.register_hook(hook)
    z.sum().backward()
    assert tracker.stat("count").tolist() == [1.0] * 4


@pytest.mark.parametrize("ns", ["memfast", "memfast_ref"])
def test_track_unless_backward_op(ns):
    """opcheck; it records outside a backward and skips inside one (a hook runs it there)."""
    if ns == "memfast" and not memfast._ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns).track_unless_backward_
    tracker = SampleTracker(4, stats="all")
    logits, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    _, row_stats, _ = torch.ops.memfast_ref.cross_entropy_fwd(logits, y, None, -100, 0.0, None, None, False, 0)
    args = (tracker.state, tracker.counters, row_stats, y, torch.arange(6) % 4, -100, 3, tracker._stat_rows)
    torch.library.opcheck(op, args)
    op(*args)
    assert tracker.stat("count").sum() == 6
    x = torch.randn(2, requires_grad=True)
    z = x * 2
    z.register_hook(lambda g: op(*args))
    z.sum().backward()
    assert tracker.stat("count").sum() == 6  # skipped inside the backward


def test_variances_are_exact_zero_for_one_update_and_match_numpy_after(backend):
    """loss_var / variability from fp32 running sums: one update has no spread (not cancellation
    noise of ~1e-5), and two updates give the population variance / std."""
    g = torch.Generator().manual_seed(2)
    assert SampleTracker(2, stats="all").scores()["variability"].isnan().all()  # never updated: no value, as the means
    tracker = SampleTracker(6, stats="all")
    y = torch.randint(0, 5, (6,), generator=g)
    rows = [torch.randn(6, 5, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    tracker.update(rows[0].float(), y, torch.arange(6))
    s = tracker.scores()
    assert torch.equal(s["variability"], torch.zeros(6)) and torch.equal(s["loss_var"], torch.zeros(6))
    tracker.update(rows[1].float(), y, torch.arange(6))
    s = tracker.scores()
    nll = torch.stack([torch.nn.functional.cross_entropy(r.float().double(), y, reduction="none") for r in rows])
    p = torch.exp(-nll)
    torch.testing.assert_close(s["variability"].double(), p.std(0, unbiased=False), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(s["loss_var"].double(), nll.var(0, unbiased=False), atol=1e-3, rtol=1e-3)


def test_to_takes_devices_only():
    t = SampleTracker(4, stats="all")
    with pytest.raises(TypeError, match="device must be a device"):
        t.to(torch.float64)  # (converted state and counters before: update raised, the saved file was refused)
    assert t.state.dtype == torch.float32 and t.counters.dtype == torch.int64
    assert t.to("cpu") is t


def test_synced_sums_are_validated_and_checksummed():
    """The sums as of the last all_reduce load only as float32 [sum statistics, N], and a flipped byte in
    them is caught like one in the state; a refused state leaves the tracker unchanged."""
    t = SampleTracker(4, stats=("csl", "count", "last_loss"))
    t.update(torch.randn(4, 3), torch.randint(0, 3, (4,)), torch.arange(4))
    from memfast._stats import SUM_STATS

    sums = [t._row[name] for name in t.stored_stats if name in SUM_STATS]
    t._synced_sums = t.state[sums].clone()  # as after an all_reduce
    u = SampleTracker(4, stats=("csl", "count", "last_loss"))
    u.load_state_dict(t.state_dict())
    assert torch.equal(u._synced_sums, t._synced_sums)
    for bad, match in ((torch.zeros(len(sums) + 1, 4), f"synced_sums must be None or float32 \\[{len(sums)}, 4\\]"),
                       ("junk", "synced_sums must be"), (t._synced_sums + 1, "corrupted")):
        sd = t.state_dict()
        sd["synced_sums"] = bad
        fresh = SampleTracker(4, stats=("csl", "count", "last_loss"))
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(sd)
        assert not fresh.state[0].any() and fresh._synced_sums is None


def test_save_keeps_the_file_mode(tmp_path):
    """A new file gets open()'s mode under the umask (mkstemp's 0600 before), an existing one keeps its
    own; a bytes path works."""
    t = SampleTracker(3)
    path = tmp_path / "t.pt"
    umask = os.umask(0o022)
    try:
        t.save(path)
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        t.save(path)
        assert os.stat(path).st_mode & 0o777 == 0o640
        t.save(os.fsencode(tmp_path / "b.pt"))
        assert SampleTracker.load(tmp_path / "b.pt").num_samples == 3
    finally:
        os.umask(umask)
