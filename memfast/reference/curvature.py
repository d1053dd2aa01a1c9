"""Reference twins of the input-curvature ops (see csrc/memfast.cpp), and the
reference code's probe loop for comparison.

The probes come from Philox4x32-10 (csrc/common/philox.h), implemented here
with int64 torch ops so that the twins give bit-identical probe signs on any
device: key = (seed low 32 bits, seed high 32 bits), counter = (element block,
sample, probe, 0); one call gives the signs of 128 consecutive elements of a
sample's flattened input, element i of the block taking bit i % 32 of word
i // 32 (1 -> +1, 0 -> -1).
"""
import math

import torch
import torch.nn.functional as F

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
PROBE_BLOCK = 128


def _mulhilo(m, c):
    """(hi, lo) 32-bit words of the 64-bit product of the constant m and the
    uint32 values c (int64 tensors), without overflowing int64."""
    a = c & 0xFFFF
    b = c >> 16
    pa = a * m  # < 2^48
    pb = b * m  # < 2^48
    t = pa + ((pb & 0xFFFF) << 16)  # < 2^49
    return (pb >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 values
    (k0, k1: Python ints). Returns the four output words as int64 tensors."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def probe_signs(seed, batch, numel, probe_offset, num_probes, device="cpu"):
    """The probes v in {-1, +1}: an int8 [num_probes, batch, numel] tensor
    (numel = elements per sample)."""
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, seed >> 32
    blocks = -(-numel // PROBE_BLOCK)
    i64 = dict(dtype=torch.int64, device=device)
    c0 = torch.arange(blocks, **i64).view(1, 1, blocks)
    c1 = torch.arange(batch, **i64).view(1, batch, 1)
    c2 = torch.arange(probe_offset, probe_offset + num_probes, **i64).view(num_probes, 1, 1)
    c3 = torch.zeros((), **i64)
    words = torch.stack(torch.broadcast_tensors(*philox4x32_10(c0, c1, c2, c3, k0, k1)), dim=-1)  # [P, B, blocks, 4]
    bits = (words.unsqueeze(-1) >> torch.arange(32, **i64)) & 1  # [P, B, blocks, 4, 32]
    bits = bits.reshape(num_probes, batch, blocks * PROBE_BLOCK)[:, :, :numel]
    return (bits * 2 - 1).to(torch.int8)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_probe_range(op, probe_offset, num_probes):
    if probe_offset < 0 or num_probes < 0 or probe_offset + num_probes > 1 << 32:
        raise ValueError(f"memfast.{op}: probes [probe_offset, probe_offset + num_probes) = "
                         f"[{probe_offset}, {probe_offset + num_probes}) must lie in [0, 2^32)")


def curvature_perturb(x, seed, probe_offset, num_probes, h):
    """[num_probes * B, ...]: x + h * v_k for probes k = probe_offset .. (probe-major)."""
    if not x.is_floating_point():
        raise ValueError(f"memfast.curvature_perturb: x must be floating point, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("memfast.curvature_perturb: x must have a batch dimension, got a 0-d tensor")
    _check_probe_range("curvature_perturb", probe_offset, num_probes)
    B = x.shape[0]
    if num_probes * B > 2**63 - 1:
        raise ValueError(f"memfast.curvature_perturb: num_probes ({num_probes}) x batch ({B}) rows do not fit a tensor")
    flat = x.reshape(B, math.prod(x.shape[1:]))
    v = probe_signs(seed, B, flat.shape[1], probe_offset, num_probes, x.device)
    acc = _opmath(x.dtype)
    # The step is rounded to the op-math type first, as in the kernels.
    step = v.to(acc) * torch.tensor(h, dtype=acc)
    out = (flat.to(acc).unsqueeze(0) + step).to(x.dtype)
    return out.reshape((num_probes * B,) + tuple(x.shape[1:])).contiguous()


def curvature_reduce(grads, g0, seed, probe_offset):
    """[3, B] float32 sums over the probes in grads of ||g_k - g0||,
    ||g_k - g0||^2 and v_k . (g_k - g0)."""
    if not g0.is_floating_point() or grads.dtype != g0.dtype:
        raise ValueError(f"memfast.curvature_reduce: grads ({grads.dtype}) and g0 ({g0.dtype}) must have the same "
                         f"floating dtype")
    if g0.dim() < 1 or grads.dim() != g0.dim() or grads.shape[1:] != g0.shape[1:]:
        raise ValueError(f"memfast.curvature_reduce: grads must be [probes * B, ...] with g0's trailing shape; got "
                         f"grads {tuple(grads.shape)} and g0 {tuple(g0.shape)}")
    B = g0.shape[0]
    if (B == 0 and grads.shape[0] != 0) or (B > 0 and grads.shape[0] % B):
        raise ValueError(f"memfast.curvature_reduce: grads has {grads.shape[0]} rows, not a multiple of the batch "
                         f"size {B}")
    P = grads.shape[0] // B if B else 0
    _check_probe_range("curvature_reduce", probe_offset, P)
    acc = _opmath(g0.dtype)
    D = math.prod(g0.shape[1:])
    d = grads.reshape(P, B, D).to(acc) - g0.reshape(1, B, D).to(acc)
    d = d.double()
    v = probe_signs(seed, B, D, probe_offset, P, g0.device)
    sq = (d * d).sum(-1)
    dot = (d * v).sum(-1)
    return torch.stack([sq.sqrt().sum(0), sq.sum(0), dot.sum(0)]).float()


def reference_probe_loop(model, x, y, n_probes, h, probes=None, *, reduction="mean", offset=1e-7):
    """The reference code's estimator (Garg et al.; CSL-Mem scorers), one probe
    at a time with two forwards and one backward each, for comparison.

    Args:
      probes: optional [n_probes, B, ...] tensor of +-1 probes; default
        Rademacher from torch's generator.
      reduction: "mean" (the reference scorers' nn.CrossEntropyLoss()) or "sum"
        (CSL-Mem's scores.py; exact per-sample gradients).
      offset: the reference's v = h * (v + 1e-7); 0 gives exactly h * v.

    Returns (curv, eig): [B] tensors, the mean over probes of ||g_k||_2 and of
    <h (v_k + offset), g_k>, where g_k = grad_x [L(x + h (v_k + offset)) - L(x)].
    The model runs in its current mode and precision settings (the reference
    calls net.eval() first).
    """
    x = x.detach()
    B = x.shape[0]
    regr = torch.zeros(B, dtype=x.dtype, device=x.device)
    eig = torch.zeros(B, dtype=x.dtype, device=x.device)
    for k in range(n_probes):
        v = probes[k].to(x.dtype) if probes is not None else torch.randint_like(x, 2) * 2 - 1
        v = h * (v + offset)
        xg = x.clone().requires_grad_()
        loss_p = F.cross_entropy(model(xg + v), y, reduction=reduction)
        loss_0 = F.cross_entropy(model(xg), y, reduction=reduction)
        (g,) = torch.autograd.grad(loss_p - loss_0, xg)
        regr += g.reshape(B, -1).norm(dim=1)
        eig += (v * g).reshape(B, -1).sum(dim=1)
    return regr / n_probes, eig / n_probes
