"""Calibrated membership risk: rank IN models against OUT models, with exact rank nulls.

A unit (a record, or a patient) has one summary number per model. Its attack AUC is the
Mann–Whitney statistic of its IN models against its OUT models,

    AUC = U / (n_in · n_out),   U = #{(i, o): s_i > s_o} + ½ #{(i, o): s_i = s_o},

and its p-value is exact: if the unit's membership does not change its scores, its IN models are a
uniformly random n_in-subset of the models (the plan draws each patient's runs that way,
independently of everything else), so given the summaries every subset is equally likely and the
null of U depends only on (n_in, n_out) — and on the tie pattern when summaries tie. Without ties
that null is computed once per (n_in, n_out) (an exact count recursion, `u_null_pmf`);
with ties it is the exact conditional null of the midrank sum (`tied_u_null_pmf`), cached per tie
pattern. Nothing is clipped, so a chance AUC is centred on 0.5, not above it.

Patient statistic (`patient_summaries`). Per model, each record's score is its mean over views,
standardised by that record's own mean and population sd over ALL models (no membership bit is
used, so the standardisation is the same whatever the patient's IN/OUT assignment and the rank null
stays exact); the patient's number for the model is the mean of its records' standardised scores.
Standardising puts an easy record (scores spread over a wide range) and a hard one on one scale,
so no single image dominates; averaging pools a patient's images, which are IN or OUT together, so
more images give more power when there is a real effect — but the null of the patient's AUC is the
same for 1 image as for 20.

Everything here works on per-model summaries: (n_models, n_units) arrays, a few hundred models by
up to ~10⁶ units, processed in chunks of units.
"""

import dataclasses
import functools
import math

import numpy as np
import pandas as pd
from scipy import special, stats

from medleak.errors import MedleakError
from medleak.privacy_utils.risk import RISK_THRESHOLDS, hanley_mcneil_se, map_chunks

DEFAULT_ALPHA = 0.05           # FDR level q of the Benjamini–Hochberg step
DEFAULT_AUC_THRESHOLD = RISK_THRESHOLDS[0]  # at_risk also needs auc ≥ this (the report's first risk threshold)
EXACT_MAX_MODELS = 1000        # float64 holds C(n, n_in) up to n ≈ 1000
EXACT_TIES_MAX_MODELS = 128    # above this, tied units use the tie-corrected normal approximation
UNIT_CHUNK = 4096              # units per chunk: (200 models × 4096) float64 ≈ 6.5 MB
IMAGE_BINS = (1, 2, 3, 5, 9, 17)  # lower edges of the images-per-patient strata: 1, 2, 3–4, 5–8, 9–16, 17+


# ---------------------------------------------------------------- exact null of U


@functools.lru_cache(maxsize=64)
def u_null_pmf(n_in: int, n_out: int) -> np.ndarray:
    """Exact null pmf of the Mann–Whitney U (no ties): float64 (n_in·n_out + 1,), index = U.

    Counts of arrangements by the classical recursion N(u; i, o) = N(u − o; i − 1, o) + N(u; i, o − 1)
    (the largest value is IN and beats all o OUT models, or it is OUT), in float64: only additions
    of non-negative numbers, so every tail probability has full relative precision. Cost
    O(n_in² · n_out²) / 4 additions: milliseconds at 16 + 16 models, ~0.1 s at 100 + 100.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise MedleakError(f"a rank statistic needs at least one IN and one OUT model, got n_in={n_in}, n_out={n_out}")
    if n_in + n_out > EXACT_MAX_MODELS:
        raise MedleakError(f"exact rank nulls are computed for at most {EXACT_MAX_MODELS} models, got {n_in + n_out}")
    m, rest = min(n_in, n_out), max(n_in, n_out)  # U's null is symmetric in the two counts
    size = m * rest + 1
    previous = np.zeros((rest + 1, size))
    previous[:, 0] = 1.0  # no IN model: U = 0
    for i in range(1, m + 1):
        current = np.zeros((rest + 1, size))
        current[0, 0] = 1.0  # no OUT model: U = 0
        for o in range(1, rest + 1):
            top = i * o + 1
            current[o, o:top] = previous[o, :top - o]
            current[o, :top] += current[o - 1, :top]
        previous = current
    return previous[rest] / previous[rest].sum()


def tie_blocks(sorted_values) -> tuple:
    """Sizes of the runs of equal values in a sorted 1-D array (the tie pattern)."""
    sorted_values = np.asarray(sorted_values)
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    return tuple(np.diff(np.concatenate([starts, [sorted_values.size]])).tolist())


@functools.lru_cache(maxsize=256)
def tied_u_null_pmf(n_in: int, blocks: tuple) -> np.ndarray:
    """Exact conditional null pmf of 2U given the tie pattern: float64 (2·n_in·n_out + 1,), index = 2U.

    `blocks` are the sizes of the tie blocks in ascending order of value (they sum to n). Every
    n_in-subset of the models is equally likely; a subset taking c_g models of block g has doubled
    midrank sum Σ c_g·(2·midrank_g) and multiplicity Π C(t_g, c_g). A count DP over blocks gives
    the distribution of that sum; 2U = doubled rank sum − n_in(n_in + 1). Cost O(n · n_in · n · n_in).
    """
    n = int(sum(blocks))
    n_in = int(n_in)
    n_out = n - n_in
    if n_in < 1 or n_out < 1:
        raise MedleakError(f"a rank statistic needs at least one IN and one OUT model, got n_in={n_in}, n_out={n_out}")
    max_sum = 2 * n_in * n + 1
    dp = np.zeros((n_in + 1, max_sum + 1))
    dp[0, 0] = 1.0
    start = 0
    for size in blocks:
        doubled_midrank = 2 * start + size + 1  # 2 × mean of ranks start+1 .. start+size
        new = dp.copy()
        for c in range(1, min(size, n_in) + 1):
            weight = special.comb(size, c)
            shift = c * doubled_midrank
            new[c:, shift:] += weight * dp[:-c, :max_sum + 1 - shift]
        dp = new  # counts stay below C(n, n_in) < 1e38 for n ≤ EXACT_TIES_MAX_MODELS: no rescaling
        start += size
    offset = n_in * (n_in + 1)
    pmf = dp[n_in, offset:offset + 2 * n_in * n_out + 1]
    return pmf / pmf.sum()


@functools.lru_cache(maxsize=64)
def _untied_survival(n_in: int, n_out: int) -> np.ndarray:
    """P(2U ≥ t) for t = 0 .. 2·n_in·n_out + 1 from the untied null (2U is even)."""
    doubled = np.zeros(2 * n_in * n_out + 1)
    doubled[::2] = u_null_pmf(n_in, n_out)
    return _survival(doubled)


@functools.lru_cache(maxsize=256)
def _tied_survival(n_in: int, blocks: tuple) -> np.ndarray:
    return _survival(tied_u_null_pmf(n_in, blocks))


def _survival(pmf_doubled):
    sf = np.concatenate([np.cumsum(pmf_doubled[::-1])[::-1], [0.0]])
    return np.clip(np.maximum.accumulate(sf[::-1])[::-1], 0.0, 1.0)


def null_auc_sd(n_in, n_out):
    """Exact null standard deviation of the AUC without ties: √((n + 1) / (12 · n_in · n_out))."""
    n_in = np.asarray(n_in, dtype=np.float64)
    n_out = np.asarray(n_out, dtype=np.float64)
    return np.sqrt((n_in + n_out + 1.0) / (12.0 * n_in * n_out))


# ---------------------------------------------------------------- rank statistic per unit


def check_summaries(summaries, masks, what="summaries"):
    """Validates (n_models, n_units) summaries and bool masks; every unit needs ≥ 1 IN and ≥ 1 OUT model."""
    summaries = np.asarray(summaries)
    masks = np.asarray(masks)
    if summaries.ndim != 2 or masks.shape != summaries.shape:
        raise MedleakError(f"{what} {summaries.shape} and masks {masks.shape} must both be (n_models, n_units)")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise MedleakError("masks must be boolean (True = the model trained on the unit)")
        masks = masks.astype(bool)
    if np.isnan(summaries).any():
        raise MedleakError(f"{what} contain NaN; check the scores the summaries were built from")
    n_in = masks.sum(axis=0)
    bad = np.flatnonzero((n_in == 0) | (n_in == masks.shape[0]))
    if bad.size:
        raise MedleakError(
            f"{bad.size} unit(s) are IN for all or none of the {masks.shape[0]} models (e.g. unit {int(bad[0])}); "
            "train more runs so every patient is both in and out of some model")
    return summaries, masks


MAX_RANKED_MODELS = 5000  # float32 rank sums are exact while n(n+1)/2 < 2²⁴


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: no element-wise ==
class UnitRanks:
    """Each unit's models ranked once (`unit_ranks`): what `rank_auc` and the noise floor's
    relabellings read, so neither sorts the summaries again."""

    ranks: np.ndarray  # (n_units, n_models) float32 midranks (multiples of ½), each unit's row contiguous
    tied: np.ndarray  # (n_units,) bool: the unit's summaries tie across models

    def arrays(self) -> dict:
        return {"ranks": self.ranks, "tied": self.tied}


def unit_ranks(summaries, chunk=UNIT_CHUNK, threads=None) -> UnitRanks:
    """Midranks over models of every unit of (n_models, n_units) float summaries (no NaN).

    Each unit's row is sorted once (float32 values rank as their float64 casts do); a unit whose
    sorted row has no equal neighbours gets its ordinal ranks, which are its midranks; the few tied
    units are ranked by `scipy.stats.rankdata`. Chunks of units run on `threads` threads.
    """
    summaries = np.asarray(summaries)
    if summaries.ndim != 2:
        raise MedleakError(f"summaries must be (n_models, n_units), got shape {summaries.shape}")
    n_models, n_units = summaries.shape
    if n_models > MAX_RANKED_MODELS:
        raise MedleakError(f"{n_models} models: rank statistics support up to {MAX_RANKED_MODELS}")
    ranks = np.empty((n_units, n_models), dtype=np.float32)
    tied = np.empty(n_units, dtype=bool)
    positions = np.arange(1, n_models + 1, dtype=np.float32)[None, :]

    def work(a, b):
        block = np.ascontiguousarray(summaries[:, a:b].T)  # (units, models)
        order = np.argsort(block, axis=1)
        ordered = np.take_along_axis(block, order, axis=1)
        has_tie = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        np.put_along_axis(ranks[a:b], order, positions, axis=1)
        rows = np.flatnonzero(has_tie)
        if rows.size:
            ranks[a + rows] = stats.rankdata(block[rows].astype(np.float64), axis=1)
        tied[a:b] = has_tie

    map_chunks(work, n_units, chunk=chunk, threads=threads)
    return UnitRanks(ranks, tied)


def rank_auc(summaries, masks, chunk=UNIT_CHUNK, ranks: UnitRanks | None = None):
    """Mann–Whitney AUC of IN against OUT models per unit, with exact one-sided p-values.

    summaries: (n_models, n_units) float, one number per model and unit (higher = more member-like);
    masks: (n_models, n_units) bool, True where the model trained on the unit. Every unit needs at
    least one IN and one OUT model (MedleakError otherwise). ranks: `unit_ranks(summaries)` when
    already computed (the campaign's fit keeps them for the noise floor).

    Returns a dict of (n_units,) arrays:
      auc      float64  U / (n_in·n_out), ties count ½
      u2       int64    2U (an integer even with midranks)
      auc_se   float64  Hanley–McNeil (1982) standard error at the observed auc
      null_sd  float64  exact null sd of the auc, √((n+1)/(12·n_in·n_out)) (ties ignored)
      p_value  float64  P(U ≥ U_obs) under the exact rank null ("IN scores higher"); with ties the
                        exact conditional null given the tie pattern (n ≤ EXACT_TIES_MAX_MODELS),
                        else the tie-corrected normal approximation with continuity correction
      n_in, n_out int64
      tied     bool     the unit's summaries have ties across models
    """
    summaries, masks = check_summaries(summaries, masks)
    n_models, n_units = summaries.shape
    ranks = unit_ranks(summaries, chunk) if ranks is None else ranks
    if ranks.ranks.shape != (n_units, n_models):
        raise MedleakError(f"ranks {ranks.ranks.shape} do not belong to summaries {summaries.shape}")
    n_in = masks.sum(axis=0).astype(np.int64)
    n_out = n_models - n_in
    rank_sum_in = np.empty(n_units, dtype=np.float32)  # exact: multiples of ½ below 2²⁴

    def work(a, b):
        rank_sum_in[a:b] = np.einsum("um,um->u", ranks.ranks[a:b], masks[:, a:b].T.astype(np.float32))

    map_chunks(work, n_units, chunk=chunk)
    u2 = np.rint(2.0 * rank_sum_in.astype(np.float64) - n_in * (n_in + 1)).astype(np.int64)
    auc = u2 / (2.0 * n_in * n_out)
    return {
        "auc": auc, "u2": u2, "auc_se": hanley_mcneil_se(auc, n_in, n_out), "null_sd": null_auc_sd(n_in, n_out),
        "p_value": rank_p_values(u2, n_in, n_out, ranks.tied, summaries), "n_in": n_in, "n_out": n_out,
        "tied": ranks.tied,
    }


def rank_p_values(u2, n_in, n_out, tied, summaries):
    """P(2U ≥ u2) per unit under the exact rank null (see `rank_auc`); float64 (n_units,)."""
    return p_value_lookup(n_in, n_out, tied, summaries)(u2)


def count_groups(n_in, n_out, units):
    """[(members, n_in, n_out)]: `units` (int indices) grouped by their (n_in, n_out), whose rank null
    is shared (the exact-k plan has one group)."""
    units = np.asarray(units, dtype=np.int64)
    if not units.size:
        return []
    pairs, group = np.unique(np.stack([n_in[units], n_out[units]], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    return [(units[group == g], int(a), int(b)) for g, (a, b) in enumerate(pairs)]


def p_value_lookup(n_in, n_out, tied, summaries):
    """A function u2 (n_units,) int → exact one-sided p-values, with every unit's null prepared once.

    Untied units are grouped by (n_in, n_out), whose null is computed once; tied units read their
    tie pattern from `summaries` (n_models, n_units). A tie pattern does not change when the IN/OUT
    labels are permuted, so permutation code calls the returned function once per relabelling.
    """
    n_in = np.asarray(n_in, dtype=np.int64)
    n_out = np.asarray(n_out, dtype=np.int64)
    tied = np.asarray(tied, dtype=bool)
    tables = [(members, _untied_survival(a, b)) for members, a, b in count_groups(n_in, n_out, np.flatnonzero(~tied))]
    tied_units = [(int(unit), int(n_in[unit]), int(n_out[unit]), np.sort(np.asarray(summaries[:, unit], dtype=np.float64)))
                  for unit in np.flatnonzero(tied)]

    def lookup(u2):
        u2 = np.asarray(u2, dtype=np.int64)
        p = np.empty(u2.shape, dtype=np.float64)
        for members, survival in tables:
            p[members] = survival[u2[members]]
        for unit, a, b, column in tied_units:
            p[unit] = _tied_p_value(int(u2[unit]), a, b, column)
        return p

    return lookup


def _tied_p_value(u2, n_in, n_out, sorted_column):
    blocks = tie_blocks(sorted_column)
    n = n_in + n_out
    if n <= EXACT_TIES_MAX_MODELS:
        return float(_tied_survival(n_in, blocks)[u2])
    t = np.asarray(blocks, dtype=np.float64)
    var_u = n_in * n_out / 12.0 * ((n + 1) - np.sum(t**3 - t) / (n * (n - 1)))
    if var_u <= 0:
        return 1.0  # every model ties: U is n_in·n_out/2 whatever the labels
    z = (u2 / 2.0 - n_in * n_out / 2.0 - 0.5) / math.sqrt(var_u)
    return float(special.ndtr(-z))


def benjamini_hochberg(p_values):
    """Benjamini–Hochberg q-values (adjusted p-values), float64 like `p_values`."""
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.size == 0:
        return p_values.copy()
    return stats.false_discovery_control(p_values, method="bh")


def bh_rejections(p_values, alpha=DEFAULT_ALPHA):
    """`benjamini_hochberg(p_values) <= alpha` (bool), sorting only the p-values ≤ alpha.

    A q-value is at least its p-value, so only p ≤ alpha can be rejected; those are the smallest
    ones, whose ranks among all are their ranks among themselves, and a larger p contributes a
    value p·n/rank > alpha to the running minimum. Same arithmetic as scipy's BH (p·(n/rank), then
    the running minimum from the largest), so the result is identical; the noise floor calls it
    once per permutation.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    candidates = np.flatnonzero(p_values <= alpha)
    rejected = np.zeros(p_values.shape, dtype=bool)
    if candidates.size:
        order = np.argsort(p_values[candidates])
        q = p_values[candidates][order] * (p_values.size / np.arange(1, candidates.size + 1, dtype=np.float64))
        np.minimum.accumulate(q[::-1], out=q[::-1])
        rejected[candidates[order]] = q <= alpha
    return rejected


def flag_at_risk(auc, q_value, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD):
    """at_risk: significant after FDR control (q ≤ alpha) and auc ≥ auc_threshold; bool array."""
    return (np.asarray(q_value) <= alpha) & (np.asarray(auc) >= auc_threshold)


# ---------------------------------------------------------------- summaries per model


def record_summaries(scores, chunk=256):
    """Per model and record: the record's view-mean score standardised over all models.

    scores: (n_models, n_records, n_views) float (2-D = one view). Returns float32
    (n_models, n_records): (x̄ − mean over models) / population sd over models, x̄ = mean over
    views; a record with no spread across models gets 0 for every model. No membership is used.
    """
    scores = np.asarray(scores)
    if scores.ndim == 2:
        scores = scores[:, :, None]
    if scores.ndim != 3:
        raise MedleakError(f"scores must have shape (n_models, n_records, n_views), got {scores.shape}")
    n_models, n_records, _ = scores.shape
    out = np.empty((n_models, n_records), dtype=np.float32)
    for a in range(0, n_records, chunk):
        x = scores[:, a:a + chunk].astype(np.float64).mean(axis=2)
        if not np.isfinite(x).all():
            raise MedleakError("scores contain NaN or inf; recompute them from finite logits")
        x -= x.mean(axis=0)
        sd = np.sqrt(np.mean(x * x, axis=0))
        out[:, a:a + chunk] = np.where(sd > 0, x / np.where(sd > 0, sd, 1.0), 0.0)
    return out


def patient_codes(patient_ids):
    """(patient ids in order of first appearance, per-record int64 index into them)."""
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1:
        raise MedleakError(f"patient_ids must be 1-D (n_records,), got shape {patient_ids.shape}")
    codes, uniques = pd.factorize(patient_ids, sort=False)
    return np.asarray(uniques), codes.astype(np.int64)


def patient_summaries(record_summary, codes, n_patients):
    """Mean over each patient's records: (n_models, n_records) + codes (n_records,) → (n_models, n_patients) float32."""
    record_summary = np.asarray(record_summary)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape != record_summary.shape[1:]:
        raise MedleakError(f"patient codes {codes.shape} do not match the {record_summary.shape[1]} records of the summaries")
    counts = np.bincount(codes, minlength=n_patients).astype(np.float64)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(n_patients))
    sums = np.add.reduceat(record_summary[:, order].astype(np.float64), starts, axis=1)
    sums[:, counts == 0] = 0.0
    return (sums / np.maximum(counts, 1.0)).astype(np.float32)


def patient_mask_from_records(masks, codes, n_patients):
    """(n_models, n_patients) bool from per-record masks; MedleakError if a patient's records disagree."""
    masks = np.asarray(masks, dtype=bool)
    codes = np.asarray(codes, dtype=np.int64)
    patient_mask = np.zeros((masks.shape[0], n_patients), dtype=bool)
    patient_mask[:, codes] = masks
    if not np.array_equal(patient_mask[:, codes], masks):
        bad = int(np.flatnonzero((patient_mask[:, codes] != masks).any(axis=0))[0])
        raise MedleakError(
            f"record {bad}: its IN/OUT bits differ from another record of the same patient; patient-level "
            "risk needs all of a patient's records in or out together (the campaign plan does this)")
    return patient_mask


# ---------------------------------------------------------------- risk tables


def _risk_frame(ids, result, alpha, auc_threshold):
    q = benjamini_hochberg(result["p_value"])
    return pd.DataFrame({
        "auc": result["auc"], "auc_se": result["auc_se"], "null_sd": result["null_sd"],
        "p_value": result["p_value"], "q_value": q,
        "at_risk": flag_at_risk(result["auc"], q, alpha, auc_threshold).astype(np.int8),
        "n_in": result["n_in"], "n_out": result["n_out"],
    }, index=pd.Index(ids))


def patient_rank_risk(scores, masks, patient_ids, *, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD,
                      record_summary=None, patient_summary=None, ranks: UnitRanks | None = None):
    """Patient-level membership risk: one number per patient and model, IN ranked against OUT.

    scores: (n_models, n_records, n_views) float (ignored when `record_summary` is given);
    masks: (n_models, n_records) bool (a patient's records must agree); patient_ids: (n_records,).
    record_summary: optional precomputed `record_summaries(scores)` (n_models, n_records);
    patient_summary: optional precomputed `patient_summaries` of it (patients in `patient_codes` order);
    ranks: optional precomputed `unit_ranks(patient_summary)`.

    Returns a DataFrame in order of first appearance of each patient with columns patient_id,
    auc, auc_se (Hanley–McNeil), null_sd, p_value (exact one-sided rank null), q_value
    (Benjamini–Hochberg over patients), at_risk (int 1/0: q_value ≤ alpha and auc ≥ auc_threshold),
    n_in, n_out, n_records.
    """
    ids, codes = patient_codes(patient_ids)
    if record_summary is None:
        record_summary = record_summaries(scores)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != record_summary.shape:
        raise MedleakError(f"masks {masks.shape} must be (n_models, n_records) like the scores {record_summary.shape}")
    summary = patient_summaries(record_summary, codes, len(ids)) if patient_summary is None else patient_summary
    result = rank_auc(summary, patient_mask_from_records(masks, codes, len(ids)), ranks=ranks)
    frame = _risk_frame(ids, result, alpha, auc_threshold)
    frame["n_records"] = np.bincount(codes, minlength=len(ids))
    return frame.rename_axis("patient_id").reset_index()


def record_rank_risk(scores, masks, *, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD, record_summary=None,
                     ranks: UnitRanks | None = None):
    """Record-level rank risk: each record's view-mean score, IN models ranked against OUT.

    Same inputs as `patient_rank_risk` without patient ids (`ranks`: `unit_ranks(record_summary)`). Returns a DataFrame in record order
    (index 0..n_records−1) with auc, auc_se, null_sd, p_value, q_value (BH over records), at_risk,
    n_in, n_out. (Standardising a record over models does not change its ranks.)
    """
    if record_summary is None:
        record_summary = record_summaries(scores)
    return _risk_frame(np.arange(record_summary.shape[1]), rank_auc(record_summary, masks, ranks=ranks), alpha,
                       auc_threshold)


# ---------------------------------------------------------------- images-per-patient adjustment


ADJUSTMENT_SENTENCE = (
    "Adjusted differences compare each group with all other patients within strata of images per patient "
    "(1, 2, 3–4, 5–8, 9–16, 17+) and average the within-stratum differences with Mantel–Haenszel weights "
    "n_group·n_rest/n_stratum, so a group does not look more exposed only because its patients have more images.")


def image_strata(n_images, bins=IMAGE_BINS):
    """Stratum index per patient: the last bin lower edge ≤ n_images (int64)."""
    n_images = np.asarray(n_images)
    if (n_images < 1).any():
        raise MedleakError("every patient needs at least one image (n_records ≥ 1)")
    return np.searchsorted(np.asarray(bins), n_images, side="right") - 1


def group_differences(risk, groups, n_images, bins=IMAGE_BINS):
    """Per group: mean risk vs the rest of the patients, raw and adjusted for images per patient.

    risk: (n_patients,) float (at_risk 0/1, auc, …); groups: (n_patients,) labels; n_images:
    (n_patients,) int ≥ 1. The adjustment is `ADJUSTMENT_SENTENCE`: with strata s, group mean
    m1_s and rest mean m0_s, weights w_s = n1_s·n0_s/(n1_s + n0_s) over strata holding both,
    adjusted = Σ w_s (m1_s − m0_s) / Σ w_s and its variance Σ w_s² (v1_s/n1_s + v0_s/n0_s) / (Σ w_s)²
    (v = within-stratum sample variance, ddof = 1; 0 for a single patient).

    Returns a DataFrame, one row per group: group, n_patients, mean_images, risk_group, risk_rest,
    raw_difference, raw_se, adjusted_difference, adjusted_se, n_strata (strata used).
    """
    risk = np.asarray(risk, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    n_images = np.asarray(n_images)
    if not (risk.shape == groups.shape == n_images.shape) or risk.ndim != 1:
        raise MedleakError(f"risk {risk.shape}, groups {groups.shape} and n_images {n_images.shape} must be equal-length 1-D arrays")
    strata = image_strata(n_images, bins)
    rows = []
    for group in np.unique(groups):
        member = groups == group
        raw, raw_se = _mean_difference(risk[member], risk[~member])
        weight_sum, weighted, weighted_var, used = 0.0, 0.0, 0.0, 0
        for s in np.unique(strata):
            inside = strata == s
            a, b = risk[inside & member], risk[inside & ~member]
            if a.size == 0 or b.size == 0:
                continue
            w = a.size * b.size / (a.size + b.size)
            diff, se = _mean_difference(a, b)
            weight_sum += w
            weighted += w * diff
            weighted_var += w * w * se * se
            used += 1
        rows.append(dict(
            group=group, n_patients=int(member.sum()), mean_images=float(n_images[member].mean()),
            risk_group=float(risk[member].mean()), risk_rest=float(risk[~member].mean()) if (~member).any() else np.nan,
            raw_difference=raw, raw_se=raw_se,
            adjusted_difference=weighted / weight_sum if used else np.nan,
            adjusted_se=math.sqrt(weighted_var) / weight_sum if used else np.nan, n_strata=used))
    return pd.DataFrame(rows)


def _mean_difference(a, b):
    """(mean(a) − mean(b), its standard error from sample variances); NaN if either is empty."""
    if a.size == 0 or b.size == 0:
        return np.nan, np.nan
    var_a = a.var(ddof=1) if a.size > 1 else 0.0
    var_b = b.var(ddof=1) if b.size > 1 else 0.0
    return float(a.mean() - b.mean()), float(math.sqrt(var_a / a.size + var_b / b.size))


# ---------------------------------------------------------------- planner


def delong_components(summaries, masks, chunk=UNIT_CHUNK):
    """DeLong (1988) variance components of each unit's AUC over models.

    summaries, masks: (n_models, n_units) as in `rank_auc`. Placement value of an IN model i:
    V_i = share of OUT models below it (ties ½); of an OUT model o: W_o = share of IN models above
    it (ties ½). Returns (var_in, var_out), float64 (n_units,): sample variances (ddof = 1) of V over
    IN and of W over OUT models (NaN where a group has a single model). The AUC's variance with
    n_in IN and n_out OUT models is var_in/n_in + var_out/n_out.
    """
    summaries, masks = check_summaries(summaries, masks)
    n_units = summaries.shape[1]
    var_in, var_out = np.empty(n_units), np.empty(n_units)
    for a in range(0, n_units, chunk):
        x = summaries[:, a:a + chunk].astype(np.float64)
        member = masks[:, a:a + chunk]
        n_in = member.sum(axis=0)
        n_out = member.shape[0] - n_in
        rank_all = stats.rankdata(x, axis=0)
        rank_in = stats.rankdata(np.where(member, x, np.inf), axis=0)    # OUT pushed above every IN
        rank_out = stats.rankdata(np.where(member, np.inf, x), axis=0)   # IN pushed above every OUT
        placement_in = (rank_all - rank_in) / n_out          # OUT models below (ties ½)
        placement_out = 1.0 - (rank_all - rank_out) / n_in   # IN models above (ties ½)
        with np.errstate(invalid="ignore", divide="ignore"):
            var_in[a:a + chunk] = _masked_var(placement_in, member)
            var_out[a:a + chunk] = _masked_var(placement_out, ~member)
    return var_in, var_out


def _masked_var(values, keep):
    count = keep.sum(axis=0)
    mean = np.sum(values, axis=0, where=keep) / count
    return np.sum((values - mean) ** 2, axis=0, where=keep) / (count - 1)


def auc_se_at(var_in, var_out, n_runs, runs_in):
    """Predicted AUC standard error per unit with n_runs models, runs_in(n_runs) of them IN; float64."""
    k = int(runs_in(int(n_runs)))
    if not 1 <= k < n_runs:
        return np.full(np.shape(var_in), np.inf)
    return np.sqrt(np.asarray(var_in, dtype=np.float64) / k + np.asarray(var_out, dtype=np.float64) / (n_runs - k))


def plan_runs(var_in, var_out, target_se, *, runs_in, quantile=0.5, max_runs=2000):
    """How many runs give the chosen standard error, from the campaign's own variance components.

    var_in, var_out: (n_units,) from `delong_components` (records or patients of the campaign);
    runs_in: callable n_runs → IN runs per patient (e.g. `lambda n: runs_in_per_patient(n, ratio)`);
    target_se: wanted AUC standard error. The unit's SE at n runs is √(var_in/k + var_out/(n − k)),
    k = runs_in(n); units with undefined components (NaN) are skipped.

    Returns {"n_runs": the smallest n ≤ max_runs whose `quantile` of per-unit SE is ≤ target_se
    (None if even max_runs is not enough), "target_se", "quantile", "se_by_runs": {n: that quantile}
    for n = 8, 16, 32, … ≤ max_runs}.
    """
    var_in = np.asarray(var_in, dtype=np.float64)
    var_out = np.asarray(var_out, dtype=np.float64)
    ok = np.isfinite(var_in) & np.isfinite(var_out)
    if not ok.any():
        raise MedleakError("no unit has variance components (each needs ≥ 2 IN and ≥ 2 OUT models)")
    if not target_se > 0:
        raise MedleakError(f"the target standard error must be positive, got {target_se}")
    var_in, var_out = var_in[ok], var_out[ok]

    def se_quantile(n):
        return float(np.quantile(auc_se_at(var_in, var_out, n, runs_in), quantile))

    # SE falls with n (k = runs_in(n) grows with n): double until enough, then bisect.
    lo, hi = 2, 2
    while hi < max_runs and se_quantile(hi) > target_se:
        lo, hi = hi, min(2 * hi, max_runs)
    found = None
    if se_quantile(hi) <= target_se:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if se_quantile(mid) <= target_se else (mid, hi)
        found = lo if se_quantile(lo) <= target_se else hi
    ladder = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if n <= max_runs]
    return {"n_runs": found, "target_se": float(target_se), "quantile": float(quantile),
            "se_by_runs": {n: se_quantile(n) for n in ladder}}
