"""The scoring step: a campaign's validated runs (`load.py`) → one (n_runs, N, V) LiRA score array.

Streaming: each run's `train_logits.npy` (N, V, C) is read block by block (`readinto` a bounded
buffer: no copy of the file in memory) and turned into LiRA scores straight into one preallocated
float32 (n_runs, N, V) array — in memory, or the memory-mapped score cache (`cache.py`) — so memory
is bounded by the score array plus a few MB of buffers per thread, never by all logits. Runs are
scored by `threads` worker threads at once (numpy releases the GIL in its reads and ufuncs); each
run is scored by the same code whatever the thread count, so the result does not depend on it.

The kernel (`lira_block`) works in float32 with fused in-place passes: per element one multiply,
|x|, exp, log1p, min and subtract (and a max of |x| as the finiteness check), and label sums as a matrix product with a ones vector (numpy's
sum over a 14-wide last axis is ~10× slower). It follows `scores.lira_scores` (float64, the
reference) term for term — log σ(x) = min(x, 0) − log1p(e^−|x|), LiRA = log p − log1mexp(log p);
multi-class z_y − logsumexp over the other classes — and agrees with it to ~1e−5 (tests). RMIA's p
is recovered from the scores when needed (`scores.rmia_from_lira`: LiRA = logit(p) exactly). Test
logits (small) are kept for utility.
"""

import concurrent.futures
import dataclasses
import os
import threading
import warnings
from pathlib import Path

import filelock
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from medleak.errors import MedleakError
from medleak.io_utils import atomic_path, load_npy
from medleak.privacy_utils.cache import CACHE_DIR, ScoreCache, plan_fingerprint, run_fingerprint
from medleak.privacy_utils.load import (SKIP_NON_FINITE, CampaignFiles, RunFiles, discover_runs, read_campaign_files,
                                        validate_runs)
from medleak.privacy_utils.risk import n_threads
from medleak.privacy_utils.scores import MAX_SCORE, lira_scores
from medleak.rundir import run_dir

READ_BLOCK = 8192  # records per read: (8192 × 16 views × 14 labels) float32 ≈ 7 MB per thread
KERNEL_BLOCK = 1024  # records per fused pass: ≈ 0.9 MB work buffers, stay in L2
LOG_HALF = float(np.log(0.5))
NEAR_ONE = -1e-30  # log p above this: recomputed in float64 (module doc)
SCORER = "lira-float32-1"  # changes whenever the scores this module writes would change (cache key)


@dataclasses.dataclass
class Campaign:
    """Everything the audit needs from a logdir: its plan files and every usable run's scores."""

    logdir: Path
    plan: dict
    dataset: str
    task: str
    label_names: list
    subgroups: list
    records: pd.DataFrame  # records.csv: row i is logit row i
    test_records: pd.DataFrame | None
    run_ids: np.ndarray  # (n_runs,) run index of each row below
    scores: np.ndarray  # (n_runs, N, V) float32 LiRA scores
    masks: np.ndarray  # (n_runs, N) bool: record was IN for the run
    test_logits: np.ndarray | None  # (n_runs, n_test, C) float32
    test_labels: np.ndarray | None  # (n_test, C) float32
    skipped: list  # [(run index, reason)]
    cache: tuple | None = None  # (cache.ScoreCache, key of these scores) when they came through the cache

    @property
    def n_runs(self) -> int:
        return len(self.run_ids)


class LiraKernel:
    """Float32 LiRA scores of one block of logits (module doc); one per thread (owns its buffers).

    labels: (N, C) 0/1 float of the whole campaign; task: "multiclass" | "multilabel".
    """

    def __init__(self, labels, task, n_views, block=KERNEL_BLOCK):
        labels = np.asarray(labels, dtype=np.float32)
        self.task, self.n_classes = task, labels.shape[1]
        # multilabel: the sign s_c of each label; multiclass: the one-hot row (1.0 at the true class)
        self.labels = (2.0 * labels - 1.0 if task == "multilabel" else labels)[:, None, :]
        self.raw_labels = labels
        self.minus_inf_at_true = np.where(labels > 0, -np.inf, 0.0).astype(np.float32)[:, None, :]
        self.ones = np.ones(self.n_classes, dtype=np.float32)
        shape = (block, n_views, self.n_classes)
        self.x, self.a = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.block = block

    def __call__(self, logits, start, out) -> bool:
        """Writes LiRA scores of records start.. (logits (R, V, C) float32) into out (R, V);
        False as soon as a logit is NaN/inf (out then partly written)."""
        for a in range(0, len(logits), self.block):
            z = logits[a:a + self.block]
            n = len(z)
            x, e = self.x[:n], self.a[:n]
            np.abs(z, out=e)
            if not e.max() < np.inf:  # max(|z|) is NaN or inf iff some logit is (one SIMD reduction)
                return False
            rows = slice(start + a, start + a + n)
            if self.task == "multilabel":
                np.multiply(z, self.labels[rows], out=x)      # s·z
                np.negative(e, out=e)
                np.exp(e, out=e)
                np.log1p(e, out=e)                            # log1p(e^−|z|) = log1p(e^−|s·z|)
                np.minimum(x, 0.0, out=x)
                np.subtract(x, e, out=x)                      # log σ(s·z)
                log_p = np.matmul(x, self.ones)
                with np.errstate(divide="ignore"):
                    rest = np.where(log_p > LOG_HALF, np.log(-np.expm1(log_p)), np.log1p(-np.exp(log_p)))
                near_one = np.flatnonzero(log_p.reshape(-1) > NEAR_ONE)
                lira = np.subtract(log_p, rest, out=log_p)
                if near_one.size:  # p within 1e−30 of 1: float32 loses e^−|z|, so these few take the float64 path
                    record, view = np.unravel_index(near_one, lira.shape)
                    lira[record, view] = lira_scores(z[record, view], self.raw_labels[start + a + record], task="multilabel")
            else:
                true = np.matmul(np.multiply(z, self.labels[rows], out=x), self.ones)  # z_y
                np.add(z, self.minus_inf_at_true[rows], out=x)  # the other classes (true one −inf)
                top = x[..., 0].copy()
                for c in range(1, self.n_classes):  # max over classes, slice by slice (a short-axis max is slow)
                    np.maximum(top, x[..., c], out=top)
                top[~np.isfinite(top)] = 0.0
                np.subtract(x, top[..., None], out=x)
                np.exp(x, out=x)
                with np.errstate(divide="ignore"):
                    lse_rest = np.log(np.matmul(x, self.ones)) + top
                lira = np.subtract(true, lse_rest, out=true)
            np.clip(lira, -MAX_SCORE, MAX_SCORE, out=out[a:a + n])
        return True


def _npy_layout(path):
    """(data offset, shape) of a C-order little-endian float32 .npy file, or None (then it is memory-mapped)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != np.dtype("<f4"):
        return None
    return offset, shape


def score_into(out, logits_path, labels, task, *, kernel=None, on_bytes=None, read_block=READ_BLOCK) -> bool:
    """Writes the LiRA scores of one run's logits into `out` (N, V), block by block (module doc);
    False (out partly written) as soon as a block holds a NaN/inf logit. `on_bytes(n)` is told
    how many bytes were read after each block (the loading bar)."""
    n_records, n_views = out.shape
    kernel = kernel or LiraKernel(labels, task, n_views)
    layout = _npy_layout(logits_path)
    if layout is None:  # another dtype or layout than the campaign writes: the slow, general way
        logits = load_npy(logits_path, mmap=True)
        for start in range(0, n_records, read_block):
            block = np.ascontiguousarray(logits[start:start + read_block], dtype=np.float32)
            if not kernel(block, start, out[start:start + read_block]):
                return False
            if on_bytes:
                on_bytes(block.nbytes)
        return True
    offset, shape = layout
    row = int(np.prod(shape[1:])) * 4
    buffer = np.empty((min(read_block, n_records),) + tuple(shape[1:]), dtype=np.float32)
    with open(logits_path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        f.seek(offset)
        for start in range(0, n_records, read_block):
            block = buffer[:min(read_block, n_records - start)]
            view = memoryview(block.reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise MedleakError(f"{logits_path}: ends after {start * row + got} bytes of logits; the file is truncated")
                got += n
            if not kernel(block, start, out[start:start + len(block)]):
                return False
            if on_bytes:
                on_bytes(len(view))
    return True


def score_rows(files: CampaignFiles, runs, out, rows=None, *, progress=True, threads=None) -> list:
    """Scores runs[i] into out[rows[i]] (default rows 0, 1, …), `threads` runs at once (default
    `risk.n_threads()`), under one loading bar with throughput; [finite?] per run."""
    labels = files.train_labels
    rows = list(range(len(runs))) if rows is None else list(rows)
    n_views = out.shape[2]
    threads = max(1, min(n_threads() if threads is None else threads, len(runs) or 1))
    bar = tqdm(total=len(runs) * labels.shape[0] * n_views * labels.shape[1] * 4, desc=f"loading {len(runs)} runs",
               unit="B", unit_scale=True, unit_divisor=1024, disable=not progress or not runs, smoothing=0.1)
    lock, local = threading.Lock(), threading.local()

    def on_bytes(n):
        with lock:
            bar.update(n)

    def score(i):
        if not hasattr(local, "kernel"):
            local.kernel = LiraKernel(labels, files.task, n_views)
        return score_into(out[rows[i]], runs[i].train_logits_path, labels, files.task, kernel=local.kernel, on_bytes=on_bytes)

    with bar, threadpool_limits(1):  # one BLAS thread per worker: the matmuls are tiny
        if threads == 1:
            return [score(i) for i in range(len(runs))]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(score, range(len(runs))))


def _pack(scores, finite):
    """Moves the rows flagged finite to the front of `scores`, in order; returns their count."""
    kept = [i for i, ok in enumerate(finite) if ok]
    for row, index in enumerate(kept):
        if row != index:
            scores[row] = scores[index]
    return len(kept)


def score_runs(files: CampaignFiles, runs, *, progress=True, threads=None):
    """(scores (n_kept, N, V) float32, kept RunFiles, [(run, reason)] skipped for non-finite logits)."""
    labels = files.train_labels
    scores = np.empty((len(runs), len(labels), runs[0].n_views if runs else 1), dtype=np.float32)
    finite = score_rows(files, runs, scores, progress=progress, threads=threads)
    n_kept = _pack(scores, finite)
    return (scores[:n_kept], [r for r, ok in zip(runs, finite) if ok],
            [(r.run, SKIP_NON_FINITE) for r, ok in zip(runs, finite) if not ok])


def _campaign(files: CampaignFiles, scores, kept, skipped, cache=None) -> Campaign:
    """The Campaign of the kept runs (in run order); warns once about the skipped ones."""
    skipped = sorted(skipped)
    if skipped:
        listed = "; ".join(f"run_{run:04d} ({why})" for run, why in skipped)
        warnings.warn(f"skipped {len(skipped)} run(s): {listed}", stacklevel=4)
    if len(kept) < 2:
        raise MedleakError(
            f"{files.logdir}: {len(kept)} usable run(s); the audit compares models that did and did not train on each "
            "record, so it needs at least 2 (16 or more for stable per-record risk)"
        )
    test_labels = files.test_labels
    return Campaign(
        logdir=files.logdir, plan=files.plan, dataset=files.dataset, task=files.task, label_names=files.label_names,
        subgroups=files.subgroups, records=files.records, test_records=files.test_records,
        run_ids=np.array([r.run for r in kept]), scores=scores, masks=np.stack([r.mask for r in kept]),
        test_logits=None if test_labels is None else np.stack([r.test_logits for r in kept]),
        test_labels=test_labels, skipped=skipped, cache=cache,
    )


def score_campaign(files: CampaignFiles, *, progress=True, cache=True, threads=None) -> Campaign:
    """Validates and scores every run of a campaign (module doc). Raises MedleakError on bad input.

    With `cache`, scores come from (and go to) the logdir's `audit_cache/` (`cache.py`): only runs
    it does not hold are read and scored; a logdir where the cache cannot be written is scored
    without it (one warning)."""
    if cache:
        try:
            return _cached_campaign(files, progress=progress, threads=threads)
        except (OSError, filelock.Timeout) as e:
            warnings.warn(f"{files.logdir / CACHE_DIR}: cache not usable ({getattr(e, 'strerror', None) or e}); "
                          "scoring every run without it", stacklevel=2)
    runs, skipped = validate_runs(files, progress=progress)
    scores, kept, non_finite = score_runs(files, runs, progress=progress, threads=threads)
    return _campaign(files, scores, kept, skipped + non_finite)


def _cached_campaign(files: CampaignFiles, *, progress, threads) -> Campaign:
    """`score_campaign` through the score cache: reuse the rows of unchanged runs, score the others."""
    usable, skipped = discover_runs(files.logdir)
    fingerprint = {run: run_fingerprint(files.logdir, run) for run in usable}
    labels = files.train_labels
    store = ScoreCache(files.logdir, {"scorer": SCORER, "task": files.task, "n_records": int(labels.shape[0]),
                                      "n_classes": int(labels.shape[1]), "plan": plan_fingerprint(files.logdir)})
    with store.lock():
        manifest = store.manifest()
        row_of = {fp: i for i, fp in enumerate(manifest["rows"])} if manifest else {}
        known_bad = manifest["skipped"] if manifest else {}
        old_scores, old_masks, old_test = store.open(manifest) if manifest else (None, None, None)
        skipped += [(run, known_bad[fingerprint[run]]) for run in usable if fingerprint[run] in known_bad]
        to_check = [run for run in usable if fingerprint[run] not in row_of and fingerprint[run] not in known_bad]
        new, rejected = validate_runs(files, runs=to_check, progress=progress, n_views=manifest and manifest["n_views"])
        cached = [RunFiles(run, run_dir(files.logdir, run) / "train_logits.npy", int(old_scores.shape[2]),
                           old_masks[row_of[fingerprint[run]]],
                           None if files.test_labels is None else old_test[row_of[fingerprint[run]]])
                  for run in usable if fingerprint[run] in row_of]
        order = sorted(cached + new, key=lambda r: r.run)
        rows = [fingerprint[r.run] for r in order]
        if manifest and rows == manifest["rows"]:  # nothing changed: the cached array as it is
            return _campaign(files, old_scores, order, skipped, cache=(store, manifest["key"]))
        key = store.key(rows)
        n_views = order[0].n_views if order else 1
        with atomic_path(store.scores_path(key), suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(order), len(labels), n_views))
            is_new = {r.run for r in new}
            for i, r in enumerate(tqdm(order, desc="reusing cached scores", unit="run", disable=not progress or not cached)):
                if r.run not in is_new:
                    out[i] = old_scores[row_of[rows[i]]]
            new_rows = [i for i, r in enumerate(order) if r.run in is_new]
            finite_new = score_rows(files, [order[i] for i in new_rows], out, new_rows, progress=progress, threads=threads)
            finite = [True] * len(order)
            for i, ok in zip(new_rows, finite_new):
                finite[i] = ok
            _pack(out, finite)  # rows of runs with non-finite logits move behind the kept ones
            out.flush()
            del out
        kept = [r for r, ok in zip(order, finite) if ok]
        rejected += [(r.run, SKIP_NON_FINITE) for r, ok in zip(order, finite) if not ok]
        current = set(fingerprint.values())
        not_again = {**{fp: why for fp, why in known_bad.items() if fp in current},
                     **{fingerprint[run]: why for run, why in rejected}}
        test = (np.stack([r.test_logits for r in kept]) if files.test_labels is not None and kept
                else np.zeros((len(kept), 0, labels.shape[1]), np.float32))
        masks = np.stack([r.mask for r in kept]) if kept else np.zeros((0, len(labels)), bool)
        store.commit(key, [fingerprint[r.run] for r in kept], masks, test, n_views=n_views, skipped=not_again)
        scores = load_npy(store.scores_path(key), mmap=True)[:len(kept)]
        return _campaign(files, scores, kept, skipped + rejected, cache=(store, key))


def load_campaign(logdir, *, progress=True, cache=True) -> Campaign:
    """Reads, validates and scores every complete run of `logdir` (`load.py`, then this module)."""
    return score_campaign(read_campaign_files(logdir), progress=progress, cache=cache)
