"""Subgroup statistics of src/medleak/privacy_utils/subgroups.py against slow loops."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics

from medleak.privacy_utils.subgroups import (composition, n_top, patient_attributes, privacy_by_subgroup, record_label_text,
                                         utility_by_subgroup)


def test_composition_matches_loop():
    rng = np.random.default_rng(0)
    n = 400
    attributes = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "race": rng.choice(["a", "b", "c"], n, p=[0.6, 0.3, 0.1])})
    risk = rng.uniform(0.5, 1.0, n) + 0.3 * (attributes["race"] == "c").to_numpy()  # group c is more exposed
    table, tests = composition(attributes, risk, top_share=0.05)
    k = 20
    top = sorted(range(n), key=lambda i: -risk[i])[:k]
    for attribute in ("sex", "race"):
        chi2 = 0.0
        cats = sorted(set(attributes[attribute]))
        for c in cats:
            n_pop = sum(1 for v in attributes[attribute] if v == c)
            observed = sum(1 for i in top if attributes[attribute][i] == c)
            expected = k * n_pop / n
            row = table[(table["attribute"] == attribute) & (table["category"] == c)].iloc[0]
            assert row["n_top"] == observed and row["n_population"] == n_pop
            assert row["pearson_residual"] == pytest.approx((observed - expected) / math.sqrt(expected))
            chi2 += (observed - expected) ** 2 / expected
        assert tests[attribute]["chi2"] == pytest.approx(chi2)
        assert tests[attribute]["p_value"] == pytest.approx(stats.chi2.sf(chi2, len(cats) - 1))
    assert tests["race"]["p_value"] < 1e-3  # the planted group is over-represented
    assert n_top(10, 0.01) == 1 and n_top(1000, 0.01) == 10


def test_patient_attributes_and_label_text():
    records = pd.DataFrame({
        "patient_id": ["a", "a", "a", "b", "c"],
        "view": ["lat", "front", "front", "lat", "front"],
        "x": [1.0, 0.0, 0.0, 0.0, 1.0],
        "y": [0.0, 1.0, 1.0, 1.0, 0.0],
    })
    multi = patient_attributes(records, ["c", "a", "b"], ["view"], ["x", "y"], "multilabel")
    assert list(multi.index) == ["c", "a", "b"]
    assert list(multi["view"]) == ["front", "front", "lat"]  # most frequent value per patient
    assert list(multi["label: x"]) == ["positive", "positive", "negative"]  # any image positive
    single = patient_attributes(records, ["a", "b", "c"], [], ["x", "y"], "multiclass")
    assert list(single["label"]) == ["y", "y", "x"]
    assert list(record_label_text(records, ["x", "y"], "multiclass")) == ["x", "y", "y", "y", "x"]
    both = records.assign(y=[1.0, 1.0, 0.0, 0.0, 0.0])
    assert list(record_label_text(both, ["x", "y"], "multilabel")) == ["x|y", "y", "none", "none", "x"]


def test_privacy_by_subgroup_matches_loop():
    rng = np.random.default_rng(1)
    attributes = pd.DataFrame({"sex": rng.choice(["F", "M"], 50)})
    auc = rng.uniform(0.5, 0.8, 50)
    table = privacy_by_subgroup(attributes, auc)
    for _, row in table.iterrows():
        mine = [a for a, s in zip(auc, attributes["sex"]) if s == row["category"]]
        assert row["n_patients"] == len(mine)
        assert row["median_auc"] == pytest.approx(np.median(mine))
        assert row["share_above_0.6"] == pytest.approx(sum(a > 0.6 for a in mine) / len(mine))


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_utility_by_subgroup_matches_loop(task):
    rng = np.random.default_rng(2)
    n, c, runs = 120, 3, 4
    if task == "multiclass":
        labels = np.eye(c)[rng.integers(0, c, n)]
    else:
        labels = (rng.random((n, c)) < 0.4).astype(float)
    logits = rng.normal(size=(runs, n, c)) + 1.5 * labels
    test_records = pd.DataFrame({"sex": rng.choice(["F", "M"], n)})
    table = utility_by_subgroup(logits, labels, test_records, ["sex"], task)
    for _, row in table.iterrows():
        selected = np.ones(n, bool) if row["attribute"] == "all" else (test_records["sex"] == row["category"]).to_numpy()
        per_run = []
        for r in range(runs):
            scores = logits[r][selected]
            if task == "multiclass":
                scores = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
            per_run.append(np.mean([metrics.roc_auc_score(labels[selected][:, j], scores[:, j]) for j in range(c)]))
        assert row["auroc_mean"] == pytest.approx(np.mean(per_run))
        assert row["auroc_sd"] == pytest.approx(np.std(per_run))
        assert row["n_test"] == selected.sum()
