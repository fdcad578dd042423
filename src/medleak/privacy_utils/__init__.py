"""Membership-inference audit as pure functions over arrays — bring your own models' logits.

Shapes: `scores` are (n_models, n_records, n_views) (a 2-D array is one view); `masks` are
(n_models, n_records) bool, True where the model trained on the record. Labels are int class
indices (n_records,) or (n_records, C) one-hot / multi-hot 0/1 rows.

    lira_scores(logits, labels)          logits (..., n_records, n_views, C) → LiRA score per view:
                                         log p − log(1 − p) of the correct label (vector); float32
    rmia_scores(logits, labels)          → RMIA score p per view; float32
                                         (multi-label / binary: p = Π_c σ(±z_c), see scores.py)
    record_auc(scores, masks)            → (auc, se) per record: Φ((μ_in − μ_out)/√(σ_in² + σ_out²))
                                         ≥ 0.5 from IN/OUT moments over models (averaged over
                                         views), Hanley–McNeil standard error
    lira(shadow_scores, shadow_masks, target_scores, *, offline=False, fix_variance=False)
                                         → (n_targets, n_records) LiRA scores (higher = member)
    rmia(shadow_scores, shadow_masks, target_scores, *, offline=False, a=None)
                                         → (n_targets, n_records) RMIA scores in [0, 1];
                                         offline with a=None tunes `a` on a shadow model
    attack_targets(scores, masks, target_indices, *, variant="lira_online")
                                         → (n_targets, n_records): models of the campaign itself
                                         attacked, each with its own leave-one-out shadows (the
                                         other models, one more dropped per record so the shadows
                                         do not depend on the target's membership); variants
                                         lira_online[_fixed], lira_offline[_fixed], rmia_online,
                                         rmia_offline; pass `lira_fit=fit_shadows(s, masks)` to sort once
    patient_risk(record_auc, patient_ids) → DataFrame patient_id, auc_max, auc_mean, n_records
                                         (most vulnerable first)

Example — audit 20 models of your own:

    s = lira_scores(logits, labels)                 # logits: (20, n, V, C)
    auc, se = record_auc(s, masks)                  # which records leak
    patients = patient_risk(auc, patient_ids)       # which patients leak
    attack = attack_targets(s, masks, [0, 1, 2])    # attack models 0–2, each with unbiased shadows

Bad input raises `medleak.errors.MedleakError` with a one-line message.
"""

from medleak.privacy_utils.attacks import attack_targets
from medleak.privacy_utils.lira import lira
from medleak.privacy_utils.risk import patient_risk, record_auc
from medleak.privacy_utils.rmia import rmia
from medleak.privacy_utils.scores import lira_scores, rmia_scores
from medleak.privacy_utils.shadows import fit_shadows

__all__ = ["lira_scores", "rmia_scores", "record_auc", "lira", "rmia", "attack_targets", "fit_shadows", "patient_risk"]
