"""Model utility metrics on host arrays: accuracy, AUROC per label, macro AUROC, per subgroup.

The one AUROC implementation of medleak (`auroc_per_column`; `auroc`, `macro_auroc` build on it):
the audit (`privacy_utils`) and the TorchXRayVision scripts use it too, so this module stays
numpy/scipy only (no jax).

`classification_metrics` takes float logits (n, C) and float 0/1 labels (n, C) (one-hot for
multi-class). Undefined values (a label with a single class present, an empty subgroup) are `None`
in the returned dicts so they serialise to JSON `null`.
"""

import numpy as np
import scipy.special
import scipy.stats

from medleak.data_utils.records import TASKS
from medleak.errors import MedleakError


def auroc_per_column(scores, positives) -> np.ndarray:
    """(C,) AUROC of each column of `scores` (n, C) against 0/1 `positives` (n, C), ties one half;
    NaN for a column with a single class present.

    The Mann–Whitney U statistic from average ranks, vectorised over columns.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise MedleakError(f"scores {scores.shape} and positives {positives.shape} must both be (n, n_columns)")
    n_pos = positives.sum(axis=0)
    n_neg = len(positives) - n_pos
    out = np.full(scores.shape[1], np.nan)
    usable = (n_pos > 0) & (n_neg > 0)
    if usable.any():
        ranks = scipy.stats.rankdata(scores[:, usable], axis=0)
        rank_sum = (ranks * positives[:, usable]).sum(axis=0)
        n_pos, n_neg = n_pos[usable], n_neg[usable]
        out[usable] = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


def auroc(scores, positives) -> float:
    """Area under the ROC curve of 1-D `scores` (ties count one half); NaN when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    return float(auroc_per_column(scores, np.asarray(positives, dtype=bool).reshape(-1, 1))[0])


def macro_auroc(scores, positives) -> float:
    """Mean AUROC over the columns that have both classes present (NaN if none)."""
    per_column = auroc_per_column(scores, positives)
    defined = per_column[np.isfinite(per_column)]
    return float(defined.mean()) if defined.size else float("nan")


def label_scores(logits, task: str) -> np.ndarray:
    """Per-label scores for AUROC: softmax probabilities (multi-class: a logit alone does not rank
    classes) or the logits themselves (multi-label: the sigmoid ranks the same and would saturate)."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == "multiclass":
        return scipy.special.softmax(logits, axis=1)
    return logits


def accuracy(logits, labels, task: str) -> float:
    """Multi-class: top-1 accuracy. Multi-label: share of (record, label) pairs right at logit 0."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if len(logits) == 0:
        return float("nan")
    if task == "multiclass":
        return float(np.mean(logits.argmax(axis=1) == labels.argmax(axis=1)))
    return float(np.mean((logits > 0) == (labels > 0.5)))


def per_label_auroc(logits, labels, task: str) -> np.ndarray:
    """(C,) AUROC of each label against the rest (NaN where a label has a single class present)."""
    return auroc_per_column(label_scores(logits, task), np.asarray(labels) > 0.5)


def _none_if_nan(value: float):
    return None if value is None or not np.isfinite(value) else float(value)


def _summary(logits, labels, task: str) -> dict:
    per_label = per_label_auroc(logits, labels, task)
    defined = per_label[np.isfinite(per_label)]
    return {
        "n": int(len(logits)),
        "accuracy": _none_if_nan(accuracy(logits, labels, task)),
        "macro_auroc": _none_if_nan(defined.mean()) if defined.size else None,
        "auroc_per_label": [_none_if_nan(v) for v in per_label],
    }


def classification_metrics(logits, labels, task: str, subgroups: dict | None = None) -> dict:
    """Accuracy, macro AUROC (labels with one class present skipped) and AUROC per label, overall
    and for each value of each subgroup: `subgroups` maps a name to an (n,) array of group labels.

    Returns {"n", "accuracy", "macro_auroc", "auroc_per_label",
             "subgroups": {name: {value: {"n", "accuracy", "macro_auroc", "auroc_per_label"}}}}.
    """
    if task not in TASKS:
        raise MedleakError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if logits.shape != labels.shape or logits.ndim != 2:
        raise MedleakError(f"logits {logits.shape} and labels {labels.shape} must both be (n_records, n_classes)")
    result = _summary(logits, labels, task)
    result["subgroups"] = {}
    for name, groups in (subgroups or {}).items():
        groups = np.asarray(groups).astype(str)  # pandas object columns, ints and strings alike
        if groups.shape != (len(logits),):
            raise MedleakError(f"subgroup column {name!r} has {groups.size} values for {len(logits)} "
                               f"records: pass one value per test record")
        result["subgroups"][name] = {
            str(value): _summary(logits[groups == value], labels[groups == value], task)
            for value in np.unique(groups)
        }
    return result
