"""A Hugging Face Trainer step on a small Llama four ways, each in a fresh process:
step time and peak memory during training (CPU: peak resident-set growth; CUDA:
peak allocated) beyond the model and the data (so it includes the gradients and
Adam's state, the same in every method).

    .venv/bin/python bench/hf_memory.py          # CPU: 8 x 512 tokens, vocabulary 32000, hidden 256, fp32
    python bench/hf_memory.py --device cuda --bf16 --vocab 128256 --hidden 2048 --layers 2 --seq 2048

  trainer   transformers.Trainer, the model's own loss (labels given to its forward)
  memfast   MemfastTrainer: memfast.cross_entropy over the model's logits, per-sequence tracker
  inplace   MemfastTrainer(inplace_backward=True): the gradient written over the logits
  linear    MemfastTrainer(linear_cross_entropy=True): the head's projection and the loss in chunks
"""
import argparse
import json
import resource
import sys
import time

METHODS = ("trainer", "memfast", "inplace", "linear")


def child(args):
    import tempfile

    import torch
    import transformers

    import memfast
    from memfast.integrations.hf import MemfastTrainer, add_sample_ids

    cuda = args.device == "cuda"
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                      max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids.clone()}
                for ids in torch.randint(0, args.vocab, (args.batch * (args.steps + 1), args.seq), generator=g)]
    train = add_sample_ids(examples)
    times, marks = [], {}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            # CPU: the resident set's high-water mark so far (ru_maxrss, KiB on Linux)
            marks["base"] = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > 1:  # the first step creates the optimiser state
                times.append(time.perf_counter() - marks["t0"])

    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps + 1, learning_rate=1e-4,
            save_strategy="no", report_to="none", use_cpu=not cuda, disable_tqdm=True, logging_strategy="no",
            bf16=args.bf16, dataloader_num_workers=0, seed=0)
        kw = dict(model=model, args=targs, train_dataset=train, callbacks=[Clock()])
        if args.method == "trainer":
            trainer = transformers.Trainer(**kw)
        else:
            tracker = memfast.SampleTracker(len(train))
            trainer = MemfastTrainer(**kw, tracker=tracker, inplace_backward=args.method == "inplace",
                                     linear_cross_entropy=args.method == "linear")
        trainer.train()
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - marks["base"]) / 2**20
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - marks["base"]) / 1024
    print(json.dumps({"ms": 1e3 * sorted(times)[len(times) // 2], "extra_mib": extra}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): autocast")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    tokens = args.batch * args.seq
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(f"Llama, {args.layers} layer(s), hidden {args.hidden}, vocabulary {args.vocab}, {args.batch} x {args.seq} "
          f"tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}: fp32 logits of a step are "
          f"{logits_mib:.0f} MiB; median of {args.steps} steps, each method in its own process")
    from memfast.bench import process_table

    process_table(__file__, args.methods.split(","), sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
