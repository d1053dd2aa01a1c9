"""A check of the one-sweep CUDA kernel of class-probability targets before it has run on a GPU:
ce_prob_fwd_kernel's per-thread RowSummary (csrc/cuda/cross_entropy_prob.cu; keep the two in step),
its xor-shuffle tree and warp combine, ported to float64 Python with the real thread strides, against
the CPU kernel (loss, row statistics, label, gradient) on edge cases; it also asserts that every
lane of a warp ends with the same summary.

    .venv/bin/python bench/emulate_cuda_prob.py
"""
import math, itertools, random
import torch
import memfast  # noqa: F401  (registers the ops)

NT = 256
NONE = 0x7fffffff
ninf = -math.inf

def isnan(x): return x != x

class S:
    __slots__ = ("t_max","t_first","t_logit","t_nan","mass","z_max","z_first","z_second","sum","dot","fm")
    def __init__(s):
        s.t_max = s.z_max = s.z_second = ninf
        s.t_first = s.z_first = NONE
        s.t_nan = 0; s.t_logit = 0.0
        s.mass = s.sum = s.dot = s.fm = 0.0
    def add(s, c, tc, wt, x):
        if tc > s.t_max:
            s.t_max, s.t_first, s.t_logit = tc, c, x
        s.t_nan |= int(isnan(tc))
        s.mass += wt
        xv = ninf if isnan(x) else x
        if xv > s.z_max:
            if s.sum != 0: s.sum *= math.exp(s.z_max - xv) if not (isnan(s.z_max - xv)) else math.nan
            if s.fm != 0: s.dot -= s.fm * (xv - s.z_max)
        if xv > s.z_max or s.z_first == NONE:
            s.z_second, s.z_max, s.z_first = s.z_max, xv, c
        elif xv > s.z_second:
            s.z_second = xv
        if x != ninf:
            s.sum += exp(x - s.z_max)
            s.dot += wt * (x - s.z_max)
            s.fm += wt
        else:
            s.dot += mul(wt, x)
    def shifted_sum(s, m):
        return 0.0 if s.sum == 0 else s.sum * exp(s.z_max - m)
    def shifted_dot(s, m):
        return s.dot if s.fm == 0 else s.dot - mul(s.fm, (m - s.z_max))
    def key(s):
        return tuple("nan" if isinstance(v, float) and isnan(v) else v for v in (getattr(s, k) for k in S.__slots__))

def exp(x):
    if isnan(x): return math.nan
    if x == math.inf: return math.inf
    if x == ninf: return 0.0
    try: return math.exp(x)
    except OverflowError: return math.inf

def mul(a, b):
    if (a == 0 and abs(b) == math.inf) or (b == 0 and abs(a) == math.inf): return math.nan
    return a * b

def combine(a, b):
    r = S()
    tb = b.t_max > a.t_max or (b.t_max == a.t_max and b.t_first < a.t_first)
    r.t_max = b.t_max if tb else a.t_max
    r.t_first = b.t_first if tb else a.t_first
    r.t_logit = b.t_logit if tb else a.t_logit
    r.t_nan = a.t_nan | b.t_nan
    r.mass = a.mass + b.mass
    zb = b.z_max > a.z_max or (b.z_max == a.z_max and b.z_first < a.z_first)
    win, lose = (b, a) if zb else (a, b)
    r.z_max, r.z_first = win.z_max, win.z_first
    r.z_second = lose.z_max if lose.z_max > win.z_second else win.z_second
    r.sum = a.shifted_sum(r.z_max) + b.shifted_sum(r.z_max)
    r.dot = a.shifted_dot(r.z_max) + b.shifted_dot(r.z_max)
    r.fm = a.fm + b.fm
    return r

def row(z, t, w, eps, zeta, grad_scale):
    C = len(z)
    keep, spread = 1 - eps, (eps / C if C else 0.0)
    wt = [(w[c] if w is not None else 1.0) * (keep * t[c] + spread) for c in range(C)]
    lanes = [S() for _ in range(NT)]
    for th in range(NT):
        for c in range(th, C, NT):
            lanes[th].add(c, t[c], wt[c], z[c])
    for off in (16, 8, 4, 2, 1):
        lanes = [combine(lanes[i], lanes[i ^ off]) for i in range(NT)]
    for wp in range(NT // 32):  # every lane of a warp holds the same summary
        keys = {lanes[wp * 32 + i].key() for i in range(32)}
        assert len(keys) == 1, ("asymmetric", keys)
    s = lanes[0]
    for wp in range(1, NT // 32):
        s = combine(s, lanes[wp * 32])
    y = s.t_first if (s.t_max > 0 and not s.t_nan) else -100
    has = y >= 0
    z_y = s.t_logit if has else 0.0
    max_other = s.z_second if s.z_first == y else s.z_max
    ssum = math.nan if (s.z_max == ninf and C > 0) else s.sum
    correct = has and s.z_first == y and not isnan(z_y)
    m = s.z_max
    log_sum = math.log(ssum) if ssum > 0 else (ninf if ssum == 0 else math.nan)
    lse = m + log_sum if not (m == ninf and log_sum == math.inf) else math.nan
    loss = (0.0 if s.mass == 0 else mul(s.mass, log_sum)) - s.dot
    if zeta and has: loss += zeta * lse * lse
    stats = [lse if has else 0.0, z_y, max_other if has else 0.0, 1.0, 1.0 if correct else 0.0]
    scale_p = s.mass + (2 * zeta * lse if zeta and has else 0.0)
    scale = scale_p / ssum * grad_scale if ssum == ssum and ssum != 0 else (math.nan if ssum != 0 else mul(scale_p, math.inf))
    g = [mul(exp(z[c] - m), scale) - wt[c] * grad_scale for c in range(C)]
    return loss, stats, y, g

def close(a, b, tol=1e-9):
    if isnan(a) or isnan(b): return isnan(a) and isnan(b)
    if abs(a) == math.inf or abs(b) == math.inf: return a == b
    return abs(a - b) <= tol * (1 + abs(b))

def check(Z, T, w=None, eps=0.0, zeta=0.0, reduction=0):
    Z, T = Z.double(), T.double()
    R, C = Z.shape
    loss, st, lab, grad = torch.ops.memfast.cross_entropy_prob_fwd(Z, T, w, eps, None, None, True, 0, zeta, 0.0)
    for r in range(R):
        l, s, y, g = row(Z[r].tolist(), T[r].tolist(), None if w is None else w.tolist(), eps, zeta, 1.0)
        assert y == lab[r].item(), (r, y, lab[r])
        assert close(l, loss[r].item()), ("loss", r, l, loss[r].item())
        for k in range(5):
            assert close(s[k], st[k, r].item()), ("stat", k, r, s[k], st[k, r].item())
        for c in range(C):
            assert close(g[c], grad[r, c].item(), 1e-8), ("grad", r, c, g[c], grad[r, c].item())

random.seed(0); torch.manual_seed(0)
n = rows = 0
for C in (0, 1, 2, 3, 255, 256, 257, 600, 1000):
    R = 6
    Z = torch.randn(R, C, dtype=torch.float64) * 3
    T = torch.softmax(torch.randn(R, C, dtype=torch.float64) * 2, 1)
    check(Z, T); n += 1
    check(Z, T, torch.rand(C, dtype=torch.float64) + 0.1, 0.2, 1e-2); n += 1
    if C >= 2:
        T2 = T.clone(); T2[:, :] = 0; T2[0, C - 1] = T2[0, 0] = 0.5   # tie: first index
        T2[1, C // 2] = 1.0; T2[2] = 1.0 / C  # all equal
        T2[3, 1] = math.nan; T2[3, 0] = 1.0
        T2[4, -1] = 0.7; T2[4, 1] = 0.3
        Z2 = Z.clone()
        Z2[0, C - 1] = Z2[0, 0] = Z2[0].max() + 1   # logit tie: correct (label 0 is first)
        Z2[1, C // 2] = Z2[1].max() + 1; Z2[1, 0] = Z2[1, C // 2]  # beaten by an earlier tie
        Z2[2, :] = -math.inf
        Z2[4, 0] = math.nan
        Z2[5, 1] = math.inf
        check(Z2, T2); n += 1
        Z3 = Z.clone(); Z3[:, 0] = -math.inf; Z3[0, :C // 2] = -math.inf
        check(Z3, T2); n += 1
        Z4 = torch.full((R, C), -math.inf, dtype=torch.float64); Z4[0, C - 1] = 1.0; Z4[1, 0] = math.nan
        check(Z4, T); n += 1
        check(Z * 1e4, T); n += 1  # huge logits: the shifted dot's no-cancellation
for C in (3, 1000, 4000):
    Z = torch.stack([torch.linspace(-50, 50, C), torch.linspace(1e4, -1e4, C), torch.linspace(-1e4, 1e4, C)]).double()
    T = torch.softmax(torch.randn(3, C, dtype=torch.float64), 1)
    check(Z, T, torch.rand(C, dtype=torch.float64) + 0.1, 0.1, 1e-3)
    rows += 3
print(f"{n * 6 + rows} rows: the emulated kernel matches the CPU kernel")
