"""Poisson sampling of privacy units into fixed-shape, padded batches.

DP-SGD's privacy amplification assumes Poisson sampling: every unit (a record, or a patient for
patient-level DP) joins each step's batch independently with probability `q`. The batch size is
then random, but jit wants one shape, so every step is laid out in the same slots:

    `max_units` unit slots  x  `records_per_unit` record slots  =  `batch_slots` flat slots

Flat slot `b` belongs to unit slot `b // records_per_unit` (record-level DP: one record per unit).
Unused slots carry index 0 and `mask=False`; the estimator gives them zero weight.

Overflow: `max_units` is chosen from the binomial tail so that a step samples more than `max_units`
units with probability <= `tail_prob` (1e-6 by default). If it happens anyway, a uniformly random
subset of `max_units` of the sampled units is kept (truncated Poisson sampling, as in
`jax_privacy.batch_selection.CyclicPoissonSampling(truncated_batch_size=...)`), and the accounting
(`medleak.dp.accounting`) uses dp-accounting's `TruncatedSubsampledGaussianDpEvent`, which is exact for
this truncation. So an overflow costs nothing unaccounted for.

Patients with more than `records_per_unit` images contribute a fresh random subset of that many
images each time they are sampled. That choice depends only on the patient's own records, so the
patient still contributes one clipped gradient and the patient-level guarantee is unchanged.
"""

import dataclasses
import math

import numpy as np
from jax_privacy import batch_selection
from scipy import stats

from medleak.errors import MedleakError

DEFAULT_TAIL_PROB = 1e-6
DEFAULT_RECORDS_QUANTILE = 0.9


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The fixed slot layout of every DP step (the same for every run of a Trainer)."""

    max_units: int  # unit slots per logical batch
    records_per_unit: int  # record slots per unit slot (1 for record-level DP)
    expected_units: float  # expected number of sampled units per step

    @property
    def batch_slots(self) -> int:
        return self.max_units * self.records_per_unit


@dataclasses.dataclass(frozen=True)
class DpSchedule:
    """Everything the sampler and the accountant need to know about one run's batches."""

    shape: BatchShape
    n_units: int
    sampling_rate: float  # q: probability that a unit joins a step
    steps: int

    @property
    def truncation_prob(self) -> float:
        """Probability that one step samples more units than there are unit slots."""
        return truncation_probability(self.n_units, self.sampling_rate, self.shape.max_units)


def truncation_probability(n_units: int, sampling_rate: float, max_units: int) -> float:
    """P(Binomial(n_units, sampling_rate) > max_units): the chance that a step is truncated."""
    return float(stats.binom.sf(max_units, n_units, sampling_rate))


def padded_unit_count(n_units: int, sampling_rate: float, tail_prob: float = DEFAULT_TAIL_PROB,
                      multiple: int = 1) -> int:
    """Smallest slot count B (a multiple of `multiple`) with P(Binomial(n, q) > B) <= tail_prob."""
    if not 0 < tail_prob < 1:
        raise ValueError(f"tail_prob must be in (0, 1), got {tail_prob}")
    count = int(stats.binom.isf(tail_prob, n_units, sampling_rate))
    # isf is computed in floating point: step until the exact tail condition holds.
    while count < n_units and stats.binom.sf(count, n_units, sampling_rate) > tail_prob:
        count += 1
    count = max(count, 1)
    return int(math.ceil(count / multiple) * multiple)


def records_per_patient_cap(record_counts, quantile: float = DEFAULT_RECORDS_QUANTILE) -> int:
    """Default record slots per patient: the smallest count that covers `quantile` of patients.

    Covering every image of the patient with the most images would make the batch mostly padding
    on datasets with long-tailed image counts (CheXpert); patients above the cap contribute a
    random subset of their images per step instead.
    """
    record_counts = np.asarray(record_counts)
    return max(1, int(np.quantile(record_counts, quantile, method="inverted_cdf")))


def group_records_by_unit(record_unit_ids):
    """Maps arbitrary unit ids (one per record) to units 0..n_units-1 in CSR form.

    Returns `(order, offsets)`: the records of unit u are `order[offsets[u]:offsets[u + 1]]`.
    """
    record_unit_ids = np.asarray(record_unit_ids)
    _, unit_of_record = np.unique(record_unit_ids, return_inverse=True)
    order = np.argsort(unit_of_record, kind="stable").astype(np.int64)
    counts = np.bincount(unit_of_record)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return order, offsets


def batch_shape(record_unit_ids, expected_records: float, *, unit: str,
                records_per_unit: int | None = None, tail_prob: float = DEFAULT_TAIL_PROB,
                grad_accum: int = 1) -> BatchShape:
    """Slot layout for DP batches of `expected_records` records on average.

    Computed once from all training records (so that every run of a campaign, which trains on a
    subset, gets the same shape and jit compiles once). `record_unit_ids` is one id per record:
    the record's own index for record-level DP, its patient id for patient-level DP.
    For patient-level DP the expected number of patients per step is chosen so that the expected
    number of (capped) records per step is `expected_records`.
    """
    if unit not in ("record", "patient"):
        raise MedleakError(f"--dp_unit must be 'record' or 'patient', got {unit!r}")
    record_unit_ids = np.asarray(record_unit_ids)
    if unit == "record":
        records_per_unit = 1
        n_units = len(record_unit_ids)
        expected_units = float(expected_records)
    else:
        _, counts = np.unique(record_unit_ids, return_counts=True)
        if records_per_unit is None:
            records_per_unit = records_per_patient_cap(counts)
        n_units = len(counts)
        mean_records = float(np.mean(np.minimum(counts, records_per_unit)))
        expected_units = float(expected_records) / mean_records
    if not 0 < expected_units <= n_units:
        raise MedleakError(f"--batch_size={expected_records} needs between 1 and {n_units} "
                           f"{unit}s per step; lower --batch_size")
    # A Binomial with the same mean and fewer trials (a run's subset) has a lighter upper tail,
    # so slots sized on all units are enough for every run; the exact per-run truncation
    # probability is computed again by `make_schedule` and accounted for.
    max_units = padded_unit_count(n_units, expected_units / n_units, tail_prob, multiple=grad_accum)
    return BatchShape(max_units=max_units, records_per_unit=int(records_per_unit),
                      expected_units=expected_units)


def make_schedule(shape: BatchShape, n_units: int, steps: int) -> DpSchedule:
    """A run's schedule: `steps` steps at sampling rate q = expected units / n_units.

    The step count is the Trainer's (epochs x steps per epoch of the expected run size), the same
    for every run so that the training program compiles once; a run with fewer units than
    expected samples each of them a little more often, and the accounting uses its own q.
    """
    if n_units < 1:
        raise MedleakError("DP training needs at least one training unit; check the plan")
    sampling_rate = shape.expected_units / n_units
    if sampling_rate > 1:
        raise MedleakError(f"--batch_size asks for {shape.expected_units:.1f} units per step but "
                           f"this run has only {n_units}; lower --batch_size")
    return DpSchedule(shape=shape, n_units=int(n_units), sampling_rate=float(sampling_rate),
                      steps=int(steps))


def poisson_batches(schedule: DpSchedule, record_indices, record_unit_ids, seed: int):
    """Yields `steps` batches of `(indices (B,) int32, mask (B,) bool)` by Poisson sampling units.

    `record_indices` are the rows (into the Trainer's image array) of this run's training records
    and `record_unit_ids` their unit ids (record-level: anything unique per record, e.g. the row).
    """
    record_indices = np.asarray(record_indices, dtype=np.int64)
    order, offsets = group_records_by_unit(record_unit_ids)
    n_units = len(offsets) - 1
    if n_units != schedule.n_units:
        raise ValueError(f"schedule is for {schedule.n_units} units, got {n_units}")
    shape = schedule.shape
    rng = np.random.default_rng(seed)
    sampler = batch_selection.CyclicPoissonSampling(
        sampling_prob=schedule.sampling_rate, iterations=schedule.steps,
        truncated_batch_size=shape.max_units)
    for units in sampler.batch_iterator(n_units, rng):
        yield _layout_batch(units, order, offsets, record_indices, shape, rng)


def _layout_batch(units, order, offsets, record_indices, shape: BatchShape, rng):
    """Places each sampled unit's (at most records_per_unit random) records in its slot row."""
    units = np.asarray(units, dtype=np.int64)
    counts = offsets[units + 1] - offsets[units]
    # Positions of every record of every sampled unit inside `order`.
    owner = np.repeat(np.arange(len(units)), counts)
    first = np.repeat(offsets[units] - np.cumsum(counts) + counts, counts)
    positions = first + np.arange(counts.sum())
    # A random rank within each unit; keep ranks below the cap (a uniform random subset).
    keys = rng.random(len(positions))
    by_unit_then_key = np.lexsort((keys, owner))
    owner, positions = owner[by_unit_then_key], positions[by_unit_then_key]
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < shape.records_per_unit
    slots = owner[keep] * shape.records_per_unit + rank[keep]
    indices = np.zeros(shape.batch_slots, dtype=np.int32)
    mask = np.zeros(shape.batch_slots, dtype=bool)
    indices[slots] = record_indices[order[positions[keep]]]
    mask[slots] = True
    return indices, mask
