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
