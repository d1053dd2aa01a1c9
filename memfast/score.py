"""`memfast score`: score saved checkpoints the way the CSL reference code
does (an eval-mode, unaugmented pass over the training set per checkpoint),
adding input curvature and input-gradient norms on request, into a
SampleTracker file that `memfast report` reads.

    memfast score --model models.py:make_model --data train.pt ckpt_*.pt --tracker scores.pt \\
        [--grad-norm --history grad_norms.pt] [--curvature --probes 10 --h 1e-3]

--model names a function that builds the network (``file.py:function`` or
``package.module:function``, called with ``--model-kwargs``); each checkpoint
is its state dict (or a dict holding one under "state_dict",
"model_state_dict" or "model"; a DDP "module." prefix is removed). --data is a
.pt file with the training inputs and the labels trained on: a dict with
"inputs" / "targets" (or "x" / "y"), or a tuple (inputs, targets). The
tracker is saved (atomically) after every checkpoint, so an interrupted run
keeps what it scored; --append continues an existing tracker file.
"""
import importlib
import importlib.util
import json
import os

from .cli import positive_float, positive_int

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def add_arguments(parser):
    parser.add_argument("checkpoints", nargs="+", help="state-dict checkpoints, scored in the order given")
    parser.add_argument("--model", required=True,
                        help="FILE.py:FUNCTION or MODULE:FUNCTION returning the nn.Module the checkpoints are for")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object of keyword arguments for the function")
    parser.add_argument("--data", required=True,
                        help=".pt file: {'inputs': [N, ...], 'targets': [N]} (or x / y, or a tuple); the labels "
                             "trained on")
    parser.add_argument("--tracker", required=True, help="the SampleTracker file to write (memfast report reads it)")
    parser.add_argument("--append", action="store_true", help="continue the tracker file if it exists")
    parser.add_argument("--grad-norm", action="store_true",
                        help="also the input-gradient norm of every sample (loss sensitivity)")
    parser.add_argument("--history",
                        help="with --grad-norm: save the [checkpoints, N] norms here (input of "
                             "memfast.metrics.theory_learning_time)")
    parser.add_argument("--curvature", action="store_true", help="also input curvature (memfast.score_curvature)")
    parser.add_argument("--probes", type=positive_int, default=10, help="curvature probes (default: %(default)s)")
    parser.add_argument("--h", type=positive_float, default=1e-3, help="curvature step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="curvature probe seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(message):
    raise SystemExit(f"memfast score: {message}")


def load_factory(spec):
    """The callable named by 'file.py:function' or 'package.module:function'."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        _fail(f"--model must be FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    try:
        if path.endswith(".py"):
            if not os.path.isfile(path):
                _fail(f"--model: no file {path}")
            module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(path)
    except ImportError as e:
        _fail(f"--model: cannot import {path}: {e}")
    factory = getattr(module, name, None)
    if not callable(factory):
        _fail(f"--model: {path} has no callable {name!r}")
    return factory


def load_data(path):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        _fail(f"--data: no file {path}")
    except Exception as e:
        _fail(f"--data: {path} is not a readable .pt file ({type(e).__name__}: {e})")
    if isinstance(obj, dict):
        pair = next(((obj[a], obj[b]) for a, b in (("inputs", "targets"), ("x", "y")) if a in obj and b in obj), None)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        pair = tuple(obj)
    else:
        pair = None
    if pair is None or not all(isinstance(t, torch.Tensor) for t in pair):
        _fail(f"--data: {path} must hold {{'inputs': tensor, 'targets': tensor}} (or x / y, or a tuple of two)")
    inputs, targets = pair
    if inputs.dim() < 1 or targets.shape != inputs.shape[:1]:
        _fail(f"--data: targets must have one label per input: inputs {list(inputs.shape)}, targets "
              f"{list(targets.shape)}")
    if targets.is_floating_point():
        _fail("--data: targets must be class indices (an integer tensor)")
    return inputs, targets.long()


def load_state_dict(path, device):
    import torch

    try:
        sd = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        _fail(f"no checkpoint {path}")
    except Exception as e:
        _fail(f"checkpoint {path} is not a readable state dict ({type(e).__name__}: {e})")
    if isinstance(sd, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        _fail(f"checkpoint {path} is not a state dict (a dict of tensors, or one under {list(STATE_DICT_KEYS)})")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def run(args):
    import torch

    import memfast
    from memfast.tracker import atomic_save

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        _fail(f"--model-kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        _fail("--model-kwargs must be a JSON object")
    if args.history and not args.grad_norm:
        _fail("--history needs --grad-norm")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device cuda but CUDA is not available")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        _fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    model = load_factory(args.model)(**kwargs)
    if not isinstance(model, torch.nn.Module):
        _fail(f"--model {args.model} returned {type(model).__name__}, not an nn.Module")
    model.to(device)
    inputs, targets = load_data(args.data)
    n = len(targets)
    if os.path.exists(args.tracker):
        if not args.append:
            _fail(f"{args.tracker} exists; pass --append to continue it, or choose another file")
        try:
            tracker = memfast.SampleTracker.load(args.tracker, device=device)
        except ValueError as e:
            _fail(str(e))
        if tracker.num_samples != n:
            _fail(f"{args.tracker} tracks {tracker.num_samples} samples, --data has {n}")
    else:
        tracker = memfast.SampleTracker(n, stats="all", device=device)
    history = []
    if args.history and args.append and os.path.exists(args.history):
        try:
            saved = torch.load(args.history, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupted, another format (pickle, zip, EOF errors)
            _fail(f"--history {args.history} is not readable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if not isinstance(saved, torch.Tensor) or saved.dim() != 2 or saved.shape[1] != n:
            _fail(f"--history {args.history} is not a [checkpoints, {n}] tensor of gradient norms")
        history = list(saved.unbind(0))
    loader = memfast.data.tensor_batches(inputs, targets, args.batch_size)
    for index, path in enumerate(args.checkpoints):
        try:
            model.load_state_dict(load_state_dict(path, device))
        except RuntimeError as e:
            _fail(f"checkpoint {path} does not fit --model {args.model}: {e}")
        model.eval()
        with torch.no_grad():
            for x, y, ids in loader:
                tracker.update(model(x.to(device)), y.to(device), ids.to(device))
        if args.grad_norm:
            history.append(memfast.score_grad_norm(model, loader, tracker, progress=not args.quiet).cpu())
        if args.curvature:
            # a seed per checkpoint, continued by --append
            memfast.score_curvature(model, loader, tracker, n_probes=args.probes, h=args.h, progress=not args.quiet,
                                    seed=args.seed + tracker.epoch)
        tracker.end_epoch()
        # After every checkpoint, atomically: an interrupted run keeps what it scored.
        tracker.save(args.tracker)
        if args.history:
            atomic_save(torch.stack(history), args.history)
        if not args.quiet:
            print(f"scored {path} ({index + 1}/{len(args.checkpoints)})")
    history_arg = f" --grad-norm-history {args.history}" if args.history else ""
    print(f"memfast score: {len(args.checkpoints)} checkpoint(s) of {n} samples into {args.tracker} "
          f"({tracker.epoch} in all); next: memfast report {args.tracker} --labels LABELS{history_arg}")
    return 0
