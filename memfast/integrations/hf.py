"""Hugging Face ``transformers`` Trainer with memfast's loss and tracker.

    from memfast.integrations.hf import MemfastTrainer, add_sample_ids

    train = add_sample_ids(train_dataset)                 # a "sample_id" column 0..N-1
    tracker = memfast.SampleTracker(len(train), device="cuda")
    trainer = MemfastTrainer(model=model, args=args, train_dataset=train, tracker=tracker)
    trainer.train()                                       # or train(resume_from_checkpoint=True)
    tracker.scores()["csl"]                               # per-sequence cumulative loss

The loss is ``memfast.cross_entropy`` over the model's logits (shifted for
causal language models: the logits at position t predict the label at t + 1;
labels of -100 are ignored), with one sample id per sequence, so a sequence's
CSL is the sum over training steps of the sum of its tokens' losses. The
tracker is saved in every checkpoint folder (``memfast_tracker.pt``) and
restored when training resumes from one; its epoch counter follows the
Trainer's epochs.

With ``linear_cross_entropy=True`` a training step never forms the model's
``[B, T, V]`` logits: the LM head's input is taken as it is called and the
head's projection and the loss run in chunks (memfast.linear_cross_entropy).

Single process: under multi-process data parallelism each rank's tracker
sees only that rank's batches, and only rank 0's is saved.
"""
import os
import warnings
from collections.abc import Mapping

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import memfast
from memfast.linear import _autocast_dtype

TRACKER_FILE = "memfast_tracker.pt"


def add_sample_ids(dataset, column="sample_id"):
    """A dataset whose examples carry their index in ``column``.

    A ``datasets.Dataset`` gets a new column; any other map-style dataset of
    dict examples (e.g. a list of dicts or a torch Dataset) is wrapped."""
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):
        if column in dataset.column_names:
            raise ValueError(f"add_sample_ids: the dataset already has a {column!r} column")
        return dataset.add_column(column, list(range(len(dataset))))
    return _WithSampleIds(dataset, column)


class _WithSampleIds:
    def __init__(self, dataset, column):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        example = self.dataset[i]
        if not isinstance(example, dict):
            raise TypeError(f"add_sample_ids: examples must be dicts (the Trainer's format), got {type(example)}")
        if self.column in example:
            raise ValueError(f"add_sample_ids: the examples already have a {self.column!r} key")
        return {**example, self.column: i}


def _epoch_complete(state):
    """Whether the Trainer is exactly at the end of an epoch (state.epoch is
    epoch + (step + 1) / steps_in_epoch, an integer only after the last batch)."""
    return state.epoch is not None and state.epoch > 0 and abs(state.epoch - round(state.epoch)) < 1e-9


class TrackerCallback(TrainerCallback):
    """Ends the tracker's epochs with the Trainer's and saves it into each
    checkpoint folder. (MemfastTrainer adds one; the resume side is in
    MemfastTrainer.train.)"""

    def __init__(self, tracker):
        self.tracker = tracker
        self._epoch_ended_at_step = -1

    def _end_epoch_once(self, state):
        # An epoch's end can be seen twice: by a step-based save on its last
        # step (on_save runs before on_epoch_end) and by on_epoch_end.
        if _epoch_complete(state) and self._epoch_ended_at_step != state.global_step:
            self.tracker.end_epoch()
            self._epoch_ended_at_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        # Training cut short by max_steps also ends here, mid-epoch: not an epoch.
        self._end_epoch_once(state)

    def on_save(self, args, state, control, **kwargs):
        # A checkpoint saved on an epoch's last step is resumed as "epoch
        # complete" and that epoch's on_epoch_end never runs: end it now.
        self._end_epoch_once(state)
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"memfast: checkpoint folder {folder} not found; the tracker was not saved with it")
            return
        self.tracker.save(os.path.join(folder, TRACKER_FILE))


def load_tracker(checkpoint_dir, tracker):
    """Restore ``tracker`` from a checkpoint folder written by MemfastTrainer."""
    path = os.path.join(os.fspath(checkpoint_dir), TRACKER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the checkpoint was not written by MemfastTrainer with a "
                                f"tracker, so resuming would restart the tracker's totals from zero")
    tracker.load_state_dict(memfast.SampleTracker.load(path).state_dict())
    return tracker


def _config_values(model, name):
    """``name`` in the model's config and in its text config (multimodal models keep the LM's there)."""
    config = getattr(model, "config", None)
    found = []
    for c in (config, getattr(config, "text_config", None)):
        value = getattr(c, name, None) if c is not None else None
        if value is not None and not isinstance(value, bool):
            found.append(float(value))
    return found[:1]


def _head_transform(model):
    """(scale, softcap): what the architectures transformers ships do to the LM head's output
    (Cohere: times logit_scale; Granite: over logits_scaling; Gemma 2/3: final_logit_softcapping).
    The first training step checks the model's own logits against it (_check_head_transform)."""
    scale = 1.0
    for value in _config_values(model, "logit_scale") + _config_values(model, "output_multiplier"):
        scale *= value
    for value in _config_values(model, "logits_scaling"):
        scale /= value
    caps = _config_values(model, "final_logit_softcapping")
    return scale, (caps[0] if caps and caps[0] > 0 else None)


_OTHER_ROUTER_LOSSES = ("encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss", "decoder_z_loss")
_warned_router_losses = []


def _router_aux_loss(model, outputs):
    """A mixture-of-experts model's load-balancing term, as its forward adds it to a loss computed
    from labels (coefficient times ``outputs.aux_loss``); None when the model returns none.
    Encoder-decoder routers' losses (Switch Transformers, NLLB-MoE) are not added: warned once."""
    if not isinstance(outputs, dict):
        return None
    others = [k for k in _OTHER_ROUTER_LOSSES if outputs.get(k) is not None]
    if others and not _warned_router_losses:
        _warned_router_losses.append(True)
        warnings.warn(f"MemfastTrainer: the model returned {', '.join(others)}, which MemfastTrainer does not add "
                      f"to the loss (only a decoder-only model's aux_loss is added); add them in a subclass's "
                      f"compute_loss if you train with them")
    aux = outputs.get("aux_loss")
    if aux is None:
        return None
    coef = [float(getattr(model, name)) for name in ("router_aux_loss_coef", "aux_loss_coef")
            if isinstance(getattr(model, name, None), (int, float))] or _config_values(model, "router_aux_loss_coef")
    if not coef:
        raise ValueError("MemfastTrainer: the model returned a router aux_loss but no router_aux_loss_coef was "
                         "found on it or its config, so the loss its own forward would form is unknown")
    return coef[0] * aux


class _HeadInput:
    """A forward pre-hook on the LM head for one forward: it keeps the head's input (the hidden
    states, [..., T, H]) and lets the head project only the last position, so the model's
    [..., T, V] logits are never formed; the loss then runs memfast.linear_cross_entropy on
    the kept input."""

    def __init__(self, head):
        self.head, self.hidden, self.calls, self.autocast = head, None, 0, None
        self.handle = head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            raise ValueError("MemfastTrainer(linear_cross_entropy=True): the LM head was not called with one "
                             "[..., T, hidden] tensor, so its input cannot be kept; use linear_cross_entropy=False")
        self.hidden = args[0]
        # The Trainer's mixed precision wraps the model's forward only (accelerate), and the loss
        # runs after it: the head's projection must see the autocast state the head saw.
        dtype = _autocast_dtype(self.hidden)
        self.autocast = dict(device_type=self.hidden.device.type, enabled=dtype is not None,
                             **({} if dtype is None else {"dtype": dtype}))
        return (args[0][..., -1:, :],)

    def autocast_context(self):
        return torch.autocast(**self.autocast)

    def remove(self):
        self.handle.remove()


def _output_linear(model):
    """The model's LM head, which must be a plain linear layer with a floating-point weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"MemfastTrainer(linear_cross_entropy=True) needs a language model's LM head, but "
                         f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    weight = getattr(head, "weight", None)
    if (not isinstance(head, torch.nn.Linear) or not isinstance(weight, torch.Tensor) or not weight.is_floating_point()
            or weight.dim() != 2 or type(weight).__name__ == "DTensor"):
        raise ValueError(f"MemfastTrainer(linear_cross_entropy=True) needs the model's output embeddings to be a "
                         f"torch.nn.Linear with its whole floating-point weight in memory, got {type(head).__name__} "
                         f"(quantized, adapter-wrapped or sharded heads: use linear_cross_entropy=False)")
    return head


def _check_head_transform(logits, hidden, head, scale, softcap):
    """The model's own logits of the last position against softcap(scale * head(hidden)): catches an
    architecture that changes its logits in a way _head_transform does not know."""
    with torch.no_grad():
        head_logits = torch.nn.functional.linear(hidden[..., -1:, :], head.weight, head.bias)
        want = head_logits.float() * scale
        if softcap is not None:
            want = softcap * torch.tanh(want / softcap)
        got = logits.float()
        if got.shape != want.shape:
            raise ValueError(f"MemfastTrainer(linear_cross_entropy=True): the model returned logits of shape "
                             f"{tuple(got.shape)} for its head's last position, expected {tuple(want.shape)}; "
                             f"use linear_cross_entropy=False")
        # the model scales (and caps) in the dtype its head computed in; here it is done in fp32
        tol = 1e-4 if head_logits.dtype in (torch.float32, torch.float64) else 2e-2
        err = float((got - want).abs().max()) if got.numel() else 0.0
        if not err <= tol * (1.0 + float(want.abs().max() if want.numel() else 0.0)):
            raise ValueError(f"MemfastTrainer(linear_cross_entropy=True): the model's logits differ from "
                             f"softcap(scale * lm_head(hidden)) with scale={scale}, softcap={softcap} by up to "
                             f"{err:.3g}: this architecture transforms its logits in a way memfast does not "
                             f"know; use linear_cross_entropy=False")


def _is_causal_lm(model):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class MemfastTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``memfast.cross_entropy`` with a
    tracker keyed by a per-example sample id.

    Extra keyword arguments:
      tracker: a :class:`memfast.SampleTracker` with one entry per training
        example (None: memfast's loss without tracking).
      sample_id_column: the dataset column holding each example's index
        (see :func:`add_sample_ids`); the Trainer keeps it although the
        model's forward does not take it, and it is removed before the
        forward.
      shift_labels: True for causal LMs (logits[:, :-1] predict
        labels[:, 1:]), False when logits and labels are aligned (sequence or
        token classification). "auto": True for the architectures
        transformers lists as causal LMs.
      ignore_index: the label that is not a target (-100).
      inplace_backward: memfast.cross_entropy's: a training step writes the
        loss's gradient over the model's logits instead of allocating it
        (for an LM, memory of the logits' size saved); the logits are not
        used after the loss in training.
      linear_cross_entropy: a training step keeps the LM head's input, lets
        the head project only the last position, and computes the loss with
        memfast.linear_cross_entropy: neither the [B, T, V] logits nor their
        gradient exist (the head must be a torch.nn.Linear; the logit scale
        of Cohere / Granite and Gemma's final softcapping are applied from
        the config, and the first step checks them against the model's own
        logits). Evaluation uses the model's logits as usual.

    Only training batches update the tracker; evaluation batches do not.
    The tracker moves to the logits' device on the first training step.
    ``args.label_smoothing_factor`` applies to the loss (the tracked loss is
    unsmoothed). ``lse_square_scale``: a z-loss (memfast.cross_entropy's), in
    the same fused pass. Gradient accumulation is handled as the model's own
    loss does: the sum over tokens is divided by the number of target tokens in
    the accumulated batch. A mixture-of-experts model's router aux_loss (when it
    returns one) is added with its coefficient, as its own forward does.
    """

    def __init__(self, *args, tracker=None, sample_id_column="sample_id", shift_labels="auto", ignore_index=-100,
                 inplace_backward=False, lse_square_scale=0.0, linear_cross_entropy=False, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("MemfastTrainer computes the loss itself (memfast.cross_entropy); "
                             "compute_loss_func cannot be combined with it")
        if len(args) > 7:
            raise TypeError("MemfastTrainer: pass compute_loss_func, callbacks and later Trainer arguments by keyword")
        if tracker is not None and not isinstance(tracker, memfast.SampleTracker):
            raise TypeError(f"MemfastTrainer: tracker must be a memfast.SampleTracker, got {type(tracker)}")
        if shift_labels not in ("auto", True, False):
            raise ValueError(f"MemfastTrainer: shift_labels must be 'auto', True or False, got {shift_labels!r}")
        self.tracker = tracker
        self.sample_id_column = sample_id_column
        self.ignore_index = ignore_index
        self.inplace_backward = inplace_backward
        if not isinstance(linear_cross_entropy, bool):
            raise TypeError(f"MemfastTrainer: linear_cross_entropy must be True or False, got {linear_cross_entropy!r}")
        self.linear_cross_entropy = linear_cross_entropy
        self._head_input = None
        self._head_checked = False
        self.lse_square_scale = memfast.loss._check_lse_square_scale(lse_square_scale, "MemfastTrainer")
        self._batch_sample_ids = None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if tracker is not None:
            callbacks.append(TrackerCallback(tracker))
        super().__init__(*args, compute_loss_func=self._memfast_loss, callbacks=callbacks, **kwargs)
        self.shift_labels = _is_causal_lm(self.model) if shift_labels == "auto" else shift_labels
        if ignore_index != -100:
            self.data_collator = _RelabellingCollator(self.data_collator, ignore_index)
        if linear_cross_entropy and getattr(self.args, "torch_compile", False):
            raise ValueError("MemfastTrainer: linear_cross_entropy=True keeps the LM head's input with a forward "
                             "hook, which a compiled model does not run; use it without torch_compile")
        from transformers.trainer_utils import has_length

        train = self.train_dataset  # (set by Trainer.__init__, given by keyword or position)
        if tracker is not None and train is not None and has_length(train) and len(train) > tracker.num_samples:
            # (a warning: the ids may name groups of examples, e.g. documents, rather than examples)
            warnings.warn(f"MemfastTrainer: the tracker holds {tracker.num_samples} samples but train_dataset has "
                          f"{len(train)} examples: with add_sample_ids's ids (0..N-1) make it "
                          f"SampleTracker(len(train_dataset), ...)", stacklevel=2)
        if linear_cross_entropy and getattr(self.args, "n_gpu", 1) > 1:
            raise ValueError("MemfastTrainer: linear_cross_entropy=True needs one device per process (DDP, e.g. "
                             "torchrun), not torch.nn.DataParallel over several GPUs, whose replicas share the "
                             "LM head's hook")

    # The Trainer drops the dataset columns the model's forward does not take;
    # keep the sample ids (compute_loss removes them before the forward).
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.sample_id_column not in self._signature_columns:
            self._signature_columns.append(self.sample_id_column)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint and self.tracker is not None:
            load_tracker(resume_from_checkpoint, self.tracker)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        sample_ids = inputs.pop(self.sample_id_column, None)
        if self.tracker is not None and model.training:
            if sample_ids is None:
                raise KeyError(f"MemfastTrainer: the batch has no {self.sample_id_column!r}: give the training set "
                               f"a sample id column (memfast.integrations.hf.add_sample_ids)")
            self._batch_sample_ids = sample_ids
        try:
            if self.linear_cross_entropy and model.training and not return_outputs:
                self._head_input = _HeadInput(_output_linear(self.accelerator.unwrap_model(model)))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        finally:
            self._batch_sample_ids = None
            if self._head_input is not None:
                self._head_input.remove()
                self._head_input = None

    def _memfast_loss(self, outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("MemfastTrainer: the batch has no labels")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        labels = _minus_100(labels.to(logits.device), self.ignore_index)
        if self.shift_labels:
            # Shift the labels, not the logits (as transformers' own loss does): logits[..., :-1, :]
            # would copy all [B, T-1, V] of them; the padded last position is ignored instead.
            labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        tracker, ids = self.tracker, self._batch_sample_ids
        if ids is not None:
            if tracker.device != logits.device:
                tracker.to(logits.device)
            ids = ids.to(logits.device)
        else:
            tracker = None
        kw = dict(ignore_index=-100, sample_ids=ids, tracker=tracker,
                  label_smoothing=float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0),
                  lse_square_scale=self.lse_square_scale)
        if self._head_input is not None:
            loss = self._linear_loss(logits, labels, num_items_in_batch, kw)
        else:
            num_classes = logits.shape[-1]
            loss = memfast.cross_entropy(logits.reshape(-1, num_classes), labels.reshape(-1),
                                         reduction="mean" if num_items_in_batch is None else "sum",
                                         inplace_backward=self.inplace_backward, **kw)
            if num_items_in_batch is not None:
                if hasattr(num_items_in_batch, "to"):
                    num_items_in_batch = num_items_in_batch.to(loss.device)
                loss = loss / num_items_in_batch
        aux = _router_aux_loss(self.accelerator.unwrap_model(self.model), outputs)
        return loss if aux is None else loss + aux.to(loss.device)

    def _linear_loss(self, logits, labels, num_items, kw):
        """The loss from the LM head's kept input: memfast.linear_cross_entropy over the head's
        weight, with the architecture's logit scale and softcap."""
        head_input, self._head_input = self._head_input, None
        head_input.remove()
        head, hidden = head_input.head, head_input.hidden
        if head_input.calls != 1 or hidden is None:
            raise ValueError(f"MemfastTrainer(linear_cross_entropy=True): the LM head ran {head_input.calls} times "
                             f"in one forward, not once (a torch.compile'd model does not run the forward hook "
                             f"that keeps the head's input); use linear_cross_entropy=False")
        if tuple(hidden.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"MemfastTrainer(linear_cross_entropy=True): the LM head's input has shape "
                             f"{tuple(hidden.shape)}, which does not match the labels' {tuple(labels.shape)}; "
                             f"use linear_cross_entropy=False")
        scale, softcap = _head_transform(self.accelerator.unwrap_model(self.model))
        # A model split over devices (device_map) moves the head's input inside the head's forward,
        # after the pre-hook: the loss does the same.
        hidden = hidden.to(head.weight.device)
        with head_input.autocast_context():
            if not self._head_checked:
                _check_head_transform(logits.to(hidden.device), hidden, head, scale, softcap)
                self._head_checked = True
            bias = head.bias
            if scale != 1.0:  # scale (h W^T + b) = (scale h) W^T + scale b: the head's input, not its [V, H] weight
                hidden = hidden * scale
                bias = None if bias is None else bias * scale
            class_weight, reduction = None, "mean"
            if num_items is not None:
                reduction = "sum"
                # The Trainer's token count as a class weight of 1 / count in the sum: the
                # gradients are formed in the forward (an fp16 sum over all tokens could overflow)
                # with the division already in them; the tracked statistics are unweighted.
                count = num_items.to(hidden.device) if hasattr(num_items, "to") else torch.tensor(
                    float(num_items), device=hidden.device)
                class_weight = torch.ones(head.weight.shape[0], dtype=torch.float32, device=hidden.device) / count
            # The weight gradient summed over the chunks in the parameter's dtype when it is wider
            # than the compute dtype (fp32 master weights under autocast: the gradient has that
            # dtype anyway), so it is rounded once per chunk's product, not per running sum.
            accum = head.weight.dtype if head.weight.dtype in (torch.float32, torch.float64) else None
            return memfast.linear_cross_entropy(hidden, head.weight, labels.to(hidden.device), linear_bias=bias,
                                                weight=class_weight, reduction=reduction, softcap=softcap,
                                                accum_dtype=accum, **kw)


class _RelabellingCollator:
    """The Trainer's collator, its batches' labels with ignore_index written as -100: the Trainer
    counts a batch's target tokens (num_items_in_batch, the loss's denominator, in training and in
    evaluation) as its labels != -100."""

    def __init__(self, collate, ignore_index):
        self.collate, self.ignore_index = collate, ignore_index

    def __call__(self, features):
        return _ignored_as_minus_100(self.collate(features), self.ignore_index)


def _ignored_as_minus_100(batch, ignore_index):
    """The batch with its labels' ignore_index (a padding label) written as -100, the label the
    Trainer's token count and the loss take as not a target."""
    if ignore_index != -100 and isinstance(batch, Mapping):
        for key in ("labels", "shift_labels"):
            if isinstance(batch.get(key), torch.Tensor):
                batch[key] = _minus_100(batch[key], ignore_index)
    return batch


def _minus_100(labels, ignore_index):
    return labels if ignore_index == -100 else labels.masked_fill(labels == ignore_index, -100)


__all__ = ["MemfastTrainer", "TrackerCallback", "add_sample_ids", "load_tracker", "TRACKER_FILE"]
