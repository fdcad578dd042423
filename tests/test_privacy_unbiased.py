"""Unbiased attacks (privacy_utils/shadows.py, attacks.py): each target scored with its own
leave-one-out shadows — against a slow loop, on null campaigns (no membership signal) and on a
planted campaign."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from medleak.campaign.plan import make_patient_mask, record_mask
from medleak.errors import MedleakError
from medleak.privacy_utils.attacks import VARIANTS, attack_targets, offline_a_per_target, pretend_target
from medleak.privacy_utils.lira import lira_from_stats, shadow_stats
from medleak.privacy_utils.rmia import population_indices, tune_offline_a, tune_offline_a_fitted
from medleak.privacy_utils.roc import auc_score, summarise_attack
from medleak.privacy_utils.scores import rmia_from_lira
from medleak.privacy_utils.shadows import dropped_models, fit_shadows, target_stats


def exact_k_campaign(n_runs, n_patients, *, seed=0, max_images=20, effect=0.0, planted=(), planted_effect=0.0, n_views=2):
    """LiRA-like scores (n_runs, n_records, n_views) float32 over the plan's exact-k patient mask.

    Patients have 1–max_images images; each record has its own base level and spread (so the
    shadow statistics matter); IN records are shifted by `effect` (0: a null campaign) and the
    records of `planted` patients by `planted_effect`. Returns (scores, masks, record_patient).
    """
    rng = np.random.default_rng(seed)
    patient_mask = make_patient_mask(n_runs, n_patients, 0.5, seed)
    images = rng.integers(1, max_images + 1, size=n_patients)
    record_patient = np.repeat(np.arange(n_patients), images)
    masks = np.stack([record_mask(row, record_patient) for row in patient_mask])
    n_records = len(record_patient)
    base = rng.normal(1.0, 2.0, size=(1, n_records, 1))
    spread = rng.uniform(0.5, 2.0, size=(1, n_records, 1))
    shift = np.full(n_records, effect)
    shift[np.isin(record_patient, planted)] += planted_effect
    noise = rng.normal(size=(n_runs, n_records, n_views))
    scores = base + spread * noise + (shift[None, :] * masks)[:, :, None]
    return scores.astype(np.float32), masks, record_patient


# ---------------------------------------------------------------- slow, obviously-correct loop


def slow_drop(masks, t, r, u):
    """The documented rule: one model of the group target t is not in, the floor(u·size)-th by index."""
    other = [j for j in range(masks.shape[0]) if masks[j, r] != masks[t, r]]
    return other[math.floor(u * len(other))] if other else None


def slow_shadow_groups(masks, t, drop_seed):
    """Per record: (IN shadow models, OUT shadow models) of target t, listed explicitly."""
    u = np.random.default_rng([drop_seed, t]).random(masks.shape[1])
    groups = []
    for r in range(masks.shape[1]):
        dropped = slow_drop(masks, t, r, u[r])
        shadows = [j for j in range(masks.shape[0]) if j not in (t, dropped)]
        groups.append(([j for j in shadows if masks[j, r]], [j for j in shadows if not masks[j, r]]))
    return groups


def slow_target_attacks(scores, masks, t, drop_seed, population, a, trim, gamma):
    """Every variant's scores of target t's records, from explicit shadow lists and numpy statistics."""
    n_records, n_views = scores.shape[1:]
    groups = slow_shadow_groups(masks, t, drop_seed)
    p = rmia_from_lira(scores).astype(np.float64)
    med, sd, trimmed = {}, {}, {}
    for r, (ins, outs) in enumerate(groups):
        for v in range(n_views):
            for g, models in (("in", ins), ("out", outs)):
                x = scores[models, r, v].astype(np.float64)
                med[g, r, v], sd[g, r, v] = np.median(x), np.std(x)
                trimmed[g, r, v] = scipy_stats.trim_mean(p[models, r, v], trim) if trim else p[models, r, v].mean()
    pooled = {g: math.sqrt(np.mean([sd[g, r, v] ** 2 for r in range(n_records) for v in range(n_views)
                                    if len(groups[r][0 if g == "in" else 1]) >= 2])) for g in ("in", "out")}
    result = {}
    for name, offline, fixed in (("lira_online", False, False), ("lira_online_fixed", False, True),
                                 ("lira_offline", True, False), ("lira_offline_fixed", True, True)):
        values = []
        for r, (ins, outs) in enumerate(groups):
            total = 0.0
            for v in range(n_views):
                # fewer than 2 shadows, or a zero spread (all agree), use the pooled σ
                s_in = pooled["in"] if fixed or len(ins) < 2 or sd["in", r, v] == 0 else sd["in", r, v]
                s_out = pooled["out"] if fixed or len(outs) < 2 or sd["out", r, v] == 0 else sd["out", r, v]
                s = float(scores[t, r, v])
                if offline:
                    total += scipy_stats.norm.logcdf(s, med["out", r, v], s_out)
                else:
                    total += scipy_stats.norm.logpdf(s, med["in", r, v], s_in) - scipy_stats.norm.logpdf(s, med["out", r, v], s_out)
            values.append(total / n_views)
        result[name] = np.array(values)
    for name in ("rmia_online", "rmia_offline"):
        def ratio(r):
            if name == "rmia_online":
                ref = [0.5 * (trimmed["in", r, v] + trimmed["out", r, v]) for v in range(n_views)]
            else:
                ref = [0.5 * ((1 + a) * trimmed["out", r, v] + 1 - a) for v in range(n_views)]
            return p[t, r].mean() / np.mean(ref)

        ratios = [ratio(r) for r in range(n_records)]
        result[name] = np.array([sum(ratios[r] / ratios[z] > gamma for z in population) / len(population) for r in range(n_records)])
    return result


@pytest.mark.parametrize("n_runs,trim", [(8, 0.0), (11, 0.2)])
def test_attack_targets_match_slow_loop(n_runs, trim):
    scores, masks, _ = exact_k_campaign(n_runs, 9, seed=n_runs, max_images=3, effect=0.4)
    scores[:, 0, 0] = 0.5  # ties: every model scores record 0 alike in view 0
    scores[: n_runs // 2, 1, 1] = -1.0
    targets = [0, 3, n_runs - 1]
    population = population_indices(scores.shape[1], 7, seed=2)
    got = attack_targets(scores, masks, targets, variant=VARIANTS, rmia_transform=rmia_from_lira, trim=trim, gamma=1.2,
                         n_population=7, population_seed=2, a=0.3, drop_seed=5)
    for row, t in enumerate(targets):
        expected = slow_target_attacks(scores, masks, t, 5, population, 0.3, trim, 1.2)
        for name in VARIANTS:
            np.testing.assert_allclose(got[name][row], expected[name], rtol=1e-5, atol=1e-6, err_msg=f"{name}, target {t}")
    single = attack_targets(scores, masks, targets, variant="lira_online", drop_seed=5)
    np.testing.assert_array_equal(single, got["lira_online"])


@pytest.mark.parametrize("transform", [None, rmia_from_lira])
def test_target_stats_are_the_explicit_shadow_lists_statistics(transform):
    scores, masks, _ = exact_k_campaign(12, 8, seed=4, max_images=4, n_views=3)
    scores[:, 2, 1] = 0.0  # a row of ties, and ±0
    scores[0, 3, 0], scores[1, 3, 0] = -0.0, 0.0
    fit = fit_shadows(scores, masks, trim=0.34, transform=transform, chunk=5, threads=2)
    values = scores.astype(np.float64) if transform is None else transform(scores).astype(np.float64)
    for t in (0, 7, 11):
        st = target_stats(fit, t, drop_seed=9)
        for r, (ins, outs) in enumerate(slow_shadow_groups(masks, t, 9)):
            assert (st["n_in"][r], st["n_out"][r]) == (len(ins), len(outs)) == (masks[:, r].sum() - 1, (~masks[:, r]).sum() - 1)
            for g, models in (("in", ins), ("out", outs)):
                x = values[models, r]  # (n, V)
                np.testing.assert_allclose(st[f"median_{g}"][r], np.median(x, axis=0), atol=1e-6)
                np.testing.assert_allclose(st[f"mean_{g}"][r], x.mean(axis=0), atol=1e-6)
                np.testing.assert_allclose(st[f"sd_{g}"][r], x.std(axis=0), atol=1e-6)
                np.testing.assert_allclose(st[f"trimmed_{g}"][r], scipy_stats.trim_mean(x, 0.34, axis=0), atol=1e-6)


def test_trimmed_window_path_equals_the_prefix_sum_path(monkeypatch):
    from medleak.privacy_utils import shadows

    scores, masks, _ = exact_k_campaign(12, 8, seed=5, max_images=4, n_views=3)
    n_in = masks.sum(axis=0)
    assert shadows.trim_window(n_in, 0.2) is not None  # the exact-k plan: one window for every record
    assert shadows.trim_window(np.array([5, 6]), 0.2) is None
    options = dict(medians=False, trim=0.2, transform=rmia_from_lira, chunk=5)
    window = shadows.fit_arrays(fit_shadows(scores, masks, **options))
    monkeypatch.setattr(shadows, "trim_window", lambda count, trim: None)
    prefix = shadows.fit_arrays(fit_shadows(scores, masks, **options))
    assert window.keys() == prefix.keys()
    for name in window:
        np.testing.assert_allclose(window[name], prefix[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_dropped_model_is_uniform_over_the_group_the_target_is_not_in():
    masks = make_patient_mask(10, 40, 0.5, seed=3)
    counts = np.zeros((40, 10))
    for seed in range(400):
        drop_in, drop_out = dropped_models(masks, 2, seed)
        member = masks[2]
        assert (drop_in[member] == 2).all() and (drop_out[~member] == 2).all()
        other = np.where(member, drop_out, drop_in)
        assert (masks[other, np.arange(40)] != member).all()  # from the group the target is not in
        counts[np.arange(40), other] += 1
    candidates = masks != masks[2]  # (models, records): eligible models per record
    assert (counts.T[~candidates] == 0).all()
    expected = np.broadcast_to(400 / candidates.sum(axis=0), candidates.shape)[candidates]
    assert (np.abs(counts.T[candidates] - expected) < 5 * np.sqrt(expected)).all()  # multinomial, each cell
    np.testing.assert_array_equal(dropped_models(masks, 2, 7)[0], dropped_models(masks, 2, 7)[0])  # seeded


def test_attack_targets_refuses_bad_input():
    scores, masks, _ = exact_k_campaign(6, 5, max_images=2)
    with pytest.raises(MedleakError, match="variant"):
        attack_targets(scores, masks, [0], variant="lira_sideways")
    with pytest.raises(MedleakError, match="target_indices"):
        attack_targets(scores, masks, [0, 6])
    with pytest.raises(MedleakError, match="target_indices"):
        attack_targets(scores, masks, [1, 1])
    with pytest.raises(MedleakError, match="at least 3 models"):
        attack_targets(scores[:2], masks[:2], [0])
    with pytest.raises(MedleakError, match="masks"):
        attack_targets(scores, masks[:, :-1], [0])


def test_records_without_shadows_in_a_group_borrow_a_gaussian_with_a_warning():
    scores, masks, _ = exact_k_campaign(8, 30, seed=2, max_images=2, effect=2.0)
    masks[:, :4] = False
    masks[0, :4] = True  # records 0–3 are IN for model 0 only: no IN shadow for any target
    with pytest.warns(UserWarning, match="no IN or no OUT"):
        result = attack_targets(scores, masks, [0, 1], variant="lira_online")
    assert np.isfinite(result).all()


# ---------------------------------------------------------------- null campaigns: chance, and only chance

# 6 variants × 4 campaign sizes × (AUC, TPR) = 48 checks: each allows 3.3 SE (Bonferroni for 48
# checks at 5 %; 2 SE per check would fail one of them by chance on most seeds).
Z_FAMILY = 3.3
JACKKNIFE_GROUPS = 20


def fast_auc(scores, members):
    """Mann–Whitney AUC (ties count one half) of one target's records."""
    ranks = scipy_stats.rankdata(scores)
    n_pos = members.sum()
    return (ranks[members].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(members) - n_pos))


def mean_auc_and_se(attack, target_masks, record_patient):
    """Mean AUC over targets and its grouped (delete-a-group-of-patients) jackknife SE.

    Targets share records and shadow models, so their AUCs are correlated and sd/√n_targets
    understates the spread; deleting whole patient groups keeps that dependence.
    """
    group = record_patient % JACKKNIFE_GROUPS
    full = np.mean([fast_auc(s, m) for s, m in zip(attack, target_masks)])
    leave_out = np.array([np.mean([fast_auc(s[group != g], m[group != g]) for s, m in zip(attack, target_masks)])
                          for g in range(JACKKNIFE_GROUPS)])
    se = math.sqrt((JACKKNIFE_GROUPS - 1) / JACKKNIFE_GROUPS * np.sum((leave_out - leave_out.mean()) ** 2))
    return full, se


def null_campaign_attacks(n_runs, seed):
    scores, masks, record_patient = exact_k_campaign(n_runs, 200, seed=seed)
    targets = np.arange(n_runs)
    return attack_targets(scores, masks, targets, variant=VARIANTS, rmia_transform=rmia_from_lira, n_population=1000), masks, record_patient


@pytest.mark.parametrize("n_runs", [8, 16, 32, 64])
def test_every_attack_is_at_chance_on_a_null_campaign(n_runs):
    attacks, masks, record_patient = null_campaign_attacks(n_runs, seed=n_runs)
    n_pos = masks.sum(axis=1).mean()
    n_neg = masks.shape[1] - n_pos
    # TPR at 1 % FPR of one target: binomial noise of the members above the threshold plus that of
    # the threshold itself (the non-members' 99th percentile); targets averaged.
    tpr_se = math.sqrt(0.01 * 0.99 * (1 / n_pos + 1 / n_neg) / n_runs)
    for name in VARIANTS:
        auc, se = mean_auc_and_se(attacks[name], masks, record_patient)
        assert abs(auc - 0.5) <= Z_FAMILY * se, f"{name} at {n_runs} runs: AUC {auc:.4f} ± {se:.4f}"
        summary, _ = summarise_attack(attacks[name], masks)
        tpr = summary["tpr_at_1%_fpr"]["mean"]
        assert abs(tpr - 0.01) <= Z_FAMILY * tpr_se, f"{name} at {n_runs} runs: TPR@1%FPR {tpr:.4f} (CI 0.01 ± {Z_FAMILY * tpr_se:.4f})"


def test_shared_shadows_are_biased_on_the_same_null_campaign():
    """The old design (last 10 runs targets, the other 6 shared shadows) is visibly below chance."""
    scores, masks, record_patient = exact_k_campaign(16, 200, seed=16)
    shared = lira_from_stats(shadow_stats(scores[:6], masks[:6]), scores[6:])
    auc, se = mean_auc_and_se(shared, masks[6:], record_patient)
    assert auc < 0.5 - Z_FAMILY * se and auc < 0.48, f"shared-shadow LiRA AUC {auc:.4f} ± {se:.4f}"
    unbiased = attack_targets(scores, masks, np.arange(6, 16))
    auc, se = mean_auc_and_se(unbiased, masks[6:], record_patient)
    assert abs(auc - 0.5) <= Z_FAMILY * se


def test_tuning_rmia_offline_a_uses_balanced_references():
    """On a null campaign the pretend target's references are balanced: tuned AUCs are at chance,
    and the evaluated target is never the pretend one."""
    scores, masks, _ = exact_k_campaign(12, 150, seed=5)
    p = rmia_from_lira(scores)
    population = population_indices(p.shape[1], 500)
    a, aucs = tune_offline_a(p, masks, population=population)
    assert aucs[a] == max(aucs.values()) and all(abs(v - 0.5) < 0.05 for v in aucs.values())
    fit = fit_shadows(p, masks, medians=False)
    assert tune_offline_a_fitted(fit, 0, population=population) == (a, aucs)
    assert pretend_target(0, [0, 1], 12) == 2 and pretend_target(3, range(12), 12) == 0 and pretend_target(0, range(12), 12) == 1
    per_target = offline_a_per_target(fit, np.arange(12), population=population)
    assert set(per_target) == set(range(12)) and len(set(per_target.values())) <= 2


# ---------------------------------------------------------------- planted campaign


def test_planted_patients_come_out_on_top():
    planted = np.arange(0, 150, 10)  # 15 of 150 patients, IN records shifted by 6
    scores, masks, record_patient = exact_k_campaign(16, 150, seed=3, planted=planted, planted_effect=6.0)
    is_planted = np.isin(record_patient, planted)
    attacks = attack_targets(scores, masks, np.arange(16), variant=VARIANTS, rmia_transform=rmia_from_lira, n_population=1000)
    for name in VARIANTS:
        attack = attacks[name]
        assert min(auc_score(a[is_planted], m[is_planted]) for a, m in zip(attack, masks)) > 0.9, name
        assert abs(np.mean([auc_score(a[~is_planted], m[~is_planted]) for a, m in zip(attack, masks)]) - 0.5) < 0.02, name
        # per patient: mean score of its records over the targets it is IN for minus those it is OUT for
        gap = (np.where(masks, attack, 0).sum(0) / masks.sum(0)) - (np.where(~masks, attack, 0).sum(0) / (~masks).sum(0))
        patient_gap = np.bincount(record_patient, weights=gap) / np.bincount(record_patient)
        assert set(np.argsort(-patient_gap)[:len(planted)]) == set(planted), name
        if name.startswith("lira"):  # RMIA's probability ratio saturates for p ≈ 1: top ranks are LiRA's claim
            top_share = [(is_planted & m)[np.argsort(-a)[:(is_planted & m).sum()]].mean() for a, m in zip(attack, masks)]
            assert np.mean(top_share) >= 0.85, name
