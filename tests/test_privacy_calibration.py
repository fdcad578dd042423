"""Calibrated risk (privacy_utils.calibration, privacy_utils.noise_floor): slow loops, null and planted campaigns."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from medleak.campaign.plan import make_patient_mask, runs_in_per_patient
from medleak.errors import MedleakError
from medleak.privacy_utils import calibration, noise_floor
from medleak.privacy_utils.risk import hanley_mcneil_se
from medleak.privacy_utils.roc import auc_score


def simulate_campaign(n_runs, n_patients, max_images, seed, planted=0, effect=0.0, n_views=2):
    """Scores with record, model and patient×model effects; `planted` patients gain `effect` when IN.

    Returns scores (n_runs, n_records, n_views) float32, record masks, patient mask, per-record
    patient codes, images per patient and the bool planted flag per patient.
    """
    rng = np.random.default_rng(seed)
    n_images = rng.integers(1, max_images + 1, size=n_patients)
    codes = np.repeat(np.arange(n_patients), n_images)
    patient_mask = make_patient_mask(n_runs, n_patients, 0.5, seed)
    masks = patient_mask[:, codes]
    is_planted = np.zeros(n_patients, dtype=bool)
    is_planted[rng.choice(n_patients, planted, replace=False)] = True
    n_records = codes.size
    scores = (rng.normal(0, 2, size=(1, n_records, 1))                      # record difficulty
              + rng.normal(0, 0.5, size=(n_runs, 1, 1))                     # model quality
              + rng.normal(0, 0.7, size=(n_runs, n_patients, 1))[:, codes]  # patient × model
              + rng.normal(0, 0.6, size=(n_runs, n_records, 1))             # record × model
              + rng.normal(0, 0.4, size=(n_runs, n_records, n_views))       # view noise
              + effect * (masks & is_planted[codes])[:, :, None])
    return scores.astype(np.float32), masks, patient_mask, codes, n_images, is_planted


def slow_auc(values, members):
    """AUC by explicit pairs: IN above OUT counts 1, ties ½."""
    total = 0.0
    ins = [v for v, m in zip(values, members) if m]
    outs = [v for v, m in zip(values, members) if not m]
    for a in ins:
        for b in outs:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(ins) * len(outs))


def slow_permutation_p(values, members):
    """P(AUC ≥ observed) over every relabelling with the same number of IN models (exact, by enumeration)."""
    n, k = len(values), int(sum(members))
    observed = slow_auc(values, members)
    hits = total = 0
    for subset in itertools.combinations(range(n), k):
        labels = np.zeros(n, dtype=bool)
        labels[list(subset)] = True
        hits += slow_auc(values, labels) >= observed - 1e-12
        total += 1
    return hits / total


def slow_bh(p):
    """Benjamini–Hochberg q-values, written out: q_(i) = min_{j ≥ i} p_(j)·m/j."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return np.array(q)


# ---------------------------------------------------------------- exact rank nulls


@pytest.mark.parametrize("n_in,n_out", [(1, 1), (1, 6), (4, 4), (5, 3), (8, 8), (12, 20)])
def test_untied_null_matches_scipy_exact_mann_whitney(n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    pmf = calibration.u_null_pmf(n_in, n_out)
    assert pmf.shape == (n_in * n_out + 1,) and pmf.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pmf, pmf[::-1], rtol=1e-12)  # symmetric about n_in·n_out/2
    for _ in range(20):
        values = rng.normal(size=n_in + n_out)
        members = np.zeros(n_in + n_out, dtype=bool)
        members[rng.choice(n_in + n_out, n_in, replace=False)] = True
        result = calibration.rank_auc(values[:, None], members[:, None])
        expected = stats.mannwhitneyu(values[members], values[~members], alternative="greater", method="exact")
        assert result["auc"][0] == pytest.approx(expected.statistic / (n_in * n_out))
        assert result["p_value"][0] == pytest.approx(expected.pvalue, rel=1e-10)


def test_untied_null_tails_are_exact_counts():
    # Smallest and largest U have exactly one arrangement each: P = 1 / C(n, n_in), to full precision.
    for n_in, n_out in [(8, 8), (30, 40), (100, 100)]:
        pmf = calibration.u_null_pmf(n_in, n_out)
        assert pmf[-1] == pytest.approx(1 / math.comb(n_in + n_out, n_in), rel=1e-9)
        assert pmf[1] == pytest.approx(1 / math.comb(n_in + n_out, n_in), rel=1e-9)  # U = 1: one swap


def test_tied_units_get_the_exact_conditional_null():
    rng = np.random.default_rng(3)
    n_models = 10
    summaries = rng.integers(0, 4, size=(n_models, 12)).astype(np.float64)  # heavy ties
    summaries[:, 0] = 7.0  # every model ties: AUC ½, p = 1
    masks = np.stack([rng.permutation(n_models) < 4 for _ in range(12)], axis=1)
    result = calibration.rank_auc(summaries, masks)
    assert result["tied"].all()
    for unit in range(12):
        assert result["auc"][unit] == pytest.approx(slow_auc(summaries[:, unit], masks[:, unit]))
        assert result["p_value"][unit] == pytest.approx(slow_permutation_p(summaries[:, unit], masks[:, unit]), rel=1e-9)
    assert result["p_value"][0] == pytest.approx(1.0)


def test_many_tied_models_fall_back_to_the_tie_corrected_normal_approximation():
    rng = np.random.default_rng(4)
    n_models = calibration.EXACT_TIES_MAX_MODELS + 20
    summaries = np.round(rng.normal(size=(n_models, 5)), 1)
    masks = np.stack([rng.permutation(n_models) < n_models // 2 for _ in range(5)], axis=1)
    result = calibration.rank_auc(summaries, masks)
    for unit in range(5):
        x, m = summaries[:, unit], masks[:, unit]
        expected = stats.mannwhitneyu(x[m], x[~m], alternative="greater", method="asymptotic", use_continuity=True)
        assert result["p_value"][unit] == pytest.approx(expected.pvalue, rel=1e-9)


def test_unit_ranks_are_scipys_midranks_and_flag_exactly_the_tied_units():
    rng = np.random.default_rng(30)
    summaries = rng.normal(size=(40, 300)).astype(np.float32)
    summaries[:, :60] = np.round(summaries[:, :60])  # ties within a unit
    summaries[:, 60:70] = 1.5                        # every model ties
    summaries[:3, 70] = [0.0, -0.0, 2.0]             # -0 and +0 tie
    ranked = calibration.unit_ranks(summaries, chunk=7, threads=2)
    np.testing.assert_array_equal(ranked.ranks, stats.rankdata(summaries.astype(np.float64), axis=0).T)
    expected_tied = [np.unique(summaries[:, u]).size < summaries.shape[0] for u in range(summaries.shape[1])]
    np.testing.assert_array_equal(ranked.tied, expected_tied)
    assert ranked.tied[:71].all() and not ranked.tied[71:].any()
    masks = np.stack([rng.permutation(40) < 17 for _ in range(300)], axis=1)
    given, fresh = calibration.rank_auc(summaries, masks, ranks=ranked), calibration.rank_auc(summaries, masks)
    for name in fresh:
        np.testing.assert_array_equal(given[name], fresh[name], err_msg=name)
    with pytest.raises(MedleakError, match="ranks"):
        calibration.rank_auc(summaries[:, :5], masks[:, :5], ranks=ranked)


def test_rank_auc_matches_pair_loop_and_standard_errors():
    rng = np.random.default_rng(5)
    n_models, n_units = 9, 30
    summaries = rng.normal(size=(n_models, n_units)) + 0.8 * np.arange(n_units)[None] % 3
    masks = np.stack([rng.permutation(n_models) < rng.integers(1, n_models) for _ in range(n_units)], axis=1)
    result = calibration.rank_auc(summaries, masks, chunk=7)
    for unit in range(n_units):
        n_in = int(masks[:, unit].sum())
        n_out = n_models - n_in
        auc = slow_auc(summaries[:, unit], masks[:, unit])
        assert result["auc"][unit] == pytest.approx(auc)
        assert result["u2"][unit] == round(2 * auc * n_in * n_out)
        assert (result["n_in"][unit], result["n_out"][unit]) == (n_in, n_out)
        assert result["auc_se"][unit] == pytest.approx(float(hanley_mcneil_se(auc, n_in, n_out)))
        assert result["null_sd"][unit] == pytest.approx(math.sqrt((n_models + 1) / (12 * n_in * n_out)))
        expected = stats.mannwhitneyu(summaries[masks[:, unit], unit], summaries[~masks[:, unit], unit],
                                      alternative="greater", method="exact")
        assert result["p_value"][unit] == pytest.approx(expected.pvalue, rel=1e-10)


def test_benjamini_hochberg_matches_loop():
    p = np.random.default_rng(6).uniform(size=57) ** 3
    np.testing.assert_allclose(calibration.benjamini_hochberg(p), slow_bh(list(p)), rtol=1e-12)


def test_bad_input_is_one_line_error():
    summaries = np.zeros((4, 3))
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)  # unit 1 is always IN
    with pytest.raises(MedleakError, match="IN for all or none"):
        calibration.rank_auc(summaries, masks)
    with pytest.raises(MedleakError, match="NaN"):
        calibration.rank_auc(np.full((4, 1), np.nan), masks[:, :1])
    with pytest.raises(MedleakError, match="same patient"):
        calibration.patient_mask_from_records(np.array([[True, False], [False, True]]), np.array([0, 0]), 1)
    with pytest.raises(MedleakError, match="inf"):
        calibration.record_summaries(np.array([[[np.inf]], [[0.0]]]))


# ---------------------------------------------------------------- summaries and the risk tables


def test_summaries_and_patient_risk_match_slow_loops():
    scores, masks, _, codes, n_images, _ = simulate_campaign(10, 25, 4, seed=7, planted=5, effect=1.0)
    ids = np.array([f"patient-{c}" for c in codes])
    n_models, n_records, n_views = scores.shape
    frame = calibration.patient_rank_risk(scores, masks, ids, alpha=0.2, auc_threshold=0.55)
    slow_p, rows = [], []
    for patient in range(25):
        records = [r for r in range(n_records) if codes[r] == patient]
        per_model = []
        for m in range(n_models):
            total = 0.0
            for r in records:
                view_means = [float(np.mean(scores[k, r, :], dtype=np.float64)) for k in range(n_models)]
                centre = sum(view_means) / n_models
                sd = math.sqrt(sum((v - centre) ** 2 for v in view_means) / n_models)
                total += (view_means[m] - centre) / sd
            per_model.append(total / len(records))
        members = masks[:, records[0]]
        rows.append((slow_auc(per_model, members), len(records)))
        slow_p.append(stats.mannwhitneyu(np.array(per_model)[members], np.array(per_model)[~members],
                                         alternative="greater", method="exact").pvalue)
    slow_q = slow_bh(slow_p)
    assert list(frame["patient_id"]) == [f"patient-{p}" for p in range(25)]
    np.testing.assert_allclose(frame["auc"], [r[0] for r in rows], atol=1e-9)
    np.testing.assert_array_equal(frame["n_records"], n_images)
    np.testing.assert_allclose(frame["p_value"], slow_p, rtol=1e-6)
    np.testing.assert_allclose(frame["q_value"], slow_q, rtol=1e-6)
    expected_risk = [(q <= 0.2) and (r[0] >= 0.55) for q, r in zip(slow_q, rows)]
    np.testing.assert_array_equal(frame["at_risk"], np.array(expected_risk, dtype=int))


def test_record_risk_is_the_rank_statistic_of_view_means():
    scores, masks, _, _, _, _ = simulate_campaign(9, 12, 3, seed=8)
    frame = calibration.record_rank_risk(scores, masks)
    for r in range(scores.shape[1]):
        view_mean = scores[:, r, :].astype(np.float64).mean(axis=1)
        assert frame["auc"][r] == pytest.approx(slow_auc(view_mean, masks[:, r]))
        expected = stats.mannwhitneyu(view_mean[masks[:, r]], view_mean[~masks[:, r]], alternative="greater", method="exact")
        assert frame["p_value"][r] == pytest.approx(expected.pvalue, rel=1e-9)


# ---------------------------------------------------------------- null campaigns


@pytest.mark.parametrize("n_runs", [8, 16, 32, 64])
def test_null_campaign_patient_risk_is_calibrated_whatever_the_image_count(n_runs):
    scores, masks, patient_mask, codes, n_images, _ = simulate_campaign(n_runs, 1200, 20, seed=100 + n_runs)
    frame = calibration.patient_rank_risk(scores, masks, codes)
    assert not calibration.rank_auc(calibration.patient_summaries(calibration.record_summaries(scores), codes, 1200),
                                    patient_mask)["tied"].any()
    k = runs_in_per_patient(n_runs, 0.5)
    # Randomised p-values P(U > u) + V·P(U = u) are exactly uniform under the null: KS per stratum.
    pmf = calibration.u_null_pmf(k, n_runs - k)
    u = np.rint(frame["auc"].to_numpy() * k * (n_runs - k)).astype(int)
    randomised = frame["p_value"].to_numpy() - np.random.default_rng(n_runs).uniform(size=u.size) * pmf[u]
    strata = calibration.image_strata(n_images)
    for s in np.unique(strata):
        inside = strata == s
        assert stats.kstest(randomised[inside], "uniform").pvalue > 1e-3, f"stratum {s} at {n_runs} runs"
        # the mean AUC does not move with the image count
        assert abs(frame["auc"][inside].mean() - 0.5) < 4 * calibration.null_auc_sd(k, n_runs - k) / math.sqrt(inside.sum())
    assert stats.spearmanr(frame["auc"], n_images).pvalue > 1e-3
    above = frame["auc"].to_numpy() > 0.6
    table = np.array([[np.sum(above & (strata == s)), np.sum(~above & (strata == s))] for s in np.unique(strata)])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert frame["at_risk"].mean() <= 0.05
    # the observed share above x lies inside the permutation chance band
    floor = noise_floor.share_floor(calibration.patient_summaries(calibration.record_summaries(scores), codes, 1200),
                                    patient_mask, n_permutations=200, seed=1, confidence=0.99)
    for threshold, headline in floor["share_above"].items():
        assert headline["excess_lo"] <= 0.0 <= headline["excess_hi"], threshold
    curve = floor["curve"]
    outside = (np.array(curve["excess_lo"]) > 0) | (np.array(curve["excess_hi"]) < 0)
    assert outside.mean() <= 0.1
    assert floor["at_risk"]["excess_lo"] <= 0.0 <= floor["at_risk"]["excess_hi"]
    assert floor["seed"] == 1 and floor["n_permutations"] == 200


def test_record_chance_curve_matches_the_exact_null_on_a_null_campaign():
    scores, _, patient_mask, codes, _, _ = simulate_campaign(16, 300, 8, seed=9)
    floor = noise_floor.share_floor(calibration.record_summaries(scores), patient_mask, codes, n_permutations=100, seed=2)
    # every record has 8 IN / 8 OUT models, so the chance share above x is the exact null's survival
    pmf = calibration.u_null_pmf(8, 8)
    grid = np.array(floor["grid"])
    exact = np.array([pmf[np.arange(65) / 64 > x].sum() for x in grid])
    np.testing.assert_allclose(floor["curve"]["chance_mean"], exact, atol=0.01)


def test_patient_floor_draws_untied_patients_from_the_null_like_relabelling_them():
    # Units that are the patients: untied patients' permuted 2U come from the exact null, tied ones
    # are relabelled model by model; passing unit_patient relabels every unit. Same distribution.
    scores, masks, patient_mask, codes, _, _ = simulate_campaign(16, 300, 3, seed=21, planted=30, effect=1.5)
    summaries = calibration.patient_summaries(calibration.record_summaries(scores), codes, 300)
    summaries[:, :40] = np.round(summaries[:, :40])  # tied patients
    assert calibration.unit_ranks(summaries).tied[:40].all()
    options = dict(n_permutations=400, alpha=0.2, auc_threshold=0.6)
    drawn = noise_floor.share_floor(summaries, patient_mask, seed=4, **options)
    relabelled = noise_floor.share_floor(summaries, patient_mask, np.arange(300), seed=5, **options)
    assert drawn["curve"]["observed"] == relabelled["curve"]["observed"]
    np.testing.assert_allclose(drawn["curve"]["chance_mean"], relabelled["curve"]["chance_mean"], atol=0.01)
    np.testing.assert_allclose(drawn["curve"]["chance_hi"], relabelled["curve"]["chance_hi"], atol=0.025)
    assert drawn["at_risk"]["chance_mean"] == pytest.approx(relabelled["at_risk"]["chance_mean"], abs=0.005)
    # untied units alone: the chance share above x is the exact null's survival
    untied = noise_floor.share_floor(summaries[:, 40:], patient_mask[:, 40:], seed=6, n_permutations=400)
    pmf = calibration.u_null_pmf(8, 8)
    exact = np.array([pmf[np.arange(65) / 64 > x].sum() for x in untied["grid"]])
    np.testing.assert_allclose(untied["curve"]["chance_mean"], exact, atol=0.006)


# ---------------------------------------------------------------- planted campaign


def test_planted_patients_are_at_risk_and_on_top():
    fdp = []
    for seed in range(10):
        scores, masks, _, codes, _, planted = simulate_campaign(16, 800, 12, seed=200 + seed, planted=40, effect=3.0)
        frame = calibration.patient_rank_risk(scores, masks, codes)
        at_risk = frame["at_risk"].to_numpy().astype(bool)
        top_decile = frame["auc"].rank(ascending=False, method="min").to_numpy() <= 80
        if seed == 0:
            assert at_risk[planted].mean() >= 0.8
            assert top_decile[planted].mean() >= 0.8
        discovered = frame["q_value"].to_numpy() <= calibration.DEFAULT_ALPHA
        fdp.append(np.sum(discovered & ~planted) / max(discovered.sum(), 1))
    # realised FDR: BH keeps its expectation at q·(760/800) ≤ q
    assert np.mean(fdp) <= calibration.DEFAULT_ALPHA + 2 * np.std(fdp, ddof=1) / math.sqrt(len(fdp))


def test_planted_excess_is_detected_by_the_noise_floor():
    scores, masks, patient_mask, codes, _, _ = simulate_campaign(16, 400, 6, seed=11, planted=40, effect=3.0)
    summaries = calibration.patient_summaries(calibration.record_summaries(scores), codes, 400)
    floor = noise_floor.share_floor(summaries, patient_mask, n_permutations=100, seed=3)
    assert floor["share_above"][0.9]["excess_lo"] > 0
    assert floor["at_risk"]["observed"] >= 0.08 and floor["at_risk"]["excess_lo"] > 0


# ---------------------------------------------------------------- noise floor against slow loops


def test_permutation_keeps_each_patients_count():
    mask = make_patient_mask(12, 50, 0.5, seed=1)
    permuted = noise_floor.permute_patient_mask(mask, np.random.default_rng(0))
    np.testing.assert_array_equal(permuted.sum(axis=0), mask.sum(axis=0))
    assert not np.array_equal(permuted, mask)
    # every k-subset equally likely: each model IN with probability k/n, each pair with k(k−1)/(n(n−1))
    rng = np.random.default_rng(1)
    draws = np.stack([noise_floor.permute_patient_mask(mask[:, :1], rng)[:, 0] for _ in range(20000)])
    np.testing.assert_allclose(draws.mean(axis=0), 6 / 12, atol=0.015)
    assert np.mean(draws[:, 0] & draws[:, 1]) == pytest.approx(6 * 5 / (12 * 11), abs=0.015)
    uneven = np.zeros((5, 2), dtype=bool)
    uneven[:1, 1] = True  # counts 0 and 1 stay 0 and 1
    np.testing.assert_array_equal(noise_floor.permute_patient_mask(uneven, rng).sum(axis=0), [0, 1])


def test_share_floor_matches_slow_loop():
    scores, masks, patient_mask, codes, _, _ = simulate_campaign(8, 15, 3, seed=12, planted=3, effect=1.0)
    summaries = calibration.record_summaries(scores)
    grid, thresholds = [0.5, 0.6, 0.75], (0.6, 0.9)
    floor = noise_floor.share_floor(summaries, patient_mask, codes, grid=grid, thresholds=thresholds,
                                    alpha=0.3, auc_threshold=0.55, n_permutations=4, seed=5)
    slow_curves, slow_risk = [], []
    for rng in noise_floor.permutation_generators(5, 4):  # permutation b draws from generator b
        permuted = noise_floor.permute_patient_mask(patient_mask, rng)
        aucs, ps = [], []
        for r in range(summaries.shape[1]):
            members = permuted[:, codes[r]]
            aucs.append(slow_auc(summaries[:, r], members))
            ps.append(stats.mannwhitneyu(summaries[members, r], summaries[~members, r], alternative="greater", method="exact").pvalue)
        q = slow_bh(ps)
        slow_curves.append([np.mean([a > x for a in aucs]) for x in grid])
        slow_risk.append(np.mean([(qi <= 0.3) and (a >= 0.55) for qi, a in zip(q, aucs)]))
    observed = [np.mean([slow_auc(summaries[:, r], masks[:, r]) > x for r in range(summaries.shape[1])]) for x in grid]
    np.testing.assert_allclose(floor["curve"]["observed"], observed)
    np.testing.assert_allclose(floor["curve"]["chance_mean"], np.mean(slow_curves, axis=0))
    np.testing.assert_allclose(floor["curve"]["chance_hi"], np.quantile(slow_curves, 0.975, axis=0))
    np.testing.assert_allclose(floor["share_above"][0.6]["chance_mean"], np.mean(slow_curves, axis=0)[1])
    assert floor["at_risk"]["chance_mean"] == pytest.approx(np.mean(slow_risk))


def test_compare_to_chance_semantics():
    chance = np.arange(1, 101, dtype=float) / 100  # 0.01 … 1.00
    result = noise_floor.compare_to_chance(0.9, chance, confidence=0.9)
    assert result["chance_mean"] == pytest.approx(0.505)
    assert result["chance_lo"] == pytest.approx(np.quantile(chance, 0.05))
    assert result["excess_lo"] == pytest.approx(0.9 - np.quantile(chance, 0.95))
    assert result["p_value"] == pytest.approx((1 + 11) / 101)


def test_strongest_attack_floor_matches_slow_loop_and_is_at_chance_on_null():
    scores, masks, _, codes, _, _ = simulate_campaign(6, 40, 4, seed=13)
    targets = slice(0, 3)
    rng = np.random.default_rng(1)
    attacks = {"view mean": scores[targets].mean(axis=2), "noise": rng.normal(size=masks[targets].shape),
               "ties": np.round(scores[targets, :, 0])}
    result = noise_floor.strongest_attack_floor(attacks, masks[targets], codes, n_permutations=6, seed=9)
    target_patient = calibration.patient_mask_from_records(masks[targets], codes, 40)
    slow = []
    for perm_rng in noise_floor.permutation_generators(9, 6):
        permuted = noise_floor.permute_patient_mask(target_patient, perm_rng)[:, codes]
        slow.append([np.mean([auc_score(s[t], permuted[t]) for t in range(3)]) for s in attacks.values()])
    slow = np.array(slow)
    observed = [np.mean([auc_score(s[t], masks[t]) for t in range(3)]) for s in attacks.values()]
    assert result["strongest"] == list(attacks)[int(np.argmax(observed))]
    assert result["max_auc"]["observed"] == pytest.approx(max(observed))
    assert result["max_auc"]["chance_mean"] == pytest.approx(slow.max(axis=1).mean())
    for i, name in enumerate(attacks):
        assert result["per_attack"][name]["chance_mean"] == pytest.approx(slow[:, i].mean())
    assert result["seed"] == 9

    # Null, larger: the strongest of three chance attacks sits inside its own chance band, above 0.5.
    scores, masks, _, codes, _, _ = simulate_campaign(16, 600, 8, seed=14)
    attacks = {name: np.random.default_rng(i).normal(size=masks[:4].shape) for i, name in enumerate("abc")}
    result = noise_floor.strongest_attack_floor(attacks, masks[:4], codes, n_permutations=200, seed=0)
    assert result["max_auc"]["excess_lo"] <= 0 <= result["max_auc"]["excess_hi"]
    assert result["max_auc"]["chance_mean"] > 0.5


# ---------------------------------------------------------------- images-per-patient adjustment


def test_group_differences_match_loop():
    rng = np.random.default_rng(15)
    n_images = rng.integers(1, 25, size=300)
    groups = rng.choice(["a", "b", "c"], size=300)
    risk = (rng.uniform(size=300) < 0.1 + 0.01 * n_images).astype(float)
    table = calibration.group_differences(risk, groups, n_images).set_index("group")
    strata = [1 if n == 1 else 2 if n == 2 else 3 if n <= 4 else 4 if n <= 8 else 5 if n <= 16 else 6 for n in n_images]
    for group in "abc":
        num = den = var = 0.0
        for s in set(strata):
            a = [risk[i] for i in range(300) if strata[i] == s and groups[i] == group]
            b = [risk[i] for i in range(300) if strata[i] == s and groups[i] != group]
            if not a or not b:
                continue
            w = len(a) * len(b) / (len(a) + len(b))
            va = np.var(a, ddof=1) if len(a) > 1 else 0.0
            vb = np.var(b, ddof=1) if len(b) > 1 else 0.0
            num += w * (np.mean(a) - np.mean(b))
            var += w * w * (va / len(a) + vb / len(b))
            den += w
        assert table.loc[group, "adjusted_difference"] == pytest.approx(num / den)
        assert table.loc[group, "adjusted_se"] == pytest.approx(math.sqrt(var) / den)
        member = groups == group
        assert table.loc[group, "raw_difference"] == pytest.approx(risk[member].mean() - risk[~member].mean())


def test_adjustment_removes_an_image_count_confounder_and_keeps_a_real_effect():
    rng = np.random.default_rng(16)
    n = 4000
    older = rng.uniform(size=n) < 0.5
    n_images = np.where(older, rng.integers(5, 21, size=n), rng.integers(1, 9, size=n))  # older: more images
    risk = (rng.uniform(size=n) < 0.04 * np.log2(n_images) + 0.02).astype(float)        # risk from images only
    table = calibration.group_differences(risk, np.where(older, "older", "younger"), n_images).set_index("group")
    row = table.loc["older"]
    assert row["raw_difference"] > 4 * row["raw_se"]           # raw: older patients look more exposed
    assert abs(row["adjusted_difference"]) < 3 * row["adjusted_se"]  # adjusted: no group effect
    risk_real = np.clip(risk + (older & (rng.uniform(size=n) < 0.1)), 0, 1)
    row = calibration.group_differences(risk_real, np.where(older, "older", "younger"), n_images).set_index("group").loc["older"]
    assert row["adjusted_difference"] > 4 * row["adjusted_se"]
    assert "images per patient" in calibration.ADJUSTMENT_SENTENCE


# ---------------------------------------------------------------- planner


def test_delong_components_match_loop():
    rng = np.random.default_rng(17)
    summaries = np.round(rng.normal(size=(9, 6)), 1)
    masks = np.stack([rng.permutation(9) < 4 for _ in range(6)], axis=1)
    var_in, var_out = calibration.delong_components(summaries, masks)
    for u in range(6):
        ins = summaries[masks[:, u], u]
        outs = summaries[~masks[:, u], u]
        v = [np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for b in outs]) for a in ins]
        w = [np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in ins]) for b in outs]
        assert var_in[u] == pytest.approx(np.var(v, ddof=1))
        assert var_out[u] == pytest.approx(np.var(w, ddof=1))


def test_planner_predicts_the_null_standard_error_and_matches_a_scan():
    scores, _, patient_mask, codes, _, _ = simulate_campaign(16, 2000, 6, seed=18)
    summaries = calibration.patient_summaries(calibration.record_summaries(scores), codes, 2000)
    var_in, var_out = calibration.delong_components(summaries, patient_mask)

    def runs_in(n):
        return runs_in_per_patient(n, 0.5)

    # At the campaign's own size the DeLong variance is the exact null variance of the AUC (a
    # little above it: the estimator is conservative with 8 + 8 models) …
    own = np.mean(calibration.auc_se_at(var_in, var_out, 16, runs_in) ** 2)
    assert 1.0 <= own / float(calibration.null_auc_sd(8, 8)) ** 2 <= 1.1
    # … and extrapolated to 64 runs it stays close to (a little above: 8 models' placements are
    # coarser than 32's) the exact null sd at 32 + 32 models.
    predicted = np.sqrt(np.mean(calibration.auc_se_at(var_in, var_out, 64, runs_in) ** 2))
    assert 1.0 <= predicted / float(calibration.null_auc_sd(32, 32)) <= 1.15
    plan = calibration.plan_runs(var_in, var_out, 0.05, runs_in=runs_in)
    scan = next(n for n in range(2, 2001)
                if np.quantile(calibration.auc_se_at(var_in, var_out, n, runs_in), 0.5) <= 0.05)
    assert plan["n_runs"] == scan
    assert plan["se_by_runs"][16] > plan["se_by_runs"][64]
    assert calibration.plan_runs(var_in, var_out, 1e-4, runs_in=runs_in, max_runs=100)["n_runs"] is None
    with pytest.raises(MedleakError, match="positive"):
        calibration.plan_runs(var_in, var_out, 0.0, runs_in=runs_in)


def _relabel_by_sort(counts, noise):
    """The noise floor's first relabelling, kept as the slow reference: a full sort of each
    patient's noise, IN where the noise is at most its count-th smallest value."""
    kth = np.sort(noise, axis=1)[np.arange(noise.shape[0]), np.maximum(counts - 1, 0)]
    return (noise <= np.where(counts > 0, kth, -1.0)[:, None]).T


@pytest.mark.parametrize("counts", [np.full(40, 5), np.array([0, 1, 5, 9, 10, 5, 3, 3] * 5)])
def test_partition_relabel_equals_the_sort_on_a_fixed_seed(counts):
    noise = np.random.default_rng(7).random((counts.size, 10))
    np.testing.assert_array_equal(noise_floor._relabel(counts, noise), _relabel_by_sort(counts, noise))
    np.testing.assert_array_equal(noise_floor._relabel(counts, noise).sum(axis=0), counts)


def test_rank_sums_equal_the_expanded_mask_product():
    rng = np.random.default_rng(2)
    unit_patient = rng.integers(0, 30, size=1000)
    ranks = (rng.integers(2, 41, size=(1000, 20)) / 2.0).astype(np.float32)  # midranks: multiples of ½
    patient_rows = (rng.random((30, 20)) < 0.5).astype(np.float32)
    expanded = np.einsum("mu,mu->u", ranks.T, patient_rows[unit_patient].T)
    np.testing.assert_array_equal(noise_floor.rank_sums(ranks, patient_rows, unit_patient, block=64), expanded)


def test_bh_rejections_equal_the_q_values_at_alpha():
    rng = np.random.default_rng(4)
    for p in (rng.random(5000) ** 3, np.round(rng.random(3000) ** 4, 3), np.full(50, 0.05), rng.random(200), np.ones(10)):
        for alpha in (0.01, 0.05, 0.2):
            np.testing.assert_array_equal(calibration.bh_rejections(p, alpha), calibration.benjamini_hochberg(p) <= alpha)
    assert calibration.bh_rejections(np.array([]), 0.05).shape == (0,)
