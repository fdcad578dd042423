"""Poisson sampling into fixed-shape padded batches (src/medleak/dp/sampling.py)."""

import numpy as np
import pytest
from scipy import stats

from medleak.dp import sampling
from medleak.errors import MedleakError


def test_padded_unit_count_is_the_smallest_with_tail_below_target():
    for n, q, tail in [(1000, 0.05, 1e-6), (50_000, 0.002, 1e-9), (40, 0.5, 1e-3)]:
        slots = sampling.padded_unit_count(n, q, tail)
        assert stats.binom.sf(slots, n, q) <= tail
        assert stats.binom.sf(slots - 1, n, q) > tail
    assert sampling.padded_unit_count(1000, 0.05, 1e-6, multiple=8) % 8 == 0


def test_batch_shape_record_and_patient_levels():
    shape = sampling.batch_shape(np.arange(1000), 50, unit="record")
    assert shape.records_per_unit == 1 and shape.expected_units == 50
    assert shape.batch_slots == shape.max_units
    tail = sampling.truncation_probability(1000, 0.05, shape.max_units)
    assert tail <= sampling.DEFAULT_TAIL_PROB
    # 300 patients with 1..4 images; cap 4 covers everybody: 2.5 images on average.
    patient_ids = np.repeat(np.arange(300), np.tile([1, 2, 3, 4], 75))
    shape = sampling.batch_shape(patient_ids, 25, unit="patient", records_per_unit=4, grad_accum=4)
    assert shape.records_per_unit == 4 and shape.expected_units == pytest.approx(10.0)
    assert shape.max_units % 4 == 0
    with pytest.raises(MedleakError, match="batch_size"):
        sampling.batch_shape(np.arange(10), 50, unit="record")
    with pytest.raises(MedleakError, match="dp_unit"):
        sampling.batch_shape(np.arange(10), 5, unit="image")


def test_records_per_patient_cap_is_a_quantile():
    counts = np.array([1] * 90 + [50] * 10)
    assert sampling.records_per_patient_cap(counts, 0.9) == 1
    assert sampling.records_per_patient_cap(counts, 0.95) == 50


def test_patient_batches_hold_whole_patients_in_their_slot_rows():
    rng = np.random.default_rng(0)
    n_patients = 200
    counts = rng.integers(1, 7, size=n_patients)
    patient_of_record = np.repeat(np.arange(n_patients), counts)
    # The run's records are rows 1000.. of the Trainer's array, in shuffled order.
    perm = rng.permutation(len(patient_of_record))
    rows, run_patients = 1000 + perm, patient_of_record[perm]
    shape = sampling.BatchShape(max_units=40, records_per_unit=4, expected_units=20.0)
    schedule = sampling.make_schedule(shape, n_patients, steps=20)
    assert schedule.sampling_rate == pytest.approx(0.1)
    patient_of_row = dict(zip(rows.tolist(), run_patients.tolist()))
    seen_per_patient = np.zeros(n_patients)
    batches = list(sampling.poisson_batches(schedule, rows, run_patients, seed=3))
    assert len(batches) == schedule.steps
    for indices, mask in batches:
        assert indices.shape == mask.shape == (160,) and indices.dtype == np.int32
        assert np.all(indices[~mask] == 0)
        slot_rows = indices.reshape(40, 4)
        slot_mask = mask.reshape(40, 4)
        # Real slots fill each row from the left; a row is one patient, no duplicates.
        assert np.all(np.sort(slot_mask, axis=1)[:, ::-1] == slot_mask)
        real = indices[mask]
        assert len(set(real.tolist())) == len(real)
        for row, row_mask in zip(slot_rows, slot_mask):
            if not row_mask.any():
                continue
            patients = {patient_of_row[r] for r in row[row_mask].tolist()}
            assert len(patients) == 1
            patient = patients.pop()
            assert row_mask.sum() == min(counts[patient], 4)
            seen_per_patient[patient] += 1
    assert seen_per_patient.sum() > 0


def test_poisson_inclusion_rate_and_batch_size_distribution():
    n, expected, steps = 500, 25.0, 4000
    shape = sampling.BatchShape(max_units=500, records_per_unit=1, expected_units=expected)
    schedule = sampling.DpSchedule(shape=shape, n_units=n, sampling_rate=expected / n, steps=steps)
    q = schedule.sampling_rate
    hits = np.zeros(n)
    sizes = []
    for indices, mask in sampling.poisson_batches(schedule, np.arange(n), np.arange(n), seed=1):
        hits[indices[mask]] += 1
        sizes.append(mask.sum())
    sizes = np.array(sizes)
    # Batch size ~ Binomial(n, q): mean and variance within 5 standard errors.
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)
    var = n * q * (1 - q)
    assert abs(sizes.var() - var) < 5 * var * np.sqrt(2 / steps)
    # Every unit joins each step independently with probability q: the per-unit counts are
    # Binomial(steps, q); a chi-square goodness-of-fit test on them must not reject.
    assert abs(hits.mean() - steps * q) < 5 * np.sqrt(steps * q * (1 - q) / n)
    chi2 = np.sum((hits - steps * q) ** 2 / (steps * q * (1 - q)))
    assert stats.chi2.sf(chi2, n - 1) > 1e-4


def test_overflow_truncates_to_a_uniform_subset():
    n, steps = 100, 3000
    shape = sampling.BatchShape(max_units=5, records_per_unit=1, expected_units=10.0)
    schedule = sampling.make_schedule(shape, n, steps=steps)
    assert schedule.steps == steps and schedule.truncation_prob > 0.9
    hits = np.zeros(n)
    for indices, mask in sampling.poisson_batches(schedule, np.arange(n), np.arange(n), seed=2):
        assert mask.sum() <= 5
        hits[indices[mask]] += 1
    # Truncation keeps a uniformly random subset: every unit equally often (chi-square).
    expected = hits.sum() / n
    assert stats.chi2.sf(np.sum((hits - expected) ** 2 / expected), n - 1) > 1e-4


def test_capped_patients_contribute_a_fresh_random_subset():
    # One patient with 10 images and a cap of 2: each image appears about equally often.
    shape = sampling.BatchShape(max_units=1, records_per_unit=2, expected_units=1.0)
    schedule = sampling.DpSchedule(shape=shape, n_units=1, sampling_rate=1.0, steps=2000)
    hits = np.zeros(10)
    for indices, mask in sampling.poisson_batches(schedule, np.arange(10), np.zeros(10), seed=4):
        assert mask.sum() == 2 and indices[0] != indices[1]
        hits[indices[mask]] += 1
    assert stats.chi2.sf(np.sum((hits - 400) ** 2 / 400), 9) > 1e-4


def test_make_schedule_refuses_too_few_units():
    shape = sampling.BatchShape(max_units=8, records_per_unit=1, expected_units=5.0)
    with pytest.raises(MedleakError, match="batch_size"):
        sampling.make_schedule(shape, 3, steps=10)
