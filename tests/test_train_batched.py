"""K models per program (train_utils/batched.py): each model of a K-batched program equals the same
model trained alone (a few steps: trajectories drift apart chaotically over a whole run), for
ordinary and DP-SGD training, GroupNorm and BatchNorm; a diverging model is masked out while the
others go on; checkpoints stay per run; the 4-device CPU sharding gives the same models."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from medleak.config import TrainConfig
from medleak.dp.estimator import DpTraining
from medleak.train_utils.batched import BatchedTrainer, ModelJob
from medleak.train_utils.checkpoint import RunCheckpoints
from medleak.train_utils.training import Trainer, TrainedModel, TrainingDiverged

SIZE, N_TRAIN, N_TEST, N_CLASSES = 16, 64, 16, 3
RTOL, ATOL = 2e-4, 2e-5


def data(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (N_TRAIN + N_TEST, SIZE, SIZE, 1), dtype=np.uint8)
    labels = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, N_TRAIN + N_TEST)]
    return images[:N_TRAIN], labels[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:]


def config(**overrides):
    base = dict(model="small_cnn", img_size=(SIZE, SIZE), epochs=2, batch_size=8, learning_rate=0.05,
                warmup=0, weight_decay=5e-4, augment="weak", eval_views=2)
    return TrainConfig(**(base | overrides))


def make_trainer(train_config):
    train_images, train_labels, test_images, test_labels = data()
    if not train_config.dp:
        return Trainer(train_config, train_images, train_labels, "multiclass", test_images, test_labels,
                       expected_train_size=24), None
    from medleak.train_utils.training import steps_per_epoch

    dp = DpTraining(train_config, np.arange(N_TRAIN) // 2, steps_per_epoch(24, train_config.batch_size))
    trainer = Trainer(train_config, train_images, train_labels, "multiclass", test_images, test_labels,
                      expected_train_size=24, schedule_fn=dp.schedule_fn, gradient_estimator=dp.gradient_estimator)
    return trainer, dp


def run_rows(k, sizes=None):
    """Different rows (and numbers of rows) per run, as in a campaign."""
    rng = np.random.default_rng(7)
    sizes = sizes or [22 + i for i in range(k)]
    return [np.sort(rng.choice(N_TRAIN, size=size, replace=False)) for size in sizes]


def assert_trees_close(a, b):
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


# The fast suite keeps the GroupNorm case; BatchNorm and DP-SGD (σ calibration dominates) are slow.
@pytest.mark.parametrize("overrides", [
    pytest.param(dict(), id="groupnorm"),
    pytest.param(dict(norm="batch"), id="batchnorm", marks=pytest.mark.slow),
    pytest.param(dict(epsilon=8.0, clip_norm=1.0), id="dp_record", marks=pytest.mark.slow),
    pytest.param(dict(epsilon=8.0, clip_norm=1.0, dp_unit="patient"), id="dp_patient", marks=pytest.mark.slow)])
def test_k_batched_models_equal_models_trained_alone(overrides):
    trainer, dp = make_trainer(config(**overrides))
    # DP: two sizes, so two noise multipliers in one program and only two sigma calibrations (slow)
    rows = run_rows(4, [22, 26, 22, 26] if dp is not None else None)
    seeds = [11, 12, 13, 14]
    alone = [trainer.train(r, s, progress=False) for r, s in zip(rows, seeds)]
    batched = BatchedTrainer(trainer, models_per_program=4)
    together = batched.train([ModelJob(r, s) for r, s in zip(rows, seeds)])
    for one, many in zip(alone, together):
        assert isinstance(many, TrainedModel)
        np.testing.assert_allclose(many.losses, one.losses, rtol=RTOL, atol=ATOL)
        assert_trees_close(many.ema_params, one.ema_params)
        assert_trees_close(many.model_state, one.model_state)
    # the runs differ from each other (different rows and seeds), so equality above is per model
    assert not np.allclose(together[0].losses, together[1].losses)
    if dp is not None:
        assert dp.summary(rows[0])["noise_multiplier"] != dp.summary(rows[1])["noise_multiplier"]
    views = batched.infer_train_views(together)
    tests = batched.infer_test(together)
    for one, view, test in zip(alone, views, tests):
        np.testing.assert_allclose(view, trainer.infer_train_views(one), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(test, trainer.infer_test(one), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_a_short_batch_is_padded_and_reuses_the_program():
    from medleak.train_utils.device import count_compilations

    trainer, _ = make_trainer(config())
    rows = run_rows(3)
    batched = BatchedTrainer(trainer, models_per_program=2)
    first = batched.train([ModelJob(rows[0], 1), ModelJob(rows[1], 2)])
    with count_compilations() as compiles:
        (last,) = batched.train([ModelJob(rows[2], 3)])  # one model in a program of 2
    assert compiles.count == 0
    np.testing.assert_allclose(last.losses, trainer.train(rows[2], 3, progress=False).losses, rtol=RTOL, atol=ATOL)
    assert len(first) == 2 and last.timings["models_in_program"] == 1


def test_a_diverging_model_is_masked_out_and_the_others_go_on():
    # Labels are shared by the models: an infinite label on the last row makes only the run that
    # trains on it diverge.
    train_images, train_labels, test_images, test_labels = data()
    trainer = Trainer(config(), train_images, train_labels, "multiclass", test_images, test_labels,
                      expected_train_size=24)
    poisoned = np.array(trainer.labels)
    poisoned[N_TRAIN - 1] = np.inf
    import jax

    trainer.labels = jax.device_put(poisoned)  # past the Trainer's own check of finite labels
    rows = [np.arange(24), np.arange(N_TRAIN - 24, N_TRAIN), np.arange(10, 34)]
    batched = BatchedTrainer(trainer, models_per_program=4)
    outcomes = batched.train([ModelJob(r, s) for r, s in zip(rows, [1, 2, 3])])
    assert isinstance(outcomes[1], TrainingDiverged) and "seed 2" in str(outcomes[1])
    for i in (0, 2):
        assert isinstance(outcomes[i], TrainedModel)
        assert np.isfinite(outcomes[i].losses).all()
        np.testing.assert_allclose(outcomes[i].losses, trainer.train(rows[i], i + 1, progress=False).losses,
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_checkpoints_are_per_run_and_an_interrupted_batch_resumes(tmp_path):
    trainer, _ = make_trainer(config(epochs=4))
    rows = run_rows(2)
    straight = BatchedTrainer(trainer, models_per_program=2).train([ModelJob(r, s) for r, s in zip(rows, [5, 6])])

    class Interrupt(Exception):
        pass

    def interrupt_after_epoch_2(steps_done, n_steps, epoch_steps, losses):
        if steps_done == 2 * epoch_steps:
            raise Interrupt

    checkpoints = [RunCheckpoints(tmp_path / f"run_{i}", every_seconds=0) for i in range(2)]
    batched = BatchedTrainer(trainer, models_per_program=2)
    with pytest.raises(Interrupt):
        batched.train([ModelJob(r, s, c) for r, s, c in zip(rows, [5, 6], checkpoints)],
                      log_progress=interrupt_after_epoch_2)
    steps = [c.latest_step() for c in checkpoints]
    assert steps[0] == steps[1] == 2 * straight[0].timings["steps_per_epoch"]
    # a fresh seed is ignored: each run resumes its own checkpoint's seed
    resumed = batched.train([ModelJob(r, 100 + s, RunCheckpoints(tmp_path / f"run_{i}", every_seconds=0))
                             for i, (r, s) in enumerate(zip(rows, [5, 6]))])
    for one, again in zip(straight, resumed):
        assert again.timings["resumed_from_step"] == steps[0] and again.seed == one.seed
        np.testing.assert_allclose(again.losses, one.losses, rtol=RTOL, atol=ATOL)
        assert_trees_close(again.ema_params, one.ema_params)


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_batched import config, make_trainer, run_rows, RTOL, ATOL
    from medleak.train_utils.batched import BatchedTrainer, ModelJob

    assert len(jax.local_devices()) == 4, jax.local_devices()
    trainer, _ = make_trainer(config())
    rows = run_rows(4)
    batched = BatchedTrainer(trainer, models_per_program=4)
    assert batched.n_devices == 4
    models = batched.train([ModelJob(r, s) for r, s in zip(rows, [1, 2, 3, 4])])
    program = next(iter(batched._programs.values()))
    views = batched.infer_train_views(models)
    for r, s, model, view in zip(rows, [1, 2, 3, 4], models, views):
        alone = trainer.train(r, s, progress=False)
        np.testing.assert_allclose(model.losses, alone.losses, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(view, trainer.infer_train_views(alone), rtol=1e-3, atol=1e-4)
    print("sharded over", batched.n_devices, "devices: equal")
""")


@pytest.mark.slow
def test_k_models_sharded_over_4_cpu_devices_equal_models_trained_alone():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(tests=tests)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded over 4 devices: equal" in result.stdout


@pytest.mark.slow
def test_a_campaign_worker_training_3_models_per_program_writes_the_runs_of_one_at_a_time(tmp_path):
    from medleak import rundir
    from medleak.campaign.main import CacheOptions, run_campaign
    from medleak.config import CampaignConfig
    from tests.layouts import write_fitzpatrick

    data_root = write_fitzpatrick(tmp_path / "data", n_patients=30)
    train_config = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=2, batch_size=4, learning_rate=0.05,
                               warmup=0, augment="weak", eval_views=2, compute_dtype="float32")
    campaign = CampaignConfig(n_runs=4, checkpoint_minutes=0)
    logs = []
    runs = {}
    for k in (1, 3):
        logdir = tmp_path / f"k{k}"
        summary = run_campaign("fitzpatrick", data_root=data_root, logdir=logdir, train_config=train_config,
                               campaign_config=campaign, cache=CacheOptions(cache_dir=str(tmp_path / "cache")),
                               log=logs.append, models_per_program=k)
        assert sorted(summary.completed) == [0, 1, 2, 3]
        runs[k] = [rundir.read_run(logdir, i) for i in range(4)]
    assert "training 3 models per program on 1 device(s)" in logs
    for one, many in zip(runs[1], runs[3]):
        np.testing.assert_array_equal(one["record_mask"], many["record_mask"])
        np.testing.assert_allclose(many["train_logits"], one["train_logits"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(many["test_logits"], one["test_logits"], rtol=1e-3, atol=1e-3)
        assert many["metrics"]["seed"] == one["metrics"]["seed"]
