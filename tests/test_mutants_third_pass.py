"""Tests from a third mutation-testing pass (2026-12-02) over the modules the earlier passes covered
least (the curvature ops' reference twins and estimator, linear_cross_entropy, the loss's argument
handling, the tracker's scores / persistence, report, noise and score): each kills a plausible
single-line bug that the rest of the suite let through."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import memfast
from memfast import _ops
from memfast.reference import curvature as ref


# ----------------------------------------------------------- curvature ops (both backends)
def test_curvature_perturb_refuses_a_negative_probe_count(backend):
    """A negative num_probes is the documented ValueError on both backends (not torch.arange's
    RuntimeError about the step's sign)."""
    op = _ops.ops("cpu")
    with pytest.raises(ValueError, match="must lie in"):
        op.curvature_perturb(torch.zeros(2, 3), 0, 4, -1, 1e-3)


def test_curvature_perturb_of_half_inputs_rounds_once(backend):
    """fp16 / bf16 inputs: x + h v is formed in fp32 and rounded once, not h v rounded to the input's
    dtype first and the sum rounded again (double rounding changes some elements)."""
    op = _ops.ops("cpu")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4, 256, generator=g) * 3).to(dtype)
        h = 1e-3 * (1 + 2 ** -9)  # not a power of two: h rounds in fp16 / bf16
        out = op.curvature_perturb(x, 5, 0, 2, h)
        v = ref.probe_signs(5, 4, 256, 0, 2).float()
        step = v * torch.tensor(h, dtype=torch.float32)
        want = (x.float().unsqueeze(0) + step).to(dtype).reshape(8, 256)
        assert torch.equal(out, want)


def test_curvature_reduce_accumulates_in_double(backend):
    """The probe dot product v . (g_k - g0) sums in fp64: 2^25 + 1 - 2^25 is 1, where an fp32 sum
    loses the 1 (rounded to 0)."""
    op = _ops.ops("cpu")
    v = ref.probe_signs(3, 1, 3, 0, 1).float().reshape(1, 3)
    grads = v * torch.tensor([2.0 ** 25, 1.0, -(2.0 ** 25)])
    out = op.curvature_reduce(grads, torch.zeros(1, 3), 3, 0)
    assert out[2].item() == 1.0


# --------------------------------------------------------------- reference probe loop
def test_reference_probe_loop_default_probes_are_rademacher_from_torch():
    """Without probes the loop draws +-1 Rademacher probes from torch's generator (randint 0/1 mapped
    to -1/+1), so the same probes given explicitly reproduce it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(7)
    got = ref.reference_probe_loop(model, x, y, 3, 1e-2, offset=0.0)
    torch.manual_seed(7)
    probes = torch.stack([torch.randint_like(x, 2) * 2 - 1 for _ in range(3)])
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    want = ref.reference_probe_loop(model, x, y, 3, 1e-2, probes, offset=0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------ scoring passes
def _tiny_loader(n=6):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    return model, [(x[:4], y[:4], torch.arange(4)), (x[4:], y[4:], torch.arange(4, n))]


def test_score_grad_norm_refuses_num_samples_that_contradict_the_tracker():
    """num_samples given with a tracker must agree with it: a tracker of 6 and num_samples=7 is a
    caller's mistake, refused before scoring (the tracker is left untouched)."""
    model, loader = _tiny_loader()
    tracker = memfast.SampleTracker(6, stats=("csl", "grad_norm"))
    with pytest.raises(ValueError, match="num_samples=7 but the tracker has 6"):
        memfast.score_grad_norm(model, loader, tracker, num_samples=7, progress=False)
    assert tracker.stat("grad_norm_count").eq(0).all()
    # agreeing is fine
    assert memfast.score_grad_norm(model, loader, tracker, num_samples=6, progress=False).shape == (6,)


def test_score_grad_norm_of_an_empty_dataset():
    """num_samples=0 with no tracker is a valid (empty) pass: an empty result, not a refusal."""
    model, _ = _tiny_loader()
    out = memfast.score_grad_norm(model, [], num_samples=0, progress=False)
    assert out.shape == (0,) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="non-negative int"):
        memfast.score_grad_norm(model, [], num_samples=-1, progress=False)


def test_input_curvature_refuses_targets_on_another_device():
    """Targets on another device than the inputs are named in a ValueError (here the meta device
    stands in for a GPU), before the model runs."""
    model = nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2], device="meta")
    for f in (memfast.input_curvature, memfast.input_gradient_norm):
        with pytest.raises(ValueError, match="targets are on meta but inputs are on cpu"):
            f(model, x, y)


class _IgnoresInput(nn.Module):
    """Logits that do not depend on the input (e.g. a collapsed model): the input gradient is 0."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 3)


def test_curvature_and_grad_norm_of_a_model_that_ignores_its_input():
    """No path from the input to the loss: zero gradient norm and zero curvature, not autograd's
    'appears to not have been used in the graph' error."""
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.equal(memfast.input_gradient_norm(_IgnoresInput(), x, y), torch.zeros(3))
    score, trace = memfast.input_curvature(_IgnoresInput(), x, y, n_probes=2, seed=0, return_trace=True)
    assert torch.equal(score, torch.zeros(3)) and torch.equal(trace, torch.zeros(3))


def test_score_curvature_seeds_that_differ_by_one_share_no_probes():
    """Each batch's probe seed is spread from the base seed: base seeds s and s + 1 (memfast score's
    seed per checkpoint) must not give batch 1 of one the probes of batch 0 of the other (which
    base + index would). Two batches hold the same samples, so equal probes give equal scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    loader = [(x, y, torch.arange(3)), (x, y, torch.arange(3, 6))]
    curv = []
    for seed in (10, 11):
        t = memfast.SampleTracker(6, stats=("csl", "curv"))
        memfast.score_curvature(model, loader, t, n_probes=1, h=0.1, seed=seed, progress=False)
        curv.append(t.scores()["curv"])
    assert not torch.allclose(curv[0][3:], curv[1][:3], rtol=1e-4, atol=0)


# ------------------------------------------------------------------ linear_cross_entropy
def _lce_batch(N=6, H=5, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, generator=g), torch.randn(C, H, generator=g), torch.randint(0, C, (N,), generator=g)


def test_linear_cross_entropy_refuses_class_weights_that_require_grad(backend):
    """As F.cross_entropy: the loss is not differentiable in the class weights, so a weight that
    requires grad is refused (silently giving it no gradient would hide a mistake); under no_grad
    it is fine."""
    x, w, y = _lce_batch()
    cw = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match="weight requires grad"):
        memfast.linear_cross_entropy(x, w, y, weight=cw)
    with torch.no_grad():
        got = memfast.linear_cross_entropy(x, w, y, weight=cw)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(x @ w.T, y, weight=cw.detach()))


def test_linear_cross_entropy_probability_targets_promote_to_the_class_weights_dtype(backend):
    """As F.cross_entropy with class probabilities: the loss takes the promotion of the logits',
    the target's and the class weights' dtypes (fp64 weights: an fp64 loss)."""
    x, w, _ = _lce_batch()
    t = torch.softmax(torch.randn(6, 4), 1)
    cw = torch.rand(4, dtype=torch.float64)
    got = memfast.linear_cross_entropy(x, w, t, weight=cw)
    want = torch.nn.functional.cross_entropy(x @ w.T, t, weight=cw)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_linear_cross_entropy_tracks_probability_rows_without_mass_under_any_negative_ignore_index(backend):
    """With class probabilities a row of all zeros has no label (-100) and is not tracked, whatever
    negative ignore_index the caller passes (-1 here): it must not be counted as an out-of-range
    target (nor tracked)."""
    x, w, _ = _lce_batch()
    t = torch.softmax(torch.randn(6, 4), 1)
    t[2] = 0.0
    tracker = memfast.SampleTracker(6, stats="all")
    memfast.linear_cross_entropy(x, w, t, ignore_index=-1, sample_ids=torch.arange(6), tracker=tracker)
    tracker.check()  # no bad-target flag
    assert tracker.stat("count").tolist() == [1, 1, 0, 1, 1, 1]


def test_linear_cross_entropy_bias_gradient_sums_in_fp32_under_bf16_autocast(backend):
    """Under bf16 autocast the bias gradient is the fp32 sum of the rows' bf16 logit gradients, not a
    bf16 sum (rounded to 8 bits, ~0.4%)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 8, generator=g), torch.randn(5, 8, generator=g)
    b, y = torch.randn(5, generator=g), torch.randint(0, 5, (256,), generator=g)
    w.requires_grad_(), b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memfast.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum").backward()
        z = torch.nn.functional.linear(x, w, b).detach().requires_grad_()
    memfast.cross_entropy(z, y, reduction="sum").backward()
    assert z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(b.grad, z.grad.float().sum(0), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ cross_entropy's arguments
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_lse_square_scale_must_be_finite(backend, value):
    """An infinite or NaN z-loss factor is refused up front (it would turn every loss into inf /
    NaN), for memfast.cross_entropy and linear_cross_entropy alike."""
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="lse_square_scale must be a finite number"):
        memfast.cross_entropy(x, y, lse_square_scale=value)
    with pytest.raises(ValueError, match="lse_square_scale must be a finite number"):
        memfast.linear_cross_entropy(x, torch.randn(5, 4), y, lse_square_scale=value)



# ------------------------------------------------------------------ tracker: scores, persistence, to()
def _updated_tracker(n=4, stats="all"):
    t = memfast.SampleTracker(n, stats=stats)
    g = torch.Generator().manual_seed(0)
    t.update(torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))
    return t


def test_scores_are_copies_of_the_statistics(backend):
    """scores()' raw sums are copies: editing one (e.g. a caller's in-place normalisation) must not
    write into the tracker's buffers."""
    t = _updated_tracker()
    before = t.state.clone()
    for v in t.scores().values():
        v.add_(1.0)
    assert torch.equal(t.state, before)


def test_state_dict_is_a_snapshot(backend):
    """state_dict() on a CPU tracker copies the buffers (.cpu() alone would alias them): later updates
    change neither the snapshot nor its checksum's validity."""
    t = _updated_tracker()
    sd = t.state_dict()
    saved = sd["state"].clone()
    t.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.arange(4))
    t.end_epoch()
    assert torch.equal(sd["state"], saved) and int(sd["counters"][0]) == 0
    u = memfast.SampleTracker.from_state_dict(sd)  # the checksum still matches
    assert torch.equal(u.state, saved)


def test_to_moves_the_synced_sums_too():
    """to(device) moves the sums of the last all_reduce with the state (else the next all_reduce
    mixes devices); the meta device stands in for a GPU."""
    t = _updated_tracker(stats=("csl", "count"))
    t._synced_sums = t.state.clone()  # as after an all_reduce
    t.to("meta")
    assert t.state.device.type == t.counters.device.type == t._synced_sums.device.type == "meta"


def test_to_refuses_an_unknown_device_name_with_a_type_error():
    """A string that names no device is the documented TypeError, as a dtype is."""
    t = memfast.SampleTracker(2)
    with pytest.raises(TypeError, match="device must be a device"):
        t.to("not-a-device")


def test_from_state_dict_places_the_tracker_on_the_given_device():
    """from_state_dict / load(device=...) build the tracker on that device (meta standing in for a
    GPU), not on the CPU."""
    sd = _updated_tracker().state_dict()
    t = memfast.SampleTracker.from_state_dict(sd, device="meta")
    assert t.device.type == "meta" and t.counters.device.type == "meta"


def test_load_of_a_missing_file_raises_file_not_found(tmp_path):
    """A missing tracker file is FileNotFoundError (callers such as `memfast report` name it so), not
    the ValueError of an unreadable one."""
    with pytest.raises(FileNotFoundError):
        memfast.SampleTracker.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tracker")
    with pytest.raises(ValueError, match="not a readable memfast SampleTracker file"):
        memfast.SampleTracker.load(tmp_path / "junk.pt")


def test_adjustment_requiring_grad_warns_only_once(monkeypatch):
    """The 'adjustment requires grad' warning is given once per process, not on every step."""
    import warnings

    from memfast import loss

    monkeypatch.setattr(loss, "_warned_adjustment_grad", [])
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    adj = torch.zeros(4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            memfast.cross_entropy(x, y, adjustment=adj)
    assert [str(w.message).startswith("memfast.cross_entropy: adjustment requires grad") for w in caught] == [True]


def test_groups_of_another_length_than_the_targets_are_refused(backend):
    """One group per target: a groups tensor one entry short is a ValueError naming the shapes, not
    a gather past its end."""
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    table = torch.randn(2, 3)
    with pytest.raises(ValueError, match="groups must have the target's shape"):
        memfast.cross_entropy(x, y, adjustment=table, groups=torch.tensor([0, 1, 1]))



@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_does_not_track_probability_targets_twice(backend, use_reentrant):
    """Activation checkpointing re-runs the loss's forward in the backward (in full: no early stop);
    the tracker must count the step once, also on PyTorch's path for probability targets (taken for
    a target that requires grad)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    tracker = memfast.SampleTracker(4, stats=("csl", "count"))
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.softmax(torch.randn(4, 3), 1).requires_grad_()
    with set_checkpoint_early_stop(False):
        loss = checkpoint(lambda a: memfast.cross_entropy(a * 2, t, sample_ids=torch.arange(4), tracker=tracker), z,
                          use_reentrant=use_reentrant)
        loss.backward()
    assert tracker.stat("count").tolist() == [1.0] * 4 and z.grad is not None


def test_scores_with_sync_merges_through_all_reduce(tmp_path):
    """scores(sync=True) runs all_reduce first: in a one-rank gloo group the values stay, and the
    tracker then holds the sums as of that all_reduce (saved as synced_sums, so a resumed run does
    not count them twice)."""
    import torch.distributed as dist

    t = _updated_tracker(stats=("csl", "count", "last_loss"))
    assert t.state_dict()["synced_sums"] is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        before = t.state.clone()
        s = t.scores(sync=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(t.state, before) and torch.equal(s["csl"], before[t._row["csl"]])
    from memfast._stats import SUM_STATS

    sums = [t._row[name] for name in t.stored_stats if name in SUM_STATS]  # csl, count, nonfinite
    synced = t.state_dict()["synced_sums"]
    assert synced is not None and torch.equal(synced, before[sums])


def test_a_state_whose_stored_rows_contradict_its_stats_is_malformed(tmp_path):
    """stored_stats must be what user_stats imply, in the canonical order: a file that lists them
    otherwise (its rows would be read as the wrong statistics) is refused as malformed."""
    sd = _updated_tracker(stats=("csl", "count")).state_dict()
    sd["stored_stats"] = ["count", "csl", "nonfinite"]  # rows swapped
    with pytest.raises(ValueError, match="is malformed: stored statistics"):
        memfast.SampleTracker.from_state_dict(sd)
    torch.save(sd, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="t.pt is malformed: stored statistics"):
        memfast.SampleTracker.load(tmp_path / "t.pt")


def test_a_single_update_has_exactly_zero_variability_and_loss_var(backend):
    """One update has no spread: variability and loss_var are 0 by rule (count == 1), also for a
    confidently wrong sample, whose p_true (2e-9 here) the 1 - E[1 - p] of confidence rounds to 0,
    leaving E[p^2] - 0 above the rounding floor."""
    t = memfast.SampleTracker(2, stats="all")
    t.update(torch.tensor([[0.0, 20.0], [1.0, 0.0]]), torch.tensor([0, 0]), torch.arange(2))
    s = t.scores()
    assert s["confidence"][0] == 0.0  # the case: E[p] rounded away
    assert torch.equal(s["variability"], torch.zeros(2)) and torch.equal(s["loss_var"], torch.zeros(2))


# ------------------------------------------------------------------ noise
def test_duplicates_refuses_a_fractional_number_of_pairs():
    """num_pairs is a count: 1.5 is refused rather than silently truncated to 1 pair; 2.0 is fine."""
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    with pytest.raises(ValueError, match="num_pairs must be a non-negative int, got 1.5"):
        memfast.noise.duplicates(x, y, 1.5)
    assert memfast.noise.duplicates(x, y, 2.0)[3].shape == (2, 2)


def test_duplicates_leaves_the_inputs_unmodified():
    """duplicates() returns new inputs; the caller's array (or tensor, whose NumPy view shares its
    memory) keeps its rows."""
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    new_x, _, _, pairs = memfast.noise.duplicates(x, y, 3, seed=1)
    assert np.array_equal(x, np.arange(20.0).reshape(10, 2))
    assert np.array_equal(new_x[pairs[:, 0]], x[pairs[:, 1]])
    xt = torch.arange(20.0).reshape(10, 2)
    memfast.noise.duplicates(xt, torch.from_numpy(y), 3, seed=1)
    assert torch.equal(xt, torch.arange(20.0).reshape(10, 2))


# ------------------------------------------------------------------ memfast score
def test_score_load_factory_refuses_an_empty_module_path():
    """':make' names no module: the command's one-line message, not importlib's ValueError."""
    from memfast import score

    with pytest.raises(SystemExit, match="--model must be FILE.py:FUNCTION or MODULE:FUNCTION"):
        score.load_factory(":make")


def test_score_state_dict_under_the_model_key_and_a_partial_module_prefix(tmp_path):
    """A checkpoint {'model': state_dict} is unwrapped; the DDP 'module.' prefix is removed only when
    every key has it (a model whose own submodule is called 'module' keeps its names)."""
    from memfast import score

    sd = {"w": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "a.pt")
    assert score.load_state_dict(tmp_path / "a.pt", "cpu").keys() == sd.keys()
    mixed = {"module.w": torch.ones(2), "head.b": torch.zeros(1)}
    torch.save(mixed, tmp_path / "b.pt")
    assert list(score.load_state_dict(tmp_path / "b.pt", "cpu")) == ["module.w", "head.b"]


def test_score_command_scores_csl_in_eval_mode(tmp_path):
    """The CSL pass over a checkpoint runs the model in eval mode (the reference's scoring): with a
    dropout layer the tracked losses are the eval-mode ones."""
    from memfast.cli import main

    (tmp_path / "models.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.9), "
        "torch.nn.Linear(16, 3))\n")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    torch.save({"inputs": x, "targets": y}, tmp_path / "data.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.9), torch.nn.Linear(16, 3))
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    assert main(["score", "--model", f"{tmp_path / 'models.py'}:make", "--data", str(tmp_path / "data.pt"),
                 "--tracker", str(tmp_path / "t.pt"), "--quiet", str(tmp_path / "ckpt.pt")]) == 0
    model.eval()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(memfast.SampleTracker.load(tmp_path / "t.pt").stat("csl"), want)


def test_score_data_needs_one_integer_label_per_input(tmp_path):
    """--data: float targets or a label count that differs from the inputs stop with a message
    (not a crash in the first update)."""
    from memfast import score

    x = torch.randn(6, 4)
    for targets, message in ((torch.zeros(6), "targets must be class indices"),
                             (torch.zeros(5, dtype=torch.long), "one label per input")):
        torch.save({"inputs": x, "targets": targets}, tmp_path / "d.pt")
        with pytest.raises(SystemExit, match=message):
            score.load_data(tmp_path / "d.pt")


def test_score_append_refuses_a_tracker_of_another_size(tmp_path):
    """--append continues a tracker only if it tracks as many samples as --data holds."""
    from memfast.cli import main

    (tmp_path / "models.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 3)\n")
    torch.save({"inputs": torch.randn(6, 4), "targets": torch.zeros(6, dtype=torch.long)}, tmp_path / "data.pt")
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "ckpt.pt")
    memfast.SampleTracker(5, stats="all").save(tmp_path / "t.pt")
    with pytest.raises(SystemExit, match="tracks 5 samples, --data has 6"):
        main(["score", "--model", f"{tmp_path / 'models.py'}:make", "--data", str(tmp_path / "data.pt"),
              "--tracker", str(tmp_path / "t.pt"), "--append", "--quiet", str(tmp_path / "ckpt.pt")])


# ------------------------------------------------------------------ report
def test_detection_metrics_are_none_when_every_kept_sample_is_positive():
    """AUROC / AUPR / FPR need both classes among the kept samples: all noisy gives None (n/a), as
    none noisy does."""
    from memfast import report

    rows = report.detection_table({"csl": np.array([0.1, 0.5, 0.9])}, noisy=np.ones(3, bool))
    assert [rows[0][m] for m in ("mislabeled_auroc", "mislabeled_aupr", "mislabeled_fpr95")] == [None] * 3
    rows = report.detection_table({"csl": np.array([0.1, 0.5, 0.9, 0.2])}, noisy=np.array([1, 1, 1, 0], bool),
                                  duplicates=np.array([0, 0, 0, 1], bool))  # the one clean sample is a duplicate
    assert rows[0]["mislabeled_auroc"] is None and rows[0]["duplicate_auroc"] is None


def test_an_aggregate_of_one_seed_prints_without_a_spread():
    """A metric aggregated over a single seed prints as its value, not 'value ± 0.0000'; two seeds
    print mean ± std (ddof=1)."""
    from memfast import report

    one = report.detection_table({"csl": np.array([0.1, 0.9, 0.2, 0.8])}, noisy=np.array([0, 1, 0, 1], bool))
    table = report.format_table(report.aggregate([one]))
    assert "±" not in table and "1.0000" in table
    two = report.detection_table({"csl": np.array([0.1, 0.9, 0.8, 0.2])}, noisy=np.array([0, 1, 0, 1], bool))
    assert "0.8750 ± 0.1768" in report.format_table(report.aggregate([one, two]))  # AUROC 1 and 0.75


def test_binned_std_of_a_constant_bin_is_zero_not_nan():
    """E[y^2] - E[y]^2 of a constant bin can round below 0 (3 x 0.1: -1.7e-18): the std is clamped to
    0 rather than the NaN of a negative square root."""
    from memfast import report

    centers, means, stds, counts = report.binned(np.array([0.0, 0.0, 0.0, 1.0]), np.array([0.1, 0.1, 0.1, 0.5]),
                                                 bins=2)
    assert counts.tolist() == [3, 1] and np.allclose(means, [0.1, 0.5])
    assert stds.tolist() == [0.0, 0.0]


def test_binned_constant_x_falls_in_the_first_of_unit_width_bins():
    """All x equal: the bins span [x, x + 1) (not zero-width bins), so every sample is in the first
    bin, centred at x + 1 / (2 bins)."""
    from memfast import report

    centers, means, stds, counts = report.binned(np.full(5, 2.0), np.arange(5.0), bins=4)
    assert centers.tolist() == [2.125] and means.tolist() == [2.0] and counts.tolist() == [5]


def test_report_command_lists_the_highest_csl_first(tmp_path, capsys):
    """`memfast report` names the ids of the largest CSL, largest first."""
    from memfast.cli import main

    t = memfast.SampleTracker(4, stats="all")
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 1.0]])  # losses ~0.13, 3.05, 0.69, 1.31
    t.update(logits, torch.zeros(4, dtype=torch.long), torch.arange(4))
    t.save(tmp_path / "t.pt")
    assert main(["report", str(tmp_path / "t.pt")]) == 0
    assert "highest CSL: ids [1, 3, 2, 0]" in capsys.readouterr().out


def test_load_array_takes_a_dict_only_with_a_single_tensor(tmp_path):
    """A .pt dict holding one tensor is that tensor; with several it is ambiguous and refused (not
    the first one silently)."""
    from memfast import report

    torch.save({"labels": torch.arange(3)}, tmp_path / "one.pt")
    assert report.load_array(tmp_path / "one.pt").tolist() == [0, 1, 2]
    torch.save({"labels": torch.arange(3), "noisy": torch.zeros(3)}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="must hold a tensor, got dict"):
        report.load_array(tmp_path / "two.pt", "--labels")


def test_proxies_of_different_lengths_are_refused():
    """Proxies scored on different sample sets (e.g. a tracker of another run) cannot share a table."""
    from memfast import report

    with pytest.raises(ValueError, match="proxies differ in length: \\[3, 4\\]"):
        report.detection_table({"csl": np.zeros(3), "curvature": np.zeros(4)}, noisy=np.zeros(3, bool))


def test_proxies_take_curvature_from_the_eval_tracker():
    """Curvature scored into the eval-mode tracker (not the training one) still fills the curvature
    row, as loss sensitivity does."""
    from memfast import report

    curv = np.array([0.5, 0.1, 0.9])
    out = report.proxies({"csl": np.ones(3)}, eval_scores={"csl": np.ones(3), "curv": curv, "grad_norm": curv * 2})
    assert np.array_equal(out["curvature"], curv) and np.array_equal(out["loss_sensitivity"], curv * 2)


def test_report_command_has_no_confident_learning_row(tmp_path, capsys):
    """The command has no confident-learning score to show: that row is left out, not printed as n/a."""
    from memfast.cli import main

    t = memfast.SampleTracker(3, stats="all")
    t.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.arange(3))
    t.save(tmp_path / "t.pt")
    assert main(["report", str(tmp_path / "t.pt")]) == 0
    out = capsys.readouterr().out
    assert "CSL" in out and "confident learning" not in out


def test_top_images_put_samples_without_a_score_last(tmp_path, monkeypatch):
    """The image grid shows the k highest scores; a NaN score (never scored) sorts below every
    number, not above."""
    import matplotlib.axes

    from memfast import report

    captions = []
    draw = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, x, y, s, *a, **k: (captions.append(s),
                                                                                     draw(ax, x, y, s, *a, **k))[1])
    report.plot_top_images(tmp_path / "top.png", np.array([np.nan, 0.2, 0.9, 0.5]), np.zeros((4, 4, 4)),
                           np.arange(4), k=2)
    assert captions == ["#2 given 2", "#3 given 3"]


@pytest.mark.parametrize("stat", ["forgetting", "learn_time", "last_maxprob", "last_loss"])
def test_all_reduce_of_a_tracker_keeping_one_per_sample_state(tmp_path, stat):
    """Every statistic with per-sample state keeps the call index it was last updated at, which
    all_reduce needs to pick each sample's owner: a tracker keeping only that statistic merges
    (here in a one-rank gloo group, where the values stay) and gives what a full tracker gives."""
    import torch.distributed as dist

    one, full = memfast.SampleTracker(4, stats=(stat,)), memfast.SampleTracker(4, stats="all")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, y = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
        one.update(logits, y, torch.arange(4))
        full.update(logits, y, torch.arange(4))
        one.end_epoch(), full.end_epoch()
    before = one.state.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        one.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(one.state, before)
    for name in one.stored_stats:
        assert torch.equal(one.stat(name), full.stat(name)), name
