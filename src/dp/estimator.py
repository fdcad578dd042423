"""DP-SGD as a gradient estimator for the Trainer, and the per-run DP set-up.

The Trainer's step asks a gradient estimator for the update direction of a batch of
`(indices (B,), mask (B,))` slots. Its default is the masked mean gradient; with `--epsilon` set it
is `DpGradientEstimator`: per-unit clipped gradients summed (`src.dp.clipping`), Gaussian noise
sigma * clip_norm added and the result divided by the expected batch size (`src.dp.noise`).
With gradient accumulation the Trainer calls `clipped_sum` on each micro-batch (unit slots are
never split: micro-batches are whole multiples of `records_per_unit`), adds the sums, and calls
`privatize` once per logical batch: noise is added once per step, as the accounting assumes.

Set-up, once per Trainer: `validate_dp_config(config)` (refuses BatchNorm), then
`dp_batch_shape(config, record_unit_ids)` on all training records (fixed slots, one compile).
Per run: `plan_dp_run(config, shape, run_unit_ids)` calibrates sigma for the run's number of units
and steps and returns the schedule, the estimator and the summary for metrics.json.
"""

import dataclasses
import functools
from typing import Callable

import numpy as np

from src.dp import accounting, clipping, noise, sampling
from src.errors import MedleakError


@dataclasses.dataclass(frozen=True)
class DpGradientEstimator:
    """Clip per unit, sum, add N(0, (sigma * clip_norm)^2), divide by the expected unit count."""

    clip_norm: float
    noise_multiplier: float
    expected_units: float
    records_per_unit: int = 1

    def clipped_sum(self, per_example_loss: Callable, params, inputs, mask):
        """Sum of per-unit clipped gradients of one (micro-)batch and its `ClipStats`."""
        return clipping.clipped_grad_sum(per_example_loss, params, inputs, mask,
                                         clip_norm=self.clip_norm,
                                         records_per_unit=self.records_per_unit)

    def privatize(self, grad_sum, key):
        """Noisy average of a logical batch's clipped-gradient sum (call once per step)."""
        return noise.noisy_mean(grad_sum, key, noise_multiplier=self.noise_multiplier,
                                clip_norm=self.clip_norm, expected_units=self.expected_units)

    def __call__(self, per_example_loss: Callable, params, inputs, mask, key):
        """One step's DP gradient: `(noisy mean gradient, ClipStats)`."""
        grad_sum, stats = self.clipped_sum(per_example_loss, params, inputs, mask)
        return self.privatize(grad_sum, key), stats


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """One run's DP training: its batch schedule, estimator and accounting summary."""

    schedule: sampling.DpSchedule
    estimator: DpGradientEstimator
    summary: dict


def validate_dp_config(config) -> None:
    """Refuses DP settings that give no guarantee (BatchNorm, bad values); no-op if DP is off."""
    if not config.dp:
        return
    if config.norm == "batch":
        raise MedleakError("--norm=batch cannot be used with --epsilon: BatchNorm mixes examples "
                           "in a batch, so per-example clipping bounds nothing; use --norm=group")
    if config.dp_unit not in ("record", "patient"):
        raise MedleakError(f"--dp_unit must be 'record' or 'patient', got {config.dp_unit!r}")
    if not config.epsilon > 0:
        raise MedleakError(f"--epsilon must be > 0 (inf disables DP), got {config.epsilon}")
    if not 0 <= config.delta < 1:
        raise MedleakError(f"--delta must be in [0, 1) (0 means 1/n_units), got {config.delta}")
    if not config.clip_norm > 0:
        raise MedleakError(f"--clip_norm must be > 0, got {config.clip_norm}")


def refuse_batch_stats(variables) -> None:
    """Refuses a model whose variables hold BatchNorm statistics (whatever the config says)."""
    if "batch_stats" in variables and len(variables["batch_stats"]) > 0:
        raise MedleakError("this model has BatchNorm layers, which DP-SGD cannot use; "
                           "use --norm=group with --epsilon")


def dp_batch_shape(config, record_unit_ids) -> sampling.BatchShape:
    """Fixed slot layout for every run of a Trainer (call once, on all training records).

    `record_unit_ids`: per training record, its patient id (any hashable values) for
    patient-level DP; ignored for record-level DP (each record is its own unit).
    """
    validate_dp_config(config)
    record_unit_ids = np.asarray(record_unit_ids)
    if config.dp_unit == "record":
        record_unit_ids = np.arange(len(record_unit_ids))
    return sampling.batch_shape(record_unit_ids, config.batch_size, unit=config.dp_unit,
                                grad_accum=config.grad_accum)


def plan_dp_run(config, shape: sampling.BatchShape, run_unit_ids) -> DpPlan:
    """Calibrates sigma for one run (its units, steps and sampling rate) and summarises it.

    `run_unit_ids`: the unit id of each of this run's training records (record-level: anything
    unique per record). delta = config.delta, or 1/n_units when it is 0.
    """
    validate_dp_config(config)
    n_units = len(np.unique(np.asarray(run_unit_ids)))
    schedule = sampling.make_schedule(shape, n_units, config.epochs)
    delta = config.delta if config.delta > 0 else accounting.default_delta(n_units)
    sigma = _calibrate_cached(float(config.epsilon), float(delta), schedule.sampling_rate,
                              schedule.steps, n_units, shape.max_units)
    summary = accounting.dp_summary(schedule, sigma, delta, clip_norm=config.clip_norm,
                                    unit=config.dp_unit, target_epsilon=config.epsilon)
    estimator = DpGradientEstimator(clip_norm=float(config.clip_norm), noise_multiplier=sigma,
                                    expected_units=shape.expected_units,
                                    records_per_unit=shape.records_per_unit)
    return DpPlan(schedule=schedule, estimator=estimator, summary=summary)


@functools.lru_cache(maxsize=64)
def _calibrate_cached(epsilon, delta, sampling_rate, steps, n_units, max_units) -> float:
    # Workers train many runs; runs with the same number of units share one calibration.
    return accounting.calibrate_noise_multiplier(epsilon, delta, sampling_rate, steps,
                                                 n_units=n_units, max_units=max_units)
