"""Membership-inference audit as pure functions over arrays — bring your own models' logits.

Shapes: `scores` are (n_models, n_records, n_views) (a 2-D array is one view); `masks` are
(n_models, n_records) bool, True where the model trained on the record, over **all** the models
(held-out targets included); `patient_ids` (n_records,), a patient's records IN or OUT together.
Labels are int class indices (n_records,) or (n_records, C) one-hot / multi-hot 0/1 rows.

Which to use. The calibrated statistics below are the audit's own (`medleak-audit` computes the
same numbers with the same functions) and are measured against chance: a unit's IN models are
ranked against its OUT models, with exact p-values, so on data without membership signal the AUCs
centre on 0.5 and the at_risk share stays below the FDR level. Use them. The paper's statistics are
kept for comparison only: `record_auc` is the Gaussian Φ((μ_in − μ_out)/√(σ_in² + σ_out²)) clipped
at 0.5, biased above 0.5 under the null (mean ≈ 0.53 at 16 models); `patient_risk`'s `auc_max` is
the worst of a patient's images, so it grows with the number of images even when nothing leaks;
`lira` / `rmia` with shared shadows are biased when the targets are runs of the same plan (each
record IN for exactly k runs) — use `attack_targets` or `FittedCampaign.attack` for those.

Calibrated (fit once, score many):

    fit_campaign(scores, masks, patient_ids)  → FittedCampaign; the per-record summaries and the
                                         LiRA / RMIA sorts of all models are made when first needed,
                                         once, and shared by every method:
        .record_risk()                   → DataFrame per record: auc (rank AUC of IN vs OUT models),
                                         auc_se, null_sd, p_value (exact rank null), q_value (BH),
                                         at_risk (q ≤ alpha and auc ≥ auc_threshold), n_in, n_out
        .patient_risk()                  → the same per patient, scored as one unit per model (its
                                         records' standardised scores averaged), + n_records; its
                                         null does not depend on the patient's number of images
        .attack(targets, variants)       → {variant: (n_targets, n_records)} membership scores of the
                                         models `targets`, each with its own leave-one-out shadows;
                                         variants lira_online[_fixed], lira_offline[_fixed],
                                         rmia_online, rmia_offline, loss_threshold
        .noise_floor(attack_scores, targets)  → observed / chance / excess (with CI and seed) of
                                         the share of patients and records above each AUC, of the
                                         at_risk share, and of the strongest attack's AUC, from
                                         seeded permutations of each patient's IN/OUT bits
        .record_auc_gaussian()           → the paper's (auc, se) per record, from the same fit

The same statistics one call at a time (each call makes its own pass over the scores):

    record_summaries(scores)             → (n_models, n_records) float32 per-model summaries
    record_rank_risk(scores, masks)      → as .record_risk()   (record_summary= to reuse summaries)
    patient_rank_risk(scores, masks, patient_ids)  → as .patient_risk()
    attack_targets(scores, masks, target_indices, *, variant="lira_online")  → as .attack();
                                         pass `lira_fit=fit_shadows(s, masks)` to sort once
    share_floor(summaries, patient_mask, unit_patient)  → chance of the shares and at_risk share
    strongest_attack_floor(attack_scores, target_masks, patient_ids)  → chance of the strongest attack

Scores and the paper's statistics:

    lira_scores(logits, labels)          logits (..., n_records, n_views, C) → LiRA score per view:
                                         log p − log(1 − p) of the correct label (vector); float32
    rmia_scores(logits, labels)          → RMIA score p per view; float32
                                         (multi-label / binary: p = Π_c σ(±z_c), see scores.py)
    record_auc(scores, masks)            → (auc, se): the paper's Gaussian record AUC (≥ 0.5)
    patient_risk(record_auc, patient_ids) → DataFrame patient_id, auc_max, auc_mean, n_records
    lira(shadow_scores, shadow_masks, target_scores, *, offline=False, fix_variance=False)
    rmia(shadow_scores, shadow_masks, target_scores, *, offline=False, a=None)
                                         → (n_targets, n_records) with shadows shared by all targets:
                                         right only for targets independent of the shadows' plan

Example — audit 20 models of your own:

    s = lira_scores(logits, labels)                    # logits: (20, n, V, C)
    fitted = fit_campaign(s, masks, patient_ids)
    records = fitted.record_risk()                     # which records leak, against chance
    patients = fitted.patient_risk()                   # which patients leak
    attacks = fitted.attack([0, 1, 2])                 # attack models 0–2, every variant
    floor = fitted.noise_floor(attacks, [0, 1, 2])     # what all of this looks like by chance

Bad input raises `medleak.errors.MedleakError` with a one-line message.
"""

from medleak.privacy_utils.attacks import attack_targets
from medleak.privacy_utils.calibrated import FittedCampaign, fit_campaign
from medleak.privacy_utils.calibration import patient_rank_risk, record_rank_risk, record_summaries
from medleak.privacy_utils.lira import lira
from medleak.privacy_utils.noise_floor import share_floor, strongest_attack_floor
from medleak.privacy_utils.risk import patient_risk, record_auc
from medleak.privacy_utils.rmia import rmia
from medleak.privacy_utils.scores import lira_scores, rmia_scores
from medleak.privacy_utils.shadows import fit_shadows

__all__ = ["lira_scores", "rmia_scores", "fit_campaign", "FittedCampaign", "record_rank_risk", "patient_rank_risk",
           "record_summaries", "attack_targets", "fit_shadows", "share_floor", "strongest_attack_floor",
           "record_auc", "patient_risk", "lira", "rmia"]
