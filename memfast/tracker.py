"""SampleTracker: per-sample training statistics (cumulative sample loss and
the other memorization proxies) kept as fp32 struct-of-arrays buffers on the
device and updated inside the loss op, with no host synchronisation."""
import os
import tempfile
import zlib

import torch

from . import _ops
from ._stats import ALL_USER_STATS, COUNTER, COUNTERS, EXTRA_STATS, KERNEL_STATS, SUM_STATS, USER_STATS

_FORMAT = "memfast.SampleTracker"
_VERSION = 1
# Stored statistics that start at -1 ("never seen" / "not learned").
_START_AT_MINUS_ONE = ("learned_epoch", "last_correct")


def _checksum(*tensors):
    """CRC32 of the tensors' bytes: torch.load does not notice flipped bytes in tensor data."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _file_mode(path):
    """The mode of the file at path, or a new file's under the process umask (as open() gives)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename: a crash
    mid-save leaves the previous file intact."""
    path = os.fsdecode(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path}: no folder {folder}")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, _file_mode(path))  # (mkstemp's file is 0600: keep the file's mode, or open()'s default)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def _stored_stats(user_stats):
    wanted = {s for u in user_stats for s in USER_STATS[u]} | {"nonfinite"}
    return tuple(s for s in KERNEL_STATS + EXTRA_STATS if s in wanted)


def _parse_stats(stats):
    if isinstance(stats, str):
        stats = ALL_USER_STATS if stats == "all" else (stats,)
    try:
        stats = tuple(dict.fromkeys(stats))
    except TypeError:  # None, a number
        stats = ()
    if not stats:
        raise ValueError("SampleTracker: stats must name at least one statistic, e.g. ('csl', 'count') or 'all'")
    unknown = [s for s in stats if s not in USER_STATS]
    if unknown:
        raise ValueError(f"SampleTracker: unknown statistic(s) {unknown}; choose from {list(ALL_USER_STATS)} or 'all'")
    return stats


def _variance(mean_sq, mean, count, mean_terms=None):
    """E[x^2] - E[x]^2 from fp32 running sums: 0 for a single update, and 0 below the sums'
    rounding, where the difference is cancellation noise, not spread; NaN for a sample never
    updated, like the means. The rounding: 8 fp32 ulps of E[x^2] and of E[x]^2 as computed.
    mean_terms: the size of the running mean E[x] was derived from, when not E[x] itself
    (E[p] = 1 - E[1 - p] is off by ulps of E[1 - p], far more than ulps of E[p] when p is small;
    where p is below those ulps, E[p] may round to 0 and E[p^2] ~ p^2 is all that is left: the
    square of the error bounds it)."""
    var = mean_sq - mean * mean
    scale = mean.abs() if mean_terms is None else mean_terms.abs()
    ulps = 8 * torch.finfo(torch.float32).eps
    noise = ulps * (mean_sq.abs() + 2 * mean.abs() * scale) + (ulps * scale) ** 2
    return torch.where((count == 1) | (var <= noise), torch.zeros_like(var), var)


class SampleTracker:
    """Per-sample statistics over training, keyed by dataset index.

    Args:
      num_samples: N, the number of samples (ids are 0..N-1).
      stats: which statistics to keep, or "all". Choices: csl, count,
        last_loss, loss_sq, inconf, ptrue_sq, margin, correct, forgetting,
        learn_time, last_maxprob, curv, grad_norm ("nonfinite" is always kept).
      device: where the buffers live (the logits' device).

    Memory: 4 bytes per sample per stored statistic (``memory_bytes``).
    """

    def __init__(self, num_samples, stats=("csl", "count"), device=None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"SampleTracker: num_samples must be a non-negative int, got {num_samples!r}")
        self.num_samples = num_samples
        self.user_stats = _parse_stats(stats)
        self.stored_stats = _stored_stats(self.user_stats)
        self._row = {s: i for i, s in enumerate(self.stored_stats)}
        self._stat_rows = [self._row.get(s, -1) for s in KERNEL_STATS]
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.state = torch.zeros(len(self.stored_stats), num_samples, dtype=torch.float32, device=device)
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        self._synced_sums = None  # sums as of the last all_reduce
        self._init_state()

    def _init_state(self):
        for s in _START_AT_MINUS_ONE:
            if s in self._row:
                self.state[self._row[s]].fill_(-1.0)

    # ------------------------------------------------------------------ basics
    @property
    def device(self):
        return self.state.device

    @property
    def memory_bytes(self):
        return self.state.numel() * self.state.element_size()

    def __len__(self):
        return self.num_samples

    def __repr__(self):
        return (f"SampleTracker(num_samples={self.num_samples}, stats={list(self.user_stats)}, "
                f"device={self.device})")

    def stat(self, name):
        """The raw [N] buffer of a stored statistic (a view: do not write to it)."""
        if name not in self._row:
            raise KeyError(f"SampleTracker does not keep {name!r}; it keeps {list(self.stored_stats)}")
        return self.state[self._row[name]]

    def to(self, device):
        """Move the buffers to a device (their dtypes are the tracker's format: fp32 state, int64 counters)."""
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            raise TypeError(f"SampleTracker.to: device must be a device (e.g. 'cuda' or torch.device('cpu')), got "
                            f"{device!r}; the tracker's dtypes are fixed") from None
        if self._synced_sums is not None:
            self._synced_sums = self._synced_sums.to(device)
        self.state = self.state.to(device)
        self.counters = self.counters.to(device)
        return self

    def reset(self):
        self._synced_sums = None
        self.state.zero_()
        self.counters.zero_()
        self._init_state()

    @property
    def epoch(self):
        """Completed epochs (calls of end_epoch). Reading it synchronises with the device."""
        return int(self.counters[COUNTER["epoch"]])

    # ----------------------------------------------------------------- updates
    def _check_batch(self, logits, sample_ids, num_rows):
        """Validate sample_ids' metadata (never its values: no host sync) and flatten it."""
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor of sample indices, got {type(sample_ids)}")
        if sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
        if logits.device != self.device:
            raise ValueError(f"the tracker is on {self.device} but the logits are on {logits.device}; "
                             f"create it with device={str(logits.device)!r} or call tracker.to(...)")
        if sample_ids.device != self.device:
            raise ValueError(f"sample_ids is on {sample_ids.device} but the tracker is on {self.device}")
        ids = sample_ids if sample_ids.dim() == 1 else sample_ids.reshape(-1)
        n = ids.numel()
        if not (n == num_rows or (n > 0 and num_rows % n == 0)):
            raise ValueError(f"sample_ids has {n} entries; it needs one per row ({num_rows}) or a number that "
                             f"divides the rows (one id per sequence)")
        return ids.long().contiguous()

    def _scatter(self, row_stats, target_rows, ids, ignore_index, num_classes):
        _ops.ops(self.device).track_(self.state, self.counters, row_stats.detach(), target_rows, ids,
                                     ignore_index, num_classes, self._stat_rows)

    @torch.no_grad()
    def update(self, logits, targets, sample_ids, *, ignore_index=-100, adjustment=None, groups=None, softcap=None):
        """Forward-only update (e.g. an eval-mode scoring pass, the reference
        code's way of computing CSL). ``targets``: class indices, or class
        probabilities (scored against each row's most probable class).
        ``softcap``: score ``softcap * tanh(logits / softcap)`` (fused), for a
        model whose loss caps its logits. Returns the per-row losses."""
        from .loss import _cross_entropy

        return _cross_entropy(logits, targets, None, ignore_index, "none", 0.0, sample_ids, self, adjustment, groups,
                              False, 0.0, softcap, track_in_backward=True)

    def check(self):
        """Raise if an update saw out-of-range sample ids or targets (the CUDA
        kernels report those on the device; this reads the flags once)."""
        c = self.counters.tolist()
        bad_ids, bad_targets = c[COUNTER["bad_ids"]], c[COUNTER["bad_targets"]]
        if bad_ids or bad_targets:
            self.counters[COUNTER["bad_ids"]] = 0
            self.counters[COUNTER["bad_targets"]] = 0
            what = []
            if bad_ids:
                what.append(f"{bad_ids} row(s) with sample_ids out of range [0, {self.num_samples})")
            if bad_targets:
                what.append(f"{bad_targets} row(s) with targets out of range")
            raise IndexError("memfast tracker: skipped " + " and ".join(what) + "; those rows were not recorded")

    def end_epoch(self):
        """Mark the end of an epoch (learning time counts epochs)."""
        self.check()
        self.counters[COUNTER["epoch"]] += 1

    # ------------------------------------------------------------- distributed
    def all_reduce(self, group=None):
        """Merge the statistics of all ranks of a torch.distributed group, in place
        on every rank (call it on all ranks, e.g. at each epoch end).

        Sums (csl, count, ...) add: each rank contributes what it accumulated
        since the previous all_reduce, so calling it repeatedly never double
        counts. Per-sample state (latest loss, correctness, learned epoch)
        comes from the rank that updated the sample last (its `last_update`
        call index; ties go to the highest rank, as if the ranks' batches of
        a step were concatenated in rank order). Ranks must make the same
        number of tracker updates (as DDP's lockstep steps do) for call
        indices to compare. Works with gloo (CPU) and NCCL (CUDA) groups.
        """
        import torch.distributed as dist

        rank = dist.get_rank(group)
        sum_rows = [self._row[s] for s in self.stored_stats if s in SUM_STATS]
        state_rows = [self._row[s] for s in self.stored_stats if s not in SUM_STATS]
        if self._synced_sums is None:
            self._synced_sums = torch.zeros(len(sum_rows), self.num_samples, dtype=torch.float32, device=self.device)
        delta = self.state[sum_rows] - self._synced_sums
        dist.all_reduce(delta, group=group)
        merged = self._synced_sums + delta
        self.state[sum_rows] = merged
        self._synced_sums = merged
        if state_rows:
            last = self.stat("last_update")
            newest = last.clone()
            dist.all_reduce(newest, op=dist.ReduceOp.MAX, group=group)
            owner = torch.where(last == newest, torch.full_like(last, rank), torch.full_like(last, -1))
            dist.all_reduce(owner, op=dist.ReduceOp.MAX, group=group)
            mine = (owner == rank).to(self.state.dtype)
            values = self.state[state_rows] * mine
            dist.all_reduce(values, group=group)
            self.state[state_rows] = values
        counters = self.counters.clone()
        dist.all_reduce(counters, op=dist.ReduceOp.MAX, group=group)
        self.counters[COUNTER["epoch"]] = counters[COUNTER["epoch"]]
        self.counters[COUNTER["calls"]] = counters[COUNTER["calls"]]
        return self

    # ------------------------------------------------------------------ scores
    def scores(self, sync=False, group=None):
        """A dict of [N] tensors: the raw statistics and the derived scores.

        csl (sum of loss), csl_mean, loss_var, inconf (sum of 1 - p_true),
        inconf_final (1 - p_true at the latest update), inconf_max (1 - max
        softmax probability at the latest update), confidence / variability
        (mean and std of p_true: dataset cartography), aum (mean margin),
        accuracy, cum_01_loss (1 - accuracy), forgetting, learn_time (epoch
        after which the sample stayed correct, / epochs; 1 if not learned),
        curv (input curvature averaged over the scoring calls), grad_norm
        (input-gradient norm, "loss sensitivity", averaged likewise), count,
        nonfinite. Samples never updated get NaN means and NaN latest-update
        values (last_loss, inconf_final, inconf_max).

        sync=True first merges all ranks (all_reduce) under torch.distributed.
        """
        if sync:
            self.all_reduce(group)
        self.check()
        out = {}
        has = self._row.__contains__
        count = self.stat("count") if has("count") else None
        mean = (lambda x: x / count) if count is not None else None
        for s in ("csl", "count", "last_loss", "inconf", "margin", "correct", "forgetting", "nonfinite"):
            if has(s):
                out[s] = self.stat(s).clone()
        if count is not None:
            if has("csl"):
                out["csl_mean"] = mean(self.stat("csl"))
            if has("csl") and has("loss_sq"):
                m = mean(self.stat("csl"))
                out["loss_var"] = _variance(mean(self.stat("loss_sq")), m, count)
            if has("inconf"):
                out["inconf_mean"] = mean(self.stat("inconf"))
                out["confidence"] = 1 - out["inconf_mean"]
                if has("ptrue_sq"):
                    conf = out["confidence"]
                    out["variability"] = _variance(mean(self.stat("ptrue_sq")), conf, count,
                                                   mean_terms=out["inconf_mean"]).sqrt()
            if has("margin"):
                out["aum"] = mean(self.stat("margin"))
            if has("correct"):
                out["accuracy"] = mean(self.stat("correct"))
                out["cum_01_loss"] = 1 - out["accuracy"]
        # The latest update's values: NaN for a sample never updated (not the 0 of an empty buffer,
        # which would read as a confidently learned sample).
        latest = (lambda x: x) if count is None else (lambda x: torch.where(count > 0, x, torch.nan))
        if has("last_loss"):
            out["last_loss"] = latest(self.stat("last_loss"))
            out["inconf_final"] = latest(1 - torch.exp(-self.stat("last_loss")))
        if has("last_maxprob"):
            out["inconf_max"] = latest(1 - self.stat("last_maxprob"))
        if has("learned_epoch"):
            learned = self.stat("learned_epoch")
            # the epochs seen, the current one too when a sample was learned in it (scores read before
            # its end_epoch(), or a run stopped mid-epoch): learned then stays below 1, "never"
            epochs = max(self.epoch, int(learned.max()) + 1 if learned.numel() else 1, 1)
            out["learn_time"] = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)) / epochs
        for s in ("curv", "grad_norm"):
            if has(s):
                out[s] = self.stat(s) / self.stat(f"{s}_count")
        return out

    # ------------------------------------------------------------- persistence
    def state_dict(self):
        state, counters = self.state.detach().cpu().clone(), self.counters.detach().cpu().clone()
        synced = None if self._synced_sums is None else self._synced_sums.detach().cpu().clone()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_samples": self.num_samples,
            "user_stats": list(self.user_stats),
            "stored_stats": list(self.stored_stats),
            "state": state,
            "counters": counters,
            "crc32": _checksum(state, counters),
            # sums as of the last all_reduce, so a resumed distributed run does not count them twice
            "synced_sums": synced,
            "synced_crc32": None if synced is None else _checksum(synced),
        }

    @staticmethod
    def _validate_state_dict(sd, where="state_dict"):
        if not isinstance(sd, dict) or sd.get("format") != _FORMAT:
            raise ValueError(f"{where} is not a memfast SampleTracker state")
        if sd.get("version") != _VERSION:
            raise ValueError(f"{where} has format version {sd.get('version')!r}; this memfast reads {_VERSION}")
        n, stored = sd.get("num_samples"), sd.get("stored_stats")
        state, counters = sd.get("state"), sd.get("counters")
        if not isinstance(n, int) or not isinstance(stored, list) or not isinstance(sd.get("user_stats"), list):
            raise ValueError(f"{where} is malformed (num_samples / stats)")
        if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or tuple(state.shape) != (len(stored), n):
            raise ValueError(f"{where} is malformed: state must be float32 [{len(stored)}, {n}]")
        if (not isinstance(counters, torch.Tensor) or counters.dtype != torch.int64
                or tuple(counters.shape) != (len(COUNTERS),)):
            raise ValueError(f"{where} is malformed: counters must be int64 [{len(COUNTERS)}]")
        try:
            expected = _stored_stats(_parse_stats(sd["user_stats"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if list(expected) != stored:
            raise ValueError(f"{where} is malformed: stored statistics {stored} do not match {sd['user_stats']}")
        synced = sd.get("synced_sums")
        sums = sum(1 for name in stored if name in SUM_STATS)
        if synced is not None and (not isinstance(synced, torch.Tensor) or synced.dtype != torch.float32
                                   or tuple(synced.shape) != (sums, n)):
            raise ValueError(f"{where} is malformed: synced_sums must be None or float32 [{sums}, {n}]")
        if ("crc32" in sd and sd["crc32"] != _checksum(state, counters)) or (
                synced is not None and sd.get("synced_crc32") is not None and sd["synced_crc32"] != _checksum(synced)):
            raise ValueError(f"{where} is corrupted: its data does not match its checksum")

    def load_state_dict(self, sd):
        self._validate_state_dict(sd)
        if sd["num_samples"] != self.num_samples:
            raise ValueError(f"load_state_dict: the state is for {sd['num_samples']} samples, this tracker has "
                             f"{self.num_samples}")
        if set(sd["user_stats"]) != set(self.user_stats) or sd["stored_stats"] != list(self.stored_stats):
            raise ValueError(f"load_state_dict: the state keeps {sd['user_stats']}, this tracker keeps "
                             f"{list(self.user_stats)}")
        # (the same statistics named in another order: stored in the same canonical rows)
        self.state.copy_(sd["state"])
        self.counters.copy_(sd["counters"])
        synced = sd.get("synced_sums")
        self._synced_sums = None if synced is None else synced.to(self.device, torch.float32).clone()

    def save(self, path):
        """Write atomically: a temporary file in the same folder, fsync, rename.
        A crash mid-save leaves the previous file intact."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, sd, device=None):
        cls._validate_state_dict(sd)
        t = cls(sd["num_samples"], stats=tuple(sd["user_stats"]), device=device)
        t.load_state_dict(sd)
        return t

    @classmethod
    def load(cls, path, device=None):
        """Read a tracker written by save(); raise ValueError naming the file if it is
        truncated, corrupted or not a tracker."""
        try:
            sd = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path} is not a readable memfast SampleTracker file ({type(e).__name__}: {e})") from None
        try:
            cls._validate_state_dict(sd, where=str(path))
        except ValueError as e:
            raise ValueError(str(e)) from None
        return cls.from_state_dict(sd, device=device)
