"""Calibration and spent epsilon (dp-accounting), and the attack bounds a guarantee implies."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from medleak.config import TrainConfig
from medleak.dp import accounting, estimator, sampling
from medleak.errors import MedleakError


@pytest.mark.parametrize("target_epsilon", [pytest.param(1.0, marks=pytest.mark.slow), pytest.param(2.0, marks=pytest.mark.slow)])
def test_calibrated_sigma_recomputes_to_the_target_with_a_fresh_accountant(target_epsilon):
    q, steps, n_units, delta = 0.05, 40, 2000, 1 / 2000
    max_units = sampling.padded_unit_count(n_units, q)
    sigma = accounting.calibrate_noise_multiplier(target_epsilon, delta, q, steps,
                                                  n_units=n_units, max_units=max_units)
    accounting._spent_epsilon.cache_clear()  # a fresh accountant, not the calibration's result
    pld = accounting.spent_epsilon(sigma, q, steps, delta, "pld", n_units=n_units,
                                   max_units=max_units)
    assert target_epsilon * 0.99 <= pld <= target_epsilon * (1 + 1e-9)
    # A slightly smaller sigma overshoots: the calibration is tight.
    assert accounting.spent_epsilon(sigma * 0.98, q, steps, delta) > target_epsilon
    # The RDP accountant is an independent, looser bound.
    assert accounting.spent_epsilon(sigma, q, steps, delta, "rdp") >= pld
    # Truncation at probability ~1e-6 per step changes epsilon negligibly.
    untruncated = accounting.spent_epsilon(sigma, q, steps, delta, "pld")
    assert untruncated == pytest.approx(pld, rel=1e-3)


@pytest.mark.slow
def test_plan_dp_run_records_what_a_fresh_accountant_reproduces():
    config = TrainConfig(epsilon=1.0, delta=0.0, clip_norm=0.8, dp_unit="patient",
                         batch_size=60, epochs=2, norm="group")
    patient_ids = np.repeat(np.arange(1500), np.tile([1, 2, 3], 500))
    shape = estimator.dp_batch_shape(config, patient_ids)
    # The run trains on half of the patients.
    run_patients = patient_ids[patient_ids < 750]
    plan = estimator.plan_dp_run(config, shape, run_patients, steps=50)
    summary = plan.summary
    assert summary["n_units"] == 750 and summary["delta"] == accounting.default_delta(750)
    assert summary["delta"] < 1 / 750
    assert summary["unit"] == "patient" and summary["accountant"] == "pld"
    assert summary["sampling_rate"] == pytest.approx(shape.expected_units / 750)
    assert summary["steps"] == 50
    assert plan.estimator.noise_multiplier == summary["noise_multiplier"]
    assert plan.estimator.expected_units == pytest.approx(30.0)  # 60 records / 2 per patient
    accounting._spent_epsilon.cache_clear()
    fresh = accounting.spent_epsilon(summary["noise_multiplier"], summary["sampling_rate"],
                                     summary["steps"], summary["delta"], "pld",
                                     n_units=summary["n_units"], max_units=summary["max_units"])
    assert fresh == pytest.approx(summary["epsilon"], rel=1e-9)
    assert 0.99 <= fresh <= 1.0
    assert summary["epsilon_rdp"] >= fresh
    assert "epsilon=" in accounting.format_summary(summary)
    with pytest.raises(MedleakError, match="norm"):
        estimator.plan_dp_run(dataclasses.replace(config, norm="batch"), shape, run_patients, 50)


def test_auc_bound_known_answers():
    # No privacy loss: no test beats chance.
    assert accounting.auc_upper_bound([0.0], [0.0]) == pytest.approx(0.5, abs=1e-3)
    # Pure eps-DP: the best AUC is e^eps / (1 + e^eps).
    for eps in (0.5, 1.0, 3.0):
        bound = accounting.auc_upper_bound([eps], [0.0])
        exact = np.exp(eps) / (1 + np.exp(eps))
        assert exact <= bound <= exact + 1e-3
    assert accounting.auc_upper_bound([np.inf], [0.0]) == 1.0
    # One Gaussian mechanism with noise sigma is (1/sigma)-GDP: trade-off curve
    # Phi(Phi^-1(1 - alpha) - mu), AUC Phi(mu / sqrt(2)). Its whole profile recovers it.
    for sigma in (0.7, 2.0):
        bound = accounting.auc_upper_bound_for_training(sigma, 1.0, 1)
        exact = stats.norm.cdf(1 / sigma / np.sqrt(2))
        assert exact - 1e-3 <= bound <= exact + 3e-3
    # A weaker guarantee allows a better attack.
    assert accounting.auc_upper_bound([1.0], [1e-5]) < accounting.auc_upper_bound([8.0], [1e-5])
    # The profile bound is tighter than the single (eps, delta) point it contains.
    q, steps, delta = 0.05, 100, 1e-4
    eps = accounting.spent_epsilon(1.0, q, steps, delta)
    assert (accounting.auc_upper_bound_for_training(1.0, q, steps)
            < accounting.auc_upper_bound([eps], [delta]))


def test_max_tpr_matches_a_loop_over_the_profile():
    epsilons = np.array([0.2, 1.0, 2.5])
    deltas = np.array([0.3, 0.05, 1e-3])
    fprs = np.linspace(0, 1, 41)
    loop = []
    for alpha in fprs:
        beta = 0.0
        for eps, delta in zip(epsilons, deltas):
            beta = max(beta, 1 - delta - np.exp(eps) * alpha, np.exp(-eps) * (1 - delta - alpha))
        loop.append(1 - beta)
    np.testing.assert_allclose(accounting.max_tpr(fprs, epsilons, deltas), loop, atol=1e-12)


def test_default_delta_is_strictly_below_one_over_n():
    sizes = np.unique(np.geomspace(2, 10**7, 300).astype(int))
    deltas = np.array([accounting.default_delta(int(n)) for n in sizes])
    assert np.all(deltas < 1 / sizes)
    # n * delta (the expected number of units a "leak each with probability delta" mechanism
    # exposes) is below one and shrinks as the dataset grows.
    assert np.all(np.diff(sizes * deltas) < 0) and sizes[0] * deltas[0] < 0.6
    assert accounting.default_delta(100_000) == pytest.approx(1 / (100_000 * (1 + np.log(100_000))))
    for bad in (0, 1, 2.5):
        with pytest.raises(MedleakError, match="--delta"):
            accounting.default_delta(bad)


def test_campaign_delta_is_fixed_at_planning_and_kept_by_running_campaigns():
    from medleak.campaign.plan import plan_differences

    patient_ids = np.repeat(np.arange(300).astype(str), 3)  # 300 patients, 900 records
    dp = TrainConfig(epsilon=2.0, delta=0.0, dp_unit="record")
    fresh = estimator.campaign_delta(dp, patient_ids, None)
    assert fresh.delta == accounting.default_delta(900)
    by_patient = estimator.campaign_delta(dataclasses.replace(dp, dp_unit="patient"), patient_ids)
    assert by_patient.delta == accounting.default_delta(300)
    # Recorded in plan.json's train_config, so a later worker resolves the same plan document.
    stored = {"train_config": fresh.to_dict()}
    again = estimator.campaign_delta(dp, patient_ids, stored)
    assert plan_differences(stored, {"train_config": again.to_dict()}) == []
    # A campaign planned before delta was fixed keeps its stored 0 (its workers still match).
    legacy = {"train_config": dp.to_dict()}
    assert estimator.campaign_delta(dp, patient_ids, legacy) == dp
    # An explicit --delta, or no DP, is left alone (non-DP plans do not change).
    explicit = dataclasses.replace(dp, delta=1e-6)
    assert estimator.campaign_delta(explicit, patient_ids, None) == explicit
    assert estimator.campaign_delta(TrainConfig(), patient_ids, None) == TrainConfig()
