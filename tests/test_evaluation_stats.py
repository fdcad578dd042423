"""Evaluation statistics (src/medleak/evaluation): against slow loops, planted and null data."""

import numpy as np
import pytest
import scipy.stats

from medleak.data_utils import chestxray14, chexpert
from medleak.errors import MedleakError
from medleak.data_utils import label_maps as transfer
from medleak.evaluation import stats


def slow_auroc(scores, positives):
    """Share of (positive, negative) pairs ranked right, ties one half: the definition, O(n^2)."""
    pos = [s for s, y in zip(scores, positives) if y]
    neg = [s for s, y in zip(scores, positives) if not y]
    if not pos or not neg:
        return float("nan")
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))


# --- resampling ---------------------------------------------------------------------------------

def test_patient_resamples_take_whole_patients_as_a_slow_loop_does():
    patients = np.array(["c", "a", "b", "a", "c", "c", "d"])
    fast = list(stats.resample_indices(len(patients), patients, n_resamples=20, seed=3))
    rng = np.random.default_rng(3)
    unique = sorted(set(patients))
    for idx in fast:
        drawn = rng.integers(0, len(unique), len(unique))
        slow = [i for p in drawn for i in range(len(patients)) if patients[i] == unique[p]]
        assert list(idx) == slow
    # Records: n draws with replacement, seeded.
    a = list(stats.resample_indices(5, None, 3, seed=1))
    assert all(len(idx) == 5 for idx in a) and all((x == y).all() for x, y in zip(a, stats.resample_indices(5, None, 3, 1)))


# --- bootstrap CI coverage ----------------------------------------------------------------------

def binormal(rng, n_pos, n_neg, separation):
    scores = np.concatenate([rng.normal(separation, 1, n_pos), rng.normal(0, 1, n_neg)])
    return scores, np.concatenate([np.ones(n_pos), np.zeros(n_neg)])


def test_bootstrap_ci_covers_the_known_auroc_at_95_percent():
    """Binormal scores, AUROC = Phi(d / sqrt 2): the 95 % CI covers it in >= 90 % of 200 simulations,
    and the point estimate matches the slow definition."""
    rng = np.random.default_rng(0)
    separation = 1.0
    truth = scipy.stats.norm.cdf(separation / np.sqrt(2))
    covered = []
    for sim in range(200):
        scores, labels = binormal(rng, 60, 90, separation)
        ci = stats.auroc_ci(scores, labels, n_resamples=200, seed=sim)["per_label"][0]
        if sim < 3:
            assert ci["auroc"] == pytest.approx(slow_auroc(scores, labels), abs=1e-12)
        covered.append(ci["low"] <= truth <= ci["high"])
    assert 0.90 <= np.mean(covered) <= 0.99


def test_patient_resampling_covers_clustered_data_where_record_resampling_does_not():
    """Four images per patient sharing the patient's score offset: image AUROC (between patients) is
    Phi(d / sqrt(2 (1 + s^2))); resampling records ignores the clustering and under-covers."""
    rng = np.random.default_rng(1)
    separation, noise = 1.0, 0.3
    truth = scipy.stats.norm.cdf(separation / np.sqrt(2 * (1 + noise ** 2)))
    patient_ids = np.repeat(np.arange(60), 4)
    by_patients, by_records = [], []
    for sim in range(80):
        patient_labels = (np.arange(60) < 25).astype(float)
        offsets = rng.normal(separation * patient_labels, 1.0)
        scores = np.repeat(offsets, 4) + rng.normal(0, noise, 240)
        labels = np.repeat(patient_labels, 4)
        for ids, out in ((patient_ids, by_patients), (None, by_records)):
            ci = stats.auroc_ci(scores, labels, ids, n_resamples=150, seed=sim)["per_label"][0]
            out.append(ci["low"] <= truth <= ci["high"])
    assert np.mean(by_patients) >= 0.88
    assert np.mean(by_records) < np.mean(by_patients) - 0.15


def test_labels_with_one_class_in_a_resample_are_left_out_and_macro_is_the_mean():
    scores = np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.4], [0.1, 0.3]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 1]])
    result = stats.auroc_ci(scores, labels, n_resamples=200, seed=0)
    assert result["per_label"][0]["auroc"] == 1.0 and result["per_label"][1]["auroc"] == pytest.approx(slow_auroc(
        scores[:, 1], labels[:, 1]))
    assert result["per_label"][1]["n_defined"] < 200  # the single positive is often not drawn
    assert result["macro"]["auroc"] == pytest.approx(np.mean([1.0, result["per_label"][1]["auroc"]]))
    none = stats.auroc_ci(scores[:, :1], np.zeros((4, 1)), n_resamples=5)
    assert none["per_label"][0] == {"auroc": None, "low": None, "high": None, "n_defined": 0}


# --- paired p-value -----------------------------------------------------------------------------

def slow_paired_p(scores_a, scores_b, labels, n_resamples, seed):
    rng = np.random.default_rng(seed)
    n = len(labels)
    observed = slow_auroc(scores_a, labels) - slow_auroc(scores_b, labels)
    differences = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        a, b = slow_auroc(scores_a[idx], labels[idx]), slow_auroc(scores_b[idx], labels[idx])
        if np.isfinite(a) and np.isfinite(b):
            differences.append(a - b)
    extreme = sum(abs(d - observed) >= abs(observed) - 1e-12 for d in differences)
    return observed, (1 + extreme) / (1 + len(differences))


def test_paired_p_value_matches_a_slow_hand_computation():
    rng = np.random.default_rng(2)
    scores, labels = binormal(rng, 15, 20, 1.0)
    other = scores + rng.normal(0, 1.0, len(scores))
    result = stats.paired_auroc_test(scores, other, labels, n_resamples=150, seed=7)["per_label"][0]
    difference, p_value = slow_paired_p(scores, other, labels, 150, 7)
    assert result["difference"] == pytest.approx(difference, abs=1e-12)
    assert result["p_value"] == pytest.approx(p_value, abs=1e-12)


def test_paired_p_value_planted_difference_is_small_and_null_is_not():
    rng = np.random.default_rng(3)
    scores, labels = binormal(rng, 150, 150, 1.5)
    useless = rng.normal(0, 1, 300)
    assert stats.paired_auroc_test(scores, useless, labels, n_resamples=300)["macro"]["p_value"] < 0.01
    # Two equally good models (independent noise on the same signal): p-values spread over (0, 1].
    p_values = []
    for sim in range(40):
        signal, null_labels = binormal(rng, 40, 40, 1.0)
        a, b = signal + rng.normal(0, 1, 80), signal + rng.normal(0, 1, 80)
        p_values.append(stats.paired_auroc_test(a, b, null_labels, n_resamples=100, seed=sim)["macro"]["p_value"])
    assert np.mean(np.array(p_values) < 0.05) <= 0.15 and np.median(p_values) > 0.3
    same = stats.paired_auroc_test(scores, scores, labels, n_resamples=50)["per_label"][0]
    assert same == {"difference": 0.0, "p_value": 1.0}


# --- thresholds ---------------------------------------------------------------------------------

def slow_youden(scores, positives):
    best, best_threshold = -np.inf, None
    for t in sorted(set(scores), reverse=True):
        tp = sum(s >= t and y for s, y in zip(scores, positives))
        tn = sum(s < t and not y for s, y in zip(scores, positives))
        j = tp / sum(positives) + tn / (len(positives) - sum(positives)) - 1
        if j > best + 1e-12:
            best, best_threshold = j, t
    return best_threshold


def test_youden_and_target_sensitivity_thresholds_against_slow_loops():
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=(80, 3)), 1)  # ties
    labels = (rng.random((80, 3)) < 0.4).astype(float)
    scores[labels == 1] += 1.0
    thresholds = stats.choose_thresholds(scores, labels)
    for c in range(3):
        assert thresholds[c] == slow_youden(list(scores[:, c]), list(labels[:, c] == 1))
    sensitive = stats.choose_thresholds(scores, labels, "sensitivity", 0.8)
    for c in range(3):
        pos = scores[labels[:, c] == 1, c]
        slow = max(t for t in set(scores[:, c]) if np.mean(pos >= t) >= 0.8)
        assert sensitive[c] == slow
    metrics = stats.threshold_metrics(scores, labels, thresholds)
    for c in range(3):
        predicted = scores[:, c] >= thresholds[c]
        truth = labels[:, c] == 1
        assert metrics["accuracy"][c] == pytest.approx(np.mean(predicted == truth))
        assert metrics["sensitivity"][c] == pytest.approx(predicted[truth].mean())
        assert metrics["specificity"][c] == pytest.approx((~predicted[~truth]).mean())
    with pytest.raises(MedleakError, match="--threshold_rule"):
        stats.choose_thresholds(scores, labels, "test_optimal")


def test_thresholds_come_from_validation_never_from_test():
    """Validation and test differ in where the classes separate: the evaluation's thresholds are the
    validation's Youden thresholds whatever the test predictions are."""
    rng = np.random.default_rng(5)
    val_scores, val_labels = binormal(rng, 50, 50, 2.0)
    test_scores, test_labels = binormal(rng, 50, 50, 2.0)
    test_scores = test_scores + 5.0  # shifted: the test-optimal threshold is ~5 higher
    expected = stats.choose_thresholds(val_scores, val_labels)
    result = stats.evaluate_predictions(test_scores, test_labels, val_scores, val_labels, ["x"], n_resamples=20)
    assert result["thresholds"] == [pytest.approx(expected[0])]
    assert expected[0] != pytest.approx(stats.choose_thresholds(test_scores, test_labels)[0], abs=1.0)
    again = stats.evaluate_predictions(test_scores * 3, test_labels[::-1], val_scores, val_labels, ["x"], n_resamples=20)
    assert again["thresholds"] == result["thresholds"]
    assert result["overall"]["specificity"][0] < 0.2  # the shift shows up on test, as it would in deployment


# --- statistical parity -------------------------------------------------------------------------

def test_statistical_parity_against_a_slow_count():
    rng = np.random.default_rng(6)
    n = 1000
    sex = rng.choice(["Female", "Male", "unknown", "F", "M"], n)
    age = rng.choice(["0-19", "20-39", "40-59", "80+", "unknown"], n)
    predicted = rng.random(n) < np.where(np.isin(sex, ["Female", "F"]), 0.6, 0.3)

    def rate(members):
        chosen = [p for p, m in zip(predicted, members) if m]
        return sum(chosen) / len(chosen)

    female = rate([s in ("Female", "F") for s in sex])
    male = rate([s in ("Male", "M") for s in sex])
    assert stats.statistical_parity(predicted, sex, "sex") == {"female-male": pytest.approx(female - male)}
    assert female - male > 0.2  # planted
    by_age = stats.statistical_parity(predicted, age, "age")
    assert set(by_age) == {"0-19", "20-39", "40-59", "80+"}
    for band, value in by_age.items():
        rest = rate([a != band and a != "unknown" for a in age])
        assert value == pytest.approx(rate([a == band for a in age]) - rest)
    # Null: predictions independent of sex give a difference near 0.
    null = stats.statistical_parity(rng.random(20000) < 0.4, rng.choice(["F", "M"], 20000), "sex")["female-male"]
    assert abs(null) < 0.03
    with pytest.raises(MedleakError, match="'race'"):
        stats.statistical_parity(predicted, sex, "race")


def test_evaluate_predictions_per_subgroup_and_paired_test():
    rng = np.random.default_rng(7)
    n = 120
    scores, labels = binormal(rng, 60, 60, 1.0)
    scores2 = np.column_stack([scores, rng.normal(size=n)])
    labels2 = np.column_stack([labels, rng.random(n) < 0.5])
    sex = rng.choice(["Female", "Male"], n)
    age = rng.choice(["20-39", "40-59"], n)
    patients = np.repeat(np.arange(n // 2), 2)
    result = stats.evaluate_predictions(scores2, labels2, scores2, labels2, ["a", "b"],
                                        {"sex": sex, "age_group": age}, patients, other_scores=scores2[:, ::-1],
                                        n_resamples=50, seed=1)
    assert result["resampled"] == "patients" and result["overall"]["n"] == n
    female = sex == "Female"
    assert result["subgroups"]["sex"]["Female"]["n"] == female.sum()
    assert result["subgroups"]["sex"]["Female"]["auroc"]["per_label"][0]["auroc"] == pytest.approx(
        slow_auroc(scores[female], labels[female]))
    predicted = scores2 >= np.array(result["thresholds"])
    assert result["statistical_parity"]["sex"][1]["female-male"] == pytest.approx(
        predicted[female, 1].mean() - predicted[~female, 1].mean())
    assert result["paired_test"]["per_label"][0]["difference"] == pytest.approx(
        slow_auroc(scores, labels) - slow_auroc(scores2[:, 1], labels))


# --- label mapping ------------------------------------------------------------------------------

def test_shared_labels_across_datasets():
    chexpert_mimic = transfer.shared_labels(chexpert.FINDINGS, chexpert.FINDINGS)
    assert [(i, j) for i, j, _ in chexpert_mimic] == [(i, i) for i in range(14)]
    nih_labels, nih_names = transfer.transfer_labels("chestxray14", np.zeros((1, 14)), chestxray14.FINDINGS)
    pairs = transfer.shared_labels(chexpert.FINDINGS, nih_names)
    assert {name for _, _, name in pairs} == {"No Finding", "Cardiomegaly", "Edema", "Consolidation", "Pneumonia",
                                             "Atelectasis", "Pneumothorax", "Pleural Effusion"}
    for i, j, name in pairs:
        assert transfer.canonical_label(chexpert.FINDINGS[i]) == transfer.canonical_label(nih_names[j]) == name
    assert nih_names[dict((n, j) for _, j, n in pairs)["Pleural Effusion"]] == "Effusion"
    # NIH model evaluated on CheXpert: the model's order, its own indices.
    reverse = transfer.shared_labels(chestxray14.FINDINGS, chexpert.FINDINGS, only=transfer.PRIVACYDOMAIN_LABELS)
    assert [(chestxray14.FINDINGS[i], chexpert.FINDINGS[j]) for i, j, _ in reverse] == [
        ("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"), ("Effusion", "Pleural Effusion"),
        ("Pneumonia", "Pneumonia")]


def test_no_shared_label_names_both_sets_in_one_line():
    with pytest.raises(MedleakError) as info:
        transfer.shared_labels(("benign", "malignant"), chestxray14.FINDINGS)
    message = str(info.value)
    assert "\n" not in message and "'benign'" in message and "'Hernia'" in message


def test_derived_no_finding_is_one_exactly_where_no_finding_is_positive():
    labels = np.zeros((3, 14), np.float32)
    labels[1, 4] = labels[2, 0] = labels[2, 13] = 1
    derived, names = transfer.transfer_labels("chestxray14", labels, chestxray14.FINDINGS)
    assert names[-1] == "No Finding" and list(derived[:, -1]) == [1, 0, 0]
    same, same_names = transfer.transfer_labels("chexpert", labels, chexpert.FINDINGS)
    assert same_names == chexpert.FINDINGS and same.shape == (3, 14)
