"""The campaign's own noise floor: what the audit's headlines look like when nothing leaks.

Each patient's IN/OUT bits are permuted across models (a column of the patient mask reshuffled,
so every patient keeps its number of IN models; all of a patient's records move together), which
is exactly how the plan could have assigned them; under "membership does not change the scores"
every such relabelling is equally likely. Statistics are recomputed from small per-model
summaries — never from the full (models × records × views) score array:

  * `share_floor`: per-unit rank AUCs (records or patients, `calibration.rank_auc`) from midranks
    computed once (`calibration.unit_ranks`, shared with the risk step) — a relabelling only
    changes which ranks are summed; for patients, whose relabellings are independent, an untied
    patient's permuted AUC is a draw from its exact rank null — giving the chance curve
    of share(AUC > x) on a grid (the eSF figures' chance band), the chance level of each headline
    share and of the at_risk share (BH at the same alpha).
  * `strongest_attack_floor`: the chance level of the strongest of several attacks (mean AUC over
    held-out targets, max over attacks), permuting each patient's target membership across targets.

Every result reports observed, chance mean, chance interval and excess = observed − chance mean
with the interval observed − (chance interval): it excludes 0 when the observed value lies outside
the chance band. The seed is recorded in the result. Permutation b draws its noise from its own
generator (`permutation_generators`: spawned from the seed), so permutations run on any number of
threads, each drawing its own noise, with the same result.
"""

import collections
import concurrent.futures

import numpy as np
from scipy import stats

from medleak.errors import MedleakError
from medleak.privacy_utils.calibration import (DEFAULT_ALPHA, DEFAULT_AUC_THRESHOLD, UnitRanks, bh_rejections,
                                               check_summaries, count_groups, patient_codes, patient_mask_from_records,
                                               p_value_lookup, rank_auc, u_null_pmf, unit_ranks)
from medleak.privacy_utils.risk import RISK_THRESHOLDS, n_threads

DEFAULT_PERMUTATIONS = 200
DEFAULT_SEED = 0
AUC_GRID = np.round(np.linspace(0.5, 1.0, 51), 4)
RANK_SUM_BLOCK = 512  # units per block of `rank_sums`: 512 × 200 float32 × 2 arrays ≈ 0.8 MB, in cache


def permute_patient_mask(patient_mask, rng):
    """A relabelling of a (n_models, n_patients) bool mask: each patient's IN models become a fresh
    uniformly random subset of the same size (in distribution, its column shuffled across models).

    Per patient, uniform noise over the models; the models whose noise is among the patient's
    count smallest are IN (a partition of float64 noise: faster than shuffling the columns).
    """
    patient_mask = np.asarray(patient_mask, dtype=bool)
    n_models, n_patients = patient_mask.shape
    return _relabel(patient_mask.sum(axis=0), rng.random((n_patients, n_models)))


def _relabel(counts, noise):
    """`permute_patient_mask` given the patients' IN counts and the (n_patients, n_models) noise.

    A patient's IN models are those whose noise is at most its count-th smallest value, found by a
    partition (O(n_models) per patient) among the patients of each IN count (the exact-k plan has
    one count, so one partition of the whole array, no copy).
    """
    return _relabel_patients(counts, noise).T


def _relabel_patients(counts, noise):
    """`_relabel` as (n_patients, n_models) bool (the layout the rank sums read)."""
    counts = np.asarray(counts, dtype=np.int64)
    threshold = np.full(noise.shape[0], -1.0)  # a patient IN for no model: below every noise value
    for count in np.unique(counts[counts > 0]):
        if np.all(counts == count):
            threshold[:] = np.partition(noise, count - 1, axis=1)[:, count - 1]
        else:
            rows = np.flatnonzero(counts == count)
            threshold[rows] = np.partition(noise[rows], count - 1, axis=1)[:, count - 1]
    return noise <= threshold[:, None]


def _shares_above(values, grid):
    """share(values > x) for every x of grid; float64 like grid."""
    ordered = np.sort(values)
    return (ordered.size - np.searchsorted(ordered, grid, side="right")) / max(ordered.size, 1)


def compare_to_chance(observed, chance, confidence=0.95):
    """Observed value(s) against a (n_permutations, …) chance sample; JSON-ready dict.

    Returns observed, chance_mean, chance_lo / chance_hi (equal-tailed `confidence` interval of the
    chance sample), excess = observed − chance_mean, excess_lo / excess_hi = observed − chance_hi /
    observed − chance_lo, and p_value = (1 + #{chance ≥ observed}) / (1 + n_permutations).
    Scalars for a scalar observed, lists for an array.
    """
    observed = np.asarray(observed, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(chance, [tail, 1.0 - tail], axis=0)
    mean = chance.mean(axis=0)
    p = (1.0 + (chance >= observed).sum(axis=0)) / (1.0 + chance.shape[0])

    def out(x):
        x = np.asarray(x, dtype=np.float64)
        return float(x) if x.ndim == 0 else x.tolist()

    return {"observed": out(observed), "chance_mean": out(mean), "chance_lo": out(lo), "chance_hi": out(hi),
            "excess": out(observed - mean), "excess_lo": out(observed - hi), "excess_hi": out(observed - lo),
            "p_value": out(p)}


def share_floor(summaries, patient_mask, unit_patient=None, *, grid=AUC_GRID, thresholds=RISK_THRESHOLDS,
                alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD, n_permutations=DEFAULT_PERMUTATIONS,
                seed=DEFAULT_SEED, confidence=0.95, threads=None, on_permutation=None, ranks: UnitRanks | None = None):
    """Chance distribution of the share of units with rank AUC above x, by permuting patients' bits.

    summaries: (n_models, n_units) float per-model summaries (`calibration.patient_summaries` for
    patients, `calibration.record_summaries` for records); patient_mask: (n_models, n_patients) bool;
    unit_patient: (n_units,) int index of each unit's patient into the mask columns (None: the
    units are the patients); ranks: `calibration.unit_ranks(summaries)` when already computed (the
    risk step's). Cost per permutation: the patients' noise, a partition of it, one rank sum per
    unit (`rank_sums`) and BH over the p-values ≤ alpha (`calibration.bh_rejections`), on
    `threads` threads (default `risk.n_threads()`; the result does not depend on it);
    `on_permutation()` is called as each permutation is done (a progress bar).

    When the units are the patients (unit_patient None), each unit's relabelling is its own,
    independent of every other unit's, and an untied unit's midranks are 1..n: its permuted 2U is
    then exactly a draw from the rank null of (n_in, n_out) (`untied_null_draws`), so only the
    tied units are relabelled model by model — the same permutation distribution, without the
    (n_patients × n_models) noise and partition.

    Returns a JSON-ready dict: seed, n_permutations, confidence, grid, curve (`compare_to_chance` of
    share(AUC > x) on the grid: the eSF chance band), share_above {threshold: compare_to_chance},
    at_risk (share with BH q ≤ alpha and auc ≥ auc_threshold, compared to chance).
    """
    patient_mask = np.asarray(patient_mask, dtype=bool)
    if patient_mask.ndim != 2:
        raise MedleakError(f"patient_mask must be (n_models, n_patients), got shape {patient_mask.shape}")
    units_are_patients = unit_patient is None
    unit_patient = np.arange(patient_mask.shape[1]) if unit_patient is None else np.asarray(unit_patient, dtype=np.int64)
    summaries, masks = check_summaries(summaries, patient_mask[:, unit_patient])
    if n_permutations < 1:
        raise MedleakError(f"the noise floor needs at least 1 permutation, got {n_permutations}")
    grid = np.asarray(grid, dtype=np.float64)
    thresholds = tuple(float(t) for t in thresholds)
    ranks = unit_ranks(summaries) if ranks is None else ranks
    observed = rank_auc(summaries, masks, ranks=ranks)
    tied, n_in, n_out = observed["tied"], observed["n_in"], observed["n_out"]
    # A relabelling's rank sums are row-wise dot products of the (n_units, n_models) midranks with
    # the unit's patient's row of the permuted mask, taken in blocks of units that stay in cache
    # (the expanded (n_models, n_units) mask is never materialised).
    offset = n_in * (n_in + 1)
    scale = 2.0 * n_in * n_out
    p_values = p_value_lookup(n_in, n_out, tied, summaries)

    def headlines(u2):
        auc = u2 / scale
        at_risk_share = (bh_rejections(p_values(u2), alpha) & (auc >= auc_threshold)).mean()  # = flag_at_risk
        return _shares_above(auc, grid), _shares_above(auc, np.asarray(thresholds)), at_risk_share

    curves = np.empty((n_permutations, grid.size))
    at_threshold = np.empty((n_permutations, len(thresholds)))
    at_risk = np.empty(n_permutations)
    counts = patient_mask.sum(axis=0)

    if units_are_patients:
        draw_untied = untied_null_draws(n_in, n_out, ~tied)
        relabelled = np.flatnonzero(tied)  # units relabelled model by model: their counts, ranks, offsets
        tied_counts, tied_ranks, tied_offset = counts[relabelled], ranks.ranks[relabelled], offset[relabelled]

    def permutation(b, rng):  # permute_patient_mask(patient_mask, rng), as (n_patients, n_models)
        if units_are_patients:
            u2 = draw_untied(rng)
            if relabelled.size:
                permuted = _relabel_patients(tied_counts, rng.random((relabelled.size, patient_mask.shape[0])))
                u2[relabelled] = np.rint(2.0 * rank_sums(tied_ranks, permuted.astype(np.float32), None) - tied_offset)
        else:
            permuted = _relabel_patients(counts, rng.random(patient_mask.shape[::-1])).astype(np.float32)
            u2 = np.rint(2.0 * rank_sums(ranks.ranks, permuted, unit_patient) - offset).astype(np.int64)
        curves[b], at_threshold[b], at_risk[b] = headlines(u2)

    _permutations(permutation, seed, n_permutations, threads, on_permutation)
    curve, shares, risk_share = headlines(observed["u2"])
    return {
        "seed": int(seed), "n_permutations": int(n_permutations), "confidence": float(confidence),
        "grid": grid.tolist(), "curve": compare_to_chance(curve, curves, confidence),
        "share_above": {t: compare_to_chance(shares[i], at_threshold[:, i], confidence) for i, t in enumerate(thresholds)},
        "at_risk": compare_to_chance(risk_share, at_risk, confidence),
    }


def untied_null_draws(n_in, n_out, untied):
    """A function rng → (n_units,) int64 2U with, for every `untied` unit, an independent draw from
    the exact rank null of its (n_in, n_out) (`calibration.u_null_pmf`, by inverse CDF); the
    other units' entries are 0 (filled by the caller). This is the permuted 2U of an untied unit
    whose relabelling is independent of the others': a uniform n_in-subset of ranks 1..n."""
    n_in, n_out = np.asarray(n_in, dtype=np.int64), np.asarray(n_out, dtype=np.int64)
    tables = [(members, np.cumsum(u_null_pmf(a, b))) for members, a, b in count_groups(n_in, n_out, np.flatnonzero(untied))]

    def draw(rng):
        u2 = np.zeros(n_in.shape, dtype=np.int64)
        for members, cdf in tables:
            u = np.searchsorted(cdf, rng.random(members.size) * cdf[-1], side="right")
            u2[members] = 2 * np.minimum(u, cdf.size - 1)
        return u2

    return draw


def permutation_generators(seed, n_permutations):
    """One generator per permutation, spawned from `seed` (`numpy.random.SeedSequence.spawn`):
    permutation b draws the same noise whichever thread runs it and whatever ran before."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n_permutations)]


def _permutations(permutation, seed, n_permutations, threads=None, on_permutation=None):
    """permutation(b, generator b) for b in range(n_permutations) on `threads` threads (default
    `risk.n_threads()`): each draws its noise (numpy releases the GIL while filling it), then
    partitions and sums; `on_permutation()` after each, in order."""
    generators = permutation_generators(seed, n_permutations)
    threads = n_threads() if threads is None else max(1, int(threads))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        in_flight = collections.deque()
        for b in range(n_permutations):
            in_flight.append(pool.submit(permutation, b, generators[b]))
            if len(in_flight) > threads:  # a few in flight: each holds its noise (n_patients × n_models)
                in_flight.popleft().result()
                if on_permutation:
                    on_permutation()
        for future in in_flight:
            future.result()
            if on_permutation:
                on_permutation()


def rank_sums(ranks, patient_rows, unit_patient, block=RANK_SUM_BLOCK):
    """Per unit u: Σ_m ranks[u, m] · patient_rows[unit_patient[u], m], float32 (n_units,).

    ranks: (n_units, n_models) float32; patient_rows: (n_patients, n_models) float32 0/1;
    unit_patient None: unit u is patient u. Exact for midranks (multiples of ½, sums below 2²⁴),
    so the order of the additions does not matter.
    """
    out = np.empty(ranks.shape[0], dtype=np.float32)
    for a in range(0, ranks.shape[0], block):
        rows = patient_rows[a:a + block] if unit_patient is None else patient_rows[unit_patient[a:a + block]]
        out[a:a + block] = np.einsum("um,um->u", ranks[a:a + block], rows)
    return out


def strongest_attack_floor(attack_scores, target_masks, patient_ids, *, n_permutations=DEFAULT_PERMUTATIONS,
                           seed=DEFAULT_SEED, confidence=0.95, threads=None, on_permutation=None):
    """Chance level of the strongest attack's AUC, permuting target membership per patient.

    attack_scores: {attack name: (n_targets, n_records) float} membership scores of the held-out
    targets (higher = member); target_masks: (n_targets, n_records) bool, the targets' true
    membership (a patient's records agree); patient_ids: (n_records,). An attack's AUC is the mean
    over targets of the AUC over records (ties ½); each permutation shuffles every patient's column
    of the target patient mask across the targets (its number of IN targets kept) and recomputes
    all attacks from record ranks computed once and summed per patient (a patient's records move
    together, so a relabelling's rank sums are (n_targets, n_patients) products, never a pass over
    the records). A target left with no member or no non-member
    record by a permutation is skipped in that mean. Permutations run on `threads` threads (the
    result does not depend on it).

    Returns a JSON-ready dict: seed, n_permutations, confidence, strongest (the attack with the
    highest observed AUC), max_auc (`compare_to_chance` of max over attacks: the chance level of the
    strongest), per_attack {name: compare_to_chance of its mean AUC}.
    """
    if not attack_scores:
        raise MedleakError("the strongest-attack noise floor needs at least one attack")
    target_masks = np.atleast_2d(np.asarray(target_masks, dtype=bool))
    names = list(attack_scores)
    scores = [np.atleast_2d(np.asarray(attack_scores[name], dtype=np.float64)) for name in names]
    for name, s in zip(names, scores):
        if s.shape != target_masks.shape:
            raise MedleakError(f"attack {name!r}: scores {s.shape} and target masks {target_masks.shape} disagree")
    _, codes = patient_codes(patient_ids)
    if codes.size != target_masks.shape[1]:
        raise MedleakError(f"patient_ids has {codes.size} entries, target masks have {target_masks.shape[1]} records")
    n_patients = int(codes.max()) + 1
    target_patient_mask = patient_mask_from_records(target_masks, codes, n_patients)
    n_records = np.bincount(codes, minlength=n_patients).astype(np.float64)
    # (n_attacks, n_targets, n_patients) float64 sums of each patient's record ranks (midranks:
    # multiples of ½, exact in float64 however they are added)
    patient_rank_sums = np.stack([[np.bincount(codes, weights=row, minlength=n_patients)
                                   for row in stats.rankdata(s, axis=1)] for s in scores])

    def attack_aucs(members):  # members: (n_targets, n_patients) bool
        n1 = members.astype(np.float64) @ n_records
        n0 = codes.size - n1
        rank_sum = np.einsum("atp,tp->at", patient_rank_sums, members.astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (rank_sum - n1 * (n1 + 1) / 2.0) / (n1 * n0)
        usable = (n1 > 0) & (n0 > 0)
        if not usable.any():
            raise MedleakError("every target has only members or only non-members; the attack AUC is undefined")
        return auc[:, usable].mean(axis=1)

    observed = attack_aucs(target_patient_mask)
    chance = np.empty((n_permutations, len(names)))

    def permutation(b, rng):
        chance[b] = attack_aucs(permute_patient_mask(target_patient_mask, rng))

    _permutations(permutation, seed, n_permutations, threads, on_permutation)
    return {
        "seed": int(seed), "n_permutations": int(n_permutations), "confidence": float(confidence),
        "strongest": names[int(np.argmax(observed))],
        "max_auc": compare_to_chance(observed.max(), chance.max(axis=1), confidence),
        "per_attack": {name: compare_to_chance(observed[i], chance[:, i], confidence) for i, name in enumerate(names)},
    }
