"""Who is at risk: subgroup and disease composition of the most vulnerable patients, and utility.

Patient attributes come from their records: a subgroup column takes the patient's most frequent
value (ties: first seen); a label is "positive" if any of the patient's records has it (multi-label)
or the most frequent class (multi-class). The top `top_share` (1 %) of patients by risk are compared
with the whole population per attribute: observed counts O vs expected E = n_top · population share,
Pearson residuals (O − E)/√E and a χ² goodness-of-fit test.

Utility per subgroup: every run's test AUROC within each subgroup value (macro over labels with both
classes present), mean ± sd over runs — next to the privacy risk of the same group.
"""

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from medleak.train_utils.metrics import label_scores, macro_auroc

TOP_SHARE = 0.01


def _mode_per_patient(patient_ids, values):
    """Most frequent value per patient (ties: the value seen first), vectorised."""
    pairs = pd.DataFrame({"patient_id": patient_ids, "value": values})
    counts = pairs.groupby(["patient_id", "value"], sort=False).size().reset_index(name="n")
    best = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("patient_id")
    return best.set_index("patient_id")["value"]


def patient_attributes(records, patient_order, subgroups, label_names, task):
    """DataFrame indexed like `patient_order` with one column per subgroup and per disease attribute."""
    columns = {}
    patient_ids = records["patient_id"].to_numpy()
    for column in subgroups:
        columns[column] = _mode_per_patient(patient_ids, records[column].astype(str).to_numpy())
    if task == "multiclass":
        label_index = records[label_names].to_numpy().argmax(axis=1)
        columns["label"] = _mode_per_patient(patient_ids, np.asarray(label_names, dtype=object)[label_index])
    else:
        positive_any = (records[label_names] > 0).groupby(records["patient_id"], sort=False).any()
        for name in label_names:
            columns[f"label: {name}"] = positive_any[name].map({True: "positive", False: "negative"})
    return pd.DataFrame(columns).reindex(pd.Index(patient_order, name="patient_id"))


def record_label_text(records, label_names, task):
    """One string per record: the class name (multi-class) or '|'-joined positive labels / 'none'."""
    labels = records[label_names].to_numpy() > 0
    names = np.asarray(label_names, dtype=object)
    if task == "multiclass":
        return names[labels.argmax(axis=1)]
    return np.array(["|".join(names[row]) if row.any() else "none" for row in labels], dtype=object)


def n_top(n_patients, top_share=TOP_SHARE):
    return max(1, int(math.ceil(top_share * n_patients)))


def composition(attributes, risk, top_share=TOP_SHARE):
    """Composition of the top `top_share` patients by `risk` vs the population, per attribute.

    attributes: DataFrame (patients × attributes); risk: (n_patients,) aligned with it.
    Returns (table, tests): table rows attribute, category, n_population, share_population, n_top,
    share_top, expected_top, pearson_residual; tests {attribute: {chi2, dof, p_value, n_top}}.
    """
    risk = np.asarray(risk, dtype=np.float64)
    k = n_top(len(risk), top_share)
    top = np.zeros(len(risk), dtype=bool)
    top[np.argsort(-risk, kind="stable")[:k]] = True
    rows, tests = [], {}
    for attribute in attributes.columns:
        values = attributes[attribute].astype(str).to_numpy()
        categories, population = np.unique(values, return_counts=True)
        observed = np.array([np.sum(top & (values == c)) for c in categories])
        expected = k * population / population.sum()
        residual = (observed - expected) / np.sqrt(expected)
        for c, n_pop, n_obs, e, r in zip(categories, population, observed, expected, residual):
            rows.append(dict(attribute=attribute, category=c, n_population=int(n_pop), share_population=n_pop / len(values),
                             n_top=int(n_obs), share_top=n_obs / k, expected_top=e, pearson_residual=r))
        if len(categories) > 1:
            chi2, p = stats.chisquare(observed, expected)
            tests[attribute] = dict(chi2=float(chi2), dof=int(len(categories) - 1), p_value=float(p), n_top=k)
        else:
            tests[attribute] = dict(chi2=0.0, dof=0, p_value=1.0, n_top=k)
    return pd.DataFrame(rows), tests


def utility_by_subgroup(test_logits, test_labels, test_records, subgroups, task):
    """Test AUROC per subgroup value and run, summarised as mean ± sd over runs.

    test_logits (n_runs, n_test, C). Returns a DataFrame attribute, category, n_test, auroc_mean,
    auroc_sd (attribute 'all' for the whole test set).
    """
    groups = [("all", "all", np.ones(len(test_records), dtype=bool))]
    for column in subgroups:
        values = test_records[column].astype(str).to_numpy()
        for category in np.unique(values):
            groups.append((column, category, values == category))
    rows = []
    for attribute, category, selected in groups:
        per_run = [macro_auroc(label_scores(logits[selected], task), test_labels[selected] > 0) for logits in test_logits]
        per_run = np.array(per_run, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows.append(dict(attribute=attribute, category=category, n_test=int(selected.sum()),
                             auroc_mean=float(np.nanmean(per_run)) if np.isfinite(per_run).any() else float("nan"),
                             auroc_sd=float(np.nanstd(per_run)) if np.isfinite(per_run).any() else float("nan")))
    return pd.DataFrame(rows)


def privacy_by_subgroup(attributes, patient_auc, thresholds=(0.6,)):
    """Per attribute/category: patients, median patient AUC and share above each threshold."""
    rows = []
    patient_auc = np.asarray(patient_auc, dtype=np.float64)
    for attribute in attributes.columns:
        values = attributes[attribute].astype(str).to_numpy()
        for category in np.unique(values):
            selected = patient_auc[values == category]
            row = dict(attribute=attribute, category=category, n_patients=int(selected.size),
                       median_auc=float(np.median(selected)))
            for t in thresholds:
                row[f"share_above_{t:g}"] = float(np.mean(selected > t))
            rows.append(row)
    return pd.DataFrame(rows)
