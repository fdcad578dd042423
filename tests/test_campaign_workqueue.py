"""The file-lock work queue with real worker processes: exactly-once runs, leases, crashes, retries.

Workers are separate Python processes (subprocess) running `worker_main` below: the real plan +
queue + run-directory code around a small real model (softmax regression in numpy, trained by
gradient descent on the run's IN records) so the tests stay fast without JAX.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medleak import rundir
from medleak.campaign import plan
from medleak.campaign.workqueue import Progress, WorkQueue
from medleak.config import CampaignConfig, TrainConfig
from medleak.data_utils.records import RecordsTable

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
N_PATIENTS = 12


# -- the worker process ----------------------------------------------------------------------

def toy_tables(n_patients=N_PATIENTS, images_per_patient=2):
    rows = []
    for p in range(n_patients + 4):
        for i in range(images_per_patient):
            label = (p + i) % 2
            rows.append(dict(record_id=f"r{p}_{i}", patient_id=f"p{p}", path=f"img/{p}_{i}.png",
                             split="train" if p < n_patients else "test", a=float(label == 0),
                             b=float(label == 1), sex="F" if p % 3 else "M"))
    table = RecordsTable("toy", pd.DataFrame(rows), ("a", "b"), "multiclass", ("sex",))
    return table.split("train"), table.split("test")


def toy_features(table):
    rng = np.random.default_rng(0)
    labels = table.labels()
    return rng.normal(size=(table.n_records, 4)) + labels @ np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), labels


def train_softmax_regression(features, labels, steps=50, lr=0.5):
    weights = np.zeros((features.shape[1], labels.shape[1]))
    for _ in range(steps):
        logits = features @ weights
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        weights -= lr * features.T @ (probs - labels) / len(features)
    return weights


def emit(events_path, **event):
    with open(events_path, "a") as f:
        f.write(json.dumps(dict(event, pid=os.getpid())) + "\n")


def read_events(events_path):
    path = Path(events_path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_main(cfg):
    from medleak.campaign.main import prepare_campaign
    from medleak.campaign.workqueue import work_loop
    from medleak.cli import main_guard

    @main_guard
    def run():
        emit(cfg["events"], kind="ready")
        while not Path(cfg["go"]).exists():
            time.sleep(0.01)
        train, test = toy_tables()
        queue = WorkQueue(cfg["logdir"], lease_seconds=cfg["lease"], max_attempts=cfg["max_attempts"])
        config = TrainConfig(model="softmax_regression", epochs=cfg["epochs"], compute_dtype="float32")
        document = plan.plan_document("toy", train, test, config, CampaignConfig(n_runs=cfg["n_runs"]))
        # the toy model is not one of medleak's: plan-time checks are tested in test_campaign_plan.py
        _, patient_mask, created = prepare_campaign(queue, document, train, test, check_trainable=False)
        emit(cfg["events"], kind="plan", created=created, mask=patient_mask.astype(int).tolist())
        if cfg.get("plan_only"):
            return
        features, labels = toy_features(train)
        test_features, test_labels = toy_features(test)
        _, patient_index = plan.patient_index(train.df["patient_id"])

        def do_run(claim):
            run_index = claim.run_index
            emit(cfg["events"], kind="start", run=run_index)
            starts = sum(e["kind"] == "start" and e["run"] == run_index for e in read_events(cfg["events"]))
            if cfg.get("user_error"):
                from medleak.errors import MedleakError

                raise MedleakError("injected bad input")
            if cfg.get("fail_every_run") or run_index in cfg.get("fail_always", []) or (run_index in cfg.get("fail_once", []) and starts == 1):
                raise RuntimeError(f"injected failure in run {run_index}")
            if cfg.get("checkpoint"):  # progress a re-claim can resume from (what the Trainer saves)
                checkpoints = rundir.checkpoint_dir(cfg["logdir"], run_index)
                checkpoints.mkdir(parents=True, exist_ok=True)
                (checkpoints / f"step_{starts}").write_text("weights")
                emit(cfg["events"], kind="checkpoint", run=run_index)
            mask = plan.record_mask(patient_mask[run_index], patient_index)
            weights = train_softmax_regression(features[mask], labels[mask])
            views = np.stack([features @ weights, (features + 0.1) @ weights], axis=1)
            time.sleep(cfg["run_seconds"])
            emit(cfg["events"], kind="finish", run=run_index)
            return rundir.write_run_tmp(cfg["logdir"], run_index, train_logits=views, train_labels=labels,
                                        record_mask=mask, test_logits=test_features @ weights,
                                        test_labels=test_labels, metrics={"run": run_index})

        k = cfg.get("runs_per_claim", 1)
        if k == 1:
            work_loop(queue, do_run, log=lambda m: print(m, flush=True))
            return

        def do_runs(claims):  # K runs trained together: a run's own failure is its outcome
            emit(cfg["events"], kind="batch", runs=[c.run_index for c in claims])
            outcomes = []
            for claim in claims:
                try:
                    outcomes.append(do_run(claim))
                except RuntimeError as e:
                    outcomes.append(e)
            return outcomes

        work_loop(queue, do_runs, log=lambda m: print(m, flush=True), runs_per_claim=k)

    run()


# -- helpers for the tests -------------------------------------------------------------------

def start_worker(tmp_path, **overrides):
    cfg = dict(logdir=str(tmp_path / "logdir"), events=str(tmp_path / "events.jsonl"), go=str(tmp_path / "go"),
               n_runs=9, lease=10.0, max_attempts=3, run_seconds=0.0, epochs=1)
    cfg.update(overrides)
    code = ("import json, sys; sys.path.insert(0, %r); import test_campaign_workqueue as t; "
            "t.worker_main(json.loads(sys.argv[1]))" % str(TESTS_DIR))
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def finish(proc, timeout=90):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def events_of(tmp_path, kind):
    return [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == kind]


def queue_state(tmp_path):
    return json.loads((tmp_path / "logdir" / "queue" / "queue.json").read_text())


def assert_no_partial_runs(logdir, n_runs):
    assert rundir.list_complete_runs(logdir) == list(range(n_runs))
    names = sorted(p.name for p in (Path(logdir) / "runs").iterdir())
    assert names == [rundir.run_dir_name(i) for i in range(n_runs)]  # no temporary directory left
    for i in range(n_runs):
        assert sorted(p.name for p in rundir.run_dir(logdir, i).iterdir()) == sorted(rundir.RUN_FILES)


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_workers_finish_nine_runs_exactly_once_and_a_rerun_does_nothing(tmp_path):
    workers = [start_worker(tmp_path, run_seconds=0.4) for _ in range(3)]
    wait_for(lambda: len(events_of(tmp_path, "ready")) == 3)
    (tmp_path / "go").touch()
    results = [finish(w) for w in workers]
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err for _, _, err in results]

    plans = events_of(tmp_path, "plan")
    assert sum(e["created"] for e in plans) == 1  # three workers raced; one plan
    assert all(e["mask"] == plans[0]["mask"] for e in plans)
    starts = [e["run"] for e in events_of(tmp_path, "start")]
    finishes = [e["run"] for e in events_of(tmp_path, "finish")]
    assert sorted(starts) == list(range(9)) and sorted(finishes) == list(range(9))
    assert len({e["pid"] for e in events_of(tmp_path, "start")}) >= 2  # the work was shared

    logdir = tmp_path / "logdir"
    assert_no_partial_runs(logdir, 9)
    patient_mask = rundir.load_patient_mask(logdir)
    _, patient_index = plan.patient_index(pd.read_csv(logdir / "records.csv")["patient_id"])
    for i in range(9):
        run = rundir.read_run(logdir, i)
        np.testing.assert_array_equal(run["record_mask"], plan.record_mask(patient_mask[i], patient_index))
        assert run["train_logits"].shape == (2 * N_PATIENTS, 2, 2) and run["train_logits"].dtype == np.float32
        assert run["metrics"]["run"] == i
    state = queue_state(tmp_path)
    assert [r["status"] for r in state["runs"]] == ["done"] * 9
    assert [r["attempts"] for r in state["runs"]] == [1] * 9
    assert any("run 9/9 done · 0 in progress · 0 failed" in out for _, out, _ in results)

    mtimes = [rundir.run_dir(logdir, i).stat().st_mtime_ns for i in range(9)]
    rc, out, err = finish(start_worker(tmp_path))
    assert rc == 0, err
    assert len(events_of(tmp_path, "start")) == 9  # nothing was redone
    assert "nothing left to claim · run 9/9 done · 0 in progress · 0 failed" in out
    assert [rundir.run_dir(logdir, i).stat().st_mtime_ns for i in range(9)] == mtimes


@pytest.mark.slow
def test_a_killed_workers_run_is_reclaimed_at_once_by_a_worker_on_its_host(tmp_path):
    (tmp_path / "go").touch()
    settings = dict(n_runs=3, lease=2.0, run_seconds=1.5)
    victim = start_worker(tmp_path, **settings)
    wait_for(lambda: len(events_of(tmp_path, "start")) == 1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL

    rc, out, err = finish(start_worker(tmp_path, **settings))
    assert rc == 0, err
    starts = [e for e in events_of(tmp_path, "start")]
    assert [e["run"] for e in starts].count(0) == 2  # the killed run, taken again
    assert sorted(e["run"] for e in starts[1:]) == [0, 1, 2]
    assert sorted(e["run"] for e in events_of(tmp_path, "finish")) == [0, 1, 2]  # once each
    assert_no_partial_runs(tmp_path / "logdir", 3)
    run0 = queue_state(tmp_path)["runs"][0]
    assert run0["status"] == "done" and run0["attempts"] == 2
    assert "worker process is gone" in run0["errors"][0]["error"]  # same host: taken at once
    assert "run_0000: started (attempt 2/3)" in out


@pytest.mark.slow
def test_a_terminated_worker_gives_its_claim_back_at_once(tmp_path):
    (tmp_path / "go").touch()
    settings = dict(n_runs=1, lease=300.0, run_seconds=1.0)
    victim = start_worker(tmp_path, **dict(settings, run_seconds=30.0))
    wait_for(lambda: len(events_of(tmp_path, "start")) == 1)
    victim.send_signal(signal.SIGTERM)  # what SLURM sends on preemption
    rc, out, _ = finish(victim)
    assert rc == 128 + signal.SIGTERM and "run_0000: interrupted; gave the claim back" in out
    run = queue_state(tmp_path)["runs"][0]
    assert (run["status"], run["attempts"], run["owner"]) == ("pending", 0, None)
    rc, out, err = finish(start_worker(tmp_path, **settings))  # no 300 s wait for the lease
    assert rc == 0, err
    assert "run_0000: started (attempt 1/3)" in out and "run 1/1 done" in out


@pytest.mark.slow
def test_heartbeat_keeps_runs_longer_than_the_lease(tmp_path):
    settings = dict(n_runs=2, lease=1.5, run_seconds=4.0)
    workers = [start_worker(tmp_path, **settings) for _ in range(2)]
    wait_for(lambda: len(events_of(tmp_path, "ready")) == 2)
    (tmp_path / "go").touch()
    assert [finish(w)[0] for w in workers] == [0, 0]
    # without renewals the first worker to finish would re-take the other's run (expired after 1.5 s)
    assert sorted(e["run"] for e in events_of(tmp_path, "start")) == [0, 1]
    state = queue_state(tmp_path)
    assert [(r["status"], r["attempts"], r["errors"]) for r in state["runs"]] == [("done", 1, [])] * 2


def test_failures_are_recorded_retried_and_reported(tmp_path):
    (tmp_path / "go").touch()
    rc, out, err = finish(start_worker(tmp_path, n_runs=3, max_attempts=2, fail_always=[1], fail_once=[2]))
    assert rc == 0, err
    assert rundir.list_complete_runs(tmp_path / "logdir") == [0, 2]
    runs = queue_state(tmp_path)["runs"]
    assert (runs[1]["status"], runs[1]["attempts"]) == ("failed", 2)
    assert [e["error"] for e in runs[1]["errors"]] == ["RuntimeError: injected failure in run 1"] * 2
    assert (runs[2]["status"], runs[2]["attempts"], len(runs[2]["errors"])) == ("done", 2, 1)
    assert "run 2/3 done · 0 in progress · 1 failed" in out
    assert "run_0001: failed, attempts used up; last error: RuntimeError: injected failure in run 1" in out

    # a later worker allowing more attempts retries the failed run (and only it)
    rc, out, err = finish(start_worker(tmp_path, n_runs=3, max_attempts=3, fail_always=[1]))
    assert rc == 0, err
    assert [e["run"] for e in events_of(tmp_path, "start")].count(1) == 3
    assert [e["run"] for e in events_of(tmp_path, "start")].count(0) == 1
    assert queue_state(tmp_path)["runs"][1]["attempts"] == 3


def test_a_worker_whose_every_run_fails_stops_instead_of_using_up_all_runs(tmp_path):
    (tmp_path / "go").touch()
    rc, out, err = finish(start_worker(tmp_path, n_runs=8, max_attempts=2, fail_every_run=True))
    assert rc == 2
    assert err.startswith("error: 3 different runs failed in a row") and err.count("\n") == 1
    runs = queue_state(tmp_path)["runs"]
    # the worker stopped after touching three runs; the other five keep all their attempts
    touched = [r for r in runs if r["attempts"] > 0]
    assert len(touched) == 3
    assert all((r["status"], r["attempts"]) == ("pending", 0) for r in runs if r not in touched)


def test_bad_input_inside_a_run_gives_the_claim_back_without_using_an_attempt(tmp_path):
    (tmp_path / "go").touch()
    rc, out, err = finish(start_worker(tmp_path, n_runs=2, max_attempts=1, user_error=True))
    assert (rc, err) == (2, "error: injected bad input\n")
    assert [(r["status"], r["attempts"]) for r in queue_state(tmp_path)["runs"]] == [("pending", 0)] * 2


def test_a_worker_with_a_different_config_is_refused(tmp_path):
    (tmp_path / "go").touch()
    assert finish(start_worker(tmp_path, n_runs=1))[0] == 0
    rc, out, err = finish(start_worker(tmp_path, n_runs=1, epochs=2))
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "train_config.epochs (logdir: 1, now: 2)" in err
    rc, out, err = finish(start_worker(tmp_path, n_runs=2))
    assert rc == 2 and "campaign.n_runs (logdir: 1, now: 2)" in err
    assert len(events_of(tmp_path, "start")) == 1


def test_workers_racing_to_create_the_plan_produce_one_plan(tmp_path):
    workers = [start_worker(tmp_path, plan_only=True) for _ in range(4)]
    wait_for(lambda: len(events_of(tmp_path, "ready")) == 4)
    (tmp_path / "go").touch()
    assert [finish(w)[0] for w in workers] == [0] * 4
    plans = events_of(tmp_path, "plan")
    creators = [e["pid"] for e in plans if e["created"]]
    assert len(creators) == 1
    assert all(e["mask"] == plans[0]["mask"] for e in plans)
    stored = rundir.read_plan(tmp_path / "logdir")
    assert stored["created_by"].endswith(f":{creators[0]}")
    np.testing.assert_array_equal(rundir.load_patient_mask(tmp_path / "logdir"), np.array(plans[0]["mask"], bool))


@pytest.mark.slow
def test_workers_claiming_four_runs_at_a_time_finish_every_run_once_and_a_failing_run_alone_retries(tmp_path):
    workers = [start_worker(tmp_path, n_runs=10, runs_per_claim=4, run_seconds=0.2, max_attempts=2,
                            fail_always=[5], fail_once=[2]) for _ in range(2)]
    wait_for(lambda: len(events_of(tmp_path, "ready")) == 2)
    (tmp_path / "go").touch()
    for worker in workers:
        rc, out, err = finish(worker)
        assert rc == 0, err
    batches = [e["runs"] for e in events_of(tmp_path, "batch")]
    assert max(len(b) for b in batches) == 4 and all(len(b) <= 4 for b in batches)
    runs = queue_state(tmp_path)["runs"]
    assert rundir.list_complete_runs(tmp_path / "logdir") == [i for i in range(10) if i != 5]
    assert (runs[5]["status"], runs[5]["attempts"]) == ("failed", 2)
    assert (runs[2]["status"], runs[2]["attempts"]) == ("done", 2)  # retried alone after its batch
    finished = [e["run"] for e in events_of(tmp_path, "finish")]
    assert sorted(finished) == [i for i in range(10) if i != 5]  # every other run trained exactly once


# -- in-process checks of the queue's rules ----------------------------------------------------

def test_claim_many_takes_up_to_k_runs_and_the_heartbeat_renews_all_of_them(tmp_path):
    from medleak.campaign.workqueue import Heartbeat

    first = WorkQueue(tmp_path, lease_seconds=0.6, max_attempts=2)
    second = WorkQueue(tmp_path, lease_seconds=0.6, max_attempts=2)
    first.initialize(6)
    claims = first.claim_many(4)
    assert [c.run_index for c in claims] == [0, 1, 2, 3] and all(c.attempt == 1 for c in claims)
    assert [c.run_index for c in second.claim_many(4)] == [4, 5]  # only two left
    with Heartbeat(first, claims):
        time.sleep(1.5)  # past two leases: renewed for all four; runs 4 and 5, not renewed, are lost
        assert [(c.run_index, c.attempt) for c in second.claim_many(4)] == [(4, 2), (5, 2)]
    assert first.renew_many(claims) == [True] * 4
    time.sleep(0.7)
    retaken = second.claim_many(2)  # all leases ran out; 0 and 1 are taken again
    assert [(c.run_index, c.attempt) for c in retaken] == [(0, 2), (1, 2)]
    assert first.renew_many(claims) == [False] * 4  # every lost claim was freed by that claim



def test_expired_claims_are_retaken_and_the_old_owner_loses_the_lease(tmp_path):
    first = WorkQueue(tmp_path, lease_seconds=1.0, max_attempts=2)
    second = WorkQueue(tmp_path, lease_seconds=1.0, max_attempts=2)
    first.initialize(2)
    claim_a = first.claim()
    claim_b = second.claim()
    assert (claim_a.run_index, claim_b.run_index) == (0, 1)
    assert second.progress() == Progress(total=2, done=0, in_progress=2, failed=0, pending=0)
    assert first.renew(claim_a)
    time.sleep(1.1)  # run 0's lease runs out; run 1's too
    retaken = second.claim()
    assert (retaken.run_index, retaken.attempt) == (0, 2)
    assert not first.renew(claim_a)
    assert second.renew(retaken)
    # run 1 has used one of its 2 attempts: claimable once more
    assert second.claim().run_index == 1
    time.sleep(1.1)
    assert second.claim() is None  # both expired with 2 attempts used: failed, nothing left
    assert second.progress().failed == 2


def test_a_run_finished_elsewhere_is_never_replaced(tmp_path):
    queue = WorkQueue(tmp_path, lease_seconds=5, max_attempts=3)
    queue.initialize(1)
    claim = queue.claim()
    arrays = dict(train_logits=np.zeros((3, 2, 2)), train_labels=np.zeros((3, 2)), record_mask=np.ones(3, bool),
                  test_logits=np.zeros((1, 2)), test_labels=np.zeros((1, 2)))
    first = rundir.write_run_files(tmp_path / "a", metrics={"who": "first"}, **arrays)
    second = rundir.write_run_files(tmp_path / "b", metrics={"who": "second"}, **arrays)
    assert queue.complete(claim, first)
    assert not queue.complete(claim, second)
    assert rundir.read_run(tmp_path, 0)["metrics"] == {"who": "first"}
    assert not second.exists()
    assert queue.claim() is None


def test_stale_temporary_directories_of_dead_local_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runs = tmp_path / "runs"
    stale = runs / f".tmp-3-{os.uname().nodename}-{dead.pid}"
    mine = rundir.tmp_run_dir(tmp_path, 4)
    other_host = runs / f".tmp-5-some-other-host-{dead.pid}"
    for d in (stale, mine, other_host):
        d.mkdir(parents=True)
    assert rundir.remove_stale_tmp_dirs(tmp_path) == [stale]
    assert mine.exists() and other_host.exists() and not stale.exists()


def test_bad_queue_settings_are_refused(tmp_path):
    from medleak.errors import MedleakError

    with pytest.raises(MedleakError, match="--lease_seconds"):
        WorkQueue(tmp_path, lease_seconds=0)
    with pytest.raises(MedleakError, match="--max_attempts"):
        WorkQueue(tmp_path, max_attempts=0)


def test_a_logdir_that_cannot_be_created_is_a_one_line_error(tmp_path):
    from medleak.errors import MedleakError

    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(MedleakError, match="--logdir"):
        WorkQueue(tmp_path / "file" / "logs")
