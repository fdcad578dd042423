"""DP-SGD as a gradient estimator for the Trainer, and the per-run DP set-up.

The Trainer (src/medleak/train_utils/training.py) takes a batch schedule and a gradient estimator. With
`--epsilon` set, `DpTraining` supplies both:

- `schedule_fn(train_indices, rng)`: Poisson-sampled, padded batches of the run's units
  (`medleak.dp.sampling`), plus the run's calibrated noise multiplier as a per-step `"noise_multiplier"`
  entry, so runs with different numbers of units (different sigma) share one compiled program;
- `gradient_estimator(...)`: per-unit clipped gradients summed (`medleak.dp.clipping`) over the
  `grad_accum` micro-batches (unit slots are never split), then Gaussian noise sigma * clip_norm
  added once and the result divided by the expected batch size (`medleak.dp.noise`);
- `summary(train_indices)`: epsilon spent, delta, sigma, q, steps, accountant… for metrics.json.

`DpGradientEstimator` is the same computation as a plain object for other callers (benchmarks,
tests). BatchNorm is refused (`validate_dp_config`, `refuse_batch_stats`).
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medleak.dp import accounting, clipping, noise, sampling
from medleak.errors import MedleakError


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
        raise MedleakError(f"--delta must be in [0, 1) (0: 1/(n (1 + ln n)) for n units), "
                           f"got {config.delta}")
    if not 0 < config.clip_norm < float("inf"):
        raise MedleakError(f"--clip_norm must be a positive number, got {config.clip_norm}")


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


def campaign_delta(config, record_patient_ids, stored_plan: dict | None = None):
    """`config` with --delta=0 replaced by the campaign's delta, fixed when the plan is made.

    delta = `accounting.default_delta(n)`, n = the training split's privacy units (records, or
    patients with --dp_unit=patient); each run trains on a subset of them, so delta < 1/n_run
    too. The result goes into plan.json's train_config, so every run and worker uses the same
    value. A logdir whose stored plan has delta 0 (planned before delta was fixed at planning)
    keeps 0, so its plan still matches; its runs then get default_delta of their own units.
    Without DP, or with an explicit --delta, `config` is returned unchanged.
    """
    if not config.dp or config.delta > 0:
        return config
    if stored_plan is not None and float(stored_plan.get("train_config", {}).get("delta", 0)) == 0:
        return config
    record_patient_ids = np.asarray(record_patient_ids)
    n_units = (len(record_patient_ids) if config.dp_unit == "record"
               else len(np.unique(record_patient_ids)))
    return dataclasses.replace(config, delta=accounting.default_delta(int(n_units)))


def plan_dp_run(config, shape: sampling.BatchShape, run_unit_ids, steps: int) -> DpPlan:
    """Calibrates sigma for one run (its units, steps and sampling rate) and summarises it.

    `run_unit_ids`: the unit id of each of this run's training records (record-level: anything
    unique per record). delta = config.delta, or `accounting.default_delta(n_units)` when it is 0
    (campaigns fix it for all runs when planned: `campaign_delta`).
    """
    validate_dp_config(config)
    n_units = len(np.unique(np.asarray(run_unit_ids)))
    schedule = sampling.make_schedule(shape, n_units, steps)
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


class DpTraining:
    """DP-SGD for one Trainer: its `schedule_fn`, `gradient_estimator` and per-run `summary`.

        dp = DpTraining(config, train_table.df["patient_id"], steps_per_epoch)
        trainer = Trainer(..., schedule_fn=dp.schedule_fn, gradient_estimator=dp.gradient_estimator)
        print(format_summary(dp.summary(train_indices)))   # before trainer.train(train_indices, …)
    """

    def __init__(self, config, record_patient_ids, steps_per_epoch: int):
        """`record_patient_ids`: the patient of every training row (used for patient-level DP)."""
        validate_dp_config(config)
        self.config = config
        record_patient_ids = np.asarray(record_patient_ids)
        if config.dp_unit == "record":
            self.record_unit_ids = np.arange(len(record_patient_ids))
        else:
            _, self.record_unit_ids = np.unique(record_patient_ids, return_inverse=True)
        self.shape = dp_batch_shape(config, self.record_unit_ids)
        self.steps = int(config.epochs * steps_per_epoch)
        self._plans = {}

    def plan(self, train_indices) -> DpPlan:
        """The run's DP plan (calibrated once per distinct set of rows)."""
        train_indices = np.asarray(train_indices, dtype=np.int64)
        key = train_indices.tobytes()
        if key not in self._plans:
            self._plans = {key: plan_dp_run(self.config, self.shape,
                                            self.record_unit_ids[train_indices], self.steps)}
        return self._plans[key]

    def summary(self, train_indices) -> dict:
        """epsilon spent, delta, sigma, q, steps, accountant… of the run on `train_indices`."""
        return dict(self.plan(train_indices).summary)

    def schedule_fn(self, train_indices, rng) -> dict:
        """The Trainer's batch schedule: Poisson-sampled padded batches + the run's sigma."""
        plan = self.plan(train_indices)
        train_indices = np.asarray(train_indices, dtype=np.int64)
        batches = list(sampling.poisson_batches(plan.schedule, train_indices,
                                                self.record_unit_ids[train_indices], rng))
        indices = np.stack([indices for indices, _ in batches])
        mask = np.stack([mask for _, mask in batches])
        sigma = np.full(len(batches), plan.estimator.noise_multiplier, dtype=np.float32)
        return {"indices": indices, "mask": mask, "noise_multiplier": sigma}

    def gradient_estimator(self, model_loss, params, model_state, images, labels, batch, key):
        """The Trainer's estimator hook: clipped per-unit sums over micro-batches, noise once."""
        if model_state:
            raise MedleakError("this model has BatchNorm statistics, which DP-SGD cannot use; "
                               "use --norm=group with --epsilon")

        def loss_fn(p, inputs):
            losses, _ = model_loss.batch_losses(p, {}, *inputs)
            return losses

        dp = DpGradientEstimator(clip_norm=float(self.config.clip_norm),
                                 noise_multiplier=batch["noise_multiplier"],
                                 expected_units=self.shape.expected_units,
                                 records_per_unit=self.shape.records_per_unit)
        micro_batches = self.config.grad_accum
        inputs, mask = (images, labels), batch["mask"]
        if micro_batches == 1:
            grad_sum, stats = dp.clipped_sum(loss_fn, params, inputs, mask)
        else:
            def split(a):
                return a.reshape(micro_batches, a.shape[0] // micro_batches, *a.shape[1:])

            def accumulate(carry, micro):
                micro_inputs, micro_mask = micro
                sums = dp.clipped_sum(loss_fn, params, micro_inputs, micro_mask)
                return jax.tree.map(jnp.add, carry, sums), None

            zero_stats = clipping.ClipStats(*(jnp.zeros((), jnp.float32),) * 4)
            init = (jax.tree.map(jnp.zeros_like, params), zero_stats)
            (grad_sum, stats), _ = jax.lax.scan(
                accumulate, init, (jax.tree.map(split, inputs), split(mask)))
        grads = dp.privatize(grad_sum, key)
        return grads, model_state, {"loss": stats.loss, "clipped_fraction": stats.clipped_fraction}
