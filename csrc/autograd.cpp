// The eager autograd of cross_entropy_fwd as a C++ autograd Function, called
// from memfast/_ops.py for plain (not traced, not functorch) tensors: at small
// shapes a training step is host time, and a Python autograd.Function costs
// ~20 us of it (forward wrapper + Python backward; bench/cpu_breakdown.py).
// It follows _ops.py's _backward for eager tensors:
//  - the forward saves the gradient it wrote; the backward scales it in place
//    (cross_entropy_bwd_, nothing to do for a mean's or sum's grad_loss == 1)
//    and returns it, so a step holds one [R, C] buffer;
//  - a second backward through the same graph recomputes the gradient from the
//    logits: kept by the node when their storage is small (kKeepLogitsBytes, a
//    classifier's: then a gradient penalty works as with F.cross_entropy; freed
//    after a backward that does not keep the graph, as autograd frees what it
//    saved), else held weakly (an LM head's cost no memory, and the caller must
//    keep them for that);
//  - create_graph=True calls back into Python (the reference's differentiable
//    gradient, memfast._ops._differentiable_grad), the one place that math is;
//  - inplace_backward=True: cross_entropy_fwd_ writes the gradient over the
//    logits (no [R, C] allocation at all) and their version counter is bumped,
//    so autograd refuses any other backward that saved them.
// Traced code (torch.compile) and torch.func transforms keep the Python
// formula registered with torch.library.
#include <ATen/SavedTensorHooks.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <string>

namespace memfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using FwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, double,
                                                  const OptTensor&, const OptTensor&, bool, int64_t, double, double);
using FwdInplaceSig = std::tuple<Tensor, Tensor>(Tensor&, const Tensor&, const OptTensor&, int64_t, double,
                                                  const OptTensor&, const OptTensor&, int64_t, double, double);
using BwdSig = Tensor(const Tensor&, const Tensor&);
using BwdInplaceSig = void(Tensor&, const Tensor&);
using TrackSig = void(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                      c10::IntArrayRef);

// The ops of one namespace (memfast: the kernels; memfast_ref: the reference,
// registered from Python).
struct OpSet {
  c10::TypedOperatorHandle<FwdSig> fwd;
  c10::TypedOperatorHandle<FwdInplaceSig> fwd_inplace;
  c10::TypedOperatorHandle<BwdSig> bwd;
  c10::TypedOperatorHandle<BwdInplaceSig> bwd_inplace;
  c10::TypedOperatorHandle<TrackSig> track;

  explicit OpSet(const std::string& ns)
      : fwd(find(ns, "cross_entropy_fwd").typed<FwdSig>()),
        fwd_inplace(find(ns, "cross_entropy_fwd_").typed<FwdInplaceSig>()),
        bwd(find(ns, "cross_entropy_bwd").typed<BwdSig>()),
        bwd_inplace(find(ns, "cross_entropy_bwd_").typed<BwdInplaceSig>()),
        track(find(ns, "track_").typed<TrackSig>()) {}

  static c10::OperatorHandle find(const std::string& ns, const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow((ns + "::" + name).c_str(), "");
  }
};

const OpSet& ops_for(const std::string& ns) {
  static const OpSet kernels("memfast");
  if (ns == "memfast") return kernels;
  TORCH_CHECK(ns == "memfast_ref", "memfast: unknown op namespace ", ns);
  // Looked up on first use: memfast_ref is defined by memfast/_ops.py after _C loads.
  static const OpSet reference("memfast_ref");
  return reference;
}

// Logits whose storage is at most this size are saved by the node for a second or a
// differentiable backward (memfast._ops.KEEP_LOGITS_BYTES reads it); larger ones are held weakly.
constexpr int64_t kKeepLogitsBytes = int64_t{4} << 20;

// memfast._ops._differentiable_grad (set at import); leaked on purpose so that
// no Python object is destroyed after the interpreter has gone.
py::object* differentiable_grad = nullptr;

// What the backward needs besides the saved gradient, in one capsule.
struct SavedInputs : torch::CustomClassHolder {
  const OpSet* ops = nullptr;
  Tensor target;
  OptTensor weight, adjustment, groups;
  int64_t ignore_index = 0, reduction = 0;
  double label_smoothing = 0.0, lse_square_scale = 0.0, softcap = 0.0;
  // The caller's logits, held weakly, for recomputing the gradient: the rows
  // themselves, or (source_is_rows false) the [N, C, d...] or [C] input the rows
  // were made from (memfast._ops.as_rows), which the caller keeps alive.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  // Small logits: the rows themselves, kept here rather than with the gradient in the node's saved
  // variables, so that a backward that does not need them (the usual one) does not unpack them and
  // so does not fail when they were changed in place since -- e.g. by a later in-place loss of the
  // same logits, as a distillation's soft and hard terms are. Unpacking checks their version.
  bool rows_saved = false;
  torch::autograd::SavedVariable rows;
  int64_t source_version = 0;
  // A backward needs the target, weight, adjustment and groups unchanged, as autograd's saved tensors
  // (check_inputs). They are dropped after a backward that does not keep the graph (released).
  int64_t target_version = 0, weight_version = 0, adjustment_version = 0, groups_version = 0;
  bool released = false;
  bool source_is_rows = true;
  bool grad_over_logits = false;  // inplace_backward: the saved gradient is the logits' own buffer
  bool saved_grad_consumed = false;
  at::ScalarType acc_dtype = at::kFloat;  // the op's loss dtype: what its backward takes

  static int64_t version_of(const OptTensor& t) { return t.has_value() && t->defined() ? t->_version() : 0; }

  void check_inputs() const {
    TORCH_CHECK(!released, "memfast.cross_entropy: Trying to backward through the graph a second time (the loss's "
                "saved inputs were freed by the first backward); specify retain_graph=True the first time");
    const std::pair<const char*, bool> changed[] = {
        {"target", target._version() != target_version},
        {"weight", version_of(weight) != weight_version},
        {"adjustment", version_of(adjustment) != adjustment_version},
        {"groups", version_of(groups) != groups_version}};
    for (const auto& [name, moved] : changed) {
      TORCH_CHECK(!moved, "memfast.cross_entropy: the ", name, " was modified in place after the forward, so the "
                  "loss's gradient no longer belongs to it; compute the loss again");
    }
  }

  Tensor live_logits(AutogradContext* ctx, const char* why, bool differentiable = false) const {
    if (rows_saved) return rows.unpack();  // (raises if modified, or freed by an earlier backward)
    auto impl = source.lock();
    Tensor t = impl ? Tensor(std::move(impl)) : Tensor();
    TORCH_CHECK(t.defined() && t._version() == source_version, "memfast.cross_entropy: ", why,
                " needs the logits alive and unmodified; keep a reference to them (or compute the loss again; "
                "inside torch.utils.checkpoint, return them from the checkpointed function)");
    // (the loss exists because they required grad)
    TORCH_CHECK(!differentiable || t.requires_grad(), "memfast.cross_entropy: ", why, " needs the logits' autograd "
                "history, which detach_() removed after the loss; compute the loss again");
    if (source_is_rows) return t;
    return t.dim() == 1 ? t.unsqueeze(0) : t.movedim(1, -1).reshape({-1, t.size(1)});
  }
};

}  // namespace

// Named (not in the anonymous namespace): autograd shows it in grad_fn and anomaly reports.
struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const OpSet* ops, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, int64_t ignore_index, double label_smoothing,
                               const OptTensor& adjustment, const OptTensor& groups, bool compute_grad,
                               int64_t reduction, double lse_square_scale, double softcap, bool inplace,
                               const Tensor* source,
                               std::optional<at::ScalarType> loss_dtype) {
    // inplace: the saved gradient is a detached alias of the logits (same storage and version
    // counter, so that a later in-place change of the logits fails this node's version check);
    // saving the input itself would make autograd regenerate a view's grad_fn after the bump (and
    // refuse views made inside a custom Function). Made before the guard below, under which
    // detach() would give the alias a version counter of its own.
    const Tensor alias = inplace ? logits.detach() : Tensor();
    // Function::apply only turns grad mode off: without this the call would go through
    // torch.library's Python autograd kernel of the op.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor loss, row_stats, grad;
    if (inplace) {
      Tensor buffer = logits;  // the op writes the gradient over it
      std::tie(loss, row_stats) = ops->fwd_inplace.call(buffer, target, weight, ignore_index, label_smoothing,
                                                        adjustment, groups, reduction, lse_square_scale, softcap);
      // Tell autograd: a node that saved these logits (or anything sharing their storage) now
      // fails its version check at backward instead of reading the gradient as the logits.
      torch::autograd::impl::bump_version(logits);
      grad = alias;
      ctx->mark_non_differentiable({row_stats});
    } else {
      std::tie(loss, row_stats, grad) = ops->fwd.call(logits, target, weight, ignore_index, label_smoothing,
                                                      adjustment, groups, compute_grad, reduction, lse_square_scale,
                                                      softcap);
      ctx->mark_non_differentiable({row_stats, grad});
    }
    // Otherwise autograd fills an [R, C] zero tensor for the unused `grad` output on every backward.
    ctx->set_materialize_grads(false);
    // Small logits (by their storage: a small view of an LM's logits is not small) are kept by the
    // node (SavedInputs::rows); never the in-place ones, whose buffer is the gradient, and not under
    // saved-tensor hooks (activation checkpointing would recompute the region to unpack them).
    const bool save_rows = !inplace && !at::SavedTensorDefaultHooks::get_hooks().has_value() &&
                           static_cast<int64_t>(logits.storage().nbytes()) <= kKeepLogitsBytes;
    ctx->save_for_backward({grad});
    auto saved = c10::make_intrusive<SavedInputs>();
    saved->rows_saved = save_rows;
    if (save_rows) saved->rows = torch::autograd::SavedVariable(logits, /*is_output=*/false);
    saved->target_version = target._version();
    saved->weight_version = SavedInputs::version_of(weight);
    saved->adjustment_version = SavedInputs::version_of(adjustment);
    saved->groups_version = SavedInputs::version_of(groups);
    saved->ops = ops;
    saved->target = target;
    saved->weight = weight;
    saved->adjustment = adjustment;
    saved->groups = groups;
    saved->ignore_index = ignore_index;
    saved->reduction = reduction;
    saved->label_smoothing = label_smoothing;
    saved->lse_square_scale = lse_square_scale;
    saved->softcap = softcap;
    // A pointer, not a tensor argument: Function::apply would make it an input of the node.
    const Tensor& held = source != nullptr ? *source : logits;
    saved->source = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(held.getIntrusivePtr());
    saved->source_version = held._version();
    saved->source_is_rows = source == nullptr;
    saved->grad_over_logits = inplace;
    saved->acc_dtype = loss.scalar_type();
    ctx->saved_data["inputs"] = c10::IValue::make_capsule(std::move(saved));
    // F.cross_entropy's output dtype (the input's, for bf16 / fp16 logits outside autocast), converted
    // here: a separate .to() would be one more autograd node, and on CUDA two more launches a step.
    if (loss_dtype.has_value() && *loss_dtype != loss.scalar_type()) loss = loss.to(*loss_dtype);
    if (inplace) return {loss, row_stats};
    return {loss, row_stats, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One entry per forward argument (ops, logits, target, ... reduction, lse_square_scale,
    // softcap, inplace, source, loss_dtype); only logits gets one.
    variable_list out(15);
    auto saved = c10::static_intrusive_pointer_cast<SavedInputs>(ctx->saved_data["inputs"].toCapsule());
    saved->check_inputs();
    // The kept rows and the inputs go when autograd frees the node's saved variables: after a backward
    // that does not keep the graph (however this one ends).
    struct ReleaseSaved {
      SavedInputs* inputs;
      bool release;
      ~ReleaseSaved() {
        if (!release) return;
        if (inputs->rows_saved) inputs->rows.reset_data();
        inputs->target = Tensor();
        inputs->weight = inputs->adjustment = inputs->groups = std::nullopt;
        inputs->released = true;
      }
    } release_saved{saved.get(), !torch::autograd::get_current_graph_task_keep_graph()};
    if (!grad_outputs[0].defined()) return out;
    const Tensor grad_loss = grad_outputs[0].to(saved->acc_dtype);
    TORCH_CHECK(!(saved->grad_over_logits && (at::GradMode::is_enabled() || saved->saved_grad_consumed)),
                "memfast.cross_entropy: ",
                at::GradMode::is_enabled() ? "a differentiable gradient (create_graph=True)"
                                           : "a second backward through one loss (retain_graph=True)",
                " recomputes the gradient from the logits, which inplace_backward=True overwrote with it; leave "
                "inplace_backward off for this loss");
    if (at::GradMode::is_enabled()) {
      // create_graph=True (a gradient penalty): a differentiable gradient, recomputed from the logits
      Tensor logits = saved->live_logits(ctx, "a differentiable gradient (create_graph=True, torch.func)",
                                         /*differentiable=*/true);
      py::gil_scoped_acquire gil;
      out[1] = (*differentiable_grad)(logits, saved->target, saved->weight, saved->ignore_index,
                                      saved->label_smoothing, saved->adjustment, saved->groups, saved->reduction,
                                      saved->lse_square_scale, saved->softcap, grad_loss)
                   .cast<Tensor>();
      return out;
    }
    if (saved->rows_saved) {
      // Small logits: the saved gradient is scaled into a new tensor (at most kKeepLogitsBytes), so that
      // it stays as saved, for a second backward (which the rows kept beside it also serve).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out[1] = saved->ops->bwd.call(ctx->get_saved_variables()[0], grad_loss);
      return out;
    }
    Tensor grad;
    if (!saved->saved_grad_consumed) {
      grad = ctx->get_saved_variables()[0];
    } else {  // a second backward: the saved gradient was scaled in place (its version moved on)
      Tensor logits = saved->live_logits(ctx, "backward twice through one loss (retain_graph=True)");
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grad = std::get<2>(saved->ops->fwd.call(logits.detach(), saved->target, saved->weight, saved->ignore_index,
                                              saved->label_smoothing, saved->adjustment, saved->groups, true,
                                              saved->reduction, saved->lse_square_scale, saved->softcap));
    }
    saved->saved_grad_consumed = true;
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // (autograd's own buffer: no version to bump)
    saved->ops->bwd_inplace.call(grad, grad_loss);
    out[1] = grad;
    return out;
  }
};

// track_unless_backward_: one kernel for every device (it only forwards to the device's track_).
void track_unless_backward(Tensor& state, Tensor& counters, const Tensor& row_stats, const Tensor& target,
                           const Tensor& sample_ids, int64_t ignore_index, int64_t num_classes,
                           c10::IntArrayRef stat_rows) {
  if (torch::autograd::get_current_graph_task_id() != -1) return;  // a checkpoint's recompute
  ops_for("memfast").track.call(state, counters, row_stats, target, sample_ids, ignore_index, num_classes,
                                stat_rows);
}

TORCH_LIBRARY_IMPL(memfast, CompositeExplicitAutograd, m) {
  m.impl("track_unless_backward_", &track_unless_backward);
}

// The ops that write into an argument (Tensor(a!) in the schema), called directly, as PyTorch's own
// in-place ops: a write into a tensor that requires grad (with grad mode on) is refused, since autograd
// cannot differentiate it, and the written tensors' version counters move on, so that autograd refuses a
// backward that saved them instead of reading what was written. memfast's own calls run below these
// keys and tell autograd themselves (CrossEntropyFunction, memfast/_ops.py).
constexpr const char* kWritingOps[] = {"cross_entropy_fwd_", "cross_entropy_prob_fwd_", "cross_entropy_bwd_",
                                       "track_", "track_unless_backward_"};

// f(argument name, tensor) for each tensor the op writes into, as it sits on the stack.
template <typename F>
void for_each_written(const c10::OperatorHandle& op, const torch::jit::Stack& stack, F&& f) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias != nullptr && alias->isWrite() && stack[first + i].isTensor()) f(args[i].name(), stack[first + i].toTensor());
  }
}

void refuse_differentiable_writes(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for_each_written(op, *stack, [&](const std::string& name, const Tensor& t) {
      TORCH_CHECK_VALUE(!t.requires_grad(), op.schema().name(), ": ", name, " requires grad, and the op writes into "
                        "it, which autograd cannot differentiate; call it on a tensor that does not require grad "
                        "(e.g. under torch.no_grad()), or use memfast.cross_entropy");
    });
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  std::vector<Tensor> written;
  for_each_written(op, *stack, [&](const std::string&, const Tensor& t) { written.push_back(t); });
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (Tensor& t : written) torch::autograd::impl::bump_version(t);
}

// For both namespaces (memfast_ref's ops are defined from Python after this library loads): the
// registrations live as long as the process, as TORCH_LIBRARY_IMPL's do.
void register_writing_guards(const std::string& ns) {
  auto* autograd = new torch::Library(torch::Library::IMPL, ns, c10::DispatchKey::Autograd, __FILE__, __LINE__);
  auto* inplace = new torch::Library(torch::Library::IMPL, ns, c10::DispatchKey::ADInplaceOrView, __FILE__, __LINE__);
  for (const char* op : kWritingOps) {
    autograd->impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_differentiable_writes>());
    inplace->impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

void init_autograd(py::module& m) {
  m.attr("KEEP_LOGITS_BYTES") = kKeepLogitsBytes;
  m.def("_register_writing_guards", &register_writing_guards,
        "Autograd and ADInplaceOrView kernels of the namespace's ops that write into an argument: refuse a\n"
        "write into a tensor that requires grad, and bump the written tensors' versions.");
  m.def("_set_differentiable_grad", [](py::object fn) {
    delete differentiable_grad;
    differentiable_grad = new py::object(std::move(fn));
  });
  m.def(
      "cross_entropy",
      [](const std::string& ns, const Tensor& logits, const Tensor& target, const OptTensor& weight,
         int64_t ignore_index, double label_smoothing, const OptTensor& adjustment, const OptTensor& groups,
         bool compute_grad, int64_t reduction, double lse_square_scale, double softcap, const OptTensor& state,
         const OptTensor& counters,
         const OptTensor& sample_ids, std::vector<int64_t> stat_rows, bool inplace, const OptTensor& source,
         std::optional<at::ScalarType> loss_dtype) {
        TORCH_CHECK(differentiable_grad != nullptr, "memfast: _set_differentiable_grad was not called");
        const OpSet* ops = &ops_for(ns);
        py::gil_scoped_release no_gil;  // as torch's own ops: the kernels may run for a while
        Tensor loss, row_stats;
        if (at::GradMode::is_enabled() && logits.requires_grad()) {
          auto out = CrossEntropyFunction::apply(ops, logits, target, weight, ignore_index, label_smoothing,
                                                 adjustment, groups, compute_grad, reduction, lse_square_scale,
                                                 softcap, inplace, source.has_value() ? &*source : nullptr, loss_dtype);
          loss = std::move(out[0]);
          row_stats = std::move(out[1]);
        } else {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          std::tie(loss, row_stats, std::ignore) = ops->fwd.call(logits, target, weight, ignore_index,
                                                                 label_smoothing, adjustment, groups, compute_grad,
                                                                 reduction, lse_square_scale, softcap);
          if (loss_dtype.has_value() && *loss_dtype != loss.scalar_type()) loss = loss.to(*loss_dtype);
        }
        if (state.has_value()) {
          Tensor state_t = *state, counters_t = *counters;
          at::AutoDispatchBelowADInplaceOrView below_autograd;  // (the tracker's buffers are not autograd's)
          ops->track.call(state_t, counters_t, row_stats, target, *sample_ids, ignore_index, logits.size(1),
                          stat_rows);
        }
        return std::make_tuple(loss, row_stats);
      },
      "Eager memfast.cross_entropy: cross_entropy_fwd (through the C++ autograd Function when the logits\n"
      "require grad), then track_(state, counters, row_stats, target, sample_ids, ...) when a tracker is\n"
      "given. inplace: write the gradient over the logits (cross_entropy_fwd_; only when they require\n"
      "grad). source: the tensor the logits rows were made from when they are not the caller's own\n"
      "(held weakly, for a second or a differentiable backward). loss_dtype: the loss's dtype (None:\n"
      "the op's, fp32 / fp64). Returns (loss, row_stats).");
}

}  // namespace memfast
