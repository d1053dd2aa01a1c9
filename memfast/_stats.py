"""Names of the statistics, per-row values and counters shared with the C++
kernels (csrc/common/ce_math.h); the order is the enum order there."""

# Per-sample statistics the kernels update, in StatRow order.
KERNEL_STATS = (
    "csl", "count", "last_loss", "loss_sq", "inconf", "ptrue_sq", "margin", "correct",
    "forgetting", "learned_epoch", "last_correct", "last_maxprob", "nonfinite", "last_update",
)
# Sums over updates (merged across ranks by addition); the other stored
# statistics are per-sample state (merged from the rank that updated last).
SUM_STATS = ("csl", "count", "loss_sq", "inconf", "ptrue_sq", "margin", "correct", "forgetting", "nonfinite",
             "curv", "curv_count", "grad_norm", "grad_norm_count")
# Statistics accumulated from Python (input curvature by memfast.score_curvature,
# input-gradient norms by memfast.score_grad_norm and score_curvature).
EXTRA_STATS = ("curv", "curv_count", "grad_norm", "grad_norm_count")
# Rows of the [NUM_ROW_STATS, R] tensor the forward op returns. log_sum = log sum_c exp(z_c - m),
# m = max_c z_c (= lse - m; the tracker forms lse - z_y = log_sum - (z_y - m) from it, exact near m).
ROW_STATS = ("log_sum", "target_logit", "max_other", "weight", "correct")
# Entries of the tracker's int64 counters.
COUNTERS = ("epoch", "calls", "bad_ids", "bad_targets")

ROW = {name: i for i, name in enumerate(ROW_STATS)}
COUNTER = {name: i for i, name in enumerate(COUNTERS)}

# What a user may ask a tracker to keep, and the stored statistics each needs.
USER_STATS = {
    "csl": ("csl",),
    "count": ("count",),
    "last_loss": ("last_loss", "last_update"),
    "loss_sq": ("loss_sq",),
    "inconf": ("inconf",),
    "ptrue_sq": ("ptrue_sq",),
    "margin": ("margin",),
    "correct": ("correct",),
    "forgetting": ("forgetting", "last_correct", "last_update"),
    "learn_time": ("learned_epoch", "last_correct", "last_update"),
    "last_maxprob": ("last_maxprob", "last_update"),
    "nonfinite": ("nonfinite",),
    "curv": ("curv", "curv_count"),
    "grad_norm": ("grad_norm", "grad_norm_count"),
}
ALL_USER_STATS = tuple(USER_STATS)
