"""TrackerCallback: the tracker follows a LightningModule's loss (CSL equals
the per-sample losses recorded the plain way), ends epochs with the Trainer,
and a run resumed from a Lightning checkpoint continues the same totals."""
import pytest
import torch
import torch.nn.functional as F

import memfast

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from memfast.integrations.lightning import CHECKPOINT_KEY, TrackerCallback, tracker_from_checkpoint  # noqa: E402

N, BATCH = 32, 8
STATS = ("csl", "count", "correct", "learn_time")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(8, 4)
        self.recorded = torch.zeros(N, dtype=torch.float64)  # per-sample losses, the plain way

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        logits = self.net(x)
        with torch.no_grad():
            self.recorded.index_add_(0, ids, F.cross_entropy(logits.double(), y, reduction="none"))
        return memfast.cross_entropy(logits, y, sample_ids=ids, tracker=self.tracker)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TinyWithValidation(Tiny):
    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", memfast.cross_entropy(self.net(x), y))


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = torch.randint(0, 4, (N,), generator=g)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(N))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def trainer(epochs, callbacks, root, validate=False):
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=str(root), accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1.0 if validate else 0)


def fit(epochs, callbacks, root, validate=False, ckpt_path=None, module=None):
    module = module or (TinyWithValidation() if validate else Tiny())
    kwargs = {"val_dataloaders": loader()} if validate else {}
    trainer(epochs, callbacks, root, validate).fit(module, loader(), ckpt_path=ckpt_path, **kwargs)
    return module


class EpochSpy(pl.Callback):
    """Records (trainer epoch, tracker epoch) before every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, pl_module.tracker.epoch))


@pytest.mark.parametrize("validate", [False, True], ids=["no-val", "val"])
def test_tracker_follows_the_module_loss(tmp_path, validate):
    tracking, spy = TrackerCallback(num_samples=N, stats=STATS), EpochSpy()
    module = fit(2, [tracking, spy], tmp_path, validate)  # validation steps do not pass the tracker
    assert module.tracker is tracking.tracker
    assert tracking.tracker.epoch == 2
    assert all(trainer_epoch == tracker_epoch for trainer_epoch, tracker_epoch in spy.seen) and len(spy.seen) == 8
    torch.testing.assert_close(tracking.tracker.stat("count"), torch.full((N,), 2.0))
    torch.testing.assert_close(tracking.tracker.stat("csl").double(), module.recorded, rtol=1e-6, atol=1e-6)
    assert "tracker" not in dict(module.named_modules()) and not any("tracker" in k for k in module.state_dict())


def test_adopts_the_modules_tracker(tmp_path):
    module = Tiny()
    module.tracker = memfast.SampleTracker(N)
    fit(1, [TrackerCallback()], tmp_path, module=module)
    torch.testing.assert_close(module.tracker.stat("csl").double(), module.recorded, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tracker"):
        fit(1, [TrackerCallback()], tmp_path)


@pytest.mark.parametrize("kind", ["epoch-end", "last-batch-step"])
def test_resume_continues_the_totals(tmp_path, kind):
    straight = TrackerCallback(num_samples=N, stats=STATS)
    fit(3, [straight], tmp_path / "straight")

    checkpoints = tmp_path / "ckpt"
    first = TrackerCallback(num_samples=N, stats=STATS)
    if kind == "epoch-end":  # saved after on_train_epoch_end
        saver = pl.callbacks.ModelCheckpoint(dirpath=checkpoints, filename="ckpt")
    else:  # saved on the epoch's last batch, before on_train_epoch_end, which a resume then skips
        saver = pl.callbacks.ModelCheckpoint(dirpath=checkpoints, filename="ckpt", every_n_train_steps=N // BATCH)
    fit(1, [first, saver], tmp_path / "first")
    path = checkpoints / "ckpt.ckpt"
    saved = tracker_from_checkpoint(path)
    assert saved.epoch == (1 if kind == "epoch-end" else 0)
    torch.testing.assert_close(saved.stat("csl"), first.tracker.stat("csl"))
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY]["tracker"]["num_samples"] == N

    resumed, spy = TrackerCallback(num_samples=N, stats=STATS), EpochSpy()
    fit(3, [resumed, spy], tmp_path / "resumed", ckpt_path=str(path))
    assert [e for e, _ in spy.seen] == [1] * 4 + [2] * 4
    assert all(trainer_epoch == tracker_epoch for trainer_epoch, tracker_epoch in spy.seen)
    assert resumed.tracker.epoch == straight.tracker.epoch == 3
    torch.testing.assert_close(resumed.tracker.stat("count"), straight.tracker.stat("count"))
    torch.testing.assert_close(resumed.tracker.stat("csl"), straight.tracker.stat("csl"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.tracker.state, straight.tracker.state, rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_without_tracker_raises(tmp_path):
    checkpoints = tmp_path / "ckpt"
    fit(1, [TrackerCallback(num_samples=N), pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_last=True)], tmp_path)
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(KeyError, match="tracker"):
        fit(2, [TrackerCallback(num_samples=N)], tmp_path, ckpt_path=str(tmp_path / "plain.ckpt"))
