"""PyTorch Lightning: a callback that gives the LightningModule a tracker,
ends its epochs with the Trainer's, and keeps it in Lightning checkpoints.

    from memfast.integrations.lightning import TrackerCallback

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, sample_ids = batch                       # e.g. memfast.data.WithIndex
            return memfast.cross_entropy(self(x), y, sample_ids=sample_ids, tracker=self.tracker)

    tracking = TrackerCallback(num_samples=len(train_set), stats="all")
    L.Trainer(callbacks=[tracking]).fit(model, loader)     # or fit(..., ckpt_path="last")
    tracking.tracker.scores()

The tracker is stored in each checkpoint under ``checkpoint["memfast"]``
(read it back with :func:`tracker_from_checkpoint`) and restored when
``fit(ckpt_path=...)`` resumes. Single device: under multi-device strategies
each rank's tracker sees only its own batches, and rank 0's is saved.
"""
try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

import torch

import memfast

CHECKPOINT_KEY = "memfast"


class TrackerCallback(pl.Callback):
    """Attach a :class:`memfast.SampleTracker` to the LightningModule.

    Args:
      tracker: the tracker to use; or
      num_samples, stats: create one (on the module's device); or neither:
        adopt the tracker the module already has in ``attribute``.
      attribute: the module attribute the training step reads the tracker
        from (``self.tracker``); set on ``setup``.

    The tracker follows the module's loss: the training step passes it to
    ``memfast.cross_entropy`` (validation steps do not). Its epoch counter
    follows the Trainer's epochs, including across a resume from a checkpoint
    written before ``on_train_epoch_end`` (e.g. after end-of-epoch validation).
    """

    def __init__(self, tracker=None, *, num_samples=None, stats=("csl", "count"), attribute="tracker"):
        if tracker is not None and not isinstance(tracker, memfast.SampleTracker):
            raise TypeError(f"TrackerCallback: tracker must be a memfast.SampleTracker, got {type(tracker)}")
        if tracker is not None and num_samples is not None:
            raise ValueError("TrackerCallback: give a tracker or num_samples, not both")
        if tracker is None and num_samples is not None:
            tracker = memfast.SampleTracker(num_samples, stats=stats)
        self.tracker = tracker
        self.attribute = attribute
        self._last_ended_epoch = -1  # the Trainer epoch whose end was last applied

    def setup(self, trainer, pl_module, stage):
        self._last_ended_epoch = -1  # a new fit (a resume restores it after setup)
        existing = getattr(pl_module, self.attribute, None)
        if self.tracker is None:
            if not isinstance(existing, memfast.SampleTracker):
                raise ValueError(f"TrackerCallback: no tracker given and the module has no SampleTracker in "
                                 f"{self.attribute!r}; pass tracker= or num_samples=")
            self.tracker = existing
        elif existing is not None and existing is not self.tracker:
            raise ValueError(f"TrackerCallback: the module's {self.attribute!r} is already set to something else")
        # Plain attribute assignment: a tracker is not an nn.Module and must not
        # become part of the model's state_dict (the checkpoint keeps it separately).
        object.__setattr__(pl_module, self.attribute, self.tracker)

    def on_fit_start(self, trainer, pl_module):
        if self.tracker.device != pl_module.device:
            self.tracker.to(pl_module.device)

    def _catch_up(self, trainer):
        # Resumed from a checkpoint saved after the last batch of an epoch but
        # before its on_train_epoch_end (a step-based checkpoint): Lightning
        # goes on with the next epoch without that hook (and without
        # on_train_epoch_start), so bring the counter to the Trainer's epoch
        # before any update.
        while self.tracker.epoch < trainer.current_epoch:
            self.tracker.end_epoch()
            self._last_ended_epoch = self.tracker.epoch - 1

    def on_train_start(self, trainer, pl_module):
        self._catch_up(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self._catch_up(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if self._last_ended_epoch != trainer.current_epoch:
            self.tracker.end_epoch()
            self._last_ended_epoch = trainer.current_epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = {"tracker": self.tracker.state_dict(), "last_ended_epoch": self._last_ended_epoch}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            raise KeyError("TrackerCallback: the checkpoint has no memfast tracker (it was not written with a "
                           "TrackerCallback); resuming would restart the tracker's totals from zero")
        if self.tracker is None:  # setup adopts the module's tracker; a checkpoint can create it
            self.tracker = memfast.SampleTracker.from_state_dict(entry["tracker"])
        else:
            self.tracker.load_state_dict(entry["tracker"])
        self._last_ended_epoch = int(entry["last_ended_epoch"])


def tracker_from_checkpoint(path, device=None):
    """The SampleTracker stored in a Lightning checkpoint file by TrackerCallback."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in checkpoint:
        raise KeyError(f"{path} has no memfast tracker (it was not written with a TrackerCallback)")
    return memfast.SampleTracker.from_state_dict(checkpoint[CHECKPOINT_KEY]["tracker"], device=device)


__all__ = ["TrackerCallback", "tracker_from_checkpoint", "CHECKPOINT_KEY"]
