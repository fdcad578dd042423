"""Evaluation statistics of one model's (or two models') test predictions (docs/TRANSFER.md).

Scores are (n, C) per-label scores (logits for multi-label models: the sigmoid ranks the same;
`train_utils.metrics.label_scores` makes them), labels (n, C) 0/1.

- Bootstrap: `n_resamples` (default 1000) seeded resamples with replacement of the test set; of its
  patients when `patient_ids` are given (a patient's images move together, since they are not
  independent), else of its images. The CI is the percentile interval of the resampled AUROCs;
  resamples in which a label has one class only are left out for that label (`n_defined`).
- Paired p-value (two models, one test set): both are scored on the same resamples; the
  difference d_b = AUROC_A - AUROC_B of each resample is centred on the observed difference d, and
  p = (1 + #{|d_b - d| >= |d|}) / (1 + B) (two-sided; Davison & Hinkley 1997, 4.4).
- Thresholds come from a validation split, never from the test predictions: Youden's J
  (max sensitivity + specificity - 1; the largest such threshold) or the largest threshold that
  reaches a target sensitivity. A record is predicted positive when its score >= the threshold.
- Statistical parity difference: positive-prediction rate of one group minus that of the other:
  female - male (records of unknown sex left out), and each age band - all other known ages.
"""

import numpy as np

from medleak.errors import MedleakError
from medleak.train_utils.metrics import auroc_per_column

N_RESAMPLES = 1000
CI_LEVEL = 0.95
THRESHOLD_RULES = ("youden", "sensitivity")
FEMALE = ("female", "f")
MALE = ("male", "m")
UNKNOWN = "unknown"


def _as_columns(scores, labels):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels.reshape(-1, 1)
    if scores.shape != labels.shape or scores.ndim != 2 or len(scores) == 0:
        raise MedleakError(f"scores {scores.shape} and labels {labels.shape} must both be (n_records, n_labels), n > 0")
    return scores, labels > 0.5


def resample_indices(n_records: int, patient_ids=None, n_resamples: int = N_RESAMPLES, seed: int = 0):
    """Yields `n_resamples` index arrays into the n records: the records of patients drawn with
    replacement (as many draws as patients) when `patient_ids` are given, else records drawn with
    replacement. The same (n, patient_ids, seed) give the same resamples (the paired test relies on it)."""
    if n_resamples < 1:
        raise MedleakError(f"--n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    if patient_ids is None:
        for _ in range(n_resamples):
            yield rng.integers(0, n_records, n_records)
        return
    patient_ids = np.asarray(patient_ids).astype(str)
    if patient_ids.shape != (n_records,):
        raise MedleakError(f"patient_ids has {patient_ids.size} values for {n_records} records")
    _, codes = np.unique(patient_ids, return_inverse=True)
    rows = np.argsort(codes, kind="stable")  # records grouped by patient
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(counts), len(counts))
        lengths = counts[drawn]
        # rows[starts[p] : starts[p] + counts[p]] for every drawn p, concatenated without a loop
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        yield rows[np.repeat(starts[drawn], lengths) + within]


def bootstrap_aurocs(scores, labels, patient_ids=None, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, C) AUROC of each label on each resample (NaN where a resample has one class)."""
    scores, positives = _as_columns(scores, labels)
    return np.stack([auroc_per_column(scores[idx], positives[idx])
                     for idx in resample_indices(len(scores), patient_ids, n_resamples, seed)])


def _macro(per_label: np.ndarray) -> np.ndarray:
    """Mean over the labels defined in each row (NaN where none is)."""
    defined = np.isfinite(per_label)
    total = np.where(defined, per_label, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / defined.sum(axis=-1)


def _interval(values: np.ndarray, level: float) -> dict:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"low": None, "high": None, "n_defined": 0}
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return {"low": float(low), "high": float(high), "n_defined": int(values.size)}


def _number(value):
    return None if value is None or not np.isfinite(value) else float(value)


def auroc_ci(scores, labels, patient_ids=None, n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL,
             seed: int = 0) -> dict:
    """AUROC per label and macro, each with its percentile bootstrap CI:
    {"per_label": [{"auroc", "low", "high", "n_defined"}], "macro": {...}}."""
    if not 0 < level < 1:
        raise MedleakError(f"--ci_level must be in (0, 1), got {level}")
    scores, positives = _as_columns(scores, labels)
    observed = auroc_per_column(scores, positives)
    resampled = bootstrap_aurocs(scores, positives, patient_ids, n_resamples, seed)
    per_label = [{"auroc": _number(observed[c]), **_interval(resampled[:, c], level)}
                 for c in range(scores.shape[1])]
    macro = {"auroc": _number(_macro(observed)), **_interval(_macro(resampled), level)}
    return {"per_label": per_label, "macro": macro}


def paired_auroc_test(scores_a, scores_b, labels, patient_ids=None, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> dict:
    """Two models' predictions on the same test records: AUROC difference (A - B) per label and
    macro with the paired bootstrap p-value (module doc). {"per_label": [{"difference", "p_value"}], "macro": {...}}."""
    scores_a, positives = _as_columns(scores_a, labels)
    scores_b, _ = _as_columns(scores_b, labels)
    if scores_a.shape != scores_b.shape:
        raise MedleakError(f"the two models' scores {scores_a.shape} and {scores_b.shape} must be on the same "
                           "test records and labels")
    observed = auroc_per_column(scores_a, positives) - auroc_per_column(scores_b, positives)
    resampled = (bootstrap_aurocs(scores_a, positives, patient_ids, n_resamples, seed)
                 - bootstrap_aurocs(scores_b, positives, patient_ids, n_resamples, seed))

    def test(difference, differences):
        differences = differences[np.isfinite(differences)]
        if not np.isfinite(difference) or differences.size == 0:
            return {"difference": None, "p_value": None}
        extreme = np.abs(differences - difference) >= abs(difference) - 1e-12
        return {"difference": float(difference), "p_value": float((1 + extreme.sum()) / (1 + differences.size))}

    return {"per_label": [test(observed[c], resampled[:, c]) for c in range(len(observed))],
            "macro": test(_macro(observed), _macro(resampled))}


def choose_thresholds(val_scores, val_labels, rule: str = "youden", target_sensitivity: float = 0.9) -> np.ndarray:
    """(C,) decision threshold per label from VALIDATION predictions (module doc); NaN for a label
    with one class only in the validation split."""
    if rule not in THRESHOLD_RULES:
        raise MedleakError(f"--threshold_rule={rule!r} is not supported: use one of {', '.join(THRESHOLD_RULES)}")
    if rule == "sensitivity" and not 0 < target_sensitivity <= 1:
        raise MedleakError(f"--target_sensitivity must be in (0, 1], got {target_sensitivity}")
    scores, positives = _as_columns(val_scores, val_labels)
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        s, y = scores[:, c], positives[:, c]
        if y.all() or not y.any():
            continue
        candidates = np.unique(s)[::-1]  # descending: predicted positive when score >= candidate
        order = np.sort(s[y])
        sensitivity = (len(order) - np.searchsorted(order, candidates, side="left")) / len(order)
        negatives = np.sort(s[~y])
        false_positive_rate = (len(negatives) - np.searchsorted(negatives, candidates, side="left")) / len(negatives)
        if rule == "youden":
            out[c] = candidates[np.argmax(sensitivity - false_positive_rate)]  # first = largest threshold
        else:
            out[c] = candidates[np.argmax(sensitivity >= target_sensitivity - 1e-12)]
    return out


def threshold_metrics(scores, labels, thresholds) -> dict:
    """Accuracy, sensitivity and specificity per label at given (validation) thresholds:
    {"accuracy": [..], "sensitivity": [..], "specificity": [..]} (None where undefined)."""
    scores, positives = _as_columns(scores, labels)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.shape != (scores.shape[1],):
        raise MedleakError(f"{thresholds.size} thresholds for {scores.shape[1]} labels")
    predicted = scores >= thresholds
    defined = np.isfinite(thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (predicted == positives).mean(axis=0)
        sensitivity = (predicted & positives).sum(axis=0) / positives.sum(axis=0)
        specificity = (~predicted & ~positives).sum(axis=0) / (~positives).sum(axis=0)
    return {name: [_number(v) if ok else None for v, ok in zip(values, defined)]
            for name, values in (("accuracy", accuracy), ("sensitivity", sensitivity), ("specificity", specificity))}


def _rate(predicted, members):
    return float(predicted[members].mean()) if members.any() else float("nan")


def statistical_parity(predicted, groups, kind: str) -> dict:
    """Positive-prediction rate differences of 1-D 0/1 `predicted` between groups:
    kind "sex": {"female-male": rate(female) - rate(male)};
    kind "age": {band: rate(band) - rate(other known bands)} for each band. 'unknown' is left out."""
    predicted = np.asarray(predicted).astype(bool).reshape(-1)
    groups = np.asarray(groups).astype(str)
    if groups.shape != predicted.shape:
        raise MedleakError(f"subgroup column has {groups.size} values for {predicted.size} predictions")
    lower = np.char.lower(np.char.strip(groups))
    if kind == "sex":
        female, male = np.isin(lower, FEMALE), np.isin(lower, MALE)
        return {"female-male": _number(_rate(predicted, female) - _rate(predicted, male))}
    if kind == "age":
        known = lower != UNKNOWN
        return {str(band): _number(_rate(predicted, groups == band) - _rate(predicted, known & (groups != band)))
                for band in np.unique(groups[known])}
    raise MedleakError(f"statistical parity is defined by 'sex' or 'age', not {kind!r}")


def largest_parity_gap(per_label) -> float | None:
    """max |SPD| over the labels and groups of one subgroup kind (`parity_differences` entry), or None."""
    values = [v for spd in per_label for v in spd.values() if v is not None]
    return float(np.max(np.abs(values))) if values else None


def parity_differences(predicted, subgroups: dict) -> dict:
    """SPD per label for the 'sex' and 'age_group' subgroups present in `subgroups`:
    {"sex": [{"female-male": ..}, ...per label], "age_group": [{band: ..}, ...]}."""
    predicted = np.asarray(predicted).astype(bool)
    kinds = {"sex": "sex", "age_group": "age"}
    return {name: [statistical_parity(predicted[:, c], subgroups[name], kind) for c in range(predicted.shape[1])]
            for name, kind in kinds.items() if name in subgroups}


def evaluate_predictions(test_scores, test_labels, val_scores, val_labels, label_names, subgroups=None,
                         patient_ids=None, other_scores=None, n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL,
                         seed: int = 0, threshold_rule: str = "youden", target_sensitivity: float = 0.9) -> dict:
    """Everything docs/TRANSFER.md reports for one test set, JSON-ready: AUROC with bootstrap CIs,
    thresholds from the validation predictions with the test accuracy/sensitivity/specificity at
    them, statistical parity differences, the same per subgroup value, and the paired p-value
    against `other_scores` (a second model on the same test records) when given."""
    test_scores, test_positives = _as_columns(test_scores, test_labels)
    if len(label_names) != test_scores.shape[1]:
        raise MedleakError(f"{len(label_names)} label names for {test_scores.shape[1]} score columns")
    thresholds = choose_thresholds(val_scores, val_labels, threshold_rule, target_sensitivity)
    subgroups = {name: np.asarray(values).astype(str) for name, values in (subgroups or {}).items()}
    patient_ids = None if patient_ids is None else np.asarray(patient_ids).astype(str)

    def summary(rows):
        ids = None if patient_ids is None else patient_ids[rows]
        return {"n": int(rows.sum()),
                "auroc": auroc_ci(test_scores[rows], test_positives[rows], ids, n_resamples, level, seed),
                **threshold_metrics(test_scores[rows], test_positives[rows], thresholds)}

    everyone = np.ones(len(test_scores), dtype=bool)
    result = {"labels": list(label_names), "threshold_rule": threshold_rule,
              "thresholds": [_number(t) for t in thresholds], "n_resamples": n_resamples, "ci_level": level,
              "seed": seed, "resampled": "patients" if patient_ids is not None else "records",
              "overall": summary(everyone),
              "subgroups": {name: {str(value): summary(values == value) for value in np.unique(values)}
                            for name, values in subgroups.items()},
              "statistical_parity": parity_differences(test_scores >= thresholds, subgroups)}
    for per_label in result["statistical_parity"].values():  # no threshold, no predictions to compare
        for c in np.flatnonzero(~np.isfinite(thresholds)):
            per_label[c] = {group: None for group in per_label[c]}
    if other_scores is not None:
        result["paired_test"] = paired_auroc_test(test_scores, other_scores, test_positives, patient_ids,
                                                  n_resamples, seed)
    return result
