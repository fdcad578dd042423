"""Stage 2: the patient-level plan of a shadow-model campaign.

Run i trains on the records of the patients that are IN for run i. The mask is drawn as in LiRA
(Carlini et al.): per patient, argsort uniform noise over the runs and take the first k runs, so
every patient is IN for exactly k = round(subset_ratio * n_runs) runs and OUT for the rest. Records
inherit their patient's bit, so all images of a patient are in or out together.

The plan is written once per logdir (by the first worker, while it holds the queue lock) with
everything that makes two models comparable: the dataset hash and the full TrainConfig. A later
worker whose dataset or config differs is refused (`check_plan`) rather than mixing models.
"""

import datetime
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.io_utils import save_npy, write_csv, write_json
from medleak.rundir import (MASK_FILE, PATIENTS_FILE, PLAN_FILE, RECORDS_FILE, TEST_RECORDS_FILE,
                            load_patient_mask, read_plan)

PLAN_FORMAT = 1


def runs_in_per_patient(n_runs: int, subset_ratio: float) -> int:
    """How many runs every patient is IN for: subset_ratio * n_runs rounded half up."""
    return int(np.floor(subset_ratio * n_runs + 0.5))


def make_patient_mask(n_runs: int, n_patients: int, subset_ratio: float, seed: int) -> np.ndarray:
    """Bool (n_runs, n_patients): patient j is IN for run i; every column has exactly k True.

    k = round(subset_ratio * n_runs). Per patient, uniform noise over the runs is argsorted and the
    first k positions are IN (LiRA's `keep.argsort(0) < k`): the runs a patient is IN for are a
    uniformly random k-subset, independently across patients. Deterministic given `seed`.
    """
    if n_runs < 1:
        raise MedleakError(f"--n_runs must be at least 1, got {n_runs}")
    if n_patients < 1:
        raise MedleakError("the training split has no patients; check --data_root")
    if not 0.0 < subset_ratio < 1.0:
        raise MedleakError(f"--subset_ratio must be strictly between 0 and 1, got {subset_ratio}")
    if runs_in_per_patient(n_runs, subset_ratio) == 0:
        raise MedleakError(f"--subset_ratio={subset_ratio} with --n_runs={n_runs} puts no patient in any run")
    rng = np.random.default_rng(seed)
    noise = rng.uniform(size=(n_runs, n_patients))
    # Each column of the argsort is a uniformly random permutation of 0..n_runs-1, so exactly k of
    # its entries are < k (LiRA's `order < int(pkeep * num_experiments)`).
    order = noise.argsort(axis=0, kind="stable")
    return order < runs_in_per_patient(n_runs, subset_ratio)


def patient_index(record_patient_ids) -> tuple[np.ndarray, np.ndarray]:
    """(patient_ids in order of first appearance, per-record index into them)."""
    codes, patients = pd.factorize(pd.Series(record_patient_ids).astype(str), sort=False)
    return np.asarray(patients, dtype=object), codes.astype(np.int64)


def record_mask(patient_mask_row: np.ndarray, record_patient_index: np.ndarray) -> np.ndarray:
    """Bool (n_records,): each record inherits the IN/OUT bit of its patient for one run."""
    return np.asarray(patient_mask_row, dtype=bool)[np.asarray(record_patient_index)]


def run_seed(campaign_seed: int, run_index: int, attempt: int = 1) -> int:
    """Training seed of one run, derived from the campaign seed (independent streams per run).

    A retried attempt (e.g. after a NaN loss, which the same seed would reproduce) gets a fresh
    seed; the seed actually used is recorded in the run's metrics.json.
    """
    entropy = [int(campaign_seed), int(run_index)] + ([int(attempt)] if attempt > 1 else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def plan_document(dataset: str, train_table, test_table, train_config, *, n_runs: int,
                  subset_ratio: float, seed: int) -> dict:
    """The identity of a campaign: what plan.json stores and what later workers must match."""
    return {
        "format": PLAN_FORMAT,
        "dataset": dataset,
        "dataset_hash": train_table.content_hash(),
        "test_dataset_hash": test_table.content_hash(),
        "train_config": train_config.to_dict(),
        "campaign": {"n_runs": int(n_runs), "subset_ratio": float(subset_ratio), "seed": int(seed)},
        "n_patients": int(len(train_table.patient_ids())),
        "n_train_records": int(train_table.n_records),
        "n_test_records": int(test_table.n_records),
        "label_names": list(train_table.label_names),
        "task": train_table.task,
        "subgroups": list(train_table.subgroups),
        "channels": int(train_table.channels),
    }


# Keys that only describe how/when a plan was written; they never make two workers incomparable.
_PROVENANCE_KEYS = ("created", "created_by")


def plan_differences(stored: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between two plan documents (nested dicts compared per key)."""
    differences = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            if not prefix and key in _PROVENANCE_KEYS:
                continue
            name = f"{prefix}{key}"
            va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, name + ".")
            elif va != vb:
                differences.append(name)

    walk(stored, wanted, "")
    return differences


def check_plan(logdir, stored: dict, wanted: dict) -> None:
    """Refuses (one-line MedleakError) a worker whose plan document differs from the stored one."""
    differences = plan_differences(stored, wanted)
    if not differences:
        return
    shown = []
    for key in differences[:6]:
        a, b = _lookup(stored, key), _lookup(wanted, key)
        if key.endswith("hash"):
            a, b = str(a)[:12], str(b)[:12]
        shown.append(f"{key} (logdir: {a}, now: {b})")
    more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
    raise MedleakError(
        f"{Path(logdir) / PLAN_FILE}: this logdir holds a campaign with a different dataset or config: "
        f"{'; '.join(shown)}{more}. Use the same flags and data, or a new --logdir"
    )


def _lookup(doc: dict, dotted: str):
    value = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<missing>"
        value = value[part]
    return value


def write_plan(logdir, document: dict, patient_mask: np.ndarray, patient_ids, train_table,
               test_table) -> None:
    """Writes the plan files; plan.json last, so its presence means the plan is complete.

    Call only while holding the queue lock (`WorkQueue.locked()`), so two workers never both write.
    """
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    save_npy(logdir / MASK_FILE, np.asarray(patient_mask, dtype=bool))
    write_csv(logdir / PATIENTS_FILE, pd.DataFrame({"patient_id": [str(p) for p in patient_ids]}))
    record_columns = [c for c in train_table.columns() if c != "split"]
    write_csv(logdir / RECORDS_FILE, train_table.df[record_columns])
    write_csv(logdir / TEST_RECORDS_FILE, test_table.df[record_columns])
    stamped = dict(document)
    stamped["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stamped["created_by"] = f"{socket.gethostname()}:{os.getpid()}"
    write_json(logdir / PLAN_FILE, stamped)


def ensure_plan(logdir, document: dict, train_table, test_table) -> tuple[dict, np.ndarray, bool]:
    """Creates the plan if the logdir has none, else checks that it matches `document`.

    Returns (stored plan document, patient mask, created). Must be called with the queue lock held.
    """
    stored = read_plan(logdir)
    if stored is not None:
        check_plan(logdir, stored, document)
        return stored, load_patient_mask(logdir), False
    campaign = document["campaign"]
    patient_ids, _ = patient_index(train_table.df["patient_id"])
    mask = make_patient_mask(campaign["n_runs"], len(patient_ids), campaign["subset_ratio"], campaign["seed"])
    write_plan(logdir, document, mask, patient_ids, train_table, test_table)
    return read_plan(logdir), mask, True
