"""Synthetic campaign logdirs for tests, written through `medleak.rundir` (layout: docs/RUNDIR.md).

    write_campaign_logdir(logdir, plan=, records=, test_records=, patient_ids=, patient_mask=, runs=) -> Path
        The plan files (plan.json last, as the campaign writes them), then every run of `runs` (dicts of
        `rundir.write_run_files`' keyword arguments) written to a temporary directory and committed as
        runs/run_NNNN — the same steps a training worker takes.
    write_planted_campaign(logdir, n_runs=16, n_patients=50, ...) -> Path
        A campaign with known answers: the PLANTED patients' IN logits are shifted far up, everyone
        else's barely. conftest.py's session-scoped `planted_campaign` fixture is one of these.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medleak import rundir
from medleak.campaign.plan import PLAN_FORMAT
from medleak.io_utils import save_npy, write_csv, write_json

LABELS = ["benign", "malignant", "other"]
PLANTED = ["p000", "p001", "p002", "p003"]


def write_campaign_logdir(logdir, *, plan: dict, records: pd.DataFrame, test_records: pd.DataFrame, patient_ids,
                          patient_mask, runs) -> Path:
    """Writes a complete campaign logdir; `patient_mask` is bool (n_runs, len(patient_ids))."""
    logdir = Path(logdir)
    logdir.mkdir(parents=True)
    save_npy(logdir / rundir.MASK_FILE, np.asarray(patient_mask, dtype=bool))
    write_csv(logdir / rundir.PATIENTS_FILE, pd.DataFrame({"patient_id": list(patient_ids)}))
    write_csv(logdir / rundir.RECORDS_FILE, records)
    write_csv(logdir / rundir.TEST_RECORDS_FILE, test_records)
    write_json(logdir / rundir.PLAN_FILE, {"format": PLAN_FORMAT, **plan})
    (logdir / rundir.RUNS_DIR).mkdir()
    for run_index, run in enumerate(runs):
        rundir.commit_run(rundir.write_run_tmp(logdir, run_index, **run), logdir, run_index)
    return logdir


def write_planted_campaign(logdir, *, n_runs=16, n_patients=50, n_views=2, task="multiclass", seed=0,
                           data_root=None, planted_effect=4.0, member_effect=0.15) -> Path:
    """Patients have 1–3 records with labels LABELS; test logits are informative (2·label + noise).

    An IN record's logits move towards its labels by `planted_effect` (PLANTED patients) or
    `member_effect` (everyone else); both 0 is a null campaign with no membership signal at all.

    Also leaves a worker's unfinished temporary run and an unrelated file in the logdir (both must be
    ignored), and with `data_root` writes a 16×16 image for every record there.
    """
    rng = np.random.default_rng(seed)
    patients = [f"p{i:03d}" for i in range(n_patients)]
    rows = []
    for i, patient in enumerate(patients):
        for k in range(1 + i % 3):
            label = np.zeros(len(LABELS))
            if task == "multiclass":
                label[rng.integers(len(LABELS))] = 1
            else:
                label[rng.random(len(LABELS)) < 0.4] = 1
            rows.append(dict(record_id=f"{patient}_r{k}", patient_id=patient, path=f"images/{patient}_{k}.png",
                             **dict(zip(LABELS, label)), sex="F" if patient in PLANTED else ("M" if i % 2 else "F"),
                             age=["20-39", "40-59", "60-79"][i % 3]))
    records = pd.DataFrame(rows)
    test = pd.DataFrame([dict(record_id=f"t{j}", patient_id=f"t{j}", path=f"images/t{j}.png",
                              **dict(zip(LABELS, np.eye(len(LABELS))[j % len(LABELS)])), sex="MF"[j % 2],
                              age=["20-39", "40-59", "60-79"][(j // 3) % 3]) for j in range(36)])
    order = np.argsort(rng.random((n_runs, n_patients)), axis=0)
    patient_mask = order < n_runs // 2
    plan = {"dataset": "synthetic", "task": task, "label_names": LABELS, "subgroups": ["sex", "age"],
            "campaign": {"n_runs": n_runs, "subset_ratio": 0.5, "seed": seed}, "extra_key": "tolerated"}

    patient_index = records["patient_id"].map({p: i for i, p in enumerate(patients)}).to_numpy()
    labels = records[LABELS].to_numpy(np.float32)
    signs = np.where(labels > 0, 1.0, -1.0)
    base = rng.normal(0, 1, size=(len(records), 1, len(LABELS)))
    planted = records["patient_id"].isin(PLANTED).to_numpy()
    test_labels = test[LABELS].to_numpy(np.float32)

    def runs():
        for run in range(n_runs):
            mask = patient_mask[run][patient_index]
            noise = rng.normal(0, 0.3, size=(len(records), n_views, len(LABELS)))
            boost = np.where(planted, planted_effect, member_effect) * mask  # planted patients: large IN effect
            yield dict(train_logits=base + noise + (boost[:, None, None] * signs[:, None, :]), train_labels=labels,
                       record_mask=mask, test_logits=2.0 * test_labels + rng.normal(0, 1, size=test_labels.shape),
                       test_labels=test_labels, metrics={"test_auroc": 0.9})

    logdir = write_campaign_logdir(logdir, plan=plan, records=records, test_records=test, patient_ids=patients,
                                   patient_mask=patient_mask, runs=runs())
    (logdir / rundir.RUNS_DIR / ".tmp-99-host-1").mkdir()  # a worker's unfinished run: ignored
    (logdir / "notes.txt").write_text("extra files are tolerated")
    if data_root is not None:
        for p in records["path"]:
            (Path(data_root) / p).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(Path(data_root) / p)
    return logdir
