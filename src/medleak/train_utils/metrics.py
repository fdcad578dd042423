"""Model utility metrics on host arrays: accuracy, AUROC per label, macro AUROC, per subgroup.

All functions take float logits (n, C) and float 0/1 labels (n, C) (one-hot for multi-class).
Undefined values (a label with a single class present, an empty subgroup) are `None` in the
returned dicts so they serialise to JSON `null`.
"""

import numpy as np
import scipy.special
import scipy.stats

from medleak.errors import MedleakError

TASKS = ("multiclass", "multilabel")


def auroc(scores, positives) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present.

    Computed as the Mann-Whitney U statistic from average ranks.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)
    u_statistic = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def label_scores(logits, task: str) -> np.ndarray:
    """Per-label scores for AUROC: softmax probabilities (multi-class) or sigmoid (multi-label)."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == "multiclass":
        return scipy.special.softmax(logits, axis=1)
    return scipy.special.expit(logits)


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
    scores = label_scores(logits, task)
    labels = np.asarray(labels) > 0.5
    return np.array([auroc(scores[:, c], labels[:, c]) for c in range(labels.shape[1])])


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
