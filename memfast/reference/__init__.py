"""Pure-PyTorch twins of every memfast op (one module per op family): the test
oracle, and the backend used when MEMFAST_BACKEND=reference or the compiled
extension is missing. Each function has exactly its op's signature and results."""
from .cross_entropy import (cross_entropy_bwd, cross_entropy_bwd_, cross_entropy_fwd, cross_entropy_fwd_,
                            cross_entropy_grad, cross_entropy_prob_fwd, cross_entropy_prob_fwd_,
                            cross_entropy_prob_grad, track_, track_unless_backward_)
from .curvature import curvature_perturb, curvature_reduce, reference_probe_loop

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_", "cross_entropy_prob_fwd", "cross_entropy_prob_fwd_",
           "cross_entropy_bwd", "cross_entropy_bwd_", "track_", "track_unless_backward_", "curvature_perturb",
           "curvature_reduce", "reference_probe_loop"]
