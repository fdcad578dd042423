"""Every held-out target scored with its own unbiased shadows: the campaign's attack entry point.

`attack_targets` evaluates LiRA and RMIA against targets that are models of the campaign itself:
target t's shadows are the other runs, with one more model dropped per record (`shadows.py`), so
the shadow statistics do not depend on t's membership. The sorts happen once (`fit_shadows`);
each target then costs O(records × views).
"""

import concurrent.futures

import numpy as np

from medleak.errors import MedleakError
from medleak.privacy_utils.lira import lira_variants_from_stats
from medleak.privacy_utils.risk import n_threads
from medleak.privacy_utils.rmia import (DEFAULT_GAMMA, DEFAULT_POPULATION, DEFAULT_TRIM, population_indices,
                                    reference_probability, rmia_from_reference, tune_offline_a_fitted)
from medleak.privacy_utils.shadows import fit_shadows, target_stats

LIRA_OPTIONS = {"lira_online": {}, "lira_online_fixed": {"fix_variance": True},
                "lira_offline": {"offline": True}, "lira_offline_fixed": {"offline": True, "fix_variance": True}}
RMIA_VARIANTS = ("rmia_online", "rmia_offline")
VARIANTS = tuple(LIRA_OPTIONS) + RMIA_VARIANTS
# Per-target shadow statistics are computed in float64 and stored in float32: half the memory
# traffic of the per-target passes; scores move by ~1e-7 relative, AUCs by < 1e-6 (tested).
STATS_DTYPE = np.float32
MAX_TARGETS_IN_FLIGHT = 2


def check_targets(target_indices, n_models):
    """Distinct in-range model indices as an int array (one-line error otherwise)."""
    targets = np.atleast_1d(np.asarray(target_indices))
    if targets.ndim != 1 or targets.size == 0 or not np.issubdtype(targets.dtype, np.integer):
        raise MedleakError(f"target_indices must be a non-empty 1-D list of model indices, got {target_indices!r}")
    if targets.min() < 0 or targets.max() >= n_models or len(np.unique(targets)) != targets.size:
        raise MedleakError(f"target_indices must be distinct model indices in [0, {n_models}), got {targets.tolist()}")
    return targets.astype(np.int64)


def pretend_target(target, target_indices, n_models):
    """The model RMIA offline `a` is tuned on for `target`: the lowest-index model that is not an
    evaluated target, else the lowest-index model other than `target` (never the target itself)."""
    others = [m for m in range(n_models) if m != target]
    spare = [m for m in others if m not in set(int(t) for t in target_indices)]
    return (spare or others)[0]


def offline_a_per_target(fit, target_indices, *, gamma=DEFAULT_GAMMA, population=None, drop_seed=0):
    """{target: tuned RMIA offline a} — tuned on `pretend_target(target, …)` with its leave-one-out
    references (`rmia.tune_offline_a_fitted`); at most two tunings for any set of targets."""
    targets = check_targets(target_indices, fit.n_models)
    tuned, result = {}, {}
    for t in targets.tolist():
        pretend = pretend_target(t, targets, fit.n_models)
        if pretend not in tuned:
            tuned[pretend] = tune_offline_a_fitted(fit, pretend, gamma=gamma, population=population, drop_seed=drop_seed)[0]
        result[t] = tuned[pretend]
    return result


def attack_targets(scores, masks, target_indices, *, variant="lira_online", drop_seed=0, rmia_transform=None,
                   trim=DEFAULT_TRIM, gamma=DEFAULT_GAMMA, n_population=DEFAULT_POPULATION, population_seed=0, a=None,
                   lira_fit=None, rmia_fit=None):
    """Membership scores of held-out targets, each attacked with its own unbiased shadows.

    Contract:
      scores: (n_models, n_records, n_views) — **all** the campaign's models, targets included
        (2-D = one view). LiRA variants read them as LiRA scores (`lira_scores`); RMIA variants read
        `rmia_transform(scores)` (e.g. `scores.rmia_from_lira`, monotone) or, without a transform,
        the scores themselves as probabilities (`rmia_scores`).
      masks: (n_models, n_records) bool, True where the model trained on the record. The design is
        unbiased when every record's IN count over the models is fixed by the plan (the exact-k
        plan: each patient IN for exactly k runs).
      target_indices: the models to attack (rows of `scores`).
      variant: one of VARIANTS ("lira_online", "lira_online_fixed" (fixed variance),
        "lira_offline", "lira_offline_fixed", "rmia_online", "rmia_offline") → returns a float64
        (n_targets, n_records) array, row i for target_indices[i] (higher = more likely a member);
        or a sequence of them → {variant: array}.
    Target t's shadows are the other n_models − 1 models minus, per record, one model drawn
    (seeded by `drop_seed` and t, `shadows.dropped_models`) from the group t's bit would enlarge:
    every record has n_in − 1 IN and n_out − 1 OUT shadows whatever t says. Records left with
    fewer than 2 IN/OUT shadows use the pooled σ, and with none a shifted Gaussian (LiRA), with a
    warning. RMIA's population is `population_indices(n_records, n_population, population_seed)`,
    the same for all targets; `trim` is the trimmed-mean fraction of its reference means. RMIA
    offline `a`: a float, a {target: a} dict, or None to tune it per target on a pretend target
    that is never the evaluated one (`offline_a_per_target`; the pretend target's references
    include the other targets' models). `lira_fit` / `rmia_fit`: a `fit_shadows` result of these
    scores (with medians, resp. with `trim` and `rmia_transform`) to reuse across calls.
    """
    names = [variant] if isinstance(variant, str) else list(variant)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise MedleakError(f"unknown attack variant(s) {unknown or names}; choose from {', '.join(VARIANTS)}")
    n_models = np.shape(masks)[0]
    if n_models < 3:
        raise MedleakError(f"attacking held-out targets needs at least 3 models (a target and 2 shadows), got {n_models}")
    targets = check_targets(target_indices, n_models)
    lira_names = [name for name in names if name in LIRA_OPTIONS]
    rmia_names = [name for name in names if name in RMIA_VARIANTS]
    if lira_names and lira_fit is None:
        lira_fit = fit_shadows(scores, masks)
    if rmia_names and rmia_fit is None:
        rmia_fit = fit_shadows(scores, masks, medians=False, trim=trim or None, transform=rmia_transform)
    n_records = (lira_fit or rmia_fit).masks.shape[1]
    population = population_indices(n_records, n_population, population_seed)
    if "rmia_offline" in rmia_names:
        if a is None:
            a = offline_a_per_target(rmia_fit, targets, gamma=gamma, population=population, drop_seed=drop_seed)
        elif not isinstance(a, dict):
            a = {int(t): float(a) for t in targets}
    result = {name: np.empty((len(targets), n_records)) for name in names}

    def score_target(row, t):
        if lira_names:
            stats = target_stats(lira_fit, t, drop_seed, dtype=STATS_DTYPE, names=("sd", "median"))
            observed = lira_fit.observed(t)
            for name, values in lira_variants_from_stats(stats, observed, {n: LIRA_OPTIONS[n] for n in lira_names}).items():
                result[name][row] = values
        if rmia_names:
            stats = target_stats(rmia_fit, t, drop_seed, dtype=STATS_DTYPE, names=("mean", "trimmed"))
            observed = rmia_fit.observed(t)
            for name in rmia_names:
                offline = name == "rmia_offline"
                reference = reference_probability(stats, offline=offline, a=a[t] if offline else None)
                result[name][row] = rmia_from_reference(reference, observed, gamma=gamma, population=population)

    # A few targets at a time on threads (each also splits its records over threads): their
    # whole-array steps (drop draws, Gaussian fallbacks, RMIA's population sort) overlap. Each
    # target in flight holds ~12 (n_records, n_views) arrays, hence the cap.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(n_threads(), len(targets), MAX_TARGETS_IN_FLIGHT))) as pool:
        for future in [pool.submit(score_target, row, t) for row, t in enumerate(targets.tolist())]:
            future.result()
    return result[variant] if isinstance(variant, str) else result
