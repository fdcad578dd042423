"""Empirical epsilon from ONE training run: the audit of Steinke, Nasr & Jagielski (2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846): m canaries are each
included in the training set independently with probability 1/2 (coin S_i). After training, an
attacker that sees only the trained model (and anything independent of S) guesses "IN" for some
canaries and abstains on the rest. If training is (epsilon, delta)-DP, the number W of correct
guesses among r guesses satisfies, for every v (their main theorem, in the form with delta > 0),

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

So v observed correct guesses reject every epsilon whose right-hand side is <= beta: the largest
such epsilon is a lower bound on the epsilon actually spent, at confidence 1 - beta. The
computation is jax-privacy's (`CanaryScoreAuditor.epsilon_one_run`, an implementation of this
paper); this module only decides the guesses, fixed before looking at the scores: "IN" for the
top r canaries by attack score, for each r in a small grid of fractions of m (`GUESS_FRACTIONS`),
Bonferroni-corrected over the grid (and over target models, when several are audited).

The trials are one model's canaries, so they need no independence across models: the
randomness the theorem uses is the canaries' coins, not the training noise. How medleak's
campaigns supply such canaries, and what that assumes, is in docs/DP.md ("Empirical ε").
"""

import dataclasses

import numpy as np
from jax_privacy import auditing

from medleak.errors import MedleakError

# Guess counts r = fraction * m, chosen before the scores are seen (the audit is then valid for
# the largest bound over them at significance / len(grid)). Small r finds strong leakage of a
# few canaries; r = m / 2 finds weak leakage spread over all of them.
GUESS_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit's result: `epsilon` is a lower bound at confidence 1 - significance."""

    epsilon: float
    significance: float
    delta: float
    n_models: int
    n_canaries: int  # summed over models
    n_guesses: int  # of the best hypothesis (0 when no hypothesis rejects epsilon = 0)
    n_correct: int


def guess_counts(n_canaries: int, fractions=GUESS_FRACTIONS) -> np.ndarray:
    """The distinct guess counts r = max(1, round(fraction * m)) that the audit tries."""
    counts = np.maximum(1, np.rint(np.asarray(fractions, dtype=float) * n_canaries))
    counts = counts.astype(np.int64)
    return np.unique(np.minimum(counts, n_canaries))


def _check(delta: float, significance: float) -> None:
    if not 0 < delta < 1:
        raise MedleakError(f"one-run audit: delta must be in (0, 1), got {delta} (use the "
                           "campaign's delta from its runs' metrics.json)")
    if not 0 < significance < 1:
        raise MedleakError(f"one-run audit: significance must be in (0, 1), got {significance}")


def check_inclusion_probability(inclusion_probability: float) -> None:
    """Refuses canaries whose coins are not fair (the theorem needs P(IN) = 1/2 exactly)."""
    if not abs(float(inclusion_probability) - 0.5) < 1e-12:
        raise MedleakError(
            f"one-run audit: canaries must be IN with probability 1/2, got {inclusion_probability} "
            "(a campaign needs --subset_ratio=0.5 and an even --n_runs for its empirical epsilon)")


def one_run_audit(scores, members, delta: float, significance: float = 0.05, *,
                  fractions=GUESS_FRACTIONS, inclusion_probability: float = 0.5) -> OneRunAudit:
    """epsilon lower bound from the canaries of ONE trained model (higher score = more likely IN).

    `scores` (m,): the attack's score per canary; non-finite scores are abstentions (the canary
    still counts in m). `members` (m,) bool: the canaries' coins, each IN with probability 1/2
    independently. Guesses: IN for the top r scores (ties at the r-th score included, a function
    of the scores only), for every r of `guess_counts`, Bonferroni over them.
    `inclusion_probability`: P(IN) of each coin (a campaign's k / n_runs); must be 1/2.
    """
    _check(delta, significance)
    check_inclusion_probability(inclusion_probability)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    if scores.shape != members.shape:
        raise MedleakError(f"one-run audit: {scores.size} scores but {members.size} "
                           "membership bits")
    m = scores.size
    finite = np.isfinite(scores)
    if m == 0 or not finite.any() or members.all() or not members.any():
        # No canary, no guess possible, or a degenerate draw (jax-privacy needs both classes).
        return OneRunAudit(0.0, significance, delta, 1, m, 0, 0)
    scores = np.where(finite, scores, -np.inf)
    descending = np.sort(scores[finite])[::-1]
    counts = guess_counts(int(finite.sum()), fractions)
    auditor = auditing.CanaryScoreAuditor(scores[members], scores[~members])
    level = significance / counts.size
    best = OneRunAudit(0.0, significance, delta, 1, m, 0, 0)
    for r in counts:
        threshold = descending[r - 1]
        eps = float(auditor.epsilon_one_run(
            level, delta, threshold_strategy=auditing.Explicit(float(threshold))))
        if eps > best.epsilon:
            guessed = scores >= threshold
            best = OneRunAudit(eps, significance, delta, 1, m, int(guessed.sum()),
                               int((guessed & members).sum()))
    return best


def one_run_audit_models(model_scores, model_members, delta: float, significance: float = 0.05,
                         *, fractions=GUESS_FRACTIONS,
                         inclusion_probability: float = 0.5) -> OneRunAudit:
    """The largest one-run bound over several target models, Bonferroni over the models.

    Each model is audited on its own canaries at significance / n_models (a union bound: valid
    however the models' coins are correlated, e.g. by the campaign's exactly-k plan).
    """
    _check(delta, significance)
    check_inclusion_probability(inclusion_probability)
    model_scores, model_members = list(model_scores), list(model_members)
    if len(model_scores) != len(model_members):
        raise MedleakError(f"one-run audit: {len(model_scores)} models' scores but "
                           f"{len(model_members)} models' membership bits")
    if not model_scores:
        return OneRunAudit(0.0, significance, delta, 0, 0, 0, 0)
    level = significance / len(model_scores)
    audits = [one_run_audit(s, m, delta, level, fractions=fractions,
                            inclusion_probability=inclusion_probability)
              for s, m in zip(model_scores, model_members)]
    best = max(audits, key=lambda a: a.epsilon)
    return dataclasses.replace(best, significance=significance, n_models=len(audits),
                               n_canaries=sum(a.n_canaries for a in audits))


def empirical_epsilon_lower_bound(in_scores, out_scores, delta: float,
                                  significance: float = 0.05, *,
                                  inclusion_probability: float = 0.5) -> float:
    """One-run epsilon lower bound from IN and OUT canaries' attack scores (higher = IN).

    `in_scores`/`out_scores`: 1-D arrays of ONE target model's canaries, or lists with one array
    per target model (then Bonferroni over the models, `one_run_audit_models`). Canaries of
    several models pooled into one array are not one run's canaries: pass lists instead.
    """
    per_model = (isinstance(in_scores, (list, tuple)) and len(in_scores) > 0
                 and np.ndim(in_scores[0]) == 1)
    if not per_model:
        in_scores, out_scores = [in_scores], [out_scores]
    scores, members = [], []
    for a, b in zip(in_scores, out_scores, strict=True):
        a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        scores.append(np.concatenate([a, b]))
        members.append(np.concatenate([np.ones(a.size, bool), np.zeros(b.size, bool)]))
    return one_run_audit_models(scores, members, delta, significance,
                                inclusion_probability=inclusion_probability).epsilon
