"""Benchmark: the audit's calibrated statistics at paper scale on CPU, the audit's path against the array API's.

200 models × 100,000 records × 16 views (1.28 GB of float32 LiRA scores, generated here; patients
with 1–4 images, each patient IN for exactly half the models), 10 held-out targets (the audit's
default for 200 runs), 200 noise-floor permutations (the audit's default).

    audit path   the audit's own steps on a stand-in campaign, sharing one `audit.audit_fit` (a
                 `FittedCampaign`, as `audit_campaign` does): `audit.record_risk_tables` (record
                 summaries, record and patient rank risk, the Gaussian record AUC, the tables),
                 `attack_suite` (LiRA ×4, RMIA ×2 with leave-one-out shadows, loss threshold, ROC
                 summaries), `noise_floors` (patients, records, strongest attack)
    public path  `fit_campaign` → .record_risk(), .patient_risk(), .record_auc_gaussian(),
                 .attack(targets) (every variant), .noise_floor(attacks, targets)

Prints one figure per line: seconds (wall and CPU) per stage, each path's total and peak RSS
(VmHWM, reset before each path), the ratio public / audit (target ≤ 1.2), and whether both paths
gave the same numbers. A small warm-up of both paths (imports, cached rank nulls) is not timed.

    python bench/attack_scale.py [--models 200 --records 100000 --views 16 --permutations 200]
"""

import argparse
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.privacy_utils import fit_campaign
from medleak.privacy_utils.audit import (AuditOptions, attack_suite, audit_fit, n_targets, noise_floors,
                                         record_risk_tables)

LABELS = ["negative", "positive"]


def synthetic_campaign(n_models, n_records, n_views, seed=0):
    """(scores (models, records, views) float32 LiRA-like, masks (models, records) bool, patient ids).

    Patients have 1–4 images and are IN for exactly half the models (as a campaign plan does); IN
    scores are shifted up by a per-record effect, so some records are very exposed and most are not.
    """
    rng = np.random.default_rng(seed)
    n_images = rng.integers(1, 5, size=n_records)  # more patients than needed; cut at n_records
    codes = np.repeat(np.arange(n_records), n_images)[:n_records]
    n_patients = int(codes[-1]) + 1
    patient_mask = (np.argsort(rng.random((n_patients, n_models)), axis=1) < n_models // 2).T
    masks = np.ascontiguousarray(patient_mask[:, codes])
    base = rng.normal(2.0, 2.0, size=(n_records, 1)).astype(np.float32)
    effect = rng.exponential(0.3, size=(n_records, 1)).astype(np.float32)
    scores = np.empty((n_models, n_records, n_views), dtype=np.float32)
    for m in range(n_models):  # row by row: no float64 temporaries of the full array
        rng.standard_normal(out=scores[m], dtype=np.float32)
        scores[m] += base
        scores[m] += effect * masks[m][:, None]
    return scores, masks, np.array([f"p{c:06d}" for c in codes])


def stand_in_campaign(scores, masks, patient_ids):
    """What the audit's steps read from a `scoring.Campaign`, without a logdir."""
    n_models, n_records = masks.shape
    label = (np.arange(n_records) % 2).astype(np.float32)
    records = pd.DataFrame({"record_id": [f"r{i}" for i in range(n_records)], "patient_id": patient_ids,
                            LABELS[0]: 1.0 - label, LABELS[1]: label})
    return types.SimpleNamespace(records=records, scores=scores, masks=masks, n_runs=n_models,
                                 run_ids=np.arange(n_models), label_names=LABELS, task="multiclass", subgroups=[])


def peak_rss_gb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2  # kB
    return float("nan")


def reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    except OSError:
        pass


class Stages:
    """Wall and CPU seconds per named stage."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def run(self, name, fn):
        wall, busy = time.perf_counter(), time.process_time()
        result = fn()
        self.wall[name], self.cpu[name] = time.perf_counter() - wall, time.process_time() - busy
        return result


def audit_path(campaign, options, targets, stages):
    fitted = audit_fit(campaign, options)  # what audit_campaign does: one fit behind every step
    risk = stages.run("audit_record_risk_tables", lambda: record_risk_tables(campaign, options, fitted))
    attacks = stages.run("audit_attack_suite", lambda: attack_suite(campaign, options, targets, fitted))
    floors = stages.run("audit_noise_floors", lambda: noise_floors(risk, attacks, options))
    return risk, attacks, floors


def public_path(scores, masks, patient_ids, options, targets, stages):
    def risk():
        fitted = fit_campaign(scores, masks, patient_ids, rmia_trim=options.rmia_trim)
        return fitted, fitted.record_risk(), fitted.patient_risk(), fitted.record_auc_gaussian()

    fitted, records, patients, gaussian = stages.run("public_record_and_patient_risk", risk)
    attacks = stages.run("public_attack", lambda: fitted.attack(
        targets, drop_seed=options.seed, gamma=options.rmia_gamma, n_population=options.rmia_population,
        population_seed=options.seed))
    floors = stages.run("public_noise_floor", lambda: fitted.noise_floor(
        attacks, targets, alpha=options.fdr, auc_threshold=options.risk_auc, n_permutations=options.permutations,
        seed=options.seed))
    return records, patients, gaussian, attacks, floors


def same_numbers(audit, public):
    """1 when both paths gave the same risk, attack scores and noise floors (the floors' attack names differ)."""
    risk, attacks, floors = audit
    records, patients, gaussian, public_attacks, public_floors = public
    same = [np.array_equal(records["p_value"].to_numpy(), risk.record_table["p_value"].to_numpy()),
            np.allclose(gaussian[0], risk.record_table["auc_gaussian"].to_numpy(), rtol=1e-12, atol=1e-12),
            np.array_equal(np.sort(patients["auc"].to_numpy()), np.sort(risk.patient_auc)),
            np.array_equal(public_attacks["lira_online"], attacks.scores["LiRA online"]),
            np.array_equal(public_attacks["rmia_offline"], attacks.scores["RMIA offline"]),
            public_floors["records"]["at_risk"] == floors["records"]["at_risk"],
            public_floors["strongest_attack"]["max_auc"] == floors["strongest_attack"]["max_auc"]]
    return int(all(same))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args()
    options = AuditOptions(permutations=args.permutations, progress=False)
    targets = np.arange(args.models - n_targets(args.models, options.eval_size), args.models)

    t0 = time.perf_counter()
    scores, masks, patient_ids = synthetic_campaign(args.models, args.records, args.views)
    campaign = stand_in_campaign(scores, masks, patient_ids)
    print(f"generate_scores: {time.perf_counter() - t0:.2f} s")
    print(f"n_patients: {len(np.unique(patient_ids))}")
    print(f"n_targets: {len(targets)}")
    print(f"rss_after_generate: {peak_rss_gb():.2f} GB")

    warm = slice(0, min(2000, args.records))  # untimed: imports, cached exact rank nulls
    warm_options = AuditOptions(permutations=20, progress=False)
    audit_path(stand_in_campaign(scores[:, warm], masks[:, warm], patient_ids[warm]), warm_options, targets, Stages())
    public_path(scores[:, warm], masks[:, warm], patient_ids[warm], warm_options, targets, Stages())

    stages = Stages()
    reset_peak_rss()
    audit = audit_path(campaign, options, targets, stages)
    audit_peak = peak_rss_gb()
    del campaign
    reset_peak_rss()
    public = public_path(scores, masks, patient_ids, options, targets, stages)
    public_peak = peak_rss_gb()

    for name, seconds in stages.wall.items():
        print(f"{name}: {seconds:.2f} s")
        print(f"{name}_cpu: {stages.cpu[name]:.2f} s")
    totals = {}
    for path in ("audit", "public"):
        totals[path] = sum(s for name, s in stages.wall.items() if name.startswith(path))
        print(f"{path}_total: {totals[path]:.2f} s")
        # CPU seconds of all threads: on a busy shared machine, wall time / this shows the contention.
        print(f"{path}_total_cpu: {sum(s for name, s in stages.cpu.items() if name.startswith(path)):.2f} s")
    print(f"audit_peak_rss: {audit_peak:.2f} GB")
    print(f"public_peak_rss: {public_peak:.2f} GB")
    print(f"public_vs_audit_ratio: {totals['public'] / totals['audit']:.3f}")
    print(f"public_equals_audit: {same_numbers(audit, public)}")
    risk, attacks, floors = audit
    print(f"mean_record_auc: {risk.record_auc.mean():.4f}")
    print(f"records_at_risk_share: {risk.record_table['at_risk'].mean():.4f}")
    print(f"patients_at_risk_share: {risk.patient_table['at_risk'].mean():.4f}")
    print(f"patients_at_risk_chance: {floors['patients']['at_risk']['chance_mean']:.4f}")
    print(f"lira_online_auc: {attacks.results['LiRA online'][0]['auc']['mean']:.4f}")
    print(f"strongest_attack_chance_auc: {floors['strongest_attack']['max_auc']['chance_mean']:.4f}")


if __name__ == "__main__":
    main()
