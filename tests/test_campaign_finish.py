"""Campaigns finish: workers outlast each other's deaths, lost claims are taken over (at once when
their owner process is gone from this host), progress keeps a preempted run's attempts, and files
take their mode from the umask.

Worker processes are the real plan + queue + run-directory code of
tests/test_campaign_workqueue.py (`start_worker`), started with subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medleak import rundir
from medleak.campaign import workqueue
from medleak.campaign.workqueue import WorkQueue
from tests.test_campaign_workqueue import (REPO, assert_no_partial_runs, events_of, finish, queue_state,
                                           start_worker, wait_for)


class PartialRunWatcher:
    """Looks at runs/ from another thread the whole time; records any run_NNNN seen incomplete."""

    def __init__(self, logdir):
        self.runs = Path(logdir) / rundir.RUNS_DIR
        self.partial, self.looks = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.is_set():
            for index in rundir.list_complete_runs(self.runs.parent):
                try:
                    names = {p.name for p in rundir.run_dir(self.runs.parent, index).iterdir()}
                except FileNotFoundError:
                    continue
                if not set(rundir.RUN_FILES) <= names:
                    self.partial.append((index, sorted(names)))
            self.looks += 1
            time.sleep(0.005)


@pytest.mark.slow
def test_three_workers_one_killed_mid_run_the_others_finish_every_run_exactly_once(tmp_path):
    # A lease far longer than the test: only the same-host dead-owner check can free the run in time.
    settings = dict(n_runs=6, lease=600.0)
    with PartialRunWatcher(tmp_path / "logdir") as watcher:
        victim = start_worker(tmp_path, run_seconds=60.0, **settings)
        wait_for(lambda: len(events_of(tmp_path, "ready")) == 1)
        others = [start_worker(tmp_path, run_seconds=0.3, **settings) for _ in range(2)]
        wait_for(lambda: len(events_of(tmp_path, "ready")) == 3)
        (tmp_path / "go").touch()
        wait_for(lambda: any(e["pid"] == victim.pid for e in events_of(tmp_path, "start")))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        results = [finish(w, timeout=60) for w in others]
    assert [rc for rc, _, _ in results] == [0, 0], [err for _, _, err in results]
    victim_run = next(e["run"] for e in events_of(tmp_path, "start") if e["pid"] == victim.pid)
    finishes = [e["run"] for e in events_of(tmp_path, "finish")]
    assert sorted(finishes) == list(range(6))  # every run completed exactly once, the killed one too
    assert victim.pid not in {e["pid"] for e in events_of(tmp_path, "finish")}
    assert_no_partial_runs(tmp_path / "logdir", 6)
    assert watcher.looks > 10 and watcher.partial == []
    runs = queue_state(tmp_path)["runs"]
    assert [r["status"] for r in runs] == ["done"] * 6
    lost = runs[victim_run]
    assert lost["attempts"] == 2 and "worker process is gone" in lost["errors"][0]["error"]
    assert any("nothing left to claim · run 6/6 done · 0 in progress · 0 failed" in out for _, out, _ in results)


def test_a_killed_runs_checkpoint_keeps_its_attempt(tmp_path):
    (tmp_path / "go").touch()
    settings = dict(n_runs=1, lease=600.0, max_attempts=1, checkpoint=True)
    victim = start_worker(tmp_path, run_seconds=60.0, **settings)
    wait_for(lambda: len(events_of(tmp_path, "checkpoint")) == 1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # max_attempts=1: had the lost claim counted, the run would now be failed
    rc, out, err = finish(start_worker(tmp_path, run_seconds=0.0, **settings), timeout=60)
    assert rc == 0, err
    assert "run_0000: started (attempt 1/1)" in out and "run 1/1 done" in out
    run = queue_state(tmp_path)["runs"][0]
    assert (run["status"], run["attempts"]) == ("done", 1)
    assert "attempt is not counted" in run["errors"][0]["error"]
    assert not rundir.checkpoint_dir(tmp_path / "logdir", 0).exists()  # deleted once published


@pytest.mark.slow
def test_a_waiting_worker_takes_over_a_claim_of_another_host_when_its_lease_expires(tmp_path):
    (tmp_path / "go").touch()
    logdir = tmp_path / "logdir"
    assert finish(start_worker(tmp_path, n_runs=2, plan_only=True))[0] == 0
    # long enough that the worker surely starts and trains run 1 before it expires (then it must wait)
    elsewhere = WorkQueue(logdir, lease_seconds=12.0)
    elsewhere.process = dict(elsewhere.process, host="another-node")  # a worker we cannot see die
    claimed = elsewhere.claim()
    assert claimed.run_index == 0
    started = time.time()
    rc, out, err = finish(start_worker(tmp_path, n_runs=2, lease=1.0), timeout=60)
    assert rc == 0, err
    assert time.time() - started > 2.0  # it waited for the lease, not less
    waiting = [line for line in out.splitlines() if line.startswith("nothing to claim; waiting for")]
    assert len(waiting) == 1 and "run_0000" in waiting[0] and " in " in waiting[0]
    assert "run_0000: started (attempt 2/3)" in out and "run 2/2 done · 0 in progress · 0 failed" in out
    run = queue_state(tmp_path)["runs"][0]
    assert "lease expired" in run["errors"][0]["error"]
    assert not elsewhere.renew(claimed)


# -- the queue's rules, in process ---------------------------------------------------------------

def dead_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    owners = [WorkQueue(tmp_path, lease_seconds=600.0) for _ in range(3)]
    owners[0].initialize(3)
    assert [owner.claim().run_index for owner in owners] == [0, 1, 2]
    with owners[0].locked():
        state = owners[0]._read()
        runs = state["runs"]
        runs[0]["owner_process"] = dict(runs[0]["owner_process"], pid=dead_process())
        # run 1's pid is alive (ours) but started at another time: a reused pid, the owner is gone
        runs[1]["owner_process"] = dict(runs[1]["owner_process"], start=runs[1]["owner_process"]["start"] + 1)
        owners[0]._write(state)
    taker = WorkQueue(tmp_path, lease_seconds=600.0)
    retaken = sorted((taker.claim().run_index, taker.claim().run_index))
    assert retaken == [0, 1] and taker.claim() is None  # run 2's owner lives: left alone
    runs = queue_state_of(tmp_path)["runs"]
    assert [r["attempts"] for r in runs] == [2, 2, 1]
    assert all("worker process is gone" in r["errors"][0]["error"] for r in runs[:2])
    assert runs[2]["owner"] == owners[2].token
    assert taker.held == [(2, runs[2]["lease_until"], runs[2]["owner_process"])]
    assert workqueue.wait_seconds(taker) == workqueue.LOCAL_POLL_SECONDS  # a local owner: looked at often


def test_process_identity_reads_the_start_time():
    me = workqueue.this_process()
    assert me["pid"] == os.getpid() and me["start"] == workqueue.process_start_time(os.getpid())
    assert not workqueue.process_is_gone(me)
    assert workqueue.process_is_gone(dict(me, pid=dead_process()))
    assert not workqueue.process_is_gone(dict(me, pid=dead_process(), host="another-node"))
    assert not workqueue.process_is_gone(dict(me, pid=dead_process(), boot_id="another-boot"))
    assert workqueue.process_start_time(dead_process()) is None


def queue_state_of(logdir):
    return json.loads((Path(logdir) / "queue" / "queue.json").read_text())


@pytest.mark.parametrize("checkpoint", ["newer", "older", "none"])
def test_a_lost_lease_costs_an_attempt_only_without_progress(tmp_path, checkpoint):
    first = WorkQueue(tmp_path, lease_seconds=0.3, max_attempts=2)
    first.initialize(1)
    checkpoints = rundir.checkpoint_dir(tmp_path, 0)
    if checkpoint == "older":  # left by an earlier attempt: no progress in this one
        checkpoints.mkdir(parents=True)
        (checkpoints / "step_10").write_text("w")
        os.utime(checkpoints / "step_10", (time.time() - 60, time.time() - 60))
    claim = first.claim()
    if checkpoint == "newer":
        (checkpoints / "nested").mkdir(parents=True)
        (checkpoints / "nested" / "step_20").write_text("w")
    time.sleep(0.4)
    second = WorkQueue(tmp_path, lease_seconds=0.3, max_attempts=2)
    retaken = second.claim()
    assert retaken.run_index == claim.run_index == 0
    error = queue_state_of(tmp_path)["runs"][0]["errors"][0]["error"]
    assert error.startswith("lease expired")
    if checkpoint == "newer":
        assert retaken.attempt == 1 and "attempt is not counted" in error
    else:
        assert retaken.attempt == 2 and "not counted" not in error
        # a crash loop without progress still stops: the second loss uses up the attempts
        time.sleep(0.4)
        assert WorkQueue(tmp_path, lease_seconds=0.3, max_attempts=2).claim() is None
        assert queue_state_of(tmp_path)["runs"][0]["status"] == "failed"


def test_the_waiting_line_says_what_and_until_when():
    deadline = time.time() + 125
    line = workqueue.waiting_line([(3, deadline, None), (7, deadline + 50, None)], 300.0)
    assert "waiting for run_0003, run_0007" in line
    assert time.strftime("%H:%M:%S", time.localtime(deadline)) in line
    assert "in 125 s" in line or "in 124 s" in line


# -- file modes follow the umask -------------------------------------------------------------------

WRITE_FILES = """
import os, sys
os.umask(int(sys.argv[2], 8))
import numpy as np, pandas as pd
from pathlib import Path
from medleak import io_utils, rundir
root = Path(sys.argv[1])
io_utils.write_json(root / "a" / "plan.json", {"x": 1})
io_utils.save_npy(root / "a" / "mask.npy", np.zeros(3, bool))
io_utils.write_csv(root / "a" / "records.csv", pd.DataFrame({"x": [1]}))
rundir.write_run_files(root / "runs" / "run_0000", train_logits=np.zeros((2, 1, 2)), train_labels=np.zeros((2, 2)),
                       record_mask=np.ones(2, bool), test_logits=np.zeros((1, 2)), test_labels=np.zeros((1, 2)),
                       metrics={})
"""


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("0022", 0o644, 0o755), ("0077", 0o600, 0o700)])
def test_written_files_and_directories_take_their_mode_from_the_umask(tmp_path, umask, file_mode, dir_mode):
    subprocess.run([sys.executable, "-c", WRITE_FILES, str(tmp_path / "out"), umask], cwd=REPO, check=True)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    dirs = [p for p in (tmp_path / "out").rglob("*") if p.is_dir()]
    assert len(files) == 9 and len(dirs) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(dir_mode)}


# -- readable progress and a quiet console --------------------------------------------------------

def test_progress_lines_come_once_per_epoch_or_per_minute_whichever_is_rarer():
    from medleak.campaign.progress import ProgressLines

    now, lines = [0.0], []
    lines_of = ProgressLines(lines.append, "run_0001", images_per_step=32, clock=lambda: now[0])
    n_steps, per_epoch, step_seconds = 300, 10, 0.5  # an epoch every 5 s
    losses = np.full(n_steps, np.nan, np.float32)
    for step in range(1, n_steps + 1):
        now[0] += step_seconds
        losses[step - 2] = 1.0 / step if step > 1 else np.nan  # the running chunk's loss is not known yet
        lines_of(step, n_steps, per_epoch, losses)
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [10, 130, 250, 300]  # the first epoch, then one a minute at an epoch's end, the last
    first = lines[0]
    # speed measured from the first call (after compilation): 9 steps in 4.5 s
    known_at_step_10 = np.mean([1.0 / step for step in range(2, 11)], dtype=np.float32)  # steps 1..9 finished
    assert first == (f"run_0001: epoch 1/30 · step 10/300 · loss {known_at_step_10:.4f} · "
                     "64 images/s · ETA 2m 25s")
    assert lines[-1].endswith("ETA 0s") and "epoch 30/30" in lines[-1]
    quick = []  # epochs of 20 minutes: a line for every epoch
    slow = ProgressLines(quick.append, "run", images_per_step=1, clock=lambda: now[0])
    for step in range(1, 4):
        now[0] += 1200
        slow(step, 3, 1, np.ones(3))
    assert len(quick) == 3


ABSL_MAIN = """
import sys, warnings
from medleak.cli import run_absl
def main(argv):
    import jax
    jax.devices()
    warnings.warn("first line\\nsecond line")
    print("ran", flush=True)
run_absl(main)
"""


def test_console_is_quiet_warnings_are_one_line_and_help_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", ABSL_MAIN], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "ran\n", result.stderr
    assert "Unable to initialize backend" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "warning: UserWarning: first line second line (<string>:7)"]
    for help_flag in ("--help", "--helpfull"):
        shown = subprocess.run([sys.executable, "fitzpatrick.py", help_flag], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0 and "--batch_size" in shown.stdout, shown.stderr
    bad = subprocess.run([sys.executable, "fitzpatrick.py", "--no_such_flag"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "no_such_flag" in bad.stderr  # a bad flag is still an error


def test_train_all_appends_to_worker_logs_and_prints_the_failing_workers_error(tmp_path):
    env = dict(os.environ, DATASETS="fitzpatrick", GPUS="", LOG_DIR=str(tmp_path / "logs"),
               DATA_DIR=str(tmp_path / "data"), PYTHON=sys.executable)
    outputs = []
    for batch_size in (0, -3):  # refused when the flags are read, before any data is touched
        result = subprocess.run(["bash", "scripts/train_all.sh", f"--batch_size={batch_size}"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 1
        outputs.append(result.stderr)
    assert "failed (pid" in outputs[0] and "error: --batch_size must be at least 1, got 0" in outputs[0]
    assert "error: --batch_size must be at least 1, got -3" in outputs[1] and "got 0" not in outputs[1]
    (log,) = (tmp_path / "logs" / "fitzpatrick" / "worker_logs").iterdir()
    text = log.read_text()
    assert text.count("worker started on") == 2  # the second start appended to the first's log
    assert text.index("got 0") < text.index("got -3")
