"""transfer_report: the comparison table reads evaluate.py's JSON files and the audits' summaries."""

import json

import numpy as np
import pytest

from medleak.evaluation.stats import evaluate_predictions
from medleak.evaluation.transfer_report import comparison_table, write_comparison


@pytest.mark.slow
def test_comparison_rows_carry_each_files_auroc_largest_parity_gap_and_attack_risk(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    labels = (rng.random((n, 2)) < 0.4).astype(float)
    sex = rng.choice(["Female", "Male"], n)
    results = {}
    for name, signal in (("record_eps8_mimic", 1.5), ("record_epsinf_mimic", 3.0), ("record_eps8_chexpert", 0.5)):
        scores = labels * signal + rng.normal(size=labels.shape)
        results[name] = evaluate_predictions(scores, labels, scores, labels, ["a", "b"], {"sex": sex},
                                             n_resamples=20)
        results[name]["n_test"] = n
        (tmp_path / f"{name}.json").write_text(json.dumps(results[name]))
    audits = tmp_path / "audits" / "record_eps8"  # as scripts/transfer_all.sh names them
    audits.mkdir(parents=True)
    (audits / "attack_summary.json").write_text(json.dumps(
        {"attacks": {"LiRA online": {"auc": {"mean": 0.55, "sd": 0.01}}, "RMIA online": {"auc": {"mean": 0.61, "sd": 0.02}}},
         "patient_risk": {"mean": 0.52, "n_at_risk": 3},
         "noise_floor": {"strongest_attack": {"max_auc": {"observed": 0.61, "chance_mean": 0.52}},
                         "patients": {"at_risk": {"observed": 0.03, "chance_mean": 0.001}}}}))
    table = comparison_table(tmp_path, tmp_path / "audits", in_domain="mimic")
    assert len(table) == 3
    for row in table.itertuples():
        key = f"record_eps{'inf' if np.isinf(row.epsilon) else f'{row.epsilon:g}'}_{row.dataset}"
        result = results[key]
        assert row.macro_auroc == result["overall"]["auroc"]["macro"]["auroc"]
        gaps = [abs(spd["female-male"]) for spd in result["statistical_parity"]["sex"] if spd["female-male"] is not None]
        assert row.spd_sex_max == max(gaps)
        assert row.domain == ("in" if row.dataset == "mimic" else "out")
        if row.epsilon == 8:
            assert row.attack_auc_best == 0.61 and row.patients_at_risk == 3 and row.attack_auc_chance == 0.52
            assert row.patients_at_risk_share == 0.03 and row.patients_at_risk_chance == 0.001
        else:
            assert row.attack_auc_best is None or np.isnan(row.attack_auc_best)
    page = write_comparison(tmp_path, tmp_path / "out", tmp_path / "audits", "mimic")
    assert page.is_file() and (tmp_path / "out" / "transfer_comparison.csv").is_file()
    assert (tmp_path / "out" / "transfer_utility.png").is_file() and "Comparison" in page.read_text()
