"""The audit across privacy budgets (mem_inf_stats.py --logdir=a,b,c) on synthetic campaign logdirs
in the run-directory format whose scores come from a known Gaussian mechanism.

Every record's LiRA score in run r is base + member + σ_r·N(0, 1): one release of a Gaussian
mechanism with sensitivity 1 and noise multiplier σ_r, i.e. DP-SGD with q = 1 and one step, so the
runs' "dp" dicts (σ_r, q = 1, steps = 1, ε from a fresh PLD accountant) are exactly the guarantee
the scores satisfy, and every attack on them must respect it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medleak.dp.accounting import auc_upper_bound_for_training, spent_epsilon
from medleak.errors import MedleakError
from medleak.privacy_utils import budgets, figures
from medleak.privacy_utils.audit import AuditOptions
from tests.campaigns import write_campaign_logdir

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
DELTA = 1e-5
N_RUNS = 16
N_LEAKY = 12_000  # patients of the fixture's non-DP campaign (why so many: `compared`)


def write_gaussian_campaign(logdir, *, sigmas=None, target_epsilon=None, n_patients=120, dataset="synthetic",
                            auroc=(0.8, 0.9), shift=None, seed=0):
    """A campaign logdir whose run r releases base + shift·member + sigmas[r]·noise per record (sigmas=None:
    ordinary training, modelled as a strong leak shift·member + 0.3·noise, shift 3 by default, and no
    "dp" in metrics.json).

    shift = 1 (the DP default) uses the whole sensitivity (the guarantee is tight); shift < 1 leaks less
    than the guarantee allows, as real DP-SGD models do; shift = 0 is a null campaign (no membership
    signal at all). Patients have 1 or 2 records (every third patient has 2). Test utility per run alternates between
    the two `auroc` values; subgroup "sex" gets auroc − 0.1 for F and auroc for M.
    """
    rng = np.random.default_rng(seed)
    patients = [f"p{i:03d}" for i in range(n_patients)]
    rows = [dict(record_id=f"{p}_r{k}", patient_id=p, path=f"{p}_{k}.png", negative=float(i % 2 == 0),
                 positive=float(i % 2 == 1), sex="FM"[i % 2]) for i, p in enumerate(patients) for k in range(1 + (i % 3 == 0))]
    records = pd.DataFrame(rows)
    test = pd.DataFrame([dict(record_id=f"t{j}", patient_id=f"t{j}", path=f"t{j}.png", negative=float(j % 2 == 0),
                              positive=float(j % 2 == 1), sex="FM"[(j // 2) % 2]) for j in range(20)])
    patient_mask = np.argsort(rng.random((N_RUNS, n_patients)), axis=0) < N_RUNS // 2
    plan = {"dataset": dataset, "task": "multiclass", "label_names": LABELS, "subgroups": ["sex"],
            "campaign": {"n_runs": N_RUNS, "subset_ratio": 0.5, "seed": seed}}

    labels = records[LABELS].to_numpy(np.float32)
    label_index = labels.argmax(axis=1)
    patient_index = records["patient_id"].map({p: i for i, p in enumerate(patients)}).to_numpy()
    base = rng.normal(0, 1, len(records))
    test_labels = test[LABELS].to_numpy(np.float32)
    runs = []
    for run in range(N_RUNS):
        member = patient_mask[run][patient_index]
        if sigmas is None:
            z = base + (3.0 if shift is None else shift) * member + 0.3 * rng.normal(size=len(records))
            dp = None
        else:
            z = base + (1.0 if shift is None else shift) * member + sigmas[run] * rng.normal(size=len(records))
            dp = dict(epsilon=spent_epsilon(sigmas[run], 1.0, 1, DELTA), target_epsilon=target_epsilon, delta=DELTA,
                      noise_multiplier=float(sigmas[run]), sampling_rate=1.0, steps=1, accountant="pld", unit="record",
                      clip_norm=1.0, truncation_prob_per_step=0.0)
        # two-class logits (0 for the other class, z for the label): LiRA's score log p − log(1 − p) is z
        logits = np.zeros((len(records), 1, 2), dtype=np.float32)
        logits[np.arange(len(records)), 0, label_index] = z
        value = auroc[run % 2]
        metrics = {"test": {"macro_auroc": value, "accuracy": value - 0.05,
                            "subgroups": {"sex": {"F": {"macro_auroc": value - 0.1}, "M": {"macro_auroc": value}}}},
                   "dp": dp}
        runs.append(dict(train_logits=logits, train_labels=labels, record_mask=member,
                         test_logits=2.0 * test_labels + rng.normal(0, 1, test_labels.shape), test_labels=test_labels,
                         metrics=metrics))
    return write_campaign_logdir(logdir, plan=plan, records=records, test_records=test, patient_ids=patients,
                                 patient_mask=patient_mask, runs=runs)


# σ for ε ≈ 1 and ≈ 4 at δ = 1e-5 (Gaussian mechanism); the ε ≈ 1 runs alternate between two σ
SIGMAS_EPS1 = [3.9 if r % 2 else 3.7 for r in range(N_RUNS)]
SIGMAS_EPS4 = [1.3] * N_RUNS


def run_cli(*flags):
    return subprocess.run([sys.executable, str(ROOT / "mem_inf_stats.py"), *flags], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    base = tmp_path_factory.mktemp("budgets")
    # the leaky campaign is large: at its δ (default_delta of 12,000 patients, 8e-6) the one-run audit's
    # 2mδ term caps what m canaries per target can prove (ε ≈ 1.1 at 5,000, 2.2 at 12,000 perfectly
    # separated patients), and the check below asks for ε > 2
    logdirs = [write_gaussian_campaign(base / "dp_epsinf" / "synthetic", seed=3, auroc=(0.9, 0.92), n_patients=N_LEAKY),
               write_gaussian_campaign(base / "dp_eps1" / "synthetic", sigmas=SIGMAS_EPS1, target_epsilon=1.0, seed=1, auroc=(0.6, 0.7)),
               write_gaussian_campaign(base / "dp_eps4" / "synthetic", sigmas=SIGMAS_EPS4, target_epsilon=4.0, seed=2, auroc=(0.8, 0.8),
                                       shift=0.5)]
    out_dir = base / "figs"
    result = run_cli("--logdir=" + ",".join(map(str, logdirs)), f"--out_dir={out_dir}", "--eval_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out_dir / "budgets.csv")
    return out_dir, table.set_index("logdir"), result.stdout


@pytest.mark.slow
def test_each_epsilon_is_picked_up_in_order_with_its_facts(compared):
    _, table, stdout = compared
    assert list(table.index) == ["dp_eps1_synthetic", "dp_eps4_synthetic", "dp_epsinf_synthetic"]
    assert table["target_epsilon"].tolist() == [1.0, 4.0, math.inf]
    assert table.loc["dp_eps1_synthetic", "spent_epsilon"] == pytest.approx(spent_epsilon(3.7, 1.0, 1, DELTA))
    assert table.loc["dp_eps1_synthetic", "spent_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert table.loc["dp_eps1_synthetic", "sigma_min"] == 3.7 and table.loc["dp_eps1_synthetic", "sigma_max"] == 3.9
    assert table["unit"].tolist() == ["record", "record", "none"]
    assert table.loc["dp_eps4_synthetic", "delta"] == DELTA and table.loc["dp_eps4_synthetic", "steps"] == 1
    assert (table["n_runs"] == N_RUNS).all()
    # utility: mean ± sd over runs of the recorded test metrics (runs alternate between two values)
    assert table.loc["dp_eps1_synthetic", "test_auroc_mean"] == pytest.approx(0.65)
    assert table.loc["dp_eps1_synthetic", "test_auroc_sd"] == pytest.approx(0.05)
    assert table.loc["dp_eps1_synthetic", "test_accuracy_mean"] == pytest.approx(0.60)
    assert table.loc["dp_eps4_synthetic", "test_auroc_sd"] == pytest.approx(0.0)
    assert "dp_eps1_synthetic: epsilon 1 (record)" in stdout


@pytest.mark.slow
def test_budgets_csv_columns(compared):
    _, table, _ = compared
    chance = [f"{kind}{stem}{end}" for stem in ("at_risk", "strongest_attack_auc")
              for kind, end in (("", ""), ("chance_", ""), ("chance_", "_lo"), ("chance_", "_hi"), ("excess_", ""),
                                ("excess_", "_lo"), ("excess_", "_hi"))]
    assert list(table.reset_index().columns) == [
        "logdir", "target_epsilon", "spent_epsilon", "delta", "unit", "sigma_min", "sigma_max", "q", "steps", "n_runs",
        "test_auroc_mean", "test_auroc_sd", "test_accuracy_mean", "test_accuracy_sd", "auc_bound",
        "share_records_above_bound", "share_records_above_bound_2se", "share_patients_above_bound", "max_record_auc",
        "max_patient_auc", "empirical_epsilon_lb", "theoretical_epsilon", "n_trials", "attack", *chance, "note"]
    assert table["note"].str.contains("one-run audit").all()
    # trials are units: record-level DP keeps the 80 single-image patients of 120, no DP all patients; × 4 targets
    assert table["n_trials"].tolist() == [320, 320, 4 * N_LEAKY]
    # the chance level of each headline: observed = chance mean + excess, inside the interval bounds
    for stem in ("at_risk", "strongest_attack_auc"):
        assert np.allclose(table[stem], table[f"chance_{stem}"] + table[f"excess_{stem}"])
        assert (table[f"chance_{stem}_lo"] <= table[f"chance_{stem}"] + 1e-12).all()
        assert (table[f"chance_{stem}"] <= table[f"chance_{stem}_hi"] + 1e-12).all()
    leaky = table.loc["dp_epsinf_synthetic"]
    assert leaky["excess_at_risk_lo"] > 0.5 and leaky["excess_strongest_attack_auc_lo"] > 0.2


@pytest.mark.slow
def test_bound_lines_equal_the_bound_of_the_weakest_run(compared):
    _, table, _ = compared
    eps1 = max(auc_upper_bound_for_training(s, 1.0, 1) for s in set(SIGMAS_EPS1))
    assert table.loc["dp_eps1_synthetic", "auc_bound"] == pytest.approx(eps1, abs=1e-12)
    assert eps1 == pytest.approx(auc_upper_bound_for_training(3.7, 1.0, 1), abs=1e-12)  # smallest σ: weakest run
    assert table.loc["dp_eps4_synthetic", "auc_bound"] == pytest.approx(auc_upper_bound_for_training(1.3, 1.0, 1), abs=1e-12)
    assert table.loc["dp_epsinf_synthetic", "auc_bound"] == 1.0
    # sanity: a whole-profile bound is below the pure-ε bound e^ε/(1+e^ε) of its spent ε
    assert table.loc["dp_eps1_synthetic", "auc_bound"] < math.exp(1.1) / (1 + math.exp(1.1))


@pytest.mark.slow
def test_risk_respects_the_guarantee_and_the_empirical_epsilon_never_exceeds_it(compared):
    _, table, _ = compared
    for name in ("dp_eps1_synthetic", "dp_eps4_synthetic"):
        row = table.loc[name]
        # true per-record AUC Φ(shift/(σ√2)) is at (ε ≈ 1: tight) or below the bound; estimates exceed it
        # only by noise
        assert row["share_records_above_bound_2se"] <= 0.05, name  # a one-sided 2-SE test: ~2 % by chance
        assert 0.0 <= row["empirical_epsilon_lb"] <= row["theoretical_epsilon"], name
    # the leaky non-DP campaign: the attack proves a large epsilon, and records exceed any DP bound
    leaky = table.loc["dp_epsinf_synthetic"]
    assert leaky["empirical_epsilon_lb"] > 2.0 and leaky["max_record_auc"] > 0.9
    assert leaky["share_records_above_bound_2se"] == 0.0  # no bound (1.0) to exceed
    assert leaky["max_record_auc"] > table.loc["dp_eps1_synthetic", "auc_bound"]


@pytest.mark.slow
def test_single_audits_figures_and_report(compared):
    out_dir, table, _ = compared
    for name in table.index:
        assert (out_dir / name / "report.html").is_file() and (out_dir / name / "record_risk.csv").is_file()
    for stem in ("budgets_esf_records", "budgets_esf_patients", "budgets_utility", "budgets_utility_sex"):
        assert (out_dir / f"{stem}.png").stat().st_size > 1000, stem
        assert (out_dir / f"{stem}.pdf").read_bytes()[:4] == b"%PDF", stem
    subgroups = pd.read_csv(out_dir / "budgets_utility_by_subgroup.csv")
    females = subgroups[(subgroups["logdir"] == "dp_eps1_synthetic") & (subgroups["category"] == "F")]
    assert females["auroc_mean"].iloc[0] == pytest.approx(0.55)
    html = (out_dir / "budgets.html").read_text()
    assert html.count('<img class="figure"') == 4 and "group privacy" in html and "patient-level" in html
    summary = json.loads((out_dir / "budgets.json").read_text())
    assert summary["labels"] == list(table.index)


@pytest.mark.slow
def test_null_campaigns_prove_no_epsilon(tmp_path):
    """No membership signal (shift 0) at three "ε" labels: every empirical ε is 0. At δ = 1e-5 and 400
    patients the audit has power (perfectly separated canaries of this size prove ε ≈ 2.3), so a
    shadow statistic that carried the target's coins (issue 11: 0.02–0.21 on null campaigns) would show."""
    logdirs = [write_gaussian_campaign(tmp_path / "dp_epsinf" / "synthetic", shift=0.0, n_patients=400, seed=11),
               write_gaussian_campaign(tmp_path / "dp_eps1" / "synthetic", sigmas=SIGMAS_EPS1, target_epsilon=1.0,
                                       shift=0.0, n_patients=400, seed=12),
               write_gaussian_campaign(tmp_path / "dp_eps4" / "synthetic", sigmas=SIGMAS_EPS4, target_epsilon=4.0,
                                       shift=0.0, n_patients=400, seed=13)]
    budgets.compare_budgets(logdirs, AuditOptions(out_dir=tmp_path / "out", eval_size=4, progress=False))
    table = pd.read_csv(tmp_path / "out" / "budgets.csv").set_index("logdir")
    assert table["empirical_epsilon_lb"].tolist() == [0.0, 0.0, 0.0]
    assert table.loc["dp_eps1_synthetic", "n_trials"] == 4 * sum(i % 3 != 0 for i in range(400))  # single-image patients × targets
    # the headlines sit at their chance level
    assert (table["excess_strongest_attack_auc_lo"] <= 0).all() and (table["excess_strongest_attack_auc_hi"] >= 0).all()


# ---------------------------------------------------------------- pure functions


def test_strongest_attack_scores_are_one_array_per_target():
    rng = np.random.default_rng(0)
    patient_ids = np.array(["a", "b", "b", "c", "d", "e", "e", "f"])
    units = budgets.trial_units(patient_ids, "patient")
    masks = np.array([[1, 0, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 1]], dtype=bool)
    names = [*budgets.LIRA_VARIANTS, "Loss threshold"]
    scores = {name: rng.normal(size=masks.shape) for name in names}
    scores["Loss threshold"] = masks + 0.1 * rng.normal(size=masks.shape)  # the strongest, by far
    best, in_scores, out_scores, n_candidates = budgets.strongest_attack_scores(scores, masks, units)
    assert best == "Loss threshold" and n_candidates == len(names) and len(in_scores) == len(out_scores) == 3
    for target in range(3):  # slow loop: per patient in first-seen order, the mean of its records' scores
        expected_in, expected_out = [], []
        for patient in dict.fromkeys(patient_ids):
            rows = np.flatnonzero(patient_ids == patient)
            (expected_in if masks[target, rows[0]] else expected_out).append(scores[best][target, rows].mean())
        assert np.allclose(in_scores[target], expected_in) and np.allclose(out_scores[target], expected_out)


def test_inclusion_probability_is_k_over_n_runs():
    rng = np.random.default_rng(1)
    exactly_k = np.argsort(rng.random((8, 30)), axis=0) < 4
    assert budgets.inclusion_probability(exactly_k) == 0.5
    assert budgets.inclusion_probability(np.argsort(rng.random((8, 30)), axis=0) < 2) == 0.25
    uneven = exactly_k.copy()
    uneven[0, 0] = ~uneven[0, 0]
    assert math.isnan(budgets.inclusion_probability(uneven))


def test_chance_columns_read_the_noise_floor_and_are_nan_without_one():
    at_risk = dict(observed=0.3, chance_mean=0.01, chance_lo=0.0, chance_hi=0.03, excess=0.29, excess_lo=0.27,
                   excess_hi=0.3, p_value=0.001)
    strongest = dict(observed=0.6, chance_mean=0.5, chance_interval=[0.48, 0.52], excess=0.1, excess_interval=[0.08, 0.12])
    got = budgets.chance_columns({"noise_floor": {"patients": {"at_risk": at_risk}, "strongest_attack": {"max_auc": strongest}}})
    assert got == {"at_risk": 0.3, "chance_at_risk": 0.01, "chance_at_risk_lo": 0.0, "chance_at_risk_hi": 0.03,
                   "excess_at_risk": 0.29, "excess_at_risk_lo": 0.27, "excess_at_risk_hi": 0.3,
                   "strongest_attack_auc": 0.6, "chance_strongest_attack_auc": 0.5, "chance_strongest_attack_auc_lo": 0.48,
                   "chance_strongest_attack_auc_hi": 0.52, "excess_strongest_attack_auc": 0.1,
                   "excess_strongest_attack_auc_lo": 0.08, "excess_strongest_attack_auc_hi": 0.12}
    assert budgets.chance_columns({"noise_floor": {"strongest_attack": strongest}})["chance_strongest_attack_auc"] == 0.5
    missing = budgets.chance_columns({})
    assert list(missing) == list(got) and all(math.isnan(v) for v in missing.values())




def test_group_privacy_and_patient_bounds():
    assert budgets.group_privacy(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = budgets.group_privacy(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.e ** 2 * 1e-5)
    facts = dict(unit="record", epsilon=1.0, delta=0.0)
    bounds = budgets.patient_bounds(facts, 0.6, [1, 2, 3, 2])
    assert bounds[0] == 0.6 and bounds[1] == bounds[3]
    assert bounds[2] == pytest.approx(math.exp(3) / (1 + math.exp(3)), abs=1e-3)  # pure 3ε: e^3ε/(1+e^3ε)
    assert (budgets.patient_bounds(dict(facts, unit="patient"), 0.6, [1, 3]) == 0.6).all()


def test_truncation_loosens_the_bound_a_little():
    facts = dict(target_epsilon=2.0, sigma_min=1.5, q=1.0, steps=1, truncation=0.0)
    exact = budgets.auc_bound(facts)
    assert exact == pytest.approx(auc_upper_bound_for_training(1.5, 1.0, 1))
    looser = budgets.auc_bound(dict(facts, truncation=1e-3))
    assert exact < looser < exact + 0.02
    assert budgets.auc_bound(dict(facts, target_epsilon=math.inf)) == 1.0


@pytest.mark.slow
def test_bound_over_runs_groups_neighbours_and_never_undercuts_a_run():
    runs = [dict(target_epsilon=2.0, epsilon=2.0, delta=DELTA, noise_multiplier=sigma, sampling_rate=q, steps=1, unit="record")
            for sigma, q in ((2.0, 1.0), (2.2, 1.0), (1.9, 0.9))]
    facts = budgets.guarantee(runs)
    assert facts["mechanisms"] == [(0.9, 1.9, 1, 0.0), (1.0, 2.0, 1, 0.0), (1.0, 2.2, 1, 0.0)]
    per_run = [auc_upper_bound_for_training(r["noise_multiplier"], r["sampling_rate"], 1) for r in runs]
    assert budgets.auc_bound(facts) == pytest.approx(max(per_run), abs=1e-12)  # one run per group: exact
    merged = budgets.auc_bound(facts, max_groups=1)  # one group: (σ 1.9, q 1.0) dominates every run
    assert merged == pytest.approx(auc_upper_bound_for_training(1.9, 1.0, 1), abs=1e-12) and merged > max(per_run)


def test_guarantee_refuses_mixed_runs():
    dp = dict(target_epsilon=1.0, epsilon=0.99, delta=1e-5, noise_multiplier=2.0, sampling_rate=0.1, steps=10, unit="record")
    assert budgets.guarantee([None, None])["target_epsilon"] == math.inf
    with pytest.raises(MedleakError, match="some runs were trained with DP"):
        budgets.guarantee([dp, None])
    with pytest.raises(MedleakError, match="unit"):
        budgets.guarantee([dp, dict(dp, unit="patient")])
    with pytest.raises(MedleakError, match="noise_multiplier"):
        budgets.guarantee([{k: v for k, v in dp.items() if k != "noise_multiplier"}])


def test_trials_are_units_with_mean_scores():
    patient_ids = np.array(["a", "b", "b", "c", "a", "d"])
    assert budgets.trial_units(patient_ids, "patient").tolist() == [0, 1, 1, 2, 0, 3]
    assert budgets.trial_units(patient_ids, "record").tolist() == [-1, -1, -1, 2, -1, 3]  # single-image patients
    scores = np.array([[1.0, 2.0, 4.0, 8.0, 3.0, np.nan], [0.0, 1.0, 1.0, 5.0, 2.0, 7.0]])
    members = np.array([[True, False, False, True, True, False], [False, True, True, False, False, True]])
    got_scores, got_members = budgets.unit_trials(scores, members, budgets.trial_units(patient_ids, "patient"))
    # slow loop: per target, per patient in first-seen order, mean of finite scores
    expected = []
    for target in range(2):
        for patient in ("a", "b", "c", "d"):
            rows = [i for i, p in enumerate(patient_ids) if p == patient and np.isfinite(scores[target, i])]
            if rows:
                expected.append((np.mean(scores[target, rows]), members[target, rows[0]]))
    assert got_scores.tolist() == [e[0] for e in expected] and got_members.tolist() == [e[1] for e in expected]


def test_logdir_labels_are_short_and_unique():
    assert budgets.logdir_labels(["logs/dp_eps1/chexpert", "logs/dp_eps8/chexpert"]) == ["dp_eps1_chexpert", "dp_eps8_chexpert"]
    assert budgets.logdir_labels(["logs/a", "logs/b"]) == ["a", "b"]
    assert list(figures.epsilon_axis([1.0, 8.0, math.inf])) == [1.0, 8.0, 80.0]


# ---------------------------------------------------------------- bad input


def test_mixed_datasets_are_refused_before_any_work(tmp_path):
    a = write_gaussian_campaign(tmp_path / "a", sigmas=SIGMAS_EPS4, target_epsilon=4.0, n_patients=12)
    b = write_gaussian_campaign(tmp_path / "b", n_patients=12, dataset="chexpert")
    with pytest.raises(MedleakError, match=r"holds a different dataset .*'dataset' differs"):
        budgets.compare_budgets([a, b], AuditOptions(out_dir=tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


def test_missing_logdir_in_the_list_is_a_one_line_error(tmp_path):
    a = write_gaussian_campaign(tmp_path / "a", sigmas=SIGMAS_EPS4, target_epsilon=4.0, n_patients=12)
    result = run_cli(f"--logdir={a},{tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "missing: no such directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedleakError, match="empty entry"):
        budgets.parse_logdirs(f"{a},,{a}")
    with pytest.raises(MedleakError, match="listed twice"):
        budgets.parse_logdirs(f"{a},{a}")
