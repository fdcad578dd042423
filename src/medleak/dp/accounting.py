"""Privacy accounting for DP-SGD (dp-accounting), and what a guarantee implies for an attack.

Accounting: one DP-SGD step is a Poisson-subsampled Gaussian mechanism on privacy units (records
or patients) with noise multiplier sigma (noise std = sigma * clip_norm, sensitivity clip_norm)
under add/remove-one-unit adjacency. When batches are padded to `max_units` slots and truncated on
overflow (`medleak.dp.sampling`), the step is dp-accounting's `TruncatedSubsampledGaussianDpEvent`,
which the PLD accountant handles exactly; the RDP accountant only knows the untruncated event and
serves as an independent, looser cross-check. sigma is calibrated for a target (epsilon, delta) with
the PLD accountant over the real number of steps (`dp_accounting.calibrate_dp_mechanism`).

Attack bounds: an (epsilon, delta) guarantee (or better, the whole privacy profile delta(epsilon)
of the trained model) bounds the trade-off curve of any membership test on one unit, hence its
TPR at every FPR and its AUC (`auc_upper_bound`). Conversely, an attack on the canaries of one
trained model gives a lower bound on the epsilon actually spent (`medleak.dp.auditing`, the
one-run audit of Steinke, Nasr & Jagielski 2023; `empirical_epsilon_lower_bound` is re-exported
here for its callers).
"""

import functools
import math

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution

from medleak.dp import sampling
from medleak.dp.auditing import empirical_epsilon_lower_bound  # noqa: F401 (re-exported)
from medleak.errors import MedleakError

ACCOUNTANTS = ("pld", "rdp")
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default; smaller is slower for little gain
# Integer orders only: dp-accounting's fractional orders warn about non-convergence at small
# sigma; integer orders give a valid, marginally looser bound.
RDP_ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 1024)
_ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def default_delta(n_units: int) -> float:
    """delta = 1 / (n (1 + ln n)) for n privacy units (records, or patients at patient level).

    Strictly below 1/n for every n >= 2, by a factor that grows with n, so the expected number of
    units a "leak each unit with probability delta" mechanism exposes, n * delta = 1/(1 + ln n),
    is below one and shrinks with n (Dwork & Roth call delta ~ 1/n "very dangerous"; docs/DP.md).
    """
    if not (isinstance(n_units, (int, np.integer)) and n_units >= 2):
        raise MedleakError(f"default delta needs at least 2 privacy units (records or patients), "
                           f"got {n_units}; pass --delta explicitly")
    return 1.0 / (n_units * (1.0 + math.log(n_units)))


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
    """A fresh accountant for add/remove-one-unit adjacency."""
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            neighboring_relation=_ADD_OR_REMOVE, value_discretization_interval=PLD_DISCRETIZATION)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS,
                                               neighboring_relation=_ADD_OR_REMOVE)
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def training_event(noise_multiplier: float, sampling_rate: float, steps: int, *,
                   n_units: int | None = None, max_units: int | None = None,
                   truncated: bool = True) -> dp_accounting.DpEvent:
    """The DpEvent of `steps` DP-SGD steps (truncated Poisson when n_units/max_units are given)."""
    if truncated and n_units is not None and max_units is not None:
        step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=int(n_units), sampling_probability=float(sampling_rate),
            truncated_batch_size=int(max_units), noise_multiplier=float(noise_multiplier))
    else:
        step = dp_accounting.PoissonSampledDpEvent(
            float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier)))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def spent_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                  accountant: str = "pld", *, n_units: int | None = None,
                  max_units: int | None = None) -> float:
    """epsilon at `delta` after `steps` steps, from a fresh accountant ("pld" or "rdp").

    With n_units and max_units the PLD accountant accounts for truncation exactly; the RDP
    accountant has no truncated event and accounts for plain Poisson sampling.
    """
    if noise_multiplier == 0:
        return math.inf
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return _spent_epsilon(float(noise_multiplier), float(sampling_rate), int(steps), float(delta),
                          accountant, n_units, max_units)


@functools.lru_cache(maxsize=256)
def _spent_epsilon(noise_multiplier, sampling_rate, steps, delta, accountant, n_units, max_units):
    # Memoised: calibration's final check and the run summary ask for the same value, and each
    # truncated-PLD evaluation takes seconds. A pure function of its arguments.
    event = training_event(noise_multiplier, sampling_rate, steps, n_units=n_units,
                           max_units=max_units, truncated=(accountant == "pld"))
    return float(make_accountant(accountant).compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(epsilon: float, delta: float, sampling_rate: float, steps: int, *,
                               n_units: int | None = None, max_units: int | None = None,
                               rel_tol: float = 1e-3) -> float:
    """Smallest sigma (within a relative `rel_tol`) whose PLD epsilon at `delta` is <= `epsilon`.

    The search runs on the plain Poisson event (several times cheaper); with n_units/max_units
    the result is then checked with the exact truncated event (truncation at probability ~1e-6
    per step moves epsilon by ~1e-5 relative) and searched again on it if it does not comply.
    """
    if not epsilon > 0:
        raise MedleakError(f"--epsilon must be > 0 (or inf to disable DP), got {epsilon}")
    if not 0 < delta < 1:
        raise MedleakError(f"--delta must be in (0, 1) (0 means 1/n_units), got {delta}")
    # Bracket the PLD search with the (cheap, looser) RDP calibration: RDP needs at least as much
    # noise, so sigma_rdp is an upper end; walk the lower end down until it overshoots.
    upper = float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant("rdp"), lambda s: training_event(s, sampling_rate, steps),
        target_epsilon=float(epsilon), target_delta=float(delta), tol=1e-4))
    while spent_epsilon(upper, sampling_rate, steps, delta, "pld") > epsilon:
        upper *= 1.2  # not expected (RDP is looser), but never hand brentq a bad bracket
    lower = upper
    while lower > 1e-3:
        lower *= 0.85
        if spent_epsilon(lower, sampling_rate, steps, delta, "pld") > epsilon:
            break
    else:
        lower = 0.0
    sigma = float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant("pld"),
        lambda s: training_event(s, sampling_rate, steps),
        target_epsilon=float(epsilon), target_delta=float(delta),
        bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
        tol=rel_tol * upper))
    if n_units is None or max_units is None:
        return sigma
    units = dict(n_units=n_units, max_units=max_units)
    if spent_epsilon(sigma, sampling_rate, steps, delta, **units) <= epsilon:
        return sigma  # the usual case: truncation is rare enough not to matter
    # Truncation matters (small datasets): search again on the exact truncated event.
    upper = sigma * 1.05
    while spent_epsilon(upper, sampling_rate, steps, delta, **units) > epsilon:
        sigma, upper = upper, upper * 1.5
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant("pld"),
        lambda s: training_event(s, sampling_rate, steps, **units),
        target_epsilon=float(epsilon), target_delta=float(delta),
        bracket_interval=dp_accounting.ExplicitBracketInterval(sigma, upper),
        tol=rel_tol * upper))


def dp_summary(schedule: "sampling.DpSchedule", noise_multiplier: float, delta: float, *,
               clip_norm: float, unit: str, target_epsilon: float) -> dict:
    """The DP facts of one trained model, for metrics.json and the start-of-training print."""
    shape = schedule.shape
    units = dict(n_units=schedule.n_units, max_units=shape.max_units)
    return dict(
        epsilon=spent_epsilon(noise_multiplier, schedule.sampling_rate, schedule.steps, delta,
                              "pld", **units),
        epsilon_rdp=spent_epsilon(noise_multiplier, schedule.sampling_rate, schedule.steps, delta,
                                  "rdp"),
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        noise_multiplier=float(noise_multiplier),
        sampling_rate=float(schedule.sampling_rate),
        steps=int(schedule.steps),
        accountant="pld",
        unit=unit,
        clip_norm=float(clip_norm),
        n_units=int(schedule.n_units),
        expected_units=float(shape.expected_units),
        max_units=int(shape.max_units),
        records_per_unit=int(shape.records_per_unit),
        truncation_prob_per_step=schedule.truncation_prob,
    )


def format_summary(summary: dict) -> str:
    """One log line: `DP: epsilon=… delta=… sigma=… q=… steps=… (pld, patient-level, …)`."""
    return (f"DP: epsilon={summary['epsilon']:.4g} (rdp {summary['epsilon_rdp']:.4g}) "
            f"delta={summary['delta']:.3g} sigma={summary['noise_multiplier']:.4g} "
            f"q={summary['sampling_rate']:.4g} steps={summary['steps']} "
            f"clip_norm={summary['clip_norm']:g} ({summary['accountant']}, "
            f"{summary['unit']}-level, {summary['max_units']} unit slots)")


# --- What a guarantee implies for a membership attack --------------------------------------------


def privacy_profile(noise_multiplier: float, sampling_rate: float, steps: int, epsilons, *,
                    n_units: int | None = None, max_units: int | None = None) -> np.ndarray:
    """delta(epsilon) of the trained model at each of `epsilons` (PLD, pessimistic)."""
    common = dict(value_discretization_interval=PLD_DISCRETIZATION)
    if n_units is not None and max_units is not None:
        step_pld = privacy_loss_distribution.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=int(n_units), sampling_probability=float(sampling_rate),
            truncated_batch_size=int(max_units), noise_multiplier=float(noise_multiplier),
            **common)
    else:
        step_pld = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=float(noise_multiplier), sampling_prob=float(sampling_rate),
            **common)
    pld = step_pld.self_compose(int(steps))
    return np.asarray(pld.get_delta_for_epsilon(np.asarray(epsilons, dtype=float)), dtype=float)


def max_tpr(fpr, epsilons, deltas) -> np.ndarray:
    """Highest TPR any membership test can reach at `fpr` under every (epsilons[i], deltas[i]).

    An (eps, delta)-DP mechanism has trade-off curve (type-II error at type-I error alpha)
    f(alpha) >= max(0, 1 - delta - e^eps alpha, e^-eps (1 - delta - alpha)), for both directions
    of add/remove; holding for every point of the profile, the bound is the sup over the points.
    Using a finite subset of the profile can only raise this bound, so it stays valid.
    """
    fpr = np.asarray(fpr, dtype=float)[..., None]
    epsilons = np.asarray(epsilons, dtype=float)
    deltas = np.asarray(deltas, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        line_low = 1 - deltas - np.exp(epsilons) * fpr
        line_high = np.exp(-epsilons) * (1 - deltas - fpr)
    line_low = np.nan_to_num(line_low, nan=0.0, neginf=0.0)
    beta = np.max(np.maximum(0.0, np.maximum(line_low, line_high)), axis=-1)
    return 1.0 - beta


def auc_upper_bound(epsilons, deltas, n_grid: int = 4001) -> float:
    """Upper bound on the AUC of any membership test, from (epsilon, delta) pairs of a profile.

    The bound TPR(alpha) is non-decreasing, so a right-endpoint Riemann sum over a grid of FPRs
    (uniform plus log-spaced near 0) over-estimates its integral: the result is a valid bound.
    (eps, 0) alone gives exactly e^eps / (1 + e^eps); eps = inf gives 1.
    """
    if np.all(np.asarray(epsilons, dtype=float) == np.inf):
        return 1.0  # no guarantee
    grid = np.unique(np.concatenate([np.linspace(0, 1, n_grid), np.geomspace(1e-9, 1, n_grid)]))
    tpr = max_tpr(grid[1:], epsilons, deltas)
    return float(min(1.0, np.sum(np.diff(grid) * tpr)))


def auc_upper_bound_for_training(noise_multiplier: float, sampling_rate: float, steps: int, *,
                                 n_units: int | None = None, max_units: int | None = None,
                                 n_epsilons: int = 400) -> float:
    """AUC bound implied by a trained model's whole privacy profile (tighter than one point)."""
    if noise_multiplier == 0:
        return 1.0
    units = dict(n_units=n_units, max_units=max_units)
    eps_max = spent_epsilon(noise_multiplier, sampling_rate, steps, 1e-12, **units)
    epsilons = np.linspace(0.0, max(eps_max, 1e-3), n_epsilons)
    deltas = privacy_profile(noise_multiplier, sampling_rate, steps, epsilons, **units)
    return auc_upper_bound(epsilons, deltas)
