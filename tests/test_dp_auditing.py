"""The one-run epsilon audit (Steinke, Nasr & Jagielski 2023): slow loop, null, planted data."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from medleak.campaign.plan import make_patient_mask
from medleak.dp import accounting, auditing
from medleak.errors import MedleakError


def slow_p_value(m, r, v, eps, delta):
    """Their bound on P[W >= v] under (eps, delta)-DP, summed term by term."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def tail(w):  # P[Binomial(r, q) >= w]
        return sum(math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(max(w, 0), r + 1))

    f_v = tail(v)
    alpha = max([(tail(v - i) - f_v) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, f_v + 2 * m * delta * alpha)


def slow_bound(scores, members, delta, significance, fractions=auditing.GUESS_FRACTIONS):
    """The audit by hand: top-r guesses for each r, correct ones counted, eps by bisection."""
    m = len(scores)
    ranked = sorted(range(m), key=lambda i: -scores[i])
    counts = sorted({min(m, max(1, round(f * m))) for f in fractions})
    level = significance / len(counts)
    best = 0.0
    for r in counts:
        threshold = scores[ranked[r - 1]]
        guessed = [i for i in range(m) if scores[i] >= threshold]
        correct = sum(1 for i in guessed if members[i])
        if slow_p_value(m, len(guessed), correct, 0.0, delta) > level:
            continue  # not even epsilon = 0 is rejected
        lo, hi = 0.0, 30.0
        for _ in range(60):  # p-value increases with eps: bisect for the last rejected eps
            mid = (lo + hi) / 2
            rejected = slow_p_value(m, len(guessed), correct, mid, delta) <= level
            lo, hi = (mid, hi) if rejected else (lo, mid)
        best = max(best, lo)
    return best


@pytest.mark.parametrize("seed,effect,delta", [(0, 0.6, 1e-5), (1, 1.5, 1e-4), (2, 3.0, 1e-6)])
def test_one_run_bound_matches_a_slow_direct_computation(seed, effect, delta):
    rng = np.random.default_rng(seed)
    m = 400
    members = rng.random(m) < 0.5
    scores = np.round(rng.normal(size=m) + effect * members, 1)  # rounding makes ties
    audit = auditing.one_run_audit(scores, members, delta, 0.05)
    slow = slow_bound(list(scores), list(members), delta, 0.05)
    assert slow > 0
    assert audit.epsilon == pytest.approx(slow, abs=1e-4)
    # The reported hypothesis is one that gives this bound.
    p_value = slow_p_value(m, audit.n_guesses, audit.n_correct, audit.epsilon - 1e-3, delta)
    assert p_value <= 0.05 / 8
    assert audit.n_canaries == m and audit.n_models == 1


def test_guess_counts_are_fixed_by_the_number_of_canaries():
    np.testing.assert_array_equal(auditing.guess_counts(1000), [2, 5, 10, 20, 50, 100, 200, 500])
    np.testing.assert_array_equal(auditing.guess_counts(10), [1, 2, 5])
    np.testing.assert_array_equal(auditing.guess_counts(1), [1])


def null_trial(seed, n_runs=16, n_patients=1000):
    """One target model of an exactly-k plan; attack scores independent of membership."""
    mask = make_patient_mask(n_runs, n_patients, 0.5, seed)
    rng = np.random.default_rng(10_000 + seed)
    return rng.normal(size=n_patients), mask[seed % n_runs]


def test_null_campaign_bound_is_zero_within_its_confidence():
    bounds = [auditing.one_run_audit(*null_trial(seed), 1e-5, 0.05).epsilon for seed in range(20)]
    assert sum(b == 0.0 for b in bounds) >= 19  # at most beta = 5 % may be > 0


def test_null_bound_over_several_target_models_is_zero():
    hits = 0
    for seed in range(20):
        mask = make_patient_mask(16, 600, 0.5, seed)
        rng = np.random.default_rng(seed)
        scores = rng.normal(size=(4, 600))
        hits += auditing.one_run_audit_models(scores, mask[:4], 1e-5, 0.05).epsilon > 0
    assert hits <= 1


def test_plan_row_bits_are_independent_fair_coins():
    # The audit's assumption about the plan: within one run, the patients' bits are independent
    # with P(IN) = 1/2 (each patient's runs are drawn separately), so the count of IN patients
    # is Binomial(n, 1/2), variance n/4, and bits of two patients are uncorrelated.
    n = 400
    rows = np.stack([make_patient_mask(16, n, 0.5, seed)[3] for seed in range(400)])
    counts = rows.sum(axis=1)
    assert abs(counts.mean() - n / 2) < 4 * math.sqrt(n / 4 / 400)
    assert 0.75 * n / 4 < counts.var() < 1.3 * n / 4
    assert abs(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) < 0.15


def test_strong_leakage_gives_a_positive_bound():
    rng = np.random.default_rng(3)
    members = rng.random(1000) < 0.5
    audit = auditing.one_run_audit(rng.normal(size=1000) + 3 * members, members, 1e-5)
    assert audit.epsilon > 2.0
    assert audit.n_correct / audit.n_guesses > 0.95


def test_bound_is_valid_and_tight_for_randomized_response():
    # Randomized response on each canary's coin is exactly eps-DP: the lower bound must stay
    # below eps (with probability >= 95 %) and come close with many canaries.
    eps, bounds = 1.5, []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        members = rng.random(5000) < 0.5
        reported = members ^ (rng.random(5000) < 1 / (1 + math.exp(eps)))
        scores = reported + 1e-6 * rng.random(5000)  # continuous only to break ties
        bounds.append(auditing.one_run_audit(scores, members, 1e-6).epsilon)
    bounds = np.array(bounds)
    assert np.mean(bounds <= eps) >= 0.95
    assert bounds.mean() > 0.8 * eps


def test_bound_is_below_the_true_epsilon_of_a_gaussian_mechanism():
    # Each canary's score N(mu * S_i, 1): mu-GDP, exact epsilon at delta from the GDP profile.
    # (delta must be well below 1/m: the bound's delta term is 2 m delta times a tail ratio.)
    mu, delta = 2.0, 1e-6

    def gdp_delta(e):
        return stats.norm.cdf(-e / mu + mu / 2) - np.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

    true_eps = optimize.brentq(lambda e: gdp_delta(e) - delta, 0, 50)
    rng = np.random.default_rng(0)
    members = rng.random(10_000) < 0.5
    lower = auditing.one_run_audit(rng.normal(mu * members, 1), members, delta).epsilon
    assert 0.5 < lower < true_eps


def test_several_models_take_the_best_bound_at_a_bonferroni_level():
    rng = np.random.default_rng(4)
    members = rng.random((3, 500)) < 0.5
    scores = rng.normal(size=(3, 500)) + np.array([[0.0], [1.0], [2.0]]) * members
    combined = auditing.one_run_audit_models(scores, members, 1e-5, 0.05)
    each = [auditing.one_run_audit(s, b, 1e-5, 0.05 / 3).epsilon for s, b in zip(scores, members)]
    assert combined.epsilon == max(each) > 0
    assert combined.n_models == 3 and combined.n_canaries == 1500 and combined.significance == 0.05
    # The score-list form used by the budget comparison gives the same number.
    in_lists = [s[b] for s, b in zip(scores, members)]
    out_lists = [s[~b] for s, b in zip(scores, members)]
    assert accounting.empirical_epsilon_lower_bound(in_lists, out_lists, 1e-5) == combined.epsilon
    single = auditing.one_run_audit(scores[2], members[2], 1e-5).epsilon
    assert auditing.empirical_epsilon_lower_bound(scores[2][members[2]], scores[2][~members[2]],
                                                  1e-5) == single


def test_abstentions_and_degenerate_inputs():
    rng = np.random.default_rng(5)
    members = rng.random(400) < 0.5
    scores = rng.normal(size=400) + 3 * members
    with_nan = scores.copy()
    with_nan[:50] = np.nan  # abstain on them; they still count as canaries
    audit = auditing.one_run_audit(with_nan, members, 1e-5)
    assert audit.n_canaries == 400 and audit.epsilon > 0
    assert auditing.one_run_audit(scores, np.ones(400, bool), 1e-5).epsilon == 0.0
    assert auditing.one_run_audit(np.full(400, np.nan), members, 1e-5).epsilon == 0.0
    with pytest.raises(MedleakError, match="delta"):
        auditing.one_run_audit(scores, members, 0.0)
    with pytest.raises(MedleakError, match="membership bits"):
        auditing.one_run_audit(scores, members[:10], 1e-5)
    with pytest.raises(MedleakError, match="subset_ratio"):
        auditing.one_run_audit(scores, members, 1e-5, inclusion_probability=9 / 17)
    with pytest.raises(MedleakError, match="models"):
        auditing.one_run_audit_models([scores], [], 1e-5)
