"""The logdir of one audited dataset, in medleak's run-directory format (layout: docs/XRV.md).

Torch-free, so the attack stage (and its tests) can read and write it without torch. Each model is
one run: run 0 the target (its `record_mask` = membership), run 1 the reference (all False). The
plan files make it loadable by `medleak.privacy_utils.scoring.load_campaign` like a shadow-model campaign.
A logdir is built under a temporary name and renamed into place only when complete.
"""

import contextlib
import dataclasses
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from medleak.campaign import plan as plan_files
from medleak import rundir
from medleak.errors import MedleakError

FORMAT = "torchxrayvision-1"
SOURCE = "torchxrayvision"
ROLE_TARGET, ROLE_REFERENCE = "target", "reference"


def plan_document(dataset, full_table, sample, member_mask, models, xrv_outputs, extra=None) -> dict:
    """plan.json of an audit logdir. `models`: [{"name", "role", ...}] in run order."""
    n_patients = len(plan_files.patient_index(sample.df["patient_id"])[0])
    document = {
        "format": FORMAT,
        "source": SOURCE,
        "dataset": dataset,
        "dataset_hash": full_table.content_hash(),
        "records_hash": sample.content_hash(),
        "campaign": {"n_runs": len(models)},
        "n_patients": int(n_patients),
        "n_train_records": int(sample.n_records),
        "n_test_records": 0,
        "n_members": int(np.sum(member_mask)),
        "label_names": list(sample.label_names),
        "xrv_outputs": list(xrv_outputs),
        "task": sample.task,
        "subgroups": list(sample.subgroups),
        "channels": int(sample.channels),
        "models": [{"run": i, **model} for i, model in enumerate(models)],
    }
    document.update(extra or {})
    return document


def write_logdir(logdir, document, sample, member_mask, logits: dict, run_metrics: dict, overwrite=False) -> Path:
    """Writes an audit logdir atomically; `logits[name]` is float32 (N, C) of model `name`.

    Run i is `document["models"][i]`; `run_metrics[name]` goes into that run's metrics.json.
    """
    logdir = Path(logdir)
    if logdir.exists() and not overwrite:
        raise MedleakError(f"{logdir} already exists; pass --overwrite to replace it or choose another --logdir")
    member_mask = np.asarray(member_mask, dtype=bool)
    labels = sample.labels()
    tmp = logdir.parent / f".tmp-{logdir.name}-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        patient_ids, patient_of_record = plan_files.patient_index(sample.df["patient_id"])
        patient_mask = np.zeros((len(document["models"]), len(patient_ids)), dtype=bool)
        empty = dataclasses.replace(sample, df=sample.df.iloc[:0])
        for run, model in enumerate(document["models"]):
            if model["role"] == ROLE_TARGET:
                patient_mask[run, patient_of_record[member_mask]] = True
        plan_files.write_plan(tmp, document, patient_mask, patient_ids, sample, empty)
        # The audit sample has no test split: without test_records.csv the loader reads none.
        (tmp / plan_files.TEST_RECORDS_FILE).unlink()
        for run, model in enumerate(document["models"]):
            scores = np.asarray(logits[model["name"]], dtype=np.float32)
            if scores.shape != labels.shape:
                raise ValueError(f"logits of {model['name']} have shape {scores.shape}, expected {labels.shape}")
            record_mask = member_mask if model["role"] == ROLE_TARGET else np.zeros(len(member_mask), dtype=bool)
            empty_logits = np.zeros((0, labels.shape[1]), np.float32)
            run_tmp = rundir.write_run_tmp(tmp, run, train_logits=scores[:, None, :], train_labels=labels,
                                           record_mask=record_mask, test_logits=empty_logits,
                                           test_labels=empty_logits, metrics=run_metrics[model["name"]])
            rundir.commit_run(run_tmp, tmp, run)
        if logdir.exists():  # --overwrite: the old logdir goes only once the new one is complete
            shutil.rmtree(logdir)
        os.rename(tmp, logdir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return logdir


def model_runs(plan: dict, logdir="logdir") -> dict:
    """{role: model entry} of an audit logdir's plan; one-line errors for anything else."""
    if plan.get("source") != SOURCE:
        raise MedleakError(f"{Path(logdir) / 'plan.json'}: not written by xrv_scores.py; run xrv_scores.py first")
    roles = {model["role"]: model for model in plan.get("models", [])}
    for role in (ROLE_TARGET, ROLE_REFERENCE):
        if role not in roles:
            raise MedleakError(f"{Path(logdir) / 'plan.json'}: lists no {role} model")
    return roles
