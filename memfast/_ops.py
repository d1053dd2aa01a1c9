"""The memfast operators: registration of fake (meta) and autograd rules, and
the choice of backend.

Two namespaces carry the same schemas: ``torch.ops.memfast`` (compiled
kernels, csrc/) and ``torch.ops.memfast_ref`` (memfast/reference.py). The
Python API calls ``ops(device)``, which picks one per device type.
"""
import os
import sys
import warnings
import weakref

import torch

from . import reference
from .reference.cross_entropy import current_graph_task_id

# The schemas, identical to csrc/memfast.cpp (tests/test_ops.py checks).
SCHEMAS = {
    "cross_entropy_fwd": (
        "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, Tensor? adjustment, Tensor? groups, bool compute_grad, int reduction, "
        "float lse_square_scale=0., float softcap=0.) -> (Tensor loss, Tensor row_stats, Tensor grad)"
    ),
    "cross_entropy_fwd_": (
        "cross_entropy_fwd_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, Tensor? adjustment, Tensor? groups, int reduction, float lse_square_scale=0., "
        "float softcap=0.) -> (Tensor loss, Tensor row_stats)"
    ),
    "cross_entropy_prob_fwd": (
        "cross_entropy_prob_fwd(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, "
        "Tensor? adjustment, Tensor? groups, bool compute_grad, int reduction, float lse_square_scale=0., "
        "float softcap=0.) -> (Tensor loss, Tensor row_stats, Tensor label, Tensor grad)"
    ),
    "cross_entropy_prob_fwd_": (
        "cross_entropy_prob_fwd_(Tensor(a!) logits, Tensor target, Tensor? weight, float label_smoothing, "
        "Tensor? adjustment, Tensor? groups, int reduction, float lse_square_scale=0., float softcap=0.) "
        "-> (Tensor loss, Tensor row_stats, Tensor label)"
    ),
    "cross_entropy_bwd": "cross_entropy_bwd(Tensor grad, Tensor grad_loss) -> Tensor",
    "cross_entropy_bwd_": "cross_entropy_bwd_(Tensor(a!) grad, Tensor grad_loss) -> ()",
    "track_": (
        "track_(Tensor(a!) state, Tensor(b!) counters, Tensor row_stats, Tensor target, "
        "Tensor sample_ids, int ignore_index, int num_classes, int[] stat_rows) -> ()"
    ),
    "track_unless_backward_": (
        "track_unless_backward_(Tensor(a!) state, Tensor(b!) counters, Tensor row_stats, Tensor target, "
        "Tensor sample_ids, int ignore_index, int num_classes, int[] stat_rows) -> ()"
    ),
    "curvature_perturb": "curvature_perturb(Tensor x, int seed, int probe_offset, int num_probes, float h) -> Tensor",
    "curvature_reduce": "curvature_reduce(Tensor grads, Tensor g0, int seed, int probe_offset) -> Tensor",
}

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.memfast)

    _EXT_ERROR = None
except ImportError as e:  # pragma: no cover - exercised when the build is missing
    _C = None
    _EXT_ERROR = e

_ref_lib = torch.library.Library("memfast_ref", "DEF")
for _name, _schema in SCHEMAS.items():
    _ref_lib.define(_schema)
    for _key in ("CPU", "CUDA"):
        _ref_lib.impl(_name, getattr(reference, _name), _key)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(who, first, *others):
    """The kernels' device checks, in the fake kernels too: a meta tensor among real ones dispatches here."""
    for t in others:
        if t is not None and t.device != first.device:
            raise ValueError(f"{who}: the inputs must be on one device, got {first.device} and {t.device}")


def _fwd_fake(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, compute_grad, reduction,
              lse_square_scale=0.0, softcap=0.0):
    if logits.dim() != 2:
        raise ValueError(f"memfast.cross_entropy: logits must be 2-D [rows, classes], got {logits.dim()}-D")
    _same_device("memfast.cross_entropy", logits, target, weight, adjustment, groups)
    R, C = logits.shape
    acc = _acc_dtype(logits.dtype)
    grad = logits.new_empty((R, C) if compute_grad else (0, 0))
    loss = logits.new_empty(R if reduction == 0 else (), dtype=acc)
    return loss, logits.new_empty((5, R), dtype=acc), grad


def _fwd_inplace_fake(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, reduction,
                      lse_square_scale=0.0, softcap=0.0):
    loss, row_stats, _ = _fwd_fake(logits, target, weight, ignore_index, label_smoothing, adjustment, groups, False,
                                   reduction, lse_square_scale, softcap)
    return loss, row_stats


def _prob_fwd_fake(logits, target, weight, label_smoothing, adjustment, groups, compute_grad, reduction,
                   lse_square_scale=0.0, softcap=0.0):
    loss, row_stats, grad = _fwd_fake(logits, target, weight, -100, label_smoothing, adjustment, groups, compute_grad,
                                      reduction)
    return loss, row_stats, logits.new_empty(logits.shape[0], dtype=torch.long), grad


def _prob_fwd_inplace_fake(logits, target, weight, label_smoothing, adjustment, groups, reduction,
                           lse_square_scale=0.0, softcap=0.0):
    return _prob_fwd_fake(logits, target, weight, label_smoothing, adjustment, groups, False, reduction)[:3]


def _bwd_fake(grad, grad_loss):
    _same_device("memfast.cross_entropy backward", grad, grad_loss)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _bwd_inplace_fake(grad, grad_loss):
    _same_device("memfast.cross_entropy backward", grad, grad_loss)
    return None


def _track_fake(state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows):
    _same_device("memfast tracker", state, counters, row_stats, target, sample_ids)
    return None


def _perturb_fake(x, seed, probe_offset, num_probes, h):
    return x.new_empty((num_probes * x.shape[0],) + tuple(x.shape[1:]))


def _reduce_fake(grads, g0, seed, probe_offset):
    _same_device("memfast.curvature_reduce", g0, grads)
    return g0.new_empty((3, g0.shape[0]), dtype=torch.float32)


def in_backward():
    """True while autograd runs a backward pass on this thread: activation checkpointing
    (torch.utils.checkpoint) re-runs its forward there, and a loss recomputed for its
    gradient must not add its statistics to a tracker a second time. While compiling it is
    False: traced code calls track_unless_backward_ (track_rows below), which decides when
    the graph runs."""
    return not torch.compiler.is_compiling() and current_graph_task_id() != -1


def track_rows(lib, state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows):
    """lib.track_ of a loss's row statistics. Eager callers have checked in_backward already;
    traced code calls track_unless_backward_, which checks when the graph runs (a compiled loss
    inside a checkpointed region is recomputed in the backward)."""
    op = lib.track_unless_backward_ if torch.compiler.is_compiling() else lib.track_
    op(state, counters, row_stats, target, sample_ids, ignore_index, num_classes, stat_rows)


def as_rows(t):
    """The op's [R, C] rows of a caller's logits: [C] -> [1, C], [N, C] as is, [N, C, d1, ...] ->
    [N*d1*..., C] in the target's order (a copy). csrc/autograd.cpp rebuilds them the same way."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


def _fwd_setup_context(ctx, inputs, output, source=None):
    """source: None, or (weakref, version) of the caller's tensor the rows were made from."""
    _, row_stats, grad = output
    ctx.mark_non_differentiable(row_stats, grad)
    ctx.op = _INDEX_TARGETS
    _keep_for_backward(ctx, inputs, grad, source)


def _prob_fwd_setup_context(ctx, inputs, output, source=None, grad_over_logits=False):
    """grad_over_logits: the forward wrote the gradient over the logits (cross_entropy_prob_fwd_),
    whose detached alias is the saved gradient; output's grad is then None."""
    _, row_stats, label, grad = output
    if grad_over_logits:
        ctx.mark_non_differentiable(row_stats, label)
        grad = inputs[0].detach()  # (not the input itself: a view's grad_fn would be regenerated)
    else:
        ctx.mark_non_differentiable(row_stats, label, grad)
    ctx.op = _PROBABILITY_TARGETS
    _keep_for_backward(ctx, inputs, grad, source, grad_over_logits)


def _keep_for_backward(ctx, inputs, grad, source, grad_over_logits=False):
    # Otherwise autograd fills an [R, C] zero tensor for the unused `grad` output on every backward.
    ctx.set_materialize_grads(False)
    logits, *rest = inputs
    # a backward needs the target, weight, adjustment and groups unchanged (see _check_inputs)
    ctx.input_versions = [(i, t._version) for i, t in enumerate(rest) if isinstance(t, torch.Tensor)]
    # What the backward changes lives in one mutable object: compiled autograd runs the backward with
    # a stand-in ctx that reads attributes through but keeps assignments to itself.
    ctx.state = _BackwardState(rest)
    ctx.grad_over_logits = grad_over_logits
    if grad_over_logits:  # the logits are the gradient now: nothing to recompute from
        ctx.save_for_backward(grad)
        ctx.keeps_logits = False
        return
    if _forward_ad_active():
        # torch.func transforms differentiate with create_graph, and forward-mode AD needs
        # them too: the gradient is recomputed from the logits (_backward, jvp), so they are kept.
        ctx.save_for_backward(grad, logits)
        ctx.save_for_forward(logits)
        ctx.keeps_logits = ctx.logits_saved = True
        return
    # For a second backward through the same graph (retain_graph=True, gradcheck) or
    # create_graph, the gradient is recomputed from the logits. Small ones (by their storage) are
    # kept, as csrc/autograd.cpp does: beside the saved gradient rather than with it, so that the
    # usual backward, which does not need them, does not fail when they were changed in place since
    # (a later in-place loss of the same logits); they are freed after a backward that does not keep
    # the graph (_release_saved_state). Larger ones -- the caller's tensor (source) when memfast made
    # the rows from it -- are held weakly, so that an LM head's cost no memory. (Traced code never
    # recomputes: there the logits are not saved.)
    ctx.save_for_backward(grad)
    if _plain_eager(logits) and logits.untyped_storage().nbytes() <= KEEP_LOGITS_BYTES and not _saved_tensor_hooks():
        ctx.keeps_logits = True
        ctx.state.kept_logits, ctx.logits_version = logits, logits._version
        ctx.logits_history = (logits.grad_fn, logits.requires_grad)  # (what detach_() would change)
        return
    ctx.keeps_logits = False
    ctx.logits_ref, ctx.logits_version = (weakref.ref(logits), logits._version) if source is None else source
    ctx.rows_from_source = source is not None


class _BackwardState:
    """A loss's backward-time state (see _keep_for_backward)."""

    __slots__ = ("saved_grad_consumed", "kept_logits", "inputs")

    def __init__(self, inputs):
        self.saved_grad_consumed = False  # the saved gradient was scaled in place by a first backward
        self.kept_logits = None  # small logits kept for a recompute, until a backward that frees the graph
        # the op's arguments after the logits (target, weight, ...), until a backward that frees the
        # graph: a teacher's [N, C] probabilities or a dense adjustment go then, as saved tensors do
        self.inputs = inputs


def _saved_tensor_hooks():
    """Whether saved-tensor hooks are active (activation checkpointing, save_on_cpu): the logits are
    then not saved (checkpointing would recompute its region, inside the backward, to unpack them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _plain_eager(t):
    """A real tensor in eager mode (not fake, functional or functorch-wrapped)."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _live_logits(ctx, why, differentiable=False):
    if getattr(ctx, "logits_saved", False):  # (forward AD: autograd's own check raises if modified)
        return ctx.saved_tensors[1]
    if ctx.keeps_logits:
        logits = ctx.state.kept_logits
        if logits is None:
            raise RuntimeError(f"memfast.cross_entropy: {why} needs the logits, which the loss kept until its "
                               "first backward; pass retain_graph=True to that one (as for any saved tensor)")
        if logits._version != ctx.logits_version:
            raise RuntimeError(f"memfast.cross_entropy: {why} needs the logits, which were modified by an inplace "
                               "operation after the loss (as a saved tensor would say); compute the loss again")
        if (logits.grad_fn, logits.requires_grad) != ctx.logits_history:
            raise RuntimeError(f"memfast.cross_entropy: {why} needs the logits' autograd history, which detach_() "
                               "removed after the loss; compute the loss again")
        return logits
    logits = ctx.logits_ref()
    if logits is None or logits._version != ctx.logits_version:
        raise RuntimeError(f"memfast.cross_entropy: {why} needs the logits alive and unmodified; keep a "
                           "reference to them (or compute the loss again; inside torch.utils.checkpoint, return "
                           "them from the checkpointed function)")
    if differentiable and not logits.requires_grad:  # (the loss exists because they required grad)
        raise RuntimeError(f"memfast.cross_entropy: {why} needs the logits' autograd history, which detach_() "
                           "removed after the loss; compute the loss again")
    return as_rows(logits) if ctx.rows_from_source else logits


def _differentiable_grad(logits, target, weight, ignore_index, eps, adjustment, groups, reduction, zeta, softcap,
                         grad_loss):
    """grad_loss * d loss / d logits as a differentiable function of the logits (create_graph=True,
    torch.func): whole-tensor reference ops. The C++ eager Function (csrc/autograd.cpp) calls it too."""
    grad = reference.cross_entropy_grad(logits, target, weight, ignore_index, eps, adjustment, groups, reduction,
                                        zeta, softcap)
    return reference.cross_entropy_bwd(grad, grad_loss)


class _ForwardOp:
    """What _backward needs to know of a forward op: its number of inputs, and how to recompute
    its gradient from the logits (with the op, or differentiably with whole-tensor ops)."""

    def __init__(self, num_inputs, recompute, differentiable, tensor_names):
        self.no_grads = (None,) * (num_inputs - 1)  # only the logits get a gradient
        self.recompute, self.differentiable = recompute, differentiable
        self.tensor_names = tensor_names  # position among the inputs after the logits -> argument name


def _index_recompute(lib, logits, inputs):
    target, weight, ignore_index, eps, adjustment, groups, _, reduction, *scalars = inputs
    return lib.cross_entropy_fwd(logits, target, weight, ignore_index, eps, adjustment, groups, True, reduction,
                                 *_fwd_scalars(scalars))[2]


def _index_differentiable(logits, inputs, grad_loss):
    target, weight, ignore_index, eps, adjustment, groups, _, reduction, *scalars = inputs
    return _differentiable_grad(logits, target, weight, ignore_index, eps, adjustment, groups, reduction,
                                *_fwd_scalars(scalars), grad_loss)


def _prob_recompute(lib, logits, inputs):
    target, weight, eps, adjustment, groups, _, reduction, *scalars = inputs
    return lib.cross_entropy_prob_fwd(logits, target, weight, eps, adjustment, groups, True, reduction,
                                      *_fwd_scalars(scalars))[3]


def _prob_differentiable(logits, inputs, grad_loss):
    target, weight, eps, adjustment, groups, _, reduction, *scalars = inputs
    grad = reference.cross_entropy_prob_grad(logits, target, weight, eps, adjustment, groups, reduction,
                                             *_fwd_scalars(scalars))
    return reference.cross_entropy_bwd(grad, grad_loss)


_INDEX_TARGETS = _ForwardOp(11, _index_recompute, _index_differentiable,
                            {0: "target", 1: "weight", 4: "adjustment", 5: "groups"})
_PROBABILITY_TARGETS = _ForwardOp(10, _prob_recompute, _prob_differentiable,
                                  {0: "target", 1: "weight", 3: "adjustment", 4: "groups"})


def _backward(lib, ctx, grad_loss):
    """d loss / d logits from the gradient the forward saved (see _fwd_setup_context)."""
    try:
        return _backward_of(lib, ctx, grad_loss)
    finally:
        _release_saved_state(ctx)


def _release_saved_state(ctx):
    """Drop the small logits a loss kept (_keep_for_backward) and its other inputs after a backward
    that does not keep the graph, as autograd frees its saved tensors then."""
    state = getattr(ctx, "state", None)
    # (Dynamo tracing a compiled autograd graph cannot call the query; there they go with the graph.)
    if state is not None and state.inputs is not None and not torch.compiler.is_compiling():
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            state.kept_logits = state.inputs = None


# PyTorch's words for a backward through a graph whose saved tensors were freed.
FREED_GRAPH_REFUSAL = ("memfast.cross_entropy: Trying to backward through the graph a second time (the loss's saved "
                       "inputs were freed by the first backward); specify retain_graph=True the first time")


def _check_inputs(ctx, inputs):
    """As for tensors autograd saved: the gradient belongs to the forward's target, weight, adjustment
    and groups, and a recompute (a second or a differentiable backward) reads them again."""
    for i, version in ctx.input_versions:
        if inputs[i]._version != version:
            raise RuntimeError(f"memfast.cross_entropy: the {ctx.op.tensor_names.get(i, 'input')} was modified in "
                               "place after the forward, so the loss's gradient no longer belongs to it; compute the "
                               "loss again")


def _backward_of(lib, ctx, grad_loss):
    op = ctx.op
    if grad_loss is None:
        return (None,) + op.no_grads
    traced = type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling()  # fake / functional tensors
    inputs = ctx.state.inputs
    if inputs is None:
        raise RuntimeError(FREED_GRAPH_REFUSAL)
    if not traced:
        _check_inputs(ctx, inputs)
    if ctx.grad_over_logits and (torch.is_grad_enabled() or ctx.state.saved_grad_consumed):
        raise RuntimeError(GRAD_OVER_LOGITS_REFUSAL.format(
            "a differentiable gradient (create_graph=True)" if torch.is_grad_enabled()
            else "a second backward through one loss (retain_graph=True)"))
    if torch.is_grad_enabled() and not traced:
        # create_graph=True (a gradient penalty) or a torch.func transform: the gradient must
        # itself be differentiable, so it is recomputed from the logits with whole-tensor ops.
        logits = _live_logits(ctx, "a differentiable gradient (create_graph=True, torch.func)", differentiable=True)
        return (op.differentiable(logits, inputs, grad_loss),) + op.no_grads
    if not ctx.state.saved_grad_consumed:
        grad = ctx.saved_tensors[0]
    else:  # a second backward: the saved gradient was scaled in place (its version moved on)
        logits = _live_logits(ctx, "backward twice through one loss (retain_graph=True)")
        grad = op.recompute(lib, logits.detach(), inputs)
    if traced or not _plain_eager(grad) or ctx.keeps_logits:
        # traced (AOTAutograd): the functional form, a fresh tensor; so too where the logits were
        # saved beside the gradient (small ones): both stay as saved, for a second backward
        return (lib.cross_entropy_bwd(grad, grad_loss),) + op.no_grads
    # eager: scale the saved gradient in place (no second [R, C] buffer; on the CPU
    # nothing at all for the usual grad_loss == 1 of a mean or sum); it is not used again
    ctx.state.saved_grad_consumed = True
    with torch._C._AutoDispatchBelowADInplaceOrView():  # the node's own buffer: no version to bump (a
        lib.cross_entropy_bwd_(grad, grad_loss)          # retained second backward unpacks it under compiled autograd)
    return (grad,) + op.no_grads


# What a backward that would recompute the gradient says when inplace_backward=True overwrote the
# logits with it (csrc/autograd.cpp says the same).
GRAD_OVER_LOGITS_REFUSAL = ("memfast.cross_entropy: {} recomputes the gradient from the logits, which "
                            "inplace_backward=True overwrote with it; leave inplace_backward off for this loss")


def _fwd_scalars(scalars):
    """(lse_square_scale, softcap) from the arguments after cross_entropy_fwd's reduction (the
    schema's defaults for those a call left out)."""
    return (float(scalars[0]) if scalars else 0.0), (float(scalars[1]) if len(scalars) > 1 else 0.0)


def _register(ns):
    lib = getattr(torch.ops, ns)
    torch.library.register_fake(f"{ns}::cross_entropy_fwd", _fwd_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_fwd_", _fwd_inplace_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_bwd", _bwd_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_bwd_", _bwd_inplace_fake)
    torch.library.register_fake(f"{ns}::track_", _track_fake)
    torch.library.register_fake(f"{ns}::track_unless_backward_", _track_fake)
    torch.library.register_fake(f"{ns}::curvature_perturb", _perturb_fake)
    torch.library.register_fake(f"{ns}::curvature_reduce", _reduce_fake)

    def backward(ctx, grad_loss, _grad_row_stats, _grad_grad):
        return _backward(lib, ctx, grad_loss)

    def prob_backward(ctx, grad_loss, _grad_row_stats, _grad_label, _grad_grad):
        return _backward(lib, ctx, grad_loss)

    torch.library.register_autograd(f"{ns}::cross_entropy_fwd", backward, setup_context=_fwd_setup_context)
    torch.library.register_fake(f"{ns}::cross_entropy_prob_fwd", _prob_fwd_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_prob_fwd_", _prob_fwd_inplace_fake)
    torch.library.register_autograd(f"{ns}::cross_entropy_prob_fwd", prob_backward,
                                    setup_context=_prob_fwd_setup_context)


class _FusedCrossEntropy(torch.autograd.Function):
    """cross_entropy_fwd's autograd under torch.func transforms and forward-mode
    AD (torch.library's registered Function has no setup_context, so functorch
    refuses it), and in eager mode when the compiled extension (whose C++
    Function serves eager mode) is missing: the same setup and backward as the
    registered formula, plus jvp."""

    generate_vmap_rule = True  # vmap runs the op per example (PyTorch's fallback loop)

    @staticmethod
    def forward(lib, source, *inputs):  # source: see _fwd_setup_context (not a tensor: no graph edge)
        with torch._C._AutoDispatchBelowAutograd():
            return lib.cross_entropy_fwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lib, source, *inputs = inputs
        _fwd_setup_context(ctx, inputs, output, source)
        ctx.lib = lib

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats, _grad_grad):
        return (None, None) + _backward(ctx.lib, ctx, grad_loss)

    @staticmethod
    def jvp(ctx, _lib_tangent, _source_tangent, logits_tangent, *_other_tangents):
        # d loss = <d loss / d logits, d logits>, per row for reduction 'none'
        if logits_tangent is None:
            return None, None, None
        logits = ctx.saved_tensors[-1]  # save_for_forward's (_fwd_setup_context)
        target, weight, ignore_index, eps, adjustment, groups, _, reduction, *scalars = ctx.state.inputs
        grad = reference.cross_entropy_grad(logits, target, weight, ignore_index, eps, adjustment, groups, reduction,
                                            *_fwd_scalars(scalars))
        acc = _acc_dtype(logits.dtype)
        per_row = (grad.to(acc) * logits_tangent.to(acc)).sum(1)
        return (per_row if reduction == 0 else per_row.sum()), None, None


class _FusedProbCrossEntropy(torch.autograd.Function):
    """cross_entropy_prob_fwd's autograd in eager mode, which knows the caller's tensor the rows
    were made from (source, as _FusedCrossEntropy); traced code uses the registered formula.
    inplace: cross_entropy_prob_fwd_ writes the gradient over the logits, whose version is then
    bumped, so that autograd refuses any other backward that saved them (as csrc/autograd.cpp)."""

    @staticmethod
    def forward(lib, source, inplace, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            if not inplace:
                return lib.cross_entropy_prob_fwd(*inputs)
            logits, target, weight, eps, adjustment, groups, _, reduction, *scalars = inputs
            out = lib.cross_entropy_prob_fwd_(logits, target, weight, eps, adjustment, groups, reduction, *scalars)
        torch.autograd.graph.increment_version(logits)
        return (*out, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lib, source, inplace, *inputs = inputs
        _prob_fwd_setup_context(ctx, inputs, output, source, grad_over_logits=inplace)
        ctx.lib = lib

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats, _grad_label, _grad_grad):
        return (None, None, None) + _backward(ctx.lib, ctx, grad_loss)


def prob_ops(device):
    """The op namespace whose cross_entropy_prob_fwd the API runs on this device, or None (PyTorch's
    loss then): the compiled CPU kernel, the reference twin where it is the backend (registered for
    CPU and CUDA), and the CUDA kernel only with MEMFAST_CUDA_PROB=1 until it has been tested on a
    GPU (csrc/cuda/cross_entropy_prob.cu). Other devices have neither."""
    kind = _device_type(device)
    if kind not in ("cpu", "cuda"):
        return None
    lib = ops(kind)
    if lib is torch.ops.memfast_ref or kind == "cpu":
        return lib
    return lib if os.environ.get("MEMFAST_CUDA_PROB") == "1" else None


def cross_entropy_prob(lib, logits, target, weight, eps, adjustment, groups, reduction, track=None, source=None,
                       lse_square_scale=0.0, softcap=0.0, inplace=False):
    """lib.cross_entropy_prob_fwd, differentiable in logits, then lib.track_ of its row statistics
    against its labels when track = (state, counters, sample_ids, stat_rows) is given. Returns
    (loss, row_stats). source, inplace: as in cross_entropy (inplace only for plain eager logits
    that require grad)."""
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    args = (logits, target, weight, eps, adjustment, groups, compute_grad, reduction, float(lse_square_scale),
            float(softcap))
    if type(logits) is torch.Tensor and not torch.compiler.is_compiling():
        if compute_grad:
            held = None if source is None else (weakref.ref(source), source._version)
            loss, row_stats, label, _ = _FusedProbCrossEntropy.apply(lib, held, bool(inplace), *args)
        else:  # no gradient: skip the registered Python autograd kernel (as cross_entropy does)
            with torch._C._AutoDispatchBelowAutograd():
                loss, row_stats, label, _ = lib.cross_entropy_prob_fwd(*args)
    else:
        loss, row_stats, label, _ = lib.cross_entropy_prob_fwd(*args)  # traced: the registered autograd and fake
    if track is not None:
        state, counters, sample_ids, stat_rows = track
        track_rows(lib, state, counters, row_stats.detach(), label, sample_ids, -100, logits.shape[1], stat_rows)
    return loss, row_stats


def _compiled_autograd_on():
    """Whether a backward may run under compiled autograd (torch._dynamo.config.compiled_autograd,
    or inside its context manager): its graph capture cannot collect the C++ autograd node's saved
    state, so the loss takes the Python autograd Function there."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # never imported: nothing can have turned it on
        return False
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool((ca is not None and ca.compiled_autograd_enabled) or dynamo.config.compiled_autograd)


def _forward_ad_active():
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


_NO_TRACKING = (None, None, None, [])


def cross_entropy(lib, logits, target, weight, ignore_index, eps, adjustment, groups, compute_grad, reduction,
                  track=None, source=None, inplace=False, loss_dtype=None, lse_square_scale=0.0, softcap=0.0):
    """lib.cross_entropy_fwd, differentiable in logits, then lib.track_ of its row statistics when
    track = (state, counters, sample_ids, stat_rows) is given. Returns (loss, row_stats).
    source: the caller's tensor the rows were made from (as_rows), when it is not logits:
    what a second or a differentiable backward recomputes from. inplace: write the gradient over
    the logits (loss.cross_entropy's inplace_backward; plain eager with the extension only --
    traced code, torch.func and the extension-less fallback allocate it as usual). loss_dtype: the
    dtype to return the loss in (None: the op's); the caller converts what comes back otherwise.
    lse_square_scale, softcap: the op's z-loss factor and logit cap (0: off)."""
    args = (logits, target, weight, ignore_index, eps, adjustment, groups, compute_grad, reduction,
            float(lse_square_scale), float(softcap))
    if type(logits) is torch.Tensor and not torch.compiler.is_compiling():  # not traced (fake / functional)
        if _forward_ad_active():  # the logits are kept (_fwd_setup_context): no source needed
            loss, row_stats, _ = _FusedCrossEntropy.apply(lib, None, *args)
        elif _C is not None and not (logits.requires_grad and _compiled_autograd_on()):
            # Plain eager: one C++ call does the forward (through the C++ autograd Function when
            # the logits require grad) and the tracking -- no Python on the step's autograd path.
            return _C.cross_entropy(lib.name, *args, *(track or _NO_TRACKING), inplace, source, loss_dtype)
        elif torch.is_grad_enabled() and logits.requires_grad:  # no extension: the Python Function
            held = None if source is None else (weakref.ref(source), source._version)
            loss, row_stats, _ = _FusedCrossEntropy.apply(lib, held, *args)
        else:
            # No gradient (eval, no_grad, tracker.update): skip torch.library's Python autograd
            # kernel, which the dispatcher would otherwise run on every call (~5 us, bench/cpu_breakdown.py).
            with torch._C._AutoDispatchBelowAutograd():
                loss, row_stats, _ = lib.cross_entropy_fwd(*args)
    else:
        loss, row_stats, _ = lib.cross_entropy_fwd(*args)  # traced: the op's registered autograd and fake
    if track is not None:
        state, counters, sample_ids, stat_rows = track
        track_rows(lib, state, counters, row_stats.detach(), target, sample_ids, ignore_index, logits.shape[1],
                   stat_rows)
    return loss, row_stats


# Logits whose storage is at most this size are saved by a loss for a second or a differentiable
# backward (larger ones are held weakly): csrc/autograd.cpp's kKeepLogitsBytes.
KEEP_LOGITS_BYTES = getattr(_C, "KEEP_LOGITS_BYTES", 4 << 20)

_register("memfast_ref")
if _C is not None:
    for _ns in ("memfast", "memfast_ref"):  # as PyTorch's in-place ops: versions bumped, grad-requiring writes refused
        _C._register_writing_guards(_ns)
    _C._set_differentiable_grad(_differentiable_grad)
    _register("memfast")
    BUILD_INFO = _C.build_info()
else:
    BUILD_INFO = None

_warned = set()


def extension_available(device_type="cpu"):
    """Whether compiled kernels exist for this device type."""
    if BUILD_INFO is None:
        return False
    if device_type == "cuda":
        return bool(BUILD_INFO["with_cuda"])
    return device_type == "cpu"


_backend = None
_ops_for_type = {}  # device type -> op namespace under the current backend (ops() runs on every call)


def set_backend(name):
    """'kernels' (compiled, falling back per device with a warning), or 'reference'."""
    global _backend
    if name not in ("kernels", "reference", "auto"):
        raise ValueError(f"memfast backend must be 'kernels', 'reference' or 'auto', got {name!r}")
    _backend = "reference" if name == "reference" else "kernels"
    _ops_for_type.clear()


def _device_type(device):
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def get_backend(device="cpu"):
    """The backend that runs on a device (type): 'kernels', or 'reference' when so set or when
    no compiled kernels exist for it (the extension missing, or built without that device)."""
    kind = _device_type(device)
    return "kernels" if _backend == "kernels" and extension_available(kind) else "reference"


set_backend(os.environ.get("MEMFAST_BACKEND", "auto"))


def ops(device):
    """The op namespace (torch.ops.memfast or torch.ops.memfast_ref) for a device."""
    kind = _device_type(device)
    lib = _ops_for_type.get(kind)
    if lib is None:
        lib = _ops_for_type[kind] = _choose_ops(kind)
    return lib


def _choose_ops(kind):
    if _backend == "kernels" and extension_available(kind):
        return torch.ops.memfast
    if _backend == "kernels" and kind not in _warned:
        _warned.add(kind)
        if BUILD_INFO is None:
            why = (f"the compiled extension memfast._C is not built or does not load ({_EXT_ERROR}); build it "
                   "with pip install --no-build-isolation -e .")
        else:
            why = f"it was built without {kind} kernels"
        warnings.warn(f"memfast: using the pure-PyTorch reference backend on {kind}: {why}", RuntimeWarning,
                      stacklevel=4)
    return torch.ops.memfast_ref
