"""Benchmark: record AUC + LiRA online + LiRA offline + RMIA online at paper scale on CPU.

200 models × 100,000 records × 16 views (1.28 GB of float32 scores, generated here), 10 held-out
targets, the other 190 models as shadows; the stages are the ones mem_inf_stats.py runs. Prints each stage's seconds, the total and the peak RSS.
Target: total ≤ 4 s and peak ≤ 2.5 GB on a 2-core CPU.

Then the unbiased per-target path (`attacks.attack_targets`: each target with its own
leave-one-out shadows): `per_target_*` stages — one sort of all models (`fit_shadows`), then the
four LiRA variants and RMIA online + offline for every target — and their total.

    python bench/attack_scale.py [--models 200 --records 100000 --views 16 --targets 10]
"""

import argparse
import resource
import time

import numpy as np

from medleak.privacy_utils import lira, rmia
from medleak.privacy_utils.attacks import LIRA_OPTIONS, RMIA_VARIANTS, attack_targets
from medleak.privacy_utils.lira import campaign_stats
from medleak.privacy_utils.risk import record_auc_from_moments
from medleak.privacy_utils.scores import rmia_from_lira
from medleak.privacy_utils.shadows import fit_shadows


def synthetic_scores(n_models, n_records, n_views, seed=0):
    """(models, records, views) float32 LiRA-like scores + balanced (models, records) IN masks.

    Every record is IN for exactly half the models (as a campaign plan does); IN scores are shifted
    up by a per-record effect, so some records are very exposed and most are not.
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n_records, n_models)), axis=1)
    masks = (order < n_models // 2).T.copy()
    del order
    base = rng.normal(2.0, 2.0, size=(n_records, 1)).astype(np.float32)
    effect = rng.exponential(0.3, size=(n_records, 1)).astype(np.float32)
    scores = np.empty((n_models, n_records, n_views), dtype=np.float32)
    for m in range(n_models):  # row by row: no float64 temporaries of the full array
        rng.standard_normal(out=scores[m], dtype=np.float32)
        scores[m] += base
        scores[m] += effect * masks[m][:, None]
    return scores, masks


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--targets", type=int, default=10)
    args = parser.parse_args()

    t0 = time.perf_counter()
    scores, masks = synthetic_scores(args.models, args.records, args.views)
    print(f"generate_scores: {time.perf_counter() - t0:.2f} s")
    targets, shadows = slice(0, args.targets), slice(args.targets, None)
    target_rows = np.arange(args.targets)

    timings, cpu, per_target = {}, {}, {}

    def timed(name, fn, into=timings):
        wall, busy = time.perf_counter(), time.process_time()
        result = fn()
        into[name], cpu[name] = time.perf_counter() - wall, time.process_time() - busy
        return result

    # As mem_inf_stats does it: one pass over the scores gives the record-risk moments (all models)
    # and the shadows' LiRA statistics, which LiRA online and offline share across all targets.
    moments, stats = timed("record_auc_and_shadow_stats", lambda: campaign_stats(scores, masks, shadows))
    auc, se = timed("record_auc_from_moments", lambda: record_auc_from_moments(moments))
    del moments
    online = timed("lira_online", lambda: lira(scores[shadows], masks[shadows], scores[targets], stats=stats))
    offline = timed("lira_offline", lambda: lira(scores[shadows], masks[shadows], scores[targets], offline=True, stats=stats))
    del stats
    # The unbiased path on the same LiRA scores: one sort of all models, then each target.
    fit = timed("per_target_fit_lira", lambda: fit_shadows(scores, masks), per_target)
    unbiased = timed("per_target_lira_4_variants", lambda: attack_targets(scores, masks, target_rows, variant=tuple(LIRA_OPTIONS), lira_fit=fit),
                     per_target)
    del fit

    # RMIA works on probabilities: turn the same array into p in place (not timed: in an audit the
    # probabilities come straight from the logits).
    for m in range(args.models):
        scores[m] = rmia_from_lira(scores[m])
    rmia_online = timed("rmia_online", lambda: rmia(scores[shadows], masks[shadows], scores[targets]))
    fit = timed("per_target_fit_rmia", lambda: fit_shadows(scores, masks, medians=False), per_target)
    unbiased.update(timed("per_target_rmia_online_offline", lambda: attack_targets(scores, masks, target_rows, variant=RMIA_VARIANTS,
                                                                                     rmia_fit=fit), per_target))
    del fit

    for name, seconds in timings.items():
        print(f"{name}: {seconds:.2f} s")
        print(f"{name}_cpu: {cpu[name]:.2f} s")
    print(f"total_attacks: {sum(timings.values()):.2f} s")
    # CPU seconds of all threads: on a busy shared machine, wall time / this shows the contention.
    print(f"total_attacks_cpu: {sum(cpu.values()):.2f} s")
    print(f"peak_rss_attacks: {peak_rss_gb():.2f} GB")
    for name, seconds in per_target.items():
        print(f"{name}: {seconds:.2f} s")
        print(f"{name}_cpu: {cpu[name]:.2f} s")
    print(f"total_per_target: {sum(per_target.values()):.2f} s")
    print(f"peak_rss_per_target: {peak_rss_gb():.2f} GB")
    # Not part of the total: RMIA with trimmed means (the audit's --rmia_trim=0.1) needs a sort.
    t0 = time.perf_counter()
    rmia(scores[shadows], masks[shadows], scores[targets], trim=0.1)
    print(f"rmia_online_trimmed_extra: {time.perf_counter() - t0:.2f} s")
    print(f"peak_rss: {peak_rss_gb():.2f} GB")
    # Sanity: the planted IN shift must be detectable.
    members = masks[targets]
    print(f"mean_record_auc: {auc.mean():.3f}")
    named = [("lira_online", online), ("lira_offline", offline), ("rmia_online", rmia_online)]
    named += [(f"per_target_{name}", unbiased[name]) for name in ("lira_online", "lira_offline", "rmia_online", "rmia_offline")]
    for name, s in named:
        gap = np.mean([s[t][members[t]].mean() - s[t][~members[t]].mean() for t in range(len(s))])
        print(f"{name}_member_gap: {gap:.3f} score")


if __name__ == "__main__":
    main()
