"""xrv_attack's stage on synthetic audit logdirs with a known answer (no torch needed).

"chexpert": the target model is more confident than the reference on its members' labels (leaks);
"mimic": the target is the reference plus noise (no leak). Scores are checked against plain loops
over the raw logits.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import special
from sklearn import metrics

from medleak.data_utils.records import RecordsTable
from medleak.errors import MedleakError
from medleak.xrv import attack
from medleak.xrv import logdir as logdir_format

LABELS = ("Atelectasis", "Edema", "Pleural Effusion", "Fracture")
N_PATIENTS = 150


def synthetic_audit(root, dataset, leak, seed):
    """Writes an audit logdir: 2 images per patient, the first half of the patients are members."""
    rng = np.random.default_rng(seed)
    n = 2 * N_PATIENTS
    patient = np.repeat([f"p{i:04d}" for i in range(N_PATIENTS)], 2)
    members = np.repeat(np.arange(N_PATIENTS) < N_PATIENTS // 2, 2)
    labels = rng.integers(0, 2, (n, len(LABELS))).astype(float)
    df = pd.DataFrame({"record_id": [f"{dataset}-{i}" for i in range(n)], "patient_id": patient,
                       "path": [f"img/{i}.jpg" for i in range(n)], "split": "train",
                       "sex": np.where(np.arange(n) % 3 == 0, "F", "M"),
                       "view": np.where(np.arange(n) % 2 == 0, "PA", "AP")})
    for j, name in enumerate(LABELS):
        df[name] = labels[:, j]
    sample = RecordsTable(dataset, df, LABELS, "multilabel", ("sex", "view"))
    sign = 2 * labels - 1
    reference = sign * rng.normal(1.0, 0.7, (n, len(LABELS))) + rng.normal(0, 0.5, (n, len(LABELS)))
    target = reference + rng.normal(0, 0.3, (n, len(LABELS))) + leak * members[:, None] * sign
    models = [{"name": "target-model", "role": "target"}, {"name": "reference-model", "role": "reference"}]
    document = logdir_format.plan_document(dataset, sample, sample, members, models, LABELS)
    logits = {"target-model": target.astype(np.float32), "reference-model": reference.astype(np.float32)}
    logdir_format.write_logdir(root / dataset, document, sample, members, logits,
                               {m["name"]: {"model": m["name"]} for m in models})
    return dict(labels=labels, members=members, target=logits["target-model"], reference=logits["reference-model"],
                patient=patient, sex=df["sex"].to_numpy())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrv_attack")
    truth = {"chexpert": synthetic_audit(root / "logs", "chexpert", leak=1.5, seed=0),
             "mimic": synthetic_audit(root / "logs", "mimic", leak=0.0, seed=1)}
    summary = attack.run(root / "logs", ["chexpert", "mimic"], root / "figs")
    return dict(root=root, truth=truth, summary=summary, figs=root / "figs")


def log_p_correct(logits, labels):
    """log Π_c σ(±z_c), record by record."""
    out = np.empty(len(logits))
    for i in range(len(logits)):
        out[i] = sum(np.log(special.expit(z if y else -z)) for z, y in zip(logits[i].astype(np.float64), labels[i]))
    return out


def test_known_answer_leaky_target_found_clean_target_not(outputs):
    leaky, clean = outputs["summary"]["chexpert"], outputs["summary"]["mimic"]
    for kind in attack.ATTACKS:
        assert leaky[kind]["auc"]["mean"] > 0.9, kind
        assert abs(clean[kind]["auc"]["mean"] - 0.5) < 0.1, kind
    assert leaky["rmia"]["tpr_at_1%_fpr"]["mean"] > 0.1


def test_rmia_scores_equal_a_loop_over_the_population(outputs):
    truth, a = outputs["truth"]["chexpert"], outputs["summary"]["chexpert"]["rmia_a"]
    p_target = np.exp(log_p_correct(truth["target"], truth["labels"]))
    p_reference = np.exp(log_p_correct(truth["reference"], truth["labels"]))
    ratio = p_target / (0.5 * ((1 + a) * p_reference + (1 - a)))
    expected = np.array([np.mean([ratio[x] / ratio[z] > 1.0 for z in range(len(ratio))]) for x in range(len(ratio))])
    records = pd.read_csv(outputs["figs"] / "chexpert_record_risk.csv")
    order = records["record_id"].str.split("-").str[1].astype(int).to_numpy()
    np.testing.assert_allclose(records["rmia_score"].to_numpy(), expected[order], atol=1e-9)


def test_lira_with_one_reference_ranks_by_the_score_difference(outputs):
    truth = outputs["truth"]["chexpert"]

    def lira_score(logits):
        log_p = log_p_correct(logits, truth["labels"])
        return log_p - np.log(-np.expm1(log_p))

    difference = lira_score(truth["target"]) - lira_score(truth["reference"])
    records = pd.read_csv(outputs["figs"] / "chexpert_record_risk.csv")
    order = records["record_id"].str.split("-").str[1].astype(int).to_numpy()
    assert np.corrcoef(pd.Series(records["lira_score"]).rank(), pd.Series(difference[order]).rank())[0, 1] > 0.9999
    auc = metrics.roc_auc_score(truth["members"], difference)
    assert outputs["summary"]["chexpert"]["lira"]["auc"]["mean"] == pytest.approx(auc, abs=1e-9)


def test_risk_tables_equal_loops(outputs):
    truth = outputs["truth"]["chexpert"]
    records = pd.read_csv(outputs["figs"] / "chexpert_record_risk.csv")
    scores, members = records["rmia_score"].to_numpy(), records["member"].to_numpy()
    order = records["record_id"].str.split("-").str[1].astype(int).to_numpy()
    assert np.array_equal(members, truth["members"][order])
    assert np.array_equal(records["patient_id"].to_numpy(), truth["patient"][order])
    for i in range(0, len(records), 37):
        expected = np.mean(scores[~members] >= scores[i])
        assert records["rmia_detection_fpr"][i] == pytest.approx(expected)
    patients = pd.read_csv(outputs["figs"] / "chexpert_patient_risk.csv")
    assert len(patients) == N_PATIENTS and patients["member"].sum() == N_PATIENTS // 2
    for _, row in patients.iloc[::17].iterrows():
        mine = records[records["patient_id"] == row["patient_id"]]
        assert row["rmia_max"] == pytest.approx(mine["rmia_score"].max())
        assert row["rmia_mean"] == pytest.approx(mine["rmia_score"].mean())
        assert row["member"] == bool(mine["member"].iloc[0])
    subgroup = pd.read_csv(outputs["figs"] / "chexpert_subgroup_attack.csv")
    women = subgroup[(subgroup["attribute"] == "sex") & (subgroup["category"] == "F")].iloc[0]
    selected = records["sex"] == "F"
    assert women["rmia_auc"] == pytest.approx(metrics.roc_auc_score(members[selected], scores[selected]))
    assert women["n_members"] == int((members & selected).sum())
    composition = pd.read_csv(outputs["figs"] / "chexpert_top_composition.csv")
    sex = composition[composition["attribute"] == "sex"]
    assert sex["n_population"].sum() == N_PATIENTS // 2  # member patients only
    assert sex["n_top"].sum() == max(1, int(np.ceil(0.01 * N_PATIENTS // 2)))


def test_figures_and_a_tuned_on_the_other_target(outputs):
    for name in ("roc.png", "roc.pdf", "attack_summary.csv", "summary.json"):
        assert (outputs["figs"] / name).is_file()
    assert (outputs["figs"] / "chexpert_composition_sex.png").is_file()
    page = (outputs["figs"] / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "target-model" in page and "offline RMIA" in page
    assert "target-model (mimic records)" in outputs["summary"]["chexpert"]["rmia_a_chosen"]
    table = pd.read_csv(outputs["figs"] / "attack_summary.csv")
    assert len(table) == 4 and set(table["attack"]) == {"offline RMIA", "offline LIRA"}


def test_a_given_or_one_dataset(outputs):
    root = outputs["root"]
    audits = {d: attack.XrvAudit(root / "logs" / d) for d in ("chexpert", "mimic")}
    with pytest.raises(MedleakError, match="--a"):
        attack.choose_a({"chexpert": audits["chexpert"]})
    assert attack.choose_a(audits, "0.3") == {"chexpert": (0.3, "given (--a)"), "mimic": (0.3, "given (--a)")}
    for bad in ("1.5", "high"):
        with pytest.raises(MedleakError, match="--a"):
            attack.choose_a(audits, bad)
    tuned = attack.choose_a(audits)
    assert tuned["chexpert"][0] == attack.tune_a(audits["mimic"])[0]
    assert tuned["mimic"][0] == attack.tune_a(audits["chexpert"])[0]
    with pytest.raises(MedleakError, match="xrv_scores.py"):
        attack.run(root / "logs", ["embed"], root / "figs-one", a="0.3")
