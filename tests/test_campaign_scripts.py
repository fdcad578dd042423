"""End to end: the five dataset scripts train real (tiny) JAX models on generated official layouts.

Each test runs the scripts as users do (`python fitzpatrick.py --data_root=… …`) in subprocesses and
checks the run directories they leave. Models are small_cnn on 16x16 images with small batches.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medleak import rundir
from medleak.campaign import plan
from tests import layouts

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model=small_cnn", "--img_size=16,16", "--epochs=2", "--batch_size=8", "--eval_views=2"]
N_CLASSES = {"fitzpatrick": 3, "chexpert": 14, "mimic": 14, "embed": 4, "fairvision": 7}

pytestmark = pytest.mark.slow


def script_env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def run_script(dataset, *flags, timeout=300):
    return subprocess.run([sys.executable, f"{dataset}.py", *flags], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def check_campaign(logdir, dataset, n_runs):
    """The logdir holds a complete, consistent campaign of `n_runs` runs."""
    stored = rundir.read_plan(logdir)
    assert stored["dataset"] == dataset and stored["campaign"]["n_runs"] == n_runs
    records = pd.read_csv(logdir / rundir.RECORDS_FILE)
    patients = pd.read_csv(logdir / "patients.csv")["patient_id"].astype(str).tolist()
    patient_mask = rundir.load_patient_mask(logdir)
    assert patient_mask.shape == (n_runs, len(patients)) == (n_runs, stored["n_patients"])
    _, patient_index = plan.patient_index(records["patient_id"].astype(str))
    assert rundir.list_complete_runs(logdir) == list(range(n_runs))
    assert sorted(p.name for p in (logdir / rundir.RUNS_DIR).iterdir()) == [rundir.run_dir_name(i) for i in range(n_runs)]
    n_test = len(pd.read_csv(logdir / rundir.TEST_RECORDS_FILE))
    for i in range(n_runs):
        run = rundir.read_run(logdir, i)
        n, c = len(records), N_CLASSES[dataset]
        assert run["train_logits"].shape == (n, 2, c) and run["train_logits"].dtype == np.float32
        assert np.isfinite(run["train_logits"]).all()
        assert run["train_labels"].shape == (n, c) and run["test_logits"].shape == (n_test, c)
        np.testing.assert_array_equal(run["record_mask"], plan.record_mask(patient_mask[i], patient_index))
        metrics = run["metrics"]
        assert metrics["run"] == i and metrics["config"] == stored["train_config"]
        assert metrics["n_train_in"] == int(run["record_mask"].sum())
        assert metrics["test"]["n"] == n_test and metrics["device"].startswith("cpu")
        assert metrics["versions"]["jax"] and metrics["timings"]["train_seconds"] > 0
    return stored


@pytest.mark.slow
def test_fitzpatrick_script_trains_eight_runs_then_does_nothing_refuses_other_configs_and_plots(tmp_path):
    # 32 patients: a run then holds at least one full batch of 8 (the plan refuses less)
    data_root = layouts.write_fitzpatrick(tmp_path / "data" / "fitzpatrick", n_patients=32, size=(20, 20))
    logdir = tmp_path / "logs" / "fitzpatrick"
    common = [f"--data_root={data_root}", f"--logdir={logdir}", f"--cache_dir={tmp_path / 'cache'}"]
    result = run_script("fitzpatrick", *common, "--n_runs=8", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run 8/8 done · 0 in progress · 0 failed" in result.stdout
    stored = check_campaign(logdir, "fitzpatrick", 8)
    assert stored["train_config"]["model"] == "small_cnn" and stored["train_config"]["img_size"] == [16, 16]
    assert stored["train_config"]["learning_rate"] == 5e-3  # the dataset's default (SPEC.md)
    assert (rundir.load_patient_mask(logdir).sum(axis=0) == 4).all()

    mtimes = [rundir.run_dir(logdir, i).stat().st_mtime_ns for i in range(8)]
    again = run_script("fitzpatrick", *common, "--n_runs=8", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "started" not in again.stdout and "images ready" not in again.stdout
    assert "nothing left to claim · run 8/8 done" in again.stdout
    assert [rundir.run_dir(logdir, i).stat().st_mtime_ns for i in range(8)] == mtimes

    refused = run_script("fitzpatrick", *common, "--n_runs=8", *TINY, "--learning_rate=0.1")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "train_config.learning_rate (logdir: 0.005, now: 0.1)" in refused.stderr

    # the audit stage reads the campaign as written (scripts/plot_all.sh → mem_inf_stats.py)
    env = dict(script_env(), DATASETS="fitzpatrick chexpert", LOG_DIR=str(tmp_path / "logs"),
               DATA_DIR=str(tmp_path / "data"), PYTHON=sys.executable)
    plotted = subprocess.run(["bash", "scripts/plot_all.sh", "--eval_size=2", f"--out_dir={tmp_path / 'figs'}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    n_records = stored["n_train_records"]  # one image per patient in Fitzpatrick17k
    assert f"8 runs, {n_records} records, {n_records} patients" in plotted.stdout
    assert "== chexpert: no campaign" in plotted.stdout
    assert (tmp_path / "figs" / "report.html").is_file()


@pytest.mark.slow
def test_train_all_runs_two_chexpert_workers_per_device_on_one_logdir(tmp_path):
    layouts.write_chexpert(tmp_path / "data" / "chexpert", n_patients=10, size=(20, 20))
    env = dict(script_env(), DATASETS="chexpert", DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logs"),
               N_RUNS="4", WORKERS_PER_GPU="2", GPUS="", PYTHON=sys.executable)
    result = subprocess.run(["bash", "scripts/train_all.sh", f"--cache_dir={tmp_path / 'cache'}", *TINY],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logdir = tmp_path / "logs" / "chexpert"
    worker_logs = sorted((logdir / "worker_logs").glob("*.log"))
    assert result.returncode == 0, result.stderr + "".join(p.read_text()[-2000:] for p in worker_logs)
    assert len(worker_logs) == 2
    check_campaign(logdir, "chexpert", 4)
    state = json.loads((logdir / "queue" / "queue.json").read_text())
    assert [r["attempts"] for r in state["runs"]] == [1] * 4  # no run trained twice


def start_script(dataset, *flags):
    return subprocess.Popen([sys.executable, f"{dataset}.py", *flags], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_mimic_embed_fairvision_campaigns_eval_only_and_a_diverging_run_side_by_side(tmp_path):
    # Four scripts at once: each process pays JAX's import and one compile; run together they
    # share the cores instead of queueing (and share nothing else: separate logdirs and caches).
    workers = {}
    for dataset in ("mimic", "embed", "fairvision"):
        data_root = getattr(layouts, f"write_{dataset}")(tmp_path / dataset / "data", n_patients=16, size=(20, 20))
        workers[dataset] = start_script(dataset, f"--data_root={data_root}", f"--logdir={tmp_path / dataset / 'logs'}",
                                        f"--cache_dir={tmp_path / dataset / 'cache'}", "--n_runs=2", *TINY)
    data_root = layouts.write_fitzpatrick(tmp_path / "eval" / "data", n_patients=12, size=(20, 20))
    eval_logdir = tmp_path / "eval" / "logs"
    workers["eval_only"] = start_script("fitzpatrick", f"--data_root={data_root}", f"--logdir={eval_logdir}",
                                        f"--cache_dir={tmp_path / 'eval' / 'cache'}", "--eval_only", *TINY)
    # a diverging configuration: the NaN loss is recorded, retried with a fresh seed, then reported
    nan_logdir = tmp_path / "eval" / "nan_logs"
    workers["diverged"] = start_script("fitzpatrick", f"--data_root={data_root}", f"--logdir={nan_logdir}",
                                       f"--cache_dir={tmp_path / 'eval' / 'cache'}", "--n_runs=1", "--subset_ratio=0.6",
                                       "--max_attempts=2", *TINY, "--epochs=4", "--learning_rate=1e30",
                                       "--batch_size=4")  # a run holds ~5 records: the plan refuses batches larger
    outputs = {name: proc.communicate(timeout=300) for name, proc in workers.items()}
    for name, proc in workers.items():
        assert proc.returncode == 0, (name, outputs[name][1][-3000:])

    for dataset in ("mimic", "embed", "fairvision"):
        assert "run 2/2 done · 0 in progress · 0 failed" in outputs[dataset][0]
        check_campaign(tmp_path / dataset / "logs", dataset, 2)

    assert "eval_only: test accuracy" in outputs["eval_only"][0]
    out = eval_logdir / "eval_only"
    metrics = json.loads((out / "metrics.json").read_text())
    record_mask = np.load(out / "record_mask.npy", allow_pickle=False)
    assert record_mask.all() and metrics["n_train_in"] == record_mask.size
    assert metrics["eval_only"] is True and metrics["train_out"] is None
    assert metrics["test"]["n"] == np.load(out / "test_logits.npy", allow_pickle=False).shape[0]
    assert not (eval_logdir / rundir.PLAN_FILE).exists() and not (eval_logdir / rundir.RUNS_DIR).exists()

    assert "nothing left to claim · run 0/1 done · 0 in progress · 1 failed" in outputs["diverged"][0]
    run = json.loads((nan_logdir / "queue" / "queue.json").read_text())["runs"][0]
    assert (run["status"], run["attempts"]) == ("failed", 2)
    errors = [e["error"] for e in run["errors"]]
    assert all(e.startswith("TrainingDiverged: training loss became nan") for e in errors)
    assert errors[0].split("(seed ")[1] != errors[1].split("(seed ")[1]  # the retry used a fresh seed
    assert rundir.list_complete_runs(nan_logdir) == [] and not list((nan_logdir / rundir.RUNS_DIR).glob(".tmp-*"))
