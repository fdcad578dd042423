"""RMIA (Zarifzadeh et al., 2024): relative membership inference against a population of records.

Scores are p(x|θ) = `rmia_scores` (probability of the correct label vector). For a record x and
view v, reference (shadow) models give Pr(x) — how likely x is under a model in general:

    online:  Pr(x) = ½ (mean_IN + mean_OUT)            (balanced over IN and OUT shadows)
    offline: Pr(x) = ½ ((1 + a) · mean_OUT + (1 − a))   (only OUT shadows; `a` corrects for them)

where the means over shadows can be **trimmed means** (`trim` > 0 drops floor(trim·n) values at
each end, so a few degenerate shadow models cannot dominate; the audit uses trim = 0.1). The array
API's default, trim = 0, is the paper's plain mean and needs no sort (moments only).

For a target model θ the likelihood ratio is LR(x) = mean_v p_v(x|θ) / mean_v Pr_v(x) (views
averaged: the probability of x under augmentation), and the score of x is the share of population
records z with LR(x) / LR(z) > γ. The population is a fixed random subset of the records
(`n_population`, seeded), the same for all targets — the attacker's pool of other records.

With one fixed population the score is a monotone function of LR(x), so γ and the population
size shape the score's scale, not the ROC; Pr(x) (and offline `a`) is what makes RMIA differ
from thresholding p(x|θ). Offline `a` is tuned (`tune_offline_a`) on a shadow
model used as a pretend target, never on an evaluated target, with references chosen by the
leave-one-out design of `shadows.py` so they do not depend on the pretend target's membership.
"""

import warnings

import numpy as np

from medleak.errors import MedleakError
from medleak.privacy_utils.lira import shadow_stats
from medleak.privacy_utils.shadows import fit_shadows, target_stats
from medleak.privacy_utils.roc import auc_score

DEFAULT_TRIM = 0.0  # the paper's plain mean; mem_inf_stats uses --rmia_trim=0.1
DEFAULT_GAMMA = 1.0
DEFAULT_POPULATION = 10_000
A_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def _stats_options(trim):
    """shadow_stats options for RMIA: trimmed means need the sort, plain means only moments."""
    return {"medians": False, "trim": trim if trim else None}


def reference_probability(stats, *, offline=False, a=None):
    """Pr(x) per record and view from `shadow_stats(..., trim=…)` output."""
    mean_in = stats.get("trimmed_in", stats["mean_in"])
    mean_out = stats.get("trimmed_out", stats["mean_out"])
    if offline:
        if a is None:
            raise MedleakError("offline RMIA needs `a` (or call rmia(..., offline=True) to tune it)")
        if not 0.0 <= a <= 1.0:
            raise MedleakError(f"RMIA offline a must lie in [0, 1], got {a}")
        out_fallback = np.where(np.isfinite(mean_out), mean_out, mean_in)
        return 0.5 * ((1.0 + a) * out_fallback + (1.0 - a))
    # Records with no IN (or OUT) shadow fall back to the group that exists.
    return 0.5 * (np.where(np.isfinite(mean_in), mean_in, mean_out) + np.where(np.isfinite(mean_out), mean_out, mean_in))


def population_indices(n_records, n_population=DEFAULT_POPULATION, seed=0):
    """A fixed random subset of record indices (all records if n_population ≥ n_records)."""
    if n_population < 1:
        raise MedleakError(f"the RMIA population (--rmia_population) must hold at least 1 record, got {n_population}")
    if n_population >= n_records:
        return np.arange(n_records)
    return np.sort(np.random.default_rng(seed).choice(n_records, size=n_population, replace=False))


def rmia_from_reference(reference, target_scores, *, gamma=DEFAULT_GAMMA, population=None):
    """RMIA scores (n_targets, n_records) in [0, 1] from Pr(x) (n_records, n_views) and p(x|θ).

    Views are averaged first: LR(x) = mean_v p_v(x|θ) / mean_v Pr_v(x) (probability of x under
    augmentation); the score is the share of population records z with LR(x) / LR(z) > γ.
    """
    target_scores = np.asarray(target_scores)
    single = target_scores.ndim == 2
    if single:
        target_scores = target_scores[None]
    n_records, n_views = reference.shape
    if target_scores.shape[1:] != (n_records, n_views):
        raise MedleakError(f"target_scores {target_scores.shape} must be (n_targets, {n_records}, {n_views})")
    if gamma <= 0:
        raise MedleakError(f"RMIA gamma must be > 0, got {gamma}")
    if population is None:
        population = population_indices(n_records)
    tiny = np.finfo(np.float64).tiny
    log_reference = np.log(np.maximum(reference.mean(axis=1), tiny))
    result = np.empty(target_scores.shape[:2])
    for t, observed in enumerate(target_scores):
        log_ratio = np.log(np.maximum(observed.mean(axis=1, dtype=np.float64), tiny)) - log_reference
        pool = np.sort(log_ratio[population])
        # share of z with LR(x)/LR(z) > γ  ⇔  log LR(z) < log LR(x) − log γ
        result[t] = np.searchsorted(pool, log_ratio - np.log(gamma), side="left") / len(population)
    return result[0] if single else result


def tune_offline_a(shadow_scores, shadow_masks, *, trim=DEFAULT_TRIM, gamma=DEFAULT_GAMMA, population=None, grid=A_GRID,
                   transform=None, drop_seed=0):
    """Picks offline `a` maximising AUC on shadow model 0 used as a pretend target.

    The pretend target's references are the other shadows with the leave-one-out design of
    `shadows.py` (one more model dropped per record from the group its bit would enlarge), so which
    references describe a record does not depend on whether the pretend target trained on it.
    With only 2 shadow models that design leaves no reference: the other shadow is used as is,
    with a warning. `transform` maps stored scores to probabilities chunk-wise (see `shadow_stats`).
    Returns (a, {a: auc}).
    """
    shadow_scores = np.asarray(shadow_scores) if not isinstance(shadow_scores, np.ndarray) else shadow_scores
    if shadow_scores.shape[0] < 2:
        raise MedleakError("tuning RMIA offline `a` needs at least 2 shadow models (one is used as a pretend target)")
    shadow_masks = np.asarray(shadow_masks)
    if shadow_scores.shape[0] == 2:
        warnings.warn("only 2 shadow models: RMIA offline `a` is tuned with the other one as the reference, "
                      "whose membership depends on the pretend target's (train more runs)", stacklevel=2)
        references = shadow_stats(shadow_scores[1:], shadow_masks[1:], **_stats_options(trim), transform=transform)
        observed = shadow_scores[0] if transform is None else transform(shadow_scores[0])
        return _best_a(references, observed, shadow_masks[0], gamma, population, grid)
    fit = fit_shadows(shadow_scores, shadow_masks, medians=False, trim=trim or None, transform=transform)
    return tune_offline_a_fitted(fit, 0, gamma=gamma, population=population, grid=grid, drop_seed=drop_seed)


def tune_offline_a_fitted(fit, pretend_index, *, gamma=DEFAULT_GAMMA, population=None, grid=A_GRID, drop_seed=0):
    """`tune_offline_a` on a `shadows.ShadowFit`: model `pretend_index` is the pretend target and
    `shadows.target_stats(fit, pretend_index, drop_seed)` its references. Returns (a, {a: auc})."""
    references = target_stats(fit, pretend_index, drop_seed)
    return _best_a(references, fit.observed(pretend_index), fit.masks[pretend_index], gamma, population, grid)


def _best_a(references, observed, members, gamma, population, grid):
    """(a with the highest AUC on the pretend target (ties: smallest a), {a: auc})."""
    aucs = {}
    for a in grid:
        scores = rmia_from_reference(reference_probability(references, offline=True, a=float(a)), observed, gamma=gamma, population=population)
        aucs[float(a)] = auc_score(scores, members)
    best = max(aucs, key=lambda k: (aucs[k], -k))
    return best, aucs


def rmia(shadow_scores, shadow_masks, target_scores, *, offline=False, a=None, gamma=DEFAULT_GAMMA, trim=DEFAULT_TRIM,
         n_population=DEFAULT_POPULATION, seed=0, stats=None):
    """RMIA membership scores in [0, 1] of target models' records (higher = more likely a member).

    shadow_scores: (n_shadows, n_records, n_views) probabilities (`rmia_scores`); shadow_masks:
    (n_shadows, n_records) bool; target_scores: (n_targets, n_records, n_views) or
    (n_records, n_views). Offline with `a=None` tunes `a` on shadow 0 as a pretend target.
    Pass `stats=shadow_stats(shadow_scores, shadow_masks, medians=False, trim=trim or None)` to reuse
    statistics. For targets that are runs of the same exact-k campaign as the shadows, use
    `attacks.attack_targets` (unbiased per-target shadows).
    """
    if stats is None:
        stats = shadow_stats(shadow_scores, shadow_masks, **_stats_options(trim))
    population = population_indices(stats["mean_in"].shape[0], n_population, seed)
    if offline and a is None:
        a, _ = tune_offline_a(shadow_scores, shadow_masks, trim=trim, gamma=gamma, population=population)
    reference = reference_probability(stats, offline=offline, a=a)
    return rmia_from_reference(reference, target_scores, gamma=gamma, population=population)
