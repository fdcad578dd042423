"""DP-SGD wired into the real Trainer (src/medleak/dp/estimator.py DpTraining + src/medleak/train_utils)."""

import dataclasses

import jax
import numpy as np
import pytest

from medleak.config import TrainConfig
from medleak.dp import accounting, estimator
from medleak.errors import MedleakError
from medleak.train_utils import training

N_PATIENTS = 90


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    counts = np.tile([1, 2, 3], N_PATIENTS // 3)
    patient_ids = np.repeat([f"p{i:03d}" for i in range(N_PATIENTS)], counts)
    n = len(patient_ids)
    labels = rng.integers(0, 2, size=n)
    images = rng.integers(0, 100, size=(n, 16, 16, 1)).astype(np.uint8)
    images[labels == 1, 4:12, 4:12] += 120  # a learnable bright square
    one_hot = np.eye(2, dtype=np.float32)[labels]
    return images, one_hot, patient_ids


@pytest.mark.slow
def test_patient_level_dp_training_compiles_once_and_records_its_guarantee(data):
    images, labels, patient_ids = data
    config = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=1, batch_size=8,
                         learning_rate=0.5, grad_accum=2, augment="none", eval_views=1,
                         epsilon=1.0, clip_norm=1.0, dp_unit="patient", weight_decay=0.0)
    expected = len(patient_ids) // 2
    steps_per_epoch = training.steps_per_epoch(expected, config.batch_size)
    dp = estimator.DpTraining(config, patient_ids, steps_per_epoch)
    assert dp.shape.records_per_unit == 3 and dp.shape.expected_units == pytest.approx(4.0)
    trainer = training.Trainer(config, images, labels, "multiclass", expected_train_size=expected,
                               schedule_fn=dp.schedule_fn,
                               gradient_estimator=dp.gradient_estimator)
    # Two runs on the two halves of the patients: one compiled program.
    for run, patients_in in enumerate([np.arange(0, 45), np.arange(45, 90)]):
        rows = np.flatnonzero(np.isin(patient_ids, [f"p{i:03d}" for i in patients_in]))
        summary = dp.summary(rows)
        assert summary["n_units"] == 45 and summary["unit"] == "patient"
        assert summary["steps"] == steps_per_epoch
        assert summary["sampling_rate"] == pytest.approx(4 / 45)
        model = trainer.train(rows, seed=run, progress=False)
        assert np.all(np.isfinite(model.losses)) and len(model.losses) == summary["steps"]
        schedule = trainer.schedule(rows, seed=run)
        assert np.all(schedule["noise_multiplier"] == np.float32(summary["noise_multiplier"]))
        assert set(schedule["indices"][schedule["mask"]].tolist()) <= set(rows.tolist())
        fresh = accounting.spent_epsilon(summary["noise_multiplier"], summary["sampling_rate"],
                                         summary["steps"], summary["delta"],
                                         n_units=summary["n_units"], max_units=summary["max_units"])
        assert fresh == pytest.approx(summary["epsilon"]) and 0.99 <= fresh <= 1.0
    assert len(trainer._programs) == 1


@pytest.mark.slow
def test_dp_without_noise_or_clipping_trains_like_the_masked_mean(data):
    """The DP estimator inside the real Trainer, at sigma=0 and a huge clip norm, takes the same
    steps as the default estimator would on the same (Poisson) batches."""
    images, labels, patient_ids = data
    config = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=1, batch_size=8,
                         learning_rate=0.1, momentum=0.0, augment="none", eval_views=1,
                         epsilon=1.0, clip_norm=1e6, dp_unit="record", weight_decay=0.0,
                         warmup=0.0)
    dp = estimator.DpTraining(config, patient_ids, steps_per_epoch=3)
    rows = np.arange(40)

    def schedule_without_noise(train_indices, rng):
        # DP-shaped batches (the estimator's slot layout) with exactly the expected number of
        # real slots, so that the expected and the realised batch sizes agree.
        indices = rng.choice(train_indices, size=(3, dp.shape.batch_slots)).astype(np.int32)
        mask = np.zeros(indices.shape, dtype=bool)
        mask[:, : int(dp.shape.expected_units)] = True
        return {"indices": indices, "mask": mask, "noise_multiplier": np.zeros(3, np.float32)}

    common = dict(expected_train_size=24, schedule_fn=schedule_without_noise)
    dp_trainer = training.Trainer(config, images, labels, "multiclass",
                                  gradient_estimator=dp.gradient_estimator, **common)
    sgd_config = dataclasses.replace(config, epsilon=float("inf"))
    sgd_trainer = training.Trainer(sgd_config, images, labels, "multiclass", **common)
    dp_model = dp_trainer.train(rows, seed=1, progress=False)
    sgd_model = sgd_trainer.train(rows, seed=1, progress=False)
    np.testing.assert_allclose(dp_model.losses, sgd_model.losses, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(dp_model.params), jax.tree.leaves(sgd_model.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_batch_norm_is_refused_before_training(data):
    _, _, patient_ids = data
    config = TrainConfig(model="small_cnn", norm="batch", epsilon=1.0, batch_size=8)
    with pytest.raises(MedleakError, match="norm=group"):
        estimator.DpTraining(config, patient_ids, steps_per_epoch=3)
    with pytest.raises(MedleakError, match="clip_norm"):
        estimator.DpTraining(dataclasses.replace(config, norm="group", clip_norm=float("inf")),
                             patient_ids, steps_per_epoch=3)
