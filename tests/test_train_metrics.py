"""Utility metrics against brute-force loops and scikit-learn."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medleak.errors import MedleakError
from medleak.train_utils import metrics


def pairwise_auroc(scores, positives):
    """Obviously-correct AUROC: the share of (positive, negative) pairs ranked right, ties half."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_loop_and_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, 60).astype(float)  # many ties
        positives = rng.random(60) < 0.4
        assert metrics.auroc(scores, positives) == pytest.approx(pairwise_auroc(scores, positives))
        assert metrics.auroc(scores, positives) == pytest.approx(roc_auc_score(positives, scores))
    assert metrics.auroc([0.1, 0.9], [False, True]) == 1.0
    assert np.isnan(metrics.auroc([0.1, 0.9], [True, True]))


def test_multiclass_metrics_and_subgroups():
    rng = np.random.default_rng(1)
    n, c = 80, 3
    labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    logits = labels * 2 + rng.normal(size=(n, c)).astype(np.float32)
    sex = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
    result = metrics.classification_metrics(logits, labels, "multiclass", {"sex": sex})
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels.argmax(1)))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    per_label = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(c)]
    assert result["auroc_per_label"] == pytest.approx(per_label)
    assert result["macro_auroc"] == pytest.approx(np.mean(per_label))
    for value in ("F", "M"):
        rows = sex == value
        alone = metrics.classification_metrics(logits[rows], labels[rows], "multiclass")
        group = result["subgroups"]["sex"][value]
        assert group["n"] == rows.sum()
        assert group["accuracy"] == pytest.approx(alone["accuracy"])
        assert group["macro_auroc"] == pytest.approx(alone["macro_auroc"])
    json.dumps(result)  # JSON-ready (metrics.json)


def test_multilabel_skips_labels_with_one_class_and_uses_elementwise_accuracy():
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=np.float32)
    logits = np.array([[2, -1, -3], [-1, -2, 1], [0.5, -1, -0.5], [-2, -1, -1]], dtype=np.float32)
    result = metrics.classification_metrics(logits, labels, "multilabel", {"site": np.array([1, 1, 2, 2])})
    assert result["auroc_per_label"][1] is None  # label 1 never positive
    assert result["macro_auroc"] == pytest.approx(np.mean([1.0, roc_auc_score(labels[:, 2], logits[:, 2])]))
    assert result["accuracy"] == pytest.approx(np.mean((logits > 0) == (labels > 0.5)))
    assert set(result["subgroups"]["site"]) == {"1", "2"}
    # Subgroup "2" has label 0 = (1, 0) and label 2 = (1, 0): both defined.
    assert result["subgroups"]["site"]["2"]["macro_auroc"] is not None
    json.dumps(result)


def test_bad_shapes_raise_user_errors():
    with pytest.raises(MedleakError, match="logits"):
        metrics.classification_metrics(np.zeros((3, 2)), np.zeros((3, 3)), "multiclass")
    with pytest.raises(MedleakError, match="subgroup column 'sex'"):
        metrics.classification_metrics(np.zeros((3, 2)), np.zeros((3, 2)), "multiclass", {"sex": ["F", "M"]})
