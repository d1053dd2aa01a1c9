"""The op registrations: schemas, build info, opcheck, torch.compile."""
import contextlib

import pytest
import torch

import memfast
from memfast import _ops, reference
from memfast._stats import COUNTERS, KERNEL_STATS, ROW_STATS

needs_ext = pytest.mark.skipif(not _ops.extension_available("cpu"), reason="compiled extension not available")
NAMESPACES = ["memfast", "memfast_ref"]


@needs_ext
def test_python_schemas_equal_cpp_schemas():
    for name, schema in _ops.SCHEMAS.items():
        cpp = str(getattr(torch.ops.memfast, name).default._schema)
        ref = str(getattr(torch.ops.memfast_ref, name).default._schema)
        assert cpp == "memfast::" + schema
        assert ref == "memfast_ref::" + schema


@needs_ext
def test_build_info():
    info = memfast.build_info()
    assert info["version"] == memfast.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    # the C++ enums and memfast/_stats.py agree in length (and the tests check the meaning)
    assert (info["num_stats"], info["num_row_stats"], info["num_counters"]) == (
        len(KERNEL_STATS), len(ROW_STATS), len(COUNTERS))


def _fwd_samples():
    R, C = 9, 6
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(R, C, dtype=dtype, requires_grad=True)
        y = torch.randint(0, C, (R,))
        y[2] = -100
        for reduction in (0, 1, 2):
            yield (x, y, None, -100, 0.0, None, None, True, reduction)
        yield (x, y, torch.rand(C, dtype=acc), -100, 0.1, torch.randn(3, C, dtype=acc), torch.randint(0, 3, (R,)), True,
               1)
        yield (x.detach(), y, None, -100, 0.0, torch.randn(R, C, dtype=acc), None, False, 0)
        yield (x, y, torch.rand(C, dtype=acc), -100, 0.1, None, None, True, 1, 1e-2)  # with a z-loss
        yield (x, y, None, -100, 0.0, None, None, True, 0, 0.5)
        yield (x, y, torch.rand(C, dtype=acc), -100, 0.1, torch.randn(3, C, dtype=acc), torch.randint(0, 3, (R,)), True,
               1, 1e-2, 2.0)  # with a softcap (and everything else)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck_forward_backward(ns):
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    for args in _fwd_samples():
        torch.library.opcheck(op.cross_entropy_fwd, args)
    grad = torch.randn(5, 4)
    torch.library.opcheck(op.cross_entropy_bwd, (grad, torch.randn(5)))
    torch.library.opcheck(op.cross_entropy_bwd, (grad.double(), torch.randn(1, dtype=torch.float64).expand(5)))
    torch.library.opcheck(op.cross_entropy_bwd_, (grad.clone(), torch.randn(5)))
    torch.library.opcheck(op.cross_entropy_bwd, (grad, torch.tensor(1.0)))  # a mean's or sum's grad_loss
    torch.library.opcheck(op.cross_entropy_bwd, (grad, torch.tensor(0.5)))
    torch.library.opcheck(op.cross_entropy_bwd_, (grad.clone(), torch.tensor(1.0)))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck_forward_inplace(ns):
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    for x, y, w, ii, eps, adj, groups, _, reduction, *zeta in _fwd_samples():
        # the gradient goes over the logits: a fresh buffer each time (opcheck runs the op repeatedly)
        torch.library.opcheck(op.cross_entropy_fwd_, (x.detach().clone(), y, w, ii, eps, adj, groups, reduction,
                                                      *zeta))


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_inplace_writes_the_gradient_over_the_logits(ns, dtype):
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for C in (1, 3, 17, 1000):
        R = 13
        x = (torch.randn(R, C) * 4).to(dtype)
        y = torch.randint(0, C, (R,))
        y[::4] = -100
        table, groups = torch.randn(3, C, dtype=acc), torch.randint(0, 3, (R,))
        for kw in ({}, {"weight": torch.rand(C, dtype=acc) + 0.1, "eps": 0.1}, {"adj": table, "groups": groups}):
            args = (y, kw.get("weight"), -100, kw.get("eps", 0.0), kw.get("adj"), kw.get("groups"))
            for reduction in (0, 1, 2):
                loss, row_stats, grad = reference.cross_entropy_fwd(x, *args, True, reduction)
                buffer = x.clone()
                got_loss, got_stats = op.cross_entropy_fwd_(buffer, *args, reduction)
                torch.testing.assert_close(got_loss, loss, equal_nan=True)
                torch.testing.assert_close(got_stats, row_stats, equal_nan=True)
                tol = dict(atol=1e-2, rtol=1e-2) if dtype in (torch.bfloat16, torch.float16) else {}
                torch.testing.assert_close(buffer.to(acc), grad.to(acc), **tol)
    with pytest.raises(ValueError, match="contiguous"):
        op.cross_entropy_fwd_(torch.randn(4, 6)[:, :5], torch.zeros(4, dtype=torch.long), None, -100, 0.0, None, None,
                              1)
    storage = torch.randn(3, 4, 5)
    saved = storage.clone()
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight shares their memory"):  # read while the gradient is written
        op.cross_entropy_fwd_(storage[0], y, storage[1, 0], -100, 0.0, None, None, 1)
    with pytest.raises(ValueError, match="adjustment shares their memory"):
        op.cross_entropy_fwd_(storage[0], y, None, -100, 0.0, storage[2], None, 1)
    assert torch.equal(storage, saved)
    # int64 targets or groups viewing the logits' own memory (the kernel read them back as the gradient:
    # out-of-bounds reads and writes)
    words = torch.zeros(4, 5, dtype=torch.float64)
    as_ints = words.view(torch.int64)
    with pytest.raises(ValueError, match="target shares their memory"):
        op.cross_entropy_fwd_(words, as_ints[:, 0], None, -100, 0.0, None, None, 1)
    with pytest.raises(ValueError, match="groups shares their memory"):
        op.cross_entropy_fwd_(words, y, None, -100, 0.0, torch.zeros(2, 5, dtype=torch.float64), as_ints[:, 1], 1)
    with pytest.raises(ValueError, match="groups shares their memory"):
        op.cross_entropy_prob_fwd_(words, torch.full((4, 5), 0.2, dtype=torch.float64), None, 0.0,
                                   torch.zeros(2, 5, dtype=torch.float64), as_ints[:, 1], 1)
    assert not words.any()
    before = torch.randn(3, 4)
    buffer = before.clone()
    with pytest.raises(IndexError):  # a bad target is refused before anything is written
        op.cross_entropy_fwd_(buffer, torch.tensor([0, 9, 1]), None, -100, 0.0, None, None, 1)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck_track(ns):
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    op = getattr(torch.ops, ns)
    t = memfast.SampleTracker(8, stats="all")
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    _, row_stats, _ = reference.cross_entropy_fwd(logits, y, None, -100, 0.0, None, None, False, 0)
    for ids in (torch.tensor([0, 1, 1, 7, 3, 1]), torch.tensor([2, 5])):
        torch.library.opcheck(op.track_, (t.state, t.counters, row_stats, y, ids, -100, 4, t._stat_rows))
    before = t.counters.clone()
    for ids in (torch.tensor([0, 1, 2, 3]), torch.zeros(0, dtype=torch.long)):  # 4 ids (or none) for 6 rows
        with pytest.raises(ValueError, match="sample_ids has .* must equal or divide the 6 rows"):
            op.track_(t.state, t.counters, row_stats, y, ids, -100, 4, t._stat_rows)
    assert torch.equal(t.counters, before)


@needs_ext
def test_track_rejects_strided_buffers():
    """The kernels write state and counters through raw pointers: a strided view must raise, not be
    written in the wrong places."""
    t = memfast.SampleTracker(8, stats="all")
    logits, y, ids = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.arange(6)
    _, row_stats, _ = reference.cross_entropy_fwd(logits, y, None, -100, 0.0, None, None, False, 0)
    strided_counters = torch.zeros(2 * len(COUNTERS), dtype=torch.long)[::2]
    with pytest.raises(ValueError, match="counters must be a contiguous"):
        torch.ops.memfast.track_(t.state, strided_counters, row_stats, y, ids, -100, 4, t._stat_rows)
    assert not strided_counters.any()
    strided_state = torch.zeros(t.state.shape[0], 2 * t.state.shape[1])[:, ::2]
    with pytest.raises(ValueError, match="state must be a contiguous"):
        torch.ops.memfast.track_(strided_state, t.counters, row_stats, y, ids, -100, 4, t._stat_rows)


def _loss(model, x, y, ids, tracker, inplace_backward=False):
    return memfast.cross_entropy(model(x), y, sample_ids=ids, tracker=tracker, label_smoothing=0.1,
                                 inplace_backward=inplace_backward)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend, compile_backend):
    if compile_backend == "inductor" and backend == "reference":
        pytest.skip("aot_eager covers the reference ops; inductor is slow to compile on 2 cores")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y, ids = torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    y[1] = -100
    eager_tracker = memfast.SampleTracker(7, stats="all")
    compiled_tracker = memfast.SampleTracker(7, stats="all")
    compiled = torch.compile(_loss, fullgraph=True, backend=compile_backend)
    torch._dynamo.reset()
    for _ in range(3):
        model.zero_grad()
        eager_loss = _loss(model, x, y, ids, eager_tracker)
        eager_loss.backward()
        eager_grad = model.weight.grad.clone()
        model.zero_grad()
        # inplace_backward traces as the functional op (the compiler plans the memory)
        compiled_loss = compiled(model, x, y, ids, compiled_tracker, inplace_backward=True)
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss)
        torch.testing.assert_close(model.weight.grad, eager_grad)
    torch.testing.assert_close(compiled_tracker.state, eager_tracker.state)
    assert torch.equal(compiled_tracker.counters, eager_tracker.counters)


@contextlib.contextmanager
def _config_compiled_autograd():
    torch._dynamo.config.compiled_autograd = True
    try:
        yield
    finally:
        torch._dynamo.config.compiled_autograd = False


@pytest.mark.parametrize("turned_on", ["config", "context"])
def test_compiled_autograd_backward_of_an_eager_loss_matches_eager(backend, turned_on):
    """A loss computed eagerly (a compiled model, the loss outside it) whose backward runs under
    compiled autograd: the C++ autograd node's state cannot be captured there, so the loss takes
    the Python autograd Function -- same loss, gradients and tracker totals as plain eager. With
    the C++ node this raised "unhashable type: 'Capsule'"."""
    import torch._dynamo.compiled_autograd as compiled_autograd

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y, ids = torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    y[1] = -100
    trackers = memfast.SampleTracker(7, stats="all"), memfast.SampleTracker(7, stats="all")
    results = []
    torch._dynamo.reset()
    for tracker, compiled in zip(trackers, (False, True)):
        grads = []
        for step in range(3):
            model.zero_grad()
            if compiled and turned_on == "context":
                scope = compiled_autograd._enable(torch.compile(backend="aot_eager"))
            elif compiled:  # the switch a program sets once, before its steps
                scope = _config_compiled_autograd()
            else:
                scope = contextlib.nullcontext()
            with scope:
                loss = _loss(model, x * (step + 1), y, ids, tracker, inplace_backward=True)
                loss = loss + memfast.cross_entropy(model(x), y, reduction="none").sum() / 3
                if compiled and turned_on == "config":  # a backward under torch.compile: compiled autograd
                    torch.compile(lambda: loss.backward(), backend="aot_eager")()
                else:
                    loss.backward()
            grads.append((loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()))
        results.append(grads)
    for got, want in zip(*results):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    torch.testing.assert_close(trackers[1].state, trackers[0].state)
    assert torch.equal(trackers[1].counters, trackers[0].counters)


@needs_ext
@pytest.mark.parametrize("ns", NAMESPACES)
def test_ops_that_write_bump_versions_and_refuse_grad_requiring_tensors(ns):
    """Called directly, the writing ops behave as PyTorch's in-place ops: the written tensors'
    version counters move on (a backward that saved them then refuses, instead of reading what was
    written: the kernels' silent wrong gradient before), and with grad mode on a write into a tensor
    that requires grad is refused, naming it, before anything is written."""
    lib = getattr(torch.ops, ns)
    y = torch.tensor([0, 1, 2])
    t = memfast.SampleTracker(3, stats="all")
    _, row_stats, _ = reference.cross_entropy_fwd(torch.randn(3, 4), y, None, -100, 0.0, None, None, False, 0)
    calls = {
        "logits": lambda z: lib.cross_entropy_fwd_(z, y, None, -100, 0.0, None, None, 1),
        "logits ": lambda z: lib.cross_entropy_prob_fwd_(z, torch.full((3, 4), 0.25), None, 0.0, None, None, 1),
        "grad": lambda z: lib.cross_entropy_bwd_(z, torch.tensor(2.0)),
    }
    for name, call in calls.items():
        a = torch.randn(3, 4, requires_grad=True)
        z = a * 1.0
        saved_by = (z * z).sum()  # mul saves z
        with torch.no_grad():
            call(z)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved_by.backward()
        for target in (a, a * 1.0):  # a leaf and a non-leaf that require grad
            before = target.detach().clone()
            with pytest.raises(ValueError, match=f"{ns}::.*: {name.strip()} requires grad, and the op writes"):
                call(target)
            assert torch.equal(target.detach(), before)
    state, counters = t.state.clone(), t.counters.clone()
    lib.track_(state, counters, row_stats, y, torch.arange(3), -100, 4, t._stat_rows)
    assert state._version == counters._version == 1


@pytest.mark.parametrize("ns", NAMESPACES)
def test_both_namespaces_refuse_the_same_bad_arguments(ns):
    """The reference ops check what the kernels check (check_common_forward_args, check_track_args),
    before writing anything: they accepted label smoothing 1.5, complex logits and groups without a
    table, and track_ wrote the state before refusing bad stat_rows or row statistics."""
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    lib = getattr(torch.ops, ns)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    forward = {
        "label_smoothing must be in": dict(eps=1.5),
        "logits must be floating point": dict(x=torch.randn(4, 3, dtype=torch.complex64)),
        "logits must be 2-D": dict(x=torch.randn(3)),
        "groups needs an adjustment table": dict(groups=torch.zeros(4, dtype=torch.long)),
        "weight must be a contiguous": dict(weight=torch.ones(4)),
        "adjustment must be a": dict(adjustment=torch.zeros(4, 2)),
        "a dense adjustment needs one row per logits row": dict(adjustment=torch.zeros(5, 3)),
    }
    for match, kw in forward.items():
        with pytest.raises(ValueError, match=match):
            lib.cross_entropy_fwd(kw.get("x", x), y, kw.get("weight"), -100, kw.get("eps", 0.0), kw.get("adjustment"),
                                  kw.get("groups"), False, 1)
    t = memfast.SampleTracker(4, stats="all")
    _, row_stats, _ = reference.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
    bad_rows = list(t._stat_rows)
    bad_rows[0] = 99
    track = {
        "does not name a row": dict(stat_rows=bad_rows),
        "row_stats must be a contiguous": dict(row_stats=row_stats[:, :3]),
        "float32 or float64": dict(row_stats=row_stats.half()),
    }
    for match, kw in track.items():
        state, counters = t.state.clone(), t.counters.clone()
        with pytest.raises(ValueError, match=match):
            lib.track_(state, counters, kw.get("row_stats", row_stats), y, torch.arange(4), -100, 3,
                       kw.get("stat_rows", t._stat_rows))
        assert torch.equal(state, t.state) and torch.equal(counters, t.counters)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_meta_tensor_among_real_ones_is_refused(ns):
    """One meta input dispatches to the fake kernel: it checks devices as the kernels do (it returned
    uninitialised CPU memory, and track_ dropped the batch)."""
    if ns == "memfast" and not _ops.extension_available("cpu"):
        pytest.skip("compiled extension not available")
    lib = getattr(torch.ops, ns)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="on one device, got cpu and meta"):
        lib.cross_entropy_fwd(x, y.to("meta"), None, -100, 0.0, None, None, False, 1)
    t = memfast.SampleTracker(4)
    _, row_stats, _ = reference.cross_entropy_fwd(x, y, None, -100, 0.0, None, None, False, 0)
    with pytest.raises(ValueError, match="on one device"):
        lib.track_(t.state, t.counters, row_stats.to("meta"), y, torch.arange(4), -100, 3, t._stat_rows)
    # the backward and curvature_reduce too (they returned uninitialised memory on the first input's device)
    grad, ones = torch.randn(4, 3), torch.ones(4)
    with pytest.raises(ValueError, match="on one device, got cpu and meta"):
        lib.cross_entropy_bwd(grad, ones.to("meta"))
    with pytest.raises(ValueError, match="on one device, got meta and cpu"):
        lib.cross_entropy_bwd_(grad.to("meta"), ones)
    with pytest.raises(ValueError, match="on one device, got cpu and meta"):
        lib.curvature_reduce(torch.randn(2, 3, device="meta"), torch.randn(2, 3), 0, 0)
