import torch, memfast, torch.nn.functional as F, warnings
torch.manual_seed(0)
N,C=16,5
x = torch.randn(N,C); y = torch.randint(0,C,(N,)); sid=torch.arange(N)
t = memfast.SampleTracker(N, stats="all"); s = t.scores()
print("empty scores", {k: v[:2].tolist() for k,v in s.items() if k in ("csl_mean","aum","learn_time","accuracy","variability")})
# nonfinite
xn = x.clone(); xn[2,1] = float('nan'); xn[3,0]=float('inf')
l = memfast.cross_entropy(xn, y, sample_ids=sid, tracker=t); print("nan loss", l, F.cross_entropy(xn,y))
print("nonfinite", t.scores()["nonfinite"][:5], "count", t.scores()["count"][:5])
# legacy reduce
print("reduce=False", memfast.cross_entropy(x, y, reduce=False).shape)
# autocast
with torch.autocast("cpu", dtype=torch.bfloat16):
    lin = torch.nn.Linear(C, C)
    z = lin(x); print("autocast logits", z.dtype, "loss", memfast.cross_entropy(z, y).dtype, F.cross_entropy(z, y).dtype)
# create_graph example
xx = torch.randn(N, 4, requires_grad=True); model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, C))
logits = model(xx); loss = memfast.cross_entropy(logits, y)
(gx,) = torch.autograd.grad(loss, xx, create_graph=True)
(loss + 0.1*gx.pow(2).sum()).backward()
g1 = model[0].weight.grad.clone(); model.zero_grad()
logits = model(xx); loss = F.cross_entropy(logits, y); (gx,) = torch.autograd.grad(loss, xx, create_graph=True); (loss + 0.1*gx.pow(2).sum()).backward()
print("create_graph", (g1-model[0].weight.grad).abs().max())
# create_graph w/o keeping logits
try:
    loss = memfast.cross_entropy(model(xx), y); (gx,) = torch.autograd.grad(loss, xx, create_graph=True); print("no-ref create_graph ok?", gx.shape)
except Exception as e: print("no-ref create_graph:", type(e).__name__, str(e)[:250])
# torch.func
from torch.func import grad, vmap, functional_call
params = dict(model.named_parameters())
def f(p, xi, yi): return memfast.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    psg = vmap(grad(f), in_dims=(None,0,0))(params, xx.detach(), y)
    print("vmap warnings", len(w), str(w[0].message)[:150] if w else None)
def f2(p, xi, yi): return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
psg2 = vmap(grad(f2), in_dims=(None,0,0))(params, xx.detach(), y)
print("per-sample grad", max((psg[k]-psg2[k]).abs().max().item() for k in psg))
# inplace with tanh raises
z0 = torch.randn(N, C, requires_grad=True)
try:
    l = memfast.cross_entropy(torch.tanh(z0), y, inplace_backward=True); l.backward(); print("tanh inplace no error!")
except Exception as e: print("tanh inplace:", type(e).__name__, str(e)[:150])
# inplace: logits now hold gradient
zz = z0 * 1.0
l = memfast.cross_entropy(zz, y, inplace_backward=True)
print("inplace logits now grad:", torch.allclose(zz, (torch.softmax(z0,1)-F.one_hot(y,C))/N, atol=1e-6))
# inplace + retain_graph second backward
zz = z0*1.0; l = memfast.cross_entropy(zz, y, inplace_backward=True); l.backward(retain_graph=True)
try: l.backward(); print("second backward no error")
except Exception as e: print("2nd backward:", type(e).__name__, str(e)[:200])
# inplace without grad (eval)
with torch.no_grad():
    zz = z0*1.0; l = memfast.cross_entropy(zz, y, inplace_backward=True); print("no_grad inplace modified logits?", not torch.equal(zz, z0))
# repeated ids
t = memfast.SampleTracker(4, stats="all")
lg = torch.randn(6, C); yy = torch.randint(0,C,(6,)); ids = torch.tensor([0,0,1,1,1,2])
memfast.cross_entropy(lg, yy, sample_ids=ids, tracker=t)
per = F.cross_entropy(lg, yy, reduction='none')
print("repeat csl", t.scores()["csl"].tolist(), [per[:2].sum().item(), per[2:5].sum().item(), per[5].item(), 0], "last_loss", t.scores()["last_loss"][:3].tolist(), per[[1,4,5]].tolist())
# torch.compile
t = memfast.SampleTracker(N, stats="all")
@torch.compile(fullgraph=True, backend="aot_eager")
def step(x, y, sid): return memfast.cross_entropy(x, y, sample_ids=sid, tracker=t)
xg = x.clone().requires_grad_(); l = step(xg, y, sid); l.backward()
print("compiled", l.item(), F.cross_entropy(x,y).item(), t.scores()["count"][:3])
# checkpoint
from torch.utils.checkpoint import checkpoint
t = memfast.SampleTracker(N, stats="all")
lin = torch.nn.Linear(C,C)
def fn(a): return memfast.cross_entropy(lin(a), y, sample_ids=sid, tracker=t)
l = checkpoint(fn, x, use_reentrant=False); l.backward(); print("checkpoint count", t.scores()["count"][:3])
