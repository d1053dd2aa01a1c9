"""`memfast score`: saved checkpoints scored into a tracker equal the same
scoring done with the Python API; bad arguments stop with a clear message."""
import json

import pytest
import torch
import torch.nn.functional as F

import memfast
from memfast.cli import main
from memfast.curvature import _batch_seed

MODELS = '''
import torch

def make(width=8):
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
'''
N = 30


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    torch.save({"inputs": x, "targets": y}, tmp_path / "data.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    checkpoints = []
    for step in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        path = tmp_path / f"ckpt{step}.pt"
        # the second one as a training script often saves it: wrapped, from a DDP model
        sd = model.state_dict()
        if step == 1:
            sd = {"model_state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": step}
        torch.save(sd, path)
        checkpoints.append((str(path), {k: v.clone() for k, v in model.state_dict().items()}))
    return tmp_path, x, y, checkpoints


def expected_tracker(x, y, checkpoints, probes):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    tracker = memfast.SampleTracker(N, stats="all")
    history = []
    for index, (_, sd) in enumerate(checkpoints):
        model.load_state_dict(sd)
        model.eval()
        with torch.no_grad():
            for start in range(0, N, 8):  # the command's --batch-size 8
                sl = slice(start, start + 8)
                tracker.update(model(x[sl]), y[sl], torch.arange(N)[sl])
        norms = memfast.input_gradient_norm(model, x, y)
        history.append(norms)
        tracker.stat("grad_norm").add_(norms)
        tracker.stat("grad_norm_count").add_(1)
        curv = torch.cat([memfast.input_curvature(model, x[s:s + 8], y[s:s + 8], n_probes=probes,
                                                  seed=_batch_seed(5 + index, b))
                          for b, s in enumerate(range(0, N, 8))])
        tracker.stat("curv").add_(curv)
        tracker.stat("curv_count").add_(1)
        tracker.end_epoch()
    return tracker, torch.stack(history)


def score(run_dir, *extra):
    tmp = run_dir[0]
    return main(["score", "--model", f"{tmp / 'models.py'}:make", "--data", str(tmp / "data.pt"),
                 "--tracker", str(tmp / "scores.pt"), "--batch-size", "8", "--quiet", *extra])


def test_score_equals_the_python_api(run_dir, capsys):
    tmp, x, y, checkpoints = run_dir
    paths = [p for p, _ in checkpoints]
    assert score(run_dir, "--grad-norm", "--history", str(tmp / "hist.pt"), "--curvature", "--probes", "2",
                 "--seed", "5", *paths) == 0
    assert "3 checkpoint(s) of 30 samples" in capsys.readouterr().out
    got = memfast.SampleTracker.load(tmp / "scores.pt")
    want, history = expected_tracker(x, y, checkpoints, probes=2)
    assert got.epoch == 3
    torch.testing.assert_close(got.state, want.state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp / "hist.pt"), history, rtol=1e-5, atol=1e-7)
    # the report command reads it, with the theory learning time from the history
    torch.save(y, tmp / "labels.pt")
    assert main(["report", str(tmp / "scores.pt"), "--labels", str(tmp / "labels.pt"), "--grad-norm-history",
                 str(tmp / "hist.pt")]) == 0
    report_text = capsys.readouterr().out
    assert "learning time (theory, Eq. 7)" in report_text and "loss sensitivity (grad norm)" in report_text
    with pytest.raises(SystemExit, match="grad-norm-history must be"):
        main(["report", str(tmp / "scores.pt"), "--labels", str(tmp / "labels.pt"), "--grad-norm-history",
              str(tmp / "labels.pt")])


def test_append_continues_the_file(run_dir):
    tmp, x, y, checkpoints = run_dir
    paths = [p for p, _ in checkpoints]
    hist = str(tmp / "hist.pt")
    assert score(run_dir, "--grad-norm", "--history", hist, "--curvature", "--probes", "2", "--seed", "5",
                 paths[0]) == 0
    with pytest.raises(SystemExit, match="exists; pass --append"):
        score(run_dir, paths[1])
    assert score(run_dir, "--append", "--grad-norm", "--history", hist, "--curvature", "--probes", "2",
                 "--seed", "5", *paths[1:]) == 0
    want, history = expected_tracker(x, y, checkpoints, probes=2)
    torch.testing.assert_close(memfast.SampleTracker.load(tmp / "scores.pt").state, want.state, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(torch.load(hist), history, rtol=1e-5, atol=1e-7)


def test_module_path_and_kwargs(run_dir):
    tmp, x, y, _ = run_dir
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp / "linear.pt")
    assert main(["score", "--model", "torch.nn:Linear", "--model-kwargs", json.dumps({"in_features": 4,
                 "out_features": 3}), "--data", str(tmp / "data.pt"), "--tracker", str(tmp / "lin.pt"), "--quiet",
                 str(tmp / "linear.pt")]) == 0
    assert memfast.SampleTracker.load(tmp / "lin.pt").stat("count").eq(1).all()


@pytest.mark.parametrize("change,message", [
    (dict(model="models.py"), "FILE.py:FUNCTION"),
    (dict(model="nowhere.py:make"), "no file"),
    (dict(model="models.py:missing"), "no callable 'missing'"),
    (dict(model="no_such_module_xyz:make"), "cannot import"),
    (dict(kwargs="[1]"), "JSON object"),
    (dict(kwargs="{"), "not JSON"),
    (dict(kwargs='{"width": 5}'), "does not fit"),
    (dict(data="bad"), "must hold"),
    (dict(checkpoint="list.pt"), "not a state dict"),
    (dict(history=True), "--history needs --grad-norm"),
])
def test_bad_arguments_stop_with_a_message(run_dir, change, message):
    tmp, x, y, checkpoints = run_dir
    torch.save({"inputs": x}, tmp / "bad.pt")
    torch.save([1, 2], tmp / "list.pt")
    args = ["score", "--model", str(tmp / change.get("model", "models.py:make")),
            "--model-kwargs", change.get("kwargs", "{}"),
            "--data", str(tmp / ("bad.pt" if change.get("data") else "data.pt")),
            "--tracker", str(tmp / "out.pt"), "--quiet",
            str(tmp / change["checkpoint"]) if "checkpoint" in change else checkpoints[0][0]]
    if change.get("model") == "no_such_module_xyz:make":
        args[2] = "no_such_module_xyz:make"
    if change.get("history"):
        args += ["--history", str(tmp / "h.pt")]
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp / "out.pt").exists()
