"""Resumable runs (src/medleak/train_utils/checkpoint.py + Trainer.train(checkpoints=...)): a run
interrupted mid-epoch and resumed from its last checkpoint trains the same model as one that ran
straight through, for ordinary and DP-SGD training; checkpoints of other runs, of diverged runs and
incomplete checkpoints are never resumed from."""

import shutil

import jax
import numpy as np
import pytest

from medleak.config import TrainConfig
from medleak.dp import estimator
from medleak.train_utils.checkpoint import RunCheckpoints
from medleak.train_utils.training import Trainer, TrainingDiverged
from tests.test_train_training import N_TEST, N_TRAIN, config, patch_dataset

ROWS = np.arange(48)
EPOCH_STEPS = 3  # 48 rows / batch 16


class Preempted(Exception):
    """Raised from `after_chunk` to stop a run the way a killed worker stops: state in memory lost."""


def preempt_after(steps: int):
    def after_chunk(steps_done):
        if steps_done == steps:
            raise Preempted

    return after_chunk


def interrupted_then_resumed(trainer, rows, directory, *, stop_after: int, seed: int, resume_seed: int):
    """Trains until `stop_after` steps (saving at every epoch boundary), then resumes in a fresh
    RunCheckpoints, passing another seed (as a re-claimed run with a new attempt number would)."""
    with pytest.raises(Preempted):
        trainer.train(rows, seed, progress=False, checkpoints=RunCheckpoints(directory, every_seconds=0),
                      after_chunk=preempt_after(stop_after))
    saved_step = RunCheckpoints(directory).latest_step()
    resumed = trainer.train(rows, resume_seed, progress=False,
                            checkpoints=RunCheckpoints(directory, every_seconds=0))
    return saved_step, resumed


def assert_same_model(trainer, a, b):
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6, atol=1e-7)
    for x, y in zip(jax.tree.leaves(a.eval_variables), jax.tree.leaves(b.eval_variables)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.infer_test(a), trainer.infer_test(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trainer.infer_train_views(a), trainer.infer_train_views(b), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def batch_norm_run():
    """A BatchNorm + EMA + momentum Trainer (every part of the TrainState) and a straight run."""
    rng = np.random.default_rng(0)
    (train_images, train_labels), (test_images, test_labels) = patch_dataset(N_TRAIN, rng), patch_dataset(N_TEST, rng)
    trainer = Trainer(config(epochs=3, norm="batch", ema_decay=0.9, augment="medium"), train_images, train_labels,
                      "multiclass", test_images, test_labels, expected_train_size=len(ROWS))
    return trainer, trainer.train(ROWS, seed=7, progress=False)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(batch_norm_run, tmp_path):
    trainer, straight = batch_norm_run
    saved_step, resumed = interrupted_then_resumed(trainer, ROWS, tmp_path / "run_0000", stop_after=5,
                                                   seed=7, resume_seed=123)
    assert saved_step == EPOCH_STEPS  # the epoch boundary before the interruption at step 5
    assert resumed.timings["resumed_from_step"] == EPOCH_STEPS
    assert resumed.timings["checkpoints_saved"] == 2  # after epoch 2, and at the end
    assert resumed.seed == 7  # the checkpoint's seed, not the new attempt's
    assert_same_model(trainer, resumed, straight)
    # The end of training is saved too: a worker lost during inference does not train again.
    assert RunCheckpoints(tmp_path / "run_0000").latest_step() == 3 * EPOCH_STEPS
    again = trainer.train(ROWS, 7, progress=False, checkpoints=RunCheckpoints(tmp_path / "run_0000"))
    assert again.timings["resumed_from_step"] == 3 * EPOCH_STEPS
    assert_same_model(trainer, again, straight)


def test_a_checkpoint_of_other_rows_is_not_resumed(batch_norm_run, tmp_path):
    trainer, straight = batch_norm_run
    other_rows = np.arange(40, 88)
    with pytest.raises(Preempted):
        trainer.train(other_rows, 7, progress=False, checkpoints=RunCheckpoints(tmp_path / "run", every_seconds=0),
                      after_chunk=preempt_after(4))
    messages = []
    model = trainer.train(ROWS, 7, progress=False, checkpoints=RunCheckpoints(tmp_path / "run", log=messages.append))
    assert model.timings["resumed_from_step"] == 0
    assert any("another run" in message for message in messages)
    assert_same_model(trainer, model, straight)


def test_saves_wait_for_the_interval_and_an_incomplete_checkpoint_is_ignored(batch_norm_run, tmp_path):
    trainer, straight = batch_norm_run
    directory = tmp_path / "run"
    with pytest.raises(Preempted):  # the interval never passes: nothing is saved before the end
        trainer.train(ROWS, 7, progress=False, checkpoints=RunCheckpoints(directory, every_seconds=3600),
                      after_chunk=preempt_after(8))
    assert RunCheckpoints(directory).latest_step() is None
    short = trainer.train(ROWS, 7, progress=False, checkpoints=RunCheckpoints(directory, every_seconds=3600))
    assert short.timings["checkpoints_saved"] == 0 and RunCheckpoints(directory).latest_step() is None
    with pytest.raises(Preempted):
        trainer.train(ROWS, 7, progress=False, checkpoints=RunCheckpoints(directory, every_seconds=0),
                      after_chunk=preempt_after(4))
    # A save cut short leaves orbax's temporary directory (renamed only when complete): not a checkpoint.
    shutil.copytree(directory / "3", directory / "6.orbax-checkpoint-tmp-1234")
    checkpoints = RunCheckpoints(directory, every_seconds=0)
    assert checkpoints.latest_step() == EPOCH_STEPS
    resumed = trainer.train(ROWS, 7, progress=False, checkpoints=checkpoints)
    assert resumed.timings["resumed_from_step"] == EPOCH_STEPS
    assert_same_model(trainer, resumed, straight)
    checkpoints.delete()
    assert not directory.exists()


def test_a_diverged_run_deletes_its_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = patch_dataset(32, rng)
    trainer = Trainer(config(learning_rate=1e30, epochs=4), images, labels, "multiclass", expected_train_size=16)
    checkpoints = RunCheckpoints(tmp_path / "run", every_seconds=0)
    with pytest.raises(TrainingDiverged):
        trainer.train(np.arange(16), 0, progress=False, checkpoints=checkpoints)
    assert not (tmp_path / "run").exists()  # the retry (a fresh seed) starts over


@pytest.mark.slow
def test_interrupted_dp_sgd_run_resumes_to_the_same_model_and_epsilon(tmp_path):
    rng = np.random.default_rng(3)
    patient_ids = np.repeat([f"p{i:02d}" for i in range(40)], 2)
    (images, labels), (test_images, test_labels) = patch_dataset(80, rng), patch_dataset(N_TEST, rng)
    dp_config = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=3, batch_size=8, learning_rate=0.2,
                            augment="weak", eval_views=2, epsilon=2.0, clip_norm=1.0, dp_unit="patient",
                            ema_decay=0.5)
    rows = np.arange(40)
    dp = estimator.DpTraining(dp_config, patient_ids, steps_per_epoch=5)
    trainer = Trainer(dp_config, images, labels, "multiclass", test_images, test_labels, expected_train_size=40,
                      schedule_fn=dp.schedule_fn, gradient_estimator=dp.gradient_estimator)
    straight = trainer.train(rows, seed=11, progress=False)
    straight_epsilon = dp.summary(rows)["epsilon"]
    saved_step, resumed = interrupted_then_resumed(trainer, rows, tmp_path / "run", stop_after=7,
                                                   seed=11, resume_seed=12)
    assert saved_step == 5 and resumed.timings["resumed_from_step"] == 5
    # The Poisson batches and the noise after the resume point are those of the straight run.
    np.testing.assert_array_equal(trainer.schedule(rows, resumed.seed)["indices"], trainer.schedule(rows, 11)["indices"])
    assert_same_model(trainer, resumed, straight)
    assert dp.summary(rows)["epsilon"] == straight_epsilon and 0.99 * 2.0 <= straight_epsilon <= 2.0
