"""memfast: fast memorization measurement and memorization-aware training."""
from ._version import __version__
from ._ops import get_backend, set_backend
from .curvature import input_curvature, input_gradient_norm, score_curvature, score_grad_norm
from .linear import linear_cross_entropy
from .loss import CrossEntropyLoss, cross_entropy
from .tracker import SampleTracker
from . import data, datasets, mat, metrics, noise, report
from .mat import MATLoss


def build_info():
    """How the compiled extension was built (None when it is missing)."""
    from . import _ops

    return None if _ops.BUILD_INFO is None else dict(_ops.BUILD_INFO)


__all__ = ["__version__", "cross_entropy", "linear_cross_entropy", "CrossEntropyLoss", "SampleTracker", "MATLoss", "build_info",
           "set_backend", "get_backend", "input_curvature", "score_curvature",
           "input_gradient_norm", "score_grad_norm", "data", "datasets", "mat",
           "metrics", "noise", "report"]
