"""Per-record and per-patient membership risk from many shadow models.

Every run (model) either trained on a record (IN) or not (OUT). Over runs, a record's score under
IN models and under OUT models form two distributions; how well they separate is that record's risk.
Per record and view we take the IN and OUT mean and population standard deviation (ddof = 0) over
runs, average each over views, and model both as Gaussians, so the best threshold attack on that
record has AUC

    AUC = Φ((μ_in − μ_out) / √(σ_in² + σ_out²)),   clipped below at 0.5,

with the Hanley–McNeil (1982) standard error for n_in IN and n_out OUT models. A patient's risk is
the max (worst image) and mean of their records' AUCs.

The heavy part (moments over ~200 models for 10⁵–10⁶ records × 16 views) runs over chunks of
records on a small thread pool (numpy releases the GIL in matmul/sort), accumulating in float64.
"""

import concurrent.futures
import os

import numpy as np
import pandas as pd
from scipy import special, stats

from medleak.errors import MedleakError

RISK_THRESHOLDS = (0.6, 0.7, 0.8, 0.9)
DEFAULT_CHUNK = 64  # records per chunk: (200 models × 64 × 16 views) float32 ≈ 0.8 MB, stays in cache


def n_threads() -> int:
    """Worker threads for chunked statistics (MEDLEAK_THREADS overrides; default: CPU count, ≤ 8)."""
    env = os.environ.get("MEDLEAK_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def map_chunks(fn, n_records, chunk=DEFAULT_CHUNK, threads=None):
    """Calls fn(start, stop) for consecutive record chunks; fn writes into preallocated outputs."""
    bounds = [(a, min(a + chunk, n_records)) for a in range(0, n_records, chunk)]
    threads = n_threads() if threads is None else threads
    if threads <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            fn(a, b)
        return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda ab: fn(*ab), bounds):
            pass


def check_scores_masks(scores, masks, what="scores"):
    """Validates (n_models, n_records, n_views) scores and (n_models, n_records) bool masks.

    A 2-D score array is read as one view. Returns (scores, masks) with masks as bool.
    """
    scores = np.asarray(scores) if not isinstance(scores, np.ndarray) else scores
    if scores.ndim == 2:
        scores = scores[:, :, None]
    if scores.ndim != 3:
        raise MedleakError(f"{what} must have shape (n_models, n_records, n_views), got {scores.shape}")
    masks = np.asarray(masks)
    if masks.shape != scores.shape[:2]:
        raise MedleakError(f"{what} {scores.shape} and masks {masks.shape} disagree: masks must be (n_models, n_records)")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise MedleakError("masks must be boolean (True = the model trained on the record)")
        masks = masks.astype(bool)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float32)
    return scores, masks


def in_out_moments(scores, masks, chunk=DEFAULT_CHUNK, threads=None):
    """Per record and view: IN/OUT mean and population sd over models, and the IN/OUT counts.

    Returns dict of float64 (n_records, n_views) arrays `mean_in, sd_in, mean_out, sd_out` and int
    (n_records,) `n_in, n_out`. Entries with no IN (OUT) model are NaN.
    """
    scores, masks = check_scores_masks(scores, masks)
    n_models, n_records, n_views = scores.shape
    n_in = masks.sum(axis=0)
    n_out = n_models - n_in
    out = {k: np.empty((n_records, n_views)) for k in ("mean_in", "sd_in", "mean_out", "sd_out")}

    def work(a, b):
        mean, sd = chunk_moments(stage(scores[:, a:b]), masks[:, a:b])
        out["mean_in"][a:b], out["mean_out"][a:b] = mean[:, 0], mean[:, 1]
        out["sd_in"][a:b], out["sd_out"][a:b] = sd[:, 0], sd[:, 1]

    map_chunks(work, n_records, chunk, threads)
    out["n_in"], out["n_out"] = n_in, n_out
    return out


def stage(chunk_scores):
    """(M, R, V) chunk of a (models, records, views) array → contiguous (R, M, V) copy.

    The copy's inner loop moves whole rows of V views (64 bytes for 16 float32 views), which is
    several times faster than transposing straight to (R, V, M); later steps work in cache.
    """
    n_models, n_records, n_views = chunk_scores.shape
    staged = np.empty((n_records, n_models, n_views), dtype=chunk_scores.dtype)
    staged[...] = chunk_scores.transpose(1, 0, 2)
    return staged


def chunk_moments(staged, chunk_masks):
    """Staged (R, M, V) scores + (M, R) masks → IN/OUT (mean, population sd), each (R, 2, V) float64.

    Index 0 of axis 1 is IN, 1 is OUT; NaN where a record has no model in the group.
    """
    member = chunk_masks.T
    return group_moments(staged, np.stack([member, ~member], axis=1))


def group_moments(staged, groups):
    """Staged (R, M, V) scores + (R, G, M) bool group memberships → (mean, population sd), (R, G, V).

    NaN where a group is empty. Float64 accumulation through two small batched matmuls (several
    groups cost about what one does, so callers ask for all theirs at once).
    """
    x = staged.astype(np.float64)
    # Centre on one model's value: keeps E[x²] − E[x]² well conditioned for large scores.
    offset = x[:, :1, :].copy()
    x -= offset
    weights = groups.astype(np.float64)
    counts = weights.sum(axis=2, keepdims=True)
    sums = weights @ x
    np.square(x, out=x)
    squares = weights @ x
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
        var = np.maximum(squares / counts - mean * mean, 0.0)
    return mean + offset, np.sqrt(var)


def require_in_and_out(n_in, n_out, record_ids=None, what="runs"):
    """One-line error when some record has no IN or no OUT model (its risk is undefined)."""
    bad = np.flatnonzero((np.asarray(n_in) == 0) | (np.asarray(n_out) == 0))
    if bad.size:
        i = int(bad[0])
        name = f"record {record_ids[i]!r}" if record_ids is not None else f"record {i}"
        kind = "IN" if n_in[i] == 0 else "OUT"
        raise MedleakError(
            f"{bad.size} record(s) have no {kind} model among the {what} (e.g. {name}: n_in={int(n_in[i])}, "
            f"n_out={int(n_out[i])}); train more runs so every patient is both in and out of some model"
        )


def gaussian_auc(mean_in, sd_in, mean_out, sd_out):
    """Φ((μ_in − μ_out)/√(σ_in² + σ_out²)) clipped below at 0.5; identical Gaussians → 0.5."""
    diff = np.asarray(mean_in, dtype=np.float64) - mean_out
    scale = np.sqrt(np.square(sd_in, dtype=np.float64) + np.square(sd_out, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        # zero spread: the sign of the gap decides (±inf), and no gap at all is chance (z = 0)
        z = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.sign(diff) * np.where(diff != 0, np.inf, 0.0))
    return np.maximum(special.ndtr(z), 0.5)


def hanley_mcneil_se(auc, n_pos, n_neg):
    """Hanley & McNeil (1982) standard error of an AUC from n_pos positives and n_neg negatives."""
    auc = np.asarray(auc, dtype=np.float64)
    n_pos = np.asarray(n_pos, dtype=np.float64)
    n_neg = np.asarray(n_neg, dtype=np.float64)
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc**2 / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return np.sqrt(np.maximum(var, 0.0))


def record_auc_from_moments(moments):
    """(auc, se) per record from `in_out_moments` output (statistics averaged over views first)."""
    auc = gaussian_auc(
        moments["mean_in"].mean(axis=1),
        moments["sd_in"].mean(axis=1),
        moments["mean_out"].mean(axis=1),
        moments["sd_out"].mean(axis=1),
    )
    return auc, hanley_mcneil_se(auc, moments["n_in"], moments["n_out"])


def record_auc(scores, masks, chunk=DEFAULT_CHUNK, threads=None):
    """Analytic per-record attack AUC and its standard error.

    scores: (n_models, n_records, n_views) (2-D = one view); masks: (n_models, n_records) bool.
    Returns (auc, se), each float64 (n_records,). Raises MedleakError if a record has no IN or no
    OUT model.
    """
    scores, masks = check_scores_masks(scores, masks)
    n_in = masks.sum(axis=0)
    require_in_and_out(n_in, masks.shape[0] - n_in, what="models")
    return record_auc_from_moments(in_out_moments(scores, masks, chunk, threads))


def patient_risk(record_auc, patient_ids):
    """Per-patient risk: max and mean of their records' AUC and their record count.

    Returns a DataFrame with columns patient_id, auc_max, auc_mean, n_records, sorted by auc_max
    (most vulnerable first; ties by patient_id order of first appearance).
    """
    record_auc = np.asarray(record_auc, dtype=np.float64)
    patient_ids = np.asarray(patient_ids)
    if record_auc.shape != patient_ids.shape or record_auc.ndim != 1:
        raise MedleakError(f"record_auc {record_auc.shape} and patient_ids {patient_ids.shape} must be equal-length 1-D arrays")
    codes, uniques = pd.factorize(patient_ids)
    n = np.bincount(codes, minlength=len(uniques))
    auc_sum = np.bincount(codes, weights=record_auc, minlength=len(uniques))
    auc_max = np.full(len(uniques), -np.inf)
    np.maximum.at(auc_max, codes, record_auc)
    df = pd.DataFrame({"patient_id": uniques, "auc_max": auc_max, "auc_mean": auc_sum / n, "n_records": n})
    return df.sort_values("auc_max", ascending=False, kind="stable").reset_index(drop=True)


def share_above(values, thresholds=RISK_THRESHOLDS):
    """{threshold: share of values strictly above it}."""
    values = np.asarray(values, dtype=np.float64)
    return {float(t): float(np.mean(values > t)) if values.size else 0.0 for t in thresholds}


def esf(values, grid, confidence=0.95):
    """Empirical survival function share(values > x) on `grid` with Clopper–Pearson bounds.

    Returns (share, lower, upper), each shaped like grid.
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    grid = np.asarray(grid, dtype=np.float64)
    n = values.size
    k = n - np.searchsorted(values, grid, side="right")  # count strictly above x
    alpha = 1.0 - confidence
    lower = np.where(k > 0, stats.beta.ppf(alpha / 2, np.maximum(k, 1), n - k + 1), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1)), 1.0)
    return k / max(n, 1), lower, upper
