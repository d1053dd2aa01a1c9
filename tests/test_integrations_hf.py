"""MemfastTrainer on a tiny randomly initialised GPT-2: per-sequence CSL equals
the sum of the per-token losses the model itself computes (shifted labels,
-100 ignored) at every step; resuming from a checkpoint (mid-epoch and at an
epoch's last step) continues the same totals."""
import pytest
import torch
import torch.nn.functional as F

import memfast

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from memfast.integrations.hf import TRACKER_FILE, MemfastTrainer, add_sample_ids  # noqa: E402

N, T, V, BATCH, EPOCHS = 16, 12, 64, 4, 2  # 4 steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def make_examples(seed=0):
    """Right-padded sequences of random lengths; padding and a random prompt
    prefix are labelled -100."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(N):
        length = int(torch.randint(4, T + 1, (1,), generator=g))
        ids = torch.zeros(T, dtype=torch.long)
        ids[:length] = torch.randint(1, V, (length,), generator=g)
        mask = (torch.arange(T) < length).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[: int(torch.randint(0, 3, (1,), generator=g))] = -100  # an unlabelled prompt
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return examples


def make_model(cls_name="GPT2LMHeadModel", seed=0, **extra):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config)


def make_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=5e-3,
                lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                logging_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class OracleTrainer(MemfastTrainer):
    """Before each training step, the model's own loss per sequence (one forward
    per sequence with its labels: the mean over its shifted target tokens)
    times its number of target tokens, summed per sample id in float64."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.oracle = torch.zeros(N, dtype=torch.float64)
        self.oracle_tokens = torch.zeros(N, dtype=torch.float64)

    def compute_loss(self, model, inputs, *a, **kw):
        if model.training:
            with torch.no_grad():
                for b, sid in enumerate(inputs["sample_id"].tolist()):
                    one = {k: inputs[k][b:b + 1] for k in ("input_ids", "attention_mask", "labels")}
                    targets = int((one["labels"][0, 1:] != -100).sum())
                    self.oracle[sid] += float(model(**one).loss) * targets
                    self.oracle_tokens[sid] += targets
        return super().compute_loss(model, inputs, *a, **kw)


@pytest.mark.parametrize("container", ["list", "datasets"])
def test_csl_is_the_models_own_per_token_loss_summed(tmp_path, container):
    if container == "list":
        train = add_sample_ids(make_examples())
    else:  # a datasets.Dataset with a column the model does not take: the Trainer drops it, not the sample ids
        datasets = pytest.importorskip("datasets")
        rows = [{**{k: v.tolist() for k, v in e.items()}, "text": "unused"} for e in make_examples()]
        train = add_sample_ids(datasets.Dataset.from_list(rows))
    tracker = memfast.SampleTracker(N, stats=("csl", "count", "inconf"))
    trainer = OracleTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=train, tracker=tracker)
    assert trainer.shift_labels is True
    trainer.train()
    s = tracker.scores()
    assert tracker.epoch == EPOCHS
    assert trainer.oracle_tokens.min() > 0
    torch.testing.assert_close(s["count"].double(), trainer.oracle_tokens)
    torch.testing.assert_close(s["csl"].double(), trainer.oracle, rtol=1e-5, atol=1e-4)
    # the loss the Trainer optimised decreased the tracked loss: training happened
    assert trainer.state.global_step == EPOCHS * N // BATCH
    # evaluation batches do not touch the tracker
    before = tracker.state.clone()
    trainer.evaluate(eval_dataset=train)
    assert torch.equal(tracker.state, before)


def test_causal_lm_loss_reads_the_models_logits_in_place(tmp_path, monkeypatch):
    """The labels are shifted, not the logits: the loss gets a view of the model's [B, T, V] logits
    (slicing logits[..., :-1, :] would copy them all, which at an LLM's vocabulary is gigabytes)."""
    from memfast.integrations import hf

    model_storage, loss_storage = [], []
    model = make_model()
    model.register_forward_hook(lambda m, args, out: model_storage.append(out.logits.untyped_storage().data_ptr()))
    real = memfast.cross_entropy

    def spy(logits, *args, **kwargs):
        loss_storage.append(logits.untyped_storage().data_ptr())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(hf.memfast, "cross_entropy", spy)
    tracker = memfast.SampleTracker(N)
    trainer = MemfastTrainer(model=model, args=make_args(tmp_path, num_train_epochs=1),
                             train_dataset=add_sample_ids(make_examples()), tracker=tracker)
    trainer.train()
    assert len(loss_storage) == N // BATCH and loss_storage == model_storage[:len(loss_storage)]


def test_inplace_backward_trains_the_same(tmp_path):
    """inplace_backward=True (the gradient written over the model's logits) gives the same training:
    same parameters and tracker totals after two epochs."""
    runs = []
    for inplace in (False, True):
        model, tracker = make_model(), memfast.SampleTracker(N, stats=("csl", "count", "last_loss"))
        logits = []
        model.register_forward_hook(lambda m, args, out: logits.append(out.logits))
        MemfastTrainer(model=model, args=make_args(tmp_path / str(inplace)), train_dataset=add_sample_ids(make_examples()),
                       tracker=tracker, inplace_backward=inplace).train()
        runs.append((model.state_dict(), tracker.state.clone()))
        assert all(z._version == (1 if inplace else 0) for z in logits)  # overwritten by the gradient, or not
    (params, state), (params_inplace, state_inplace) = runs
    for name in params:
        torch.testing.assert_close(params_inplace[name], params[name], msg=name)
    torch.testing.assert_close(state_inplace, state)
    assert state[1].sum() > 0


def test_missing_sample_ids_raise(tmp_path):
    trainer = MemfastTrainer(model=make_model(), args=make_args(tmp_path, max_steps=1), train_dataset=make_examples(),
                             tracker=memfast.SampleTracker(N))
    with pytest.raises(KeyError, match="sample_id"):
        trainer.train()
    with pytest.raises(ValueError, match="compute_loss_func"):
        MemfastTrainer(model=make_model(), args=make_args(tmp_path), compute_loss_func=lambda *a, **k: 0)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("stop_step", [3, 4], ids=["mid-epoch", "epoch-last-step"])
def test_resume_continues_the_totals(tmp_path, stop_step):
    stats = ("csl", "count", "correct", "learn_time")
    train = add_sample_ids(make_examples())
    straight = memfast.SampleTracker(N, stats=stats)
    MemfastTrainer(model=make_model(), args=make_args(tmp_path / "straight"), train_dataset=train,
                   tracker=straight).train()

    out = tmp_path / "resumed"
    first = memfast.SampleTracker(N, stats=stats)
    MemfastTrainer(model=make_model(), args=make_args(out, save_strategy="steps", save_steps=stop_step),
                   train_dataset=train, tracker=first, callbacks=[StopAt(stop_step)]).train()
    checkpoint = out / f"checkpoint-{stop_step}"
    assert (checkpoint / TRACKER_FILE).is_file()
    saved = memfast.SampleTracker.load(checkpoint / TRACKER_FILE)
    assert saved.epoch == stop_step // (N // BATCH)
    assert 0 < float(saved.stat("count").sum()) < float(straight.stat("count").sum())

    resumed = memfast.SampleTracker(N, stats=stats)
    MemfastTrainer(model=make_model(seed=1), args=make_args(out, save_strategy="steps", save_steps=stop_step),
                   train_dataset=train, tracker=resumed).train(resume_from_checkpoint=True)
    assert resumed.epoch == straight.epoch == EPOCHS
    torch.testing.assert_close(resumed.stat("count"), straight.stat("count"))
    torch.testing.assert_close(resumed.stat("csl"), straight.stat("csl"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed.scores()["learn_time"], straight.scores()["learn_time"])


def test_resume_without_tracker_file_raises(tmp_path):
    train = add_sample_ids(make_examples())
    MemfastTrainer(model=make_model(), args=make_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2),
                   train_dataset=train).train()  # no tracker: nothing saved
    trainer = MemfastTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=train,
                             tracker=memfast.SampleTracker(N))
    with pytest.raises(FileNotFoundError, match=TRACKER_FILE):
        trainer.train(resume_from_checkpoint=True)


def test_sequence_classification_unshifted(tmp_path):
    examples = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"], "labels": int(i % 3)}
                for i, e in enumerate(make_examples())]
    model = make_model("GPT2ForSequenceClassification", num_labels=3, pad_token_id=0)
    tracker = memfast.SampleTracker(N)
    seen = torch.zeros(N, dtype=torch.float64)

    class Oracle(MemfastTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                with torch.no_grad():
                    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                    loss = torch.nn.functional.cross_entropy(logits.double(), inputs["labels"], reduction="none")
                    seen.index_add_(0, inputs["sample_id"], loss)
            return super().compute_loss(model, inputs, *a, **kw)

    trainer = Oracle(model=model, args=make_args(tmp_path, num_train_epochs=1), train_dataset=add_sample_ids(examples),
                     tracker=tracker)
    assert trainer.shift_labels is False
    trainer.train()
    torch.testing.assert_close(tracker.stat("count"), torch.ones(N))
    torch.testing.assert_close(tracker.stat("csl").double(), seen, rtol=1e-5, atol=1e-5)


def test_add_sample_ids():
    examples = make_examples()[:3]
    wrapped = add_sample_ids(examples)
    assert len(wrapped) == 3 and wrapped[2]["sample_id"] == 2 and torch.equal(wrapped[2]["input_ids"],
                                                                              examples[2]["input_ids"])
    with pytest.raises(ValueError, match="sample_id"):
        add_sample_ids(wrapped)[0]
    with pytest.raises(TypeError, match="dicts"):
        add_sample_ids([(1, 2)])[0]
    datasets = pytest.importorskip("datasets")
    table = add_sample_ids(datasets.Dataset.from_dict({"x": [5, 6, 7]}))
    assert table["sample_id"] == [0, 1, 2]


def test_z_loss_is_added_to_the_models_loss(tmp_path):
    """lse_square_scale: the step's loss is the sum over target tokens of the cross entropy plus
    zeta * lse^2, divided by the Trainer's token count (as the model's own loss is)."""
    zeta = 0.05
    seen = []

    class Recorder(MemfastTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            inputs_before = dict(inputs)  # the Trainer pops the labels
            loss = super().compute_loss(model, inputs, *a, **kw)
            inputs = inputs_before
            with torch.no_grad():
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                labels = inputs["labels"][:, 1:].reshape(-1)
                logits = out.logits[:, :-1].reshape(-1, V)
                valid = labels != -100
                lse = torch.logsumexp(logits[valid], -1)
                total = F.cross_entropy(logits, labels, reduction="sum") + zeta * (lse ** 2).sum()
                # the Trainer's token count for the accumulated batch (the model's own loss divides by it too)
                count = kw.get("num_items_in_batch")
                want = total / (valid.sum() if count is None else count)
            seen.append((float(loss), float(want)))
            return loss

    Recorder(model=make_model(), args=make_args(tmp_path, num_train_epochs=1),
             train_dataset=add_sample_ids(make_examples()), tracker=memfast.SampleTracker(N),
             lse_square_scale=zeta).train()
    assert len(seen) == N // BATCH
    for got, want in seen:
        assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="lse_square_scale"):
        MemfastTrainer(model=make_model(), args=make_args(tmp_path), lse_square_scale=-1)


LM_SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=32)
# Architectures whose logits are not just lm_head(hidden): Gemma 2's final softcapping (small
# enough here to bend these logits), Cohere's logit_scale, Granite's logits_scaling; Mixtral
# returns a router aux_loss.
ARCHITECTURES = {
    "gpt2": lambda: make_model(),  # lm_head tied to the input embeddings
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LM_SIZES)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**LM_SIZES, head_dim=16,
                                                                              final_logit_softcapping=0.5)),
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**LM_SIZES, logit_scale=0.5)),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**LM_SIZES, logits_scaling=4.0)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **LM_SIZES, num_local_experts=2, num_experts_per_tok=1, output_router_logits=True, router_aux_loss_coef=0.3)),
}


def make_lm(arch):
    torch.manual_seed(0)
    return ARCHITECTURES[arch]()


class LossRecorder(MemfastTrainer):
    """Records each training step's loss beside the model's own loss of the same batch (labels given
    to its forward: the sum over shifted target tokens / the Trainer's token count, plus a MoE
    model's router aux_loss), and the shape of the logits the model returned."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen, self.logit_shapes = [], []
        self.model.register_forward_hook(lambda m, args, out: self.logit_shapes.append(tuple(out.logits.shape)))

    def compute_loss(self, model, inputs, *a, **kw):
        inputs_before = dict(inputs)  # the Trainer pops the labels
        loss = super().compute_loss(model, inputs, *a, **kw)
        if model.training:
            with torch.no_grad():
                own = {k: inputs_before[k] for k in ("input_ids", "attention_mask", "labels")}
                want = model(**own, num_items_in_batch=kw.get("num_items_in_batch")).loss
            self.logit_shapes.pop()  # the oracle's own forward
            self.seen.append((float(loss), float(want)))
        return loss


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loss_is_the_models_own(tmp_path, arch):
    """Both loss paths give, step by step, the loss the model's forward computes from the labels
    (a MoE model's router aux_loss included); with linear_cross_entropy=True the model's logits in
    training are those of one position only ([B, 1, V]), in evaluation the whole [B, T, V]."""
    for linear in (False, True):
        trainer = LossRecorder(model=make_lm(arch), args=make_args(tmp_path / str(linear), num_train_epochs=1),
                               train_dataset=add_sample_ids(make_examples()), tracker=memfast.SampleTracker(N),
                               linear_cross_entropy=linear)
        trainer.train()
        assert len(trainer.seen) == N // BATCH
        for got, want in trainer.seen:
            assert got == pytest.approx(want, rel=1e-5)
        assert set(trainer.logit_shapes) == {(BATCH, 1 if linear else T, V)}
        trainer.logit_shapes.clear()
        trainer.evaluate(eval_dataset=add_sample_ids(make_examples()))
        assert {shape[1] for shape in trainer.logit_shapes} == {T}


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_linear_cross_entropy_under_bf16_autocast(tmp_path, monkeypatch, arch):
    """TrainingArguments(bf16=True) autocasts the model's forward only; the head's projection in
    the loss runs in the same autocast (bf16 logits, as the model's head computes them): the step's
    loss is the fp32 model's own to bf16 precision."""
    import memfast.linear as linear_module

    compute_dtypes = []
    real_cast = linear_module._cast

    def spy(input, linear_weight, linear_bias, dtype):
        compute_dtypes.append(dtype)
        return real_cast(input, linear_weight, linear_bias, dtype)

    monkeypatch.setattr(linear_module, "_cast", spy)
    trainer = LossRecorder(model=make_lm(arch), args=make_args(tmp_path, num_train_epochs=1, bf16=True),
                           train_dataset=add_sample_ids(make_examples()), tracker=memfast.SampleTracker(N),
                           linear_cross_entropy=True)
    trainer.train()
    assert compute_dtypes == [torch.bfloat16] * (N // BATCH)
    for got, want in trainer.seen:
        assert got == pytest.approx(want, rel=2e-2)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_linear_cross_entropy_trains_the_same(tmp_path, arch):
    """linear_cross_entropy=True (the head's projection and the loss in chunks, no [B, T, V] logits)
    gives the same parameters and tracker totals as the loss over the model's logits, with
    gradient accumulation (the Trainer's token count) and label smoothing."""
    runs = []
    for linear in (False, True):
        model, tracker = make_lm(arch), memfast.SampleTracker(N, stats=("csl", "count", "margin", "last_loss"))
        args = make_args(tmp_path / str(linear), gradient_accumulation_steps=2, label_smoothing_factor=0.1)
        MemfastTrainer(model=model, args=args, train_dataset=add_sample_ids(make_examples()), tracker=tracker,
                       linear_cross_entropy=linear, lse_square_scale=1e-3).train()
        runs.append((model.state_dict(), tracker.state.clone()))
    (params, state), (params_linear, state_linear) = runs
    for name in params:
        torch.testing.assert_close(params_linear[name], params[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(state_linear, state, rtol=1e-5, atol=1e-4)
    assert state[1].sum() > 0


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_linear_cross_entropy_refuses_an_unknown_logit_transform(tmp_path, monkeypatch, arch):
    """The first step checks the model's own logits against the head transform memfast applies:
    one it does not know (here: made to forget the softcap or the scaling) raises."""
    from memfast.integrations import hf

    monkeypatch.setattr(hf, "_head_transform", lambda model: (1.0, None))
    trainer = MemfastTrainer(model=make_lm(arch), args=make_args(tmp_path, max_steps=1),
                             train_dataset=add_sample_ids(make_examples()), tracker=memfast.SampleTracker(N),
                             linear_cross_entropy=True)
    with pytest.raises(ValueError, match="transforms its logits"):
        trainer.train()


def test_linear_cross_entropy_needs_a_linear_head(tmp_path):
    model = make_model()
    model.set_output_embeddings(torch.nn.Sequential(torch.nn.Linear(32, V, bias=False)))
    trainer = MemfastTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=add_sample_ids(
        make_examples()), tracker=memfast.SampleTracker(N), linear_cross_entropy=True)
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        trainer.train()
    # the refused step left no sample ids behind: evaluation does not record into the tracker
    trainer.evaluate(eval_dataset=add_sample_ids(make_examples()))
    assert trainer.tracker.state.abs().sum() == 0
    with pytest.raises(TypeError, match="linear_cross_entropy"):
        MemfastTrainer(model=make_model(), args=make_args(tmp_path), linear_cross_entropy="yes")
    with pytest.raises(ValueError, match="has no output embeddings"):
        MemfastTrainer(model=transformers.GPT2ForSequenceClassification(make_model().config),
                       args=make_args(tmp_path, max_steps=1), train_dataset=add_sample_ids(make_examples()),
                       tracker=memfast.SampleTracker(N), linear_cross_entropy=True).train()
    with pytest.warns(UserWarning, match="tracker holds 3 samples but train_dataset has 16"):
        MemfastTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=add_sample_ids(make_examples()),
                       tracker=memfast.SampleTracker(3))
    with pytest.raises(ValueError, match="torch_compile"):
        MemfastTrainer(model=make_model(), args=make_args(tmp_path, torch_compile=True), linear_cross_entropy=True)


class StepLosses(MemfastTrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.losses = []

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        if model.training:
            self.losses.append(float(loss))
        return loss


@pytest.mark.parametrize("linear", [False, True])
def test_another_padding_label_trains_as_minus_100(tmp_path, linear):
    """ignore_index=0 with labels padded by 0: the same losses (with gradient accumulation, whose
    denominator the Trainer counts as labels != -100), parameters, tracker and evaluation loss as
    the same data padded with -100. Before, the padding entered the Trainer's token count."""
    runs = []
    for pad in (-100, 0):
        examples = make_examples()
        for example in examples:  # token ids are >= 1: 0 is never a target
            example["labels"] = example["labels"].masked_fill(example["labels"] == -100, pad)
        trainer = StepLosses(model=make_model(), args=make_args(tmp_path / str(pad), gradient_accumulation_steps=2),
                             train_dataset=add_sample_ids(examples), tracker=memfast.SampleTracker(N, stats="all"),
                             ignore_index=pad, linear_cross_entropy=linear)
        trainer.train()
        runs.append((trainer.losses, trainer.model.transformer.wte.weight.detach().clone(), trainer.tracker.state,
                     trainer.evaluate(eval_dataset=add_sample_ids(examples))["eval_loss"]))
    (losses, weight, state, eval_loss), (losses0, weight0, state0, eval_loss0) = runs
    assert losses0 == pytest.approx(losses, rel=1e-6), (losses0, losses)
    torch.testing.assert_close(weight0, weight)
    torch.testing.assert_close(state0, state)
    assert eval_loss0 == pytest.approx(eval_loss, rel=1e-6)
