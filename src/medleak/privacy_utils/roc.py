"""ROC curves of membership attacks: per target model, then mean ± sd over targets.

Attacks are judged at low false-positive rates (Carlini et al., 2022): besides the AUC we report the
TPR at 0.1 % and 1 % FPR — the best TPR among thresholds whose FPR does not exceed the level.
Curves from different targets are put on one FPR grid (log-spaced, so the low-FPR region the
log-log plot shows is resolved) before averaging.
"""

import concurrent.futures

import numpy as np
from sklearn import metrics

from medleak.errors import MedleakError
from medleak.privacy_utils.risk import n_threads
from medleak.train_utils.metrics import auroc

FPR_LEVELS = (0.001, 0.01)
FPR_GRID = np.unique(np.concatenate([np.logspace(-5, 0, 201), np.linspace(0, 1, 101)]))


def roc_curve(scores, members):
    """(fpr, tpr) of the threshold attack `score > t`, members = True for IN records."""
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise MedleakError(f"scores {scores.shape} and membership {members.shape} must be equal-length 1-D arrays")
    if members.all() or not members.any():
        raise MedleakError("an ROC curve needs both member and non-member records")
    fpr, tpr, _ = metrics.roc_curve(members, scores, drop_intermediate=False)
    return fpr, tpr


def auc_score(scores, members):
    """Area under the ROC curve (ties count one half; `medleak.train_utils.metrics.auroc`)."""
    members = np.asarray(members, dtype=bool)
    if members.all() or not members.any():
        raise MedleakError("an AUC needs both member and non-member records")
    return auroc(scores, members)


def tpr_at_fpr(fpr, tpr, level):
    """Highest TPR among operating points with FPR ≤ level (0 if none)."""
    ok = np.asarray(fpr) <= level
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def tpr_on_grid(fpr, tpr, grid=FPR_GRID):
    """The ROC as a step function (best TPR at FPR ≤ x) evaluated on `grid`."""
    order = np.argsort(fpr, kind="stable")
    fpr, best = np.asarray(fpr)[order], np.maximum.accumulate(np.asarray(tpr)[order])
    idx = np.searchsorted(fpr, grid, side="right") - 1
    return np.where(idx >= 0, best[np.clip(idx, 0, None)], 0.0)


def summarise_attack(target_scores, target_members, levels=FPR_LEVELS, grid=FPR_GRID):
    """Per-target AUC and TPR@levels, their mean ± sd, and the mean ± sd ROC on `grid`.

    target_scores, target_members: (n_targets, n_records). Returns a JSON-ready dict plus
    `tpr_grid` (n_targets, len(grid)) for plotting bands.
    """
    target_scores = np.atleast_2d(np.asarray(target_scores, dtype=np.float64))
    target_members = np.atleast_2d(np.asarray(target_members, dtype=bool))
    if target_scores.shape != target_members.shape:
        raise MedleakError(f"target scores {target_scores.shape} and memberships {target_members.shape} disagree")
    def one_target(row):
        fpr, tpr = roc_curve(target_scores[row], target_members[row])
        return auc_score(target_scores[row], target_members[row]), [tpr_at_fpr(fpr, tpr, lv) for lv in levels], tpr_on_grid(fpr, tpr, grid)

    # targets on threads: their sorts release the GIL; results in target order
    with concurrent.futures.ThreadPoolExecutor(min(n_threads(), len(target_scores))) as pool:
        per_target = list(pool.map(one_target, range(len(target_scores))))
    aucs = [auc for auc, _, _ in per_target]
    tprs = {lv: [at_levels[i] for _, at_levels, _ in per_target] for i, lv in enumerate(levels)}
    curves = np.array([curve for _, _, curve in per_target])

    def mean_sd(values):
        values = np.asarray(values, dtype=np.float64)
        return {"mean": float(values.mean()), "sd": float(values.std()), "per_target": values.tolist()}

    summary = {"auc": mean_sd(aucs)}
    for lv in levels:
        summary[f"tpr_at_{lv * 100:g}%_fpr"] = mean_sd(tprs[lv])
    summary["n_targets"] = int(len(aucs))
    return summary, curves
