"""Campaign set-up: which records a campaign plans over when some images are unreadable."""

import pytest

from medleak.campaign.main import CacheOptions, RunTrainer, load_splits
from medleak.config import TrainConfig
from medleak.errors import MedleakError
from tests.layouts import write_chexpert


def _corrupt_first_train_image(data_root):
    train, _ = load_splits("chexpert", data_root, {})
    victim = train.df["path"].iloc[0]
    (data_root / victim).write_bytes(b"not a jpeg")
    return train, victim


def test_skip_unreadable_drops_the_record_before_planning(tmp_path):
    data_root = write_chexpert(tmp_path / "data", n_patients=8)
    train, victim = _corrupt_first_train_image(data_root)
    cache = CacheOptions(cache_dir=str(tmp_path / "cache"), skip_unreadable=True)

    kept_train, kept_test = load_splits("chexpert", data_root, {}, (16, 16), cache)

    assert kept_train.n_records == train.n_records - 1
    assert victim not in set(kept_train.df["path"])
    assert list(kept_train.df.index) == list(range(kept_train.n_records))  # row i = logit row i
    assert kept_test.n_records > 0


def test_unreadable_image_without_the_flag_is_a_one_line_error(tmp_path):
    data_root = write_chexpert(tmp_path / "data", n_patients=8)
    _, victim = _corrupt_first_train_image(data_root)
    train, test = load_splits("chexpert", data_root, {})
    with pytest.raises(MedleakError) as error:
        RunTrainer(train, test, TrainConfig(model="small_cnn", img_size=(16, 16)), data_root,
                   expected_train_size=train.n_records, cache=CacheOptions(cache_dir=str(tmp_path / "cache")))
    message = str(error.value)
    assert "\n" not in message and victim in message and "--skip_unreadable" in message


@pytest.mark.slow
def test_a_sigkilled_workers_run_resumes_from_its_checkpoint_to_the_uninterrupted_logits(tmp_path):
    """Real processes: a worker is SIGKILLed after its run saved a checkpoint; the next worker resumes
    the run there (the step counter continues) and publishes the logits of a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from medleak import rundir
    from medleak.train_utils.checkpoint import RunCheckpoints
    from tests.layouts import write_fitzpatrick

    repo = Path(__file__).resolve().parent.parent
    data_root = write_fitzpatrick(tmp_path / "data", n_patients=24, size=(20, 20))
    flags = [f"--data_root={data_root}", f"--cache_dir={tmp_path / 'cache'}", "--model=small_cnn",
             "--img_size=16,16", "--epochs=40", "--batch_size=4", "--eval_views=2", "--n_runs=1",
             "--subset_ratio=0.6", "--lease_seconds=5"]

    def worker(logdir, *extra):
        return subprocess.Popen([sys.executable, "fitzpatrick.py", f"--logdir={logdir}", *flags, *extra],
                                cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    straight = worker(tmp_path / "straight", "--checkpoint_minutes=0")
    logdir = tmp_path / "killed"
    killed = worker(logdir, "--checkpoint_minutes=1e-6")  # a checkpoint at every epoch boundary
    checkpoints = RunCheckpoints(rundir.checkpoint_dir(logdir, 0))
    deadline = time.time() + 240
    while (checkpoints.latest_step() or 0) < 10 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    saved_step = checkpoints.latest_step()
    checkpoints.close()
    assert saved_step and not rundir.is_complete(logdir, 0), "the run finished before it could be killed"

    resumed = worker(logdir, "--checkpoint_minutes=1e-6")
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in (("resumed", resumed), ("straight", straight))}
    assert resumed.returncode == 0 and straight.returncode == 0, outputs
    run, reference = rundir.read_run(logdir, 0), rundir.read_run(tmp_path / "straight", 0)
    timings = run["metrics"]["timings"]
    assert saved_step <= timings["resumed_from_step"] < timings["steps"]
    assert run["metrics"]["seed"] == reference["metrics"]["seed"]
    np.testing.assert_allclose(run["test_logits"], reference["test_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run["train_logits"], reference["train_logits"], rtol=1e-5, atol=1e-5)
    assert not rundir.checkpoint_dir(logdir, 0).exists()  # deleted once published


def test_a_campaign_planned_under_the_old_steps_rule_trains_its_stored_schedule(tmp_path):
    """plan.json's schedule is the campaign's: a worker of a medleak whose steps-per-epoch rule
    changed since (ceil(n / B) before, nearest whole batch now) trains the stored steps, not its own."""
    import numpy as np

    from medleak import rundir
    from medleak.campaign import plan
    from medleak.campaign.main import run_campaign
    from medleak.config import CampaignConfig
    from medleak.io_utils import write_json
    from medleak.train_utils.training import steps_per_epoch

    data_root = write_chexpert(tmp_path / "data", n_patients=16)
    cache = CacheOptions(cache_dir=str(tmp_path / "cache"))
    train, test = load_splits("chexpert", data_root, {}, (16, 16), cache)
    campaign = CampaignConfig(n_runs=1, subset_ratio=0.5)
    expected = plan.expected_train_size(train.n_records, campaign.subset_ratio)
    batch_size = next(b for b in range(2, expected + 1) if plan.format_1_steps_per_epoch(expected, b)
                      != steps_per_epoch(expected, b) and expected // b >= 1)
    config = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=2, batch_size=batch_size, augment="none",
                         eval_views=1)
    logdir = tmp_path / "logs"
    document = plan.plan_document("chexpert", train, test, plan.resolve_train_config(config, train), campaign)
    plan.ensure_plan(logdir, document, train, test)
    stored = rundir.read_plan(logdir)
    old_per_epoch = plan.format_1_steps_per_epoch(expected, batch_size)  # as a plan made before the rule changed
    stored["schedule"] = plan.schedule_block(expected, old_per_epoch, config.epochs)
    write_json(logdir / rundir.PLAN_FILE, stored)

    summary = run_campaign("chexpert", data_root=data_root, logdir=logdir, train_config=config,
                           campaign_config=campaign, cache=cache, log=lambda message: None)
    assert sorted(summary.completed) == [0]
    timings = rundir.read_run(logdir, 0)["metrics"]["timings"]
    assert timings["steps_per_epoch"] == old_per_epoch != steps_per_epoch(expected, batch_size)
    assert timings["steps"] == old_per_epoch * config.epochs
    assert rundir.read_plan(logdir)["schedule"] == stored["schedule"]  # followed, not re-planned
    assert np.isfinite(rundir.read_run(logdir, 0)["test_logits"]).all()
