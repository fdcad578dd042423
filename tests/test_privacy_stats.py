"""Every statistic of src/medleak/privacy_utils against a slow, obviously-correct loop on random data."""

import math
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from medleak.errors import MedleakError
from medleak.privacy_utils import lira, lira_scores, patient_risk, record_auc, rmia, rmia_scores
from medleak.privacy_utils.lira import campaign_stats, shadow_stats
from medleak.privacy_utils.risk import esf, hanley_mcneil_se, in_out_moments, share_above
from medleak.privacy_utils.rmia import population_indices, reference_probability, tune_offline_a
from medleak.privacy_utils.roc import auc_score, summarise_attack, tpr_at_fpr
from medleak.privacy_utils.scores import rmia_from_lira

lira_module = sys.modules["medleak.privacy_utils.lira"]


def random_campaign(n_models=13, n_records=40, n_views=3, seed=0, shift=0.7):
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_records)) < 0.5
    masks[0] = True  # every record has ≥ 1 IN and ≥ 1 OUT model
    masks[1] = False
    base = rng.normal(0, 3, size=(1, n_records, 1))
    scores = (rng.normal(size=(n_models, n_records, n_views)) + base + shift * masks[:, :, None]).astype(np.float32)
    return scores, masks


# ---------------------------------------------------------------- scores


def slow_lira_score(logit_row, label, task):
    z = [float(v) for v in logit_row]
    if task == "multiclass":
        exps = [math.exp(v - max(z)) for v in z]
        p = [e / sum(exps) for e in exps]
        return math.log(p[label]) - math.log(sum(p[j] for j in range(len(z)) if j != label)), p[label]
    prob = 1.0
    for zc, yc in zip(z, label):
        s = 1 / (1 + math.exp(-zc))
        prob *= s if yc else 1 - s
    return math.log(prob) - math.log(1 - prob), prob


def test_multiclass_scores_match_loop_and_accept_int_or_onehot():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(7, 4, 5))
    labels = rng.integers(0, 5, size=7)
    onehot = np.eye(5)[labels]
    got = lira_scores(logits, labels)
    assert got.shape == (7, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, lira_scores(logits, onehot), rtol=1e-6)
    for i in range(7):
        for v in range(4):
            expected, p = slow_lira_score(logits[i, v], labels[i], "multiclass")
            assert got[i, v] == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert rmia_scores(logits, labels)[i, v] == pytest.approx(p, rel=1e-5)


def test_multilabel_and_binary_scores_match_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, size=(6, 3, 4))
    labels = (rng.random((6, 4)) < 0.4).astype(np.float32)
    labels[0] = [1, 1, 0, 0]  # make sure rows don't all have exactly one label set
    got = lira_scores(logits, labels, task="multilabel")
    np.testing.assert_allclose(got, lira_scores(logits, labels), rtol=1e-6)  # inferred as multi-label
    for i in range(6):
        for v in range(3):
            expected, p = slow_lira_score(logits[i, v], labels[i], "multilabel")
            assert got[i, v] == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert rmia_scores(logits, labels, task="multilabel")[i, v] == pytest.approx(p, rel=1e-5)
    binary = lira_scores(logits[..., :1], labels[:, :1])
    np.testing.assert_allclose(binary, np.where(labels[:, None, :1] == 1, logits[..., :1], -logits[..., :1])[..., 0], rtol=1e-5)


def test_scores_are_stable_for_huge_logits_and_rmia_is_sigmoid_of_lira():
    logits = np.array([[[1e4, -1e4, 0.0]], [[-3e3, 3e3, 5.0]]])
    labels = np.array([0, 0])
    s = lira_scores(logits, labels)
    assert np.isfinite(s).all() and s[0, 0] > 600 and s[1, 0] < -600
    ml = lira_scores(np.array([[900.0, -900.0]]), np.array([[1.0, 0.0]]))
    assert np.isfinite(ml).all() and ml[0] > 600
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, size=(20, 2, 6))
    labels = rng.integers(0, 6, 20)
    np.testing.assert_allclose(rmia_from_lira(lira_scores(logits, labels)), rmia_scores(logits, labels), rtol=1e-5, atol=1e-7)


def test_scores_refuse_mismatched_labels():
    with pytest.raises(MedleakError, match="classes"):
        lira_scores(np.zeros((4, 2, 3)), np.zeros((4, 5)))
    with pytest.raises(MedleakError, match="records"):
        lira_scores(np.zeros((4, 2, 3)), np.zeros(5, dtype=int))
    with pytest.raises(MedleakError, match=r"\[0, 3\)"):
        lira_scores(np.zeros((4, 3)), np.array([0, 1, 2, 3]))


# ---------------------------------------------------------------- record / patient risk


def test_record_auc_matches_loop():
    scores, masks = random_campaign()
    auc, se = record_auc(scores, masks, chunk=7)  # chunk smaller than n_records: exercises chunking
    for r in range(scores.shape[1]):
        mi, si, mo, so = [], [], [], []
        for v in range(scores.shape[2]):
            ins = [float(scores[m, r, v]) for m in range(scores.shape[0]) if masks[m, r]]
            outs = [float(scores[m, r, v]) for m in range(scores.shape[0]) if not masks[m, r]]
            mi.append(sum(ins) / len(ins))
            mo.append(sum(outs) / len(outs))
            si.append(math.sqrt(sum((x - mi[-1]) ** 2 for x in ins) / len(ins)))
            so.append(math.sqrt(sum((x - mo[-1]) ** 2 for x in outs) / len(outs)))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        a = scipy_stats.norm.cdf((mean(mi) - mean(mo)) / math.sqrt(mean(si) ** 2 + mean(so) ** 2))
        a = max(a, 0.5)
        n1, n2 = int(masks[:, r].sum()), int((~masks[:, r]).sum())
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        s = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2))
        assert auc[r] == pytest.approx(a, abs=1e-6)
        assert se[r] == pytest.approx(s, abs=1e-6)


def test_record_auc_is_clipped_and_well_conditioned():
    scores, masks = random_campaign(shift=-2.0)  # IN scores lower: AUC would be < 0.5
    auc, _ = record_auc(scores + np.float32(500.0), masks)
    assert (auc >= 0.5).all()
    auc_shifted, _ = record_auc(scores, masks)
    np.testing.assert_allclose(auc, auc_shifted, atol=2e-4)  # large offsets do not break the variance


def test_record_auc_of_a_record_every_model_scores_identically_is_one_half():
    # Saturated scores (clipped at ±MAX_SCORE) are identical across models: no spread, no gap.
    scores, masks = random_campaign()
    scores[:, 3, :] = 700.0
    auc, se = record_auc(scores, masks)
    assert auc[3] == 0.5
    assert np.isfinite(se[3])
    assert np.isfinite(auc).all()


def test_record_auc_refuses_records_without_in_or_out_models():
    scores, masks = random_campaign()
    masks[:, 5] = True
    with pytest.raises(MedleakError, match="no OUT model"):
        record_auc(scores, masks)
    with pytest.raises(MedleakError, match="masks"):
        record_auc(scores, masks[:, :-1])


def test_hanley_mcneil_known_value():
    # By hand: A = 0.8, Q1 = 2/3, Q2 = 0.7111, 50 + 50 cases → √(4.951 / 2500) = 0.0445; and the SE
    # shrinks like 1/√n.
    assert hanley_mcneil_se(0.8, 50, 50) == pytest.approx(0.0445, abs=1e-4)
    assert hanley_mcneil_se(0.8, 5000, 5000) < hanley_mcneil_se(0.8, 50, 50) / 9


def test_patient_risk_matches_loop():
    rng = np.random.default_rng(4)
    aucs = rng.uniform(0.5, 1.0, 30)
    patients = rng.choice(["p1", "p2", "p3", "p4", "p5"], 30)
    df = patient_risk(aucs, patients)
    assert list(df["auc_max"]) == sorted(df["auc_max"], reverse=True)
    for _, row in df.iterrows():
        mine = [a for a, p in zip(aucs, patients) if p == row["patient_id"]]
        assert row["auc_max"] == pytest.approx(max(mine))
        assert row["auc_mean"] == pytest.approx(sum(mine) / len(mine))
        assert row["n_records"] == len(mine)


def test_shares_and_esf_match_loop():
    rng = np.random.default_rng(5)
    values = rng.uniform(0.5, 1.0, 200)
    shares = share_above(values)
    for t, share in shares.items():
        assert share == pytest.approx(sum(v > t for v in values) / len(values))
    grid = np.linspace(0.5, 1.0, 11)
    share, lower, upper = esf(values, grid)
    for x, s, lo, hi in zip(grid, share, lower, upper):
        k = sum(v > x for v in values)
        assert s == pytest.approx(k / 200)
        ci = scipy_stats.binomtest(k, 200).proportion_ci(0.95, method="exact")
        assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


# ---------------------------------------------------------------- LiRA


def slow_median_sd(values):
    ordered = sorted(values)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    mean = sum(values) / n
    return median, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_shadow_medians_and_sds_are_exact(chunk):
    scores, masks = random_campaign(n_models=11, n_records=23)
    scores[3, 4, 0] = -0.0  # signed zero and negative values sort correctly
    scores[4, 4, 0] = 0.0
    st = shadow_stats(scores, masks, trim=0.2, chunk=chunk, threads=2)
    for r in range(23):
        for v in range(3):
            for name, group in (("in", masks[:, r]), ("out", ~masks[:, r])):
                vals = [float(x) for x in scores[group, r, v]]
                med, sd = slow_median_sd(vals)
                assert st[f"median_{name}"][r, v] == pytest.approx(med, abs=1e-6)  # exact up to float32→64
                assert st[f"sd_{name}"][r, v] == pytest.approx(sd, abs=1e-5)
                k = math.floor(0.2 * len(vals))
                kept = sorted(vals)[k:len(vals) - k]
                assert st[f"trimmed_{name}"][r, v] == pytest.approx(sum(kept) / len(kept), abs=1e-5)
                assert st[f"trimmed_{name}"][r, v] == pytest.approx(scipy_stats.trim_mean(vals, 0.2), abs=1e-5)


def slow_lira(shadow, masks, target, offline, fix_variance):
    n_records, n_views = shadow.shape[1], shadow.shape[2]
    per_record = {}
    var_in, var_out = [], []
    for r in range(n_records):
        for v in range(n_views):
            ins = [float(shadow[m, r, v]) for m in range(len(shadow)) if masks[m, r]]
            outs = [float(shadow[m, r, v]) for m in range(len(shadow)) if not masks[m, r]]
            per_record[r, v] = slow_median_sd(ins) + slow_median_sd(outs)
            var_in.append(per_record[r, v][1] ** 2)
            var_out.append(per_record[r, v][3] ** 2)
    pooled_in, pooled_out = math.sqrt(sum(var_in) / len(var_in)), math.sqrt(sum(var_out) / len(var_out))
    result = []
    for r in range(n_records):
        total = 0.0
        for v in range(n_views):
            mi, si, mo, so = per_record[r, v]
            if fix_variance:
                si, so = pooled_in, pooled_out
            s = float(target[r, v])
            if offline:
                total += scipy_stats.norm.logcdf(s, mo, so)
            else:
                total += scipy_stats.norm.logpdf(s, mi, si) - scipy_stats.norm.logpdf(s, mo, so)
        result.append(total / n_views)
    return np.array(result)


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("fix_variance", [False, True])
def test_lira_matches_loop(offline, fix_variance):
    scores, masks = random_campaign(n_models=12, n_records=15)
    shadows, shadow_masks, targets = scores[2:], masks[2:], scores[:2]
    shadow_masks[0], shadow_masks[1] = True, False
    shadow_masks[2], shadow_masks[3] = True, False  # ≥ 2 IN and ≥ 2 OUT shadows per record
    got = lira(shadows, shadow_masks, targets, offline=offline, fix_variance=fix_variance)
    assert got.shape == (2, 15)
    for t in range(2):
        np.testing.assert_allclose(got[t], slow_lira(shadows, shadow_masks, targets[t], offline, fix_variance), rtol=1e-5, atol=1e-5)
    single = lira(shadows, shadow_masks, targets[0], offline=offline, fix_variance=fix_variance)
    np.testing.assert_allclose(single, got[0])


def test_lira_detects_planted_members_and_handles_missing_groups():
    scores, masks = random_campaign(n_models=30, n_records=300, shift=3.0, seed=6)
    scores, masks = scores[::-1].copy(), masks[::-1].copy()  # rows 0/1 (all IN / all OUT) are shadows
    st = shadow_stats(scores[2:], masks[2:])
    st["n_in"][0] = 0  # pretend record 0 has no IN shadow
    st["median_in"][0] = np.nan
    with pytest.warns(UserWarning, match="no IN or no OUT"):
        result = lira_module.lira_from_stats(st, scores[:2])
    assert np.isfinite(result).all()
    assert auc_score(result[0], masks[0]) > 0.9


# ---------------------------------------------------------------- RMIA


def slow_rmia(shadow_p, masks, target_p, population, gamma, offline, a, trim):
    n_records, n_views = shadow_p.shape[1], shadow_p.shape[2]
    ref = np.zeros((n_records, n_views))
    for r in range(n_records):
        for v in range(n_views):
            ins = [float(x) for x, m in zip(shadow_p[:, r, v], masks[:, r]) if m]
            outs = [float(x) for x, m in zip(shadow_p[:, r, v], masks[:, r]) if not m]
            t_in, t_out = scipy_stats.trim_mean(ins, trim), scipy_stats.trim_mean(outs, trim)
            ref[r, v] = 0.5 * ((1 + a) * t_out + (1 - a)) if offline else 0.5 * (t_in + t_out)
    def ratio(r):  # views averaged: mean p over views / mean Pr over views
        return sum(float(target_p[r, v]) for v in range(n_views)) / sum(ref[r, v] for v in range(n_views))

    result = np.zeros(n_records)
    for r in range(n_records):
        result[r] = sum(1 for z in population if ratio(r) / ratio(z) > gamma) / len(population)
    return result


@pytest.mark.parametrize("offline,trim", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
def test_rmia_matches_loop(offline, trim):
    scores, masks = random_campaign(n_models=12, n_records=25, n_views=2)
    p = rmia_from_lira(scores)
    shadows, shadow_masks, target = p[2:], masks[2:], p[0]
    shadow_masks[0], shadow_masks[1] = True, False
    population = population_indices(25, 10, seed=3)
    got = rmia(shadows, shadow_masks, target, offline=offline, a=0.3 if offline else None, gamma=1.3, trim=trim, n_population=10, seed=3)
    expected = slow_rmia(shadows, shadow_masks, target, population, 1.3, offline, 0.3, trim)
    np.testing.assert_allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("n_population", [0, -5])
def test_rmia_population_must_hold_a_record(n_population):
    scores, masks = random_campaign(n_models=6, n_records=10, n_views=1)
    p = rmia_from_lira(scores)
    with pytest.raises(MedleakError, match="population"):
        rmia(p[1:], masks[1:], p[0], n_population=n_population)


def test_rmia_offline_a_is_tuned_on_a_shadow_not_the_target():
    scores, masks = random_campaign(n_models=20, n_records=200, shift=1.5, seed=8)
    scores, masks = scores[::-1].copy(), masks[::-1].copy()
    p = rmia_from_lira(scores)
    a, aucs = tune_offline_a(p[2:], masks[2:], population=population_indices(200, 100))
    assert 0.0 <= a <= 1.0 and aucs[a] == max(aucs.values())
    # Changing the evaluated target cannot change the tuned `a`.
    tuned = rmia(p[2:], masks[2:], p[0], offline=True)
    tuned_other = rmia(p[2:], masks[2:], p[0][::-1].copy(), offline=True)
    assert auc_score(tuned, masks[0]) > 0.75
    ref = reference_probability(shadow_stats(p[2:], masks[2:], trim=0.1), offline=True, a=a)
    assert ref.shape == (200, 3)
    assert np.isfinite(tuned_other).all()


# ---------------------------------------------------------------- ROC


def test_roc_summary_matches_loop():
    rng = np.random.default_rng(9)
    members = rng.random((3, 400)) < 0.5
    scores = rng.normal(size=(3, 400)) + 0.8 * members
    summary, curves = summarise_attack(scores, members)
    for t in range(3):
        pos, neg = scores[t][members[t]], scores[t][~members[t]]
        pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert summary["auc"]["per_target"][t] == pytest.approx(pairs)
        for level, key in ((0.001, "tpr_at_0.1%_fpr"), (0.01, "tpr_at_1%_fpr")):
            best = 0.0
            for thr in sorted(set(scores[t])):  # attack: predict member if score ≥ thr
                fpr = np.mean(neg >= thr)
                if fpr <= level:
                    best = max(best, np.mean(pos >= thr))
            assert summary[key]["per_target"][t] == pytest.approx(best)
    assert summary["auc"]["mean"] == pytest.approx(np.mean(summary["auc"]["per_target"]))
    assert summary["auc"]["sd"] == pytest.approx(np.std(summary["auc"]["per_target"]))
    assert curves.shape[0] == 3 and (np.diff(curves, axis=1) >= -1e-12).all()
    assert tpr_at_fpr([0.0, 0.5, 1.0], [0.2, 0.7, 1.0], 0.01) == 0.2


@pytest.mark.parametrize("shadows", [slice(0, 9), np.array([0, 2, 3, 5, 6, 7, 8, 10])])
def test_campaign_stats_is_record_moments_and_shadow_stats_in_one_pass(shadows):
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(12, 150, 3)).astype(np.float32) * 4
    masks = rng.random((12, 150)) < 0.5
    moments, stats = campaign_stats(scores, masks, shadows, trim=0.2, chunk=32, threads=2)
    expected_moments = in_out_moments(scores, masks)
    expected_stats = shadow_stats(scores[shadows], masks[shadows], trim=0.2)
    assert set(moments) == set(expected_moments) and set(stats) == set(expected_stats)
    for key in expected_moments:
        np.testing.assert_allclose(moments[key], expected_moments[key], rtol=1e-12, atol=1e-12)
    for key in expected_stats:
        np.testing.assert_allclose(stats[key], expected_stats[key], rtol=1e-12, atol=1e-12)
