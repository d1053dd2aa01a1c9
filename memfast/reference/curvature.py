"""Reference twins of the input-curvature ops (see csrc/memfast.cpp)."""


def curvature_perturb(x, seed, probe_offset, num_probes, h):
    raise NotImplementedError("curvature_perturb: not implemented yet")


def curvature_reduce(grads, g0, seed, probe_offset, h):
    raise NotImplementedError("curvature_reduce: not implemented yet")
