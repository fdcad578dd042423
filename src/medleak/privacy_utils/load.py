"""Reads a campaign logdir (format: docs/ARCHITECTURE.md "Run directory") into score arrays.

Streaming: each run's `train_logits.npy` (N, V, C) is memory-mapped and turned into LiRA scores
chunk by chunk, straight into one preallocated float32 (n_runs, N, V) array, so memory is bounded
by the score array, not by all logits. RMIA's p is recovered from it when needed
(`scores.rmia_from_lira`: LiRA = logit(p) exactly). Test logits (small) are kept for utility.

Tolerant of extra files and directories; strict about shapes and labels: every run must agree
with records.csv / test_records.csv and plan.json. Runs that are incomplete (a file missing or
unreadable) or hold NaN/inf logits are skipped with one warning that lists them.
"""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from medleak.rundir import read_plan
from medleak.rundir import RUN_FILES, list_complete_runs, run_dir
from medleak.data_utils.records import read_csv, require_columns
from medleak.errors import MedleakError
from medleak.io_utils import load_npy
from medleak.privacy_utils.scores import TASKS, lira_scores

SCORE_CHUNK = 8192  # records per scoring chunk: bounded float64 temporaries


@dataclasses.dataclass
class Campaign:
    """Everything the audit needs from a logdir."""

    logdir: Path
    plan: dict
    dataset: str
    task: str
    label_names: list
    subgroups: list
    records: pd.DataFrame  # records.csv: row i is logit row i
    test_records: pd.DataFrame | None
    run_ids: np.ndarray  # (n_runs,) run index of each row below
    scores: np.ndarray  # (n_runs, N, V) float32 LiRA scores
    masks: np.ndarray  # (n_runs, N) bool: record was IN for the run
    test_logits: np.ndarray | None  # (n_runs, n_test, C) float32
    test_labels: np.ndarray | None  # (n_test, C) float32
    skipped: list  # [(run index, reason)]

    @property
    def n_runs(self) -> int:
        return len(self.run_ids)

    def train_labels(self) -> np.ndarray:
        return self.records[self.label_names].to_numpy(dtype=np.float32)


def _read_table(path, label_names, subgroups):
    df = read_csv(path, dtype={"record_id": str, "patient_id": str, "path": str}, keep_default_na=False)
    require_columns(df, ["record_id", "patient_id"] + list(label_names) + list(subgroups), path)
    labels = df[list(label_names)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise MedleakError(f"{path}: label columns {list(label_names)} must hold only 0/1 values")
    df[list(label_names)] = labels.astype(np.float32)
    for column in subgroups:
        df[column] = df[column].astype(str).replace({"": "unknown", "nan": "unknown"})
    return df


def read_plan_files(logdir):
    """(plan, records, test_records or None) with one-line errors for a logdir that is not a campaign."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise MedleakError(f"--logdir={logdir}: no such directory")
    plan_path = logdir / "plan.json"
    if not plan_path.is_file():
        raise MedleakError(f"{plan_path}: missing; --logdir must be a campaign logdir written by a dataset script (e.g. chexpert.py)")
    plan = read_plan(logdir)
    for key in ("label_names", "task"):
        if key not in plan:
            raise MedleakError(f"{plan_path}: lacks {key!r}; re-create the campaign with the current version")
    if plan["task"] not in TASKS:
        raise MedleakError(f"{plan_path}: task must be one of {TASKS}, got {plan['task']!r}")
    label_names, subgroups = list(plan["label_names"]), list(plan.get("subgroups", []))
    records = _read_table(logdir / "records.csv", label_names, subgroups)
    test_path = logdir / "test_records.csv"
    test_records = _read_table(test_path, label_names, subgroups) if test_path.is_file() else None
    return plan, records, test_records


def _expected_masks(logdir, records, run_ids):
    """Record masks implied by patient_mask.npy + patients.csv (None when those are absent)."""
    mask_path, patients_path = Path(logdir) / "patient_mask.npy", Path(logdir) / "patients.csv"
    if not (mask_path.is_file() and patients_path.is_file()):
        return None
    patient_mask = load_npy(mask_path)
    patients = read_csv(patients_path, dtype={"patient_id": str}, keep_default_na=False)["patient_id"]
    position = pd.Series(np.arange(len(patients)), index=patients.to_numpy())
    index = position.reindex(records["patient_id"].to_numpy()).to_numpy()
    if np.isnan(index).any() or patient_mask.ndim != 2 or patient_mask.shape[1] != len(patients):
        raise MedleakError(f"{mask_path}: does not match {patients_path} and records.csv; the plan files are inconsistent")
    if max(run_ids, default=-1) >= patient_mask.shape[0]:
        raise MedleakError(f"{mask_path}: has {patient_mask.shape[0]} runs but run_{max(run_ids):04d} exists")
    return lambda run: patient_mask[run][index.astype(np.int64)]


def load_campaign(logdir, *, progress=True) -> Campaign:
    """Loads every complete run of `logdir` (see module doc). Raises MedleakError on bad input."""
    logdir = Path(logdir)
    plan, records, test_records = read_plan_files(logdir)
    label_names, task = list(plan["label_names"]), plan["task"]
    train_labels = records[label_names].to_numpy(dtype=np.float32)
    test_labels = None if test_records is None else test_records[label_names].to_numpy(dtype=np.float32)
    n_records, n_classes = train_labels.shape

    candidates = list_complete_runs(logdir)
    if not candidates:
        raise MedleakError(f"{logdir / 'runs'}: no complete runs yet; train shadow models first (the dataset script with --logdir={logdir})")
    skipped = []
    usable = []
    for run in candidates:
        missing = [f for f in RUN_FILES if not (run_dir(logdir, run) / f).is_file()]
        if missing:
            skipped.append((run, f"missing {', '.join(missing)}"))
        else:
            usable.append(run)
    expected_mask = _expected_masks(logdir, records, usable)

    n_views = None
    scores = masks = test_logits = None
    kept = []
    for run in tqdm(usable, desc="loading runs", unit="run", disable=not progress):
        path = run_dir(logdir, run)
        try:
            logits = load_npy(path / "train_logits.npy", mmap=True)
            labels = load_npy(path / "train_labels.npy")
            mask = load_npy(path / "record_mask.npy")
            run_test_logits = load_npy(path / "test_logits.npy")
            run_test_labels = load_npy(path / "test_labels.npy")
        except (ValueError, OSError) as e:
            skipped.append((run, f"unreadable ({str(e).splitlines()[0]})"))
            continue
        if logits.ndim != 3 or logits.shape[0] != n_records or logits.shape[2] != n_classes:
            raise MedleakError(
                f"{path / 'train_logits.npy'}: shape {logits.shape}, expected ({n_records}, n_views, {n_classes}) "
                "from records.csv and plan.json label_names"
            )
        if labels.shape != train_labels.shape or not np.array_equal(labels, train_labels):
            raise MedleakError(f"{path / 'train_labels.npy'}: labels differ from {logdir / 'records.csv'}; the run belongs to another dataset or plan")
        if mask.shape != (n_records,) or mask.dtype != bool:
            raise MedleakError(f"{path / 'record_mask.npy'}: expected bool ({n_records},), got {mask.dtype} {mask.shape}")
        if expected_mask is not None and not np.array_equal(mask, expected_mask(run)):
            raise MedleakError(f"{path / 'record_mask.npy'}: differs from row {run} of patient_mask.npy; the run was trained on another plan")
        if n_views is None:
            n_views = logits.shape[1]
            scores = np.empty((len(usable), n_records, n_views), dtype=np.float32)
            masks = np.empty((len(usable), n_records), dtype=bool)
        elif logits.shape[1] != n_views:
            raise MedleakError(f"{path / 'train_logits.npy'}: {logits.shape[1]} views, other runs have {n_views}")
        if test_labels is not None:
            if run_test_logits.shape != test_labels.shape:
                raise MedleakError(f"{path / 'test_logits.npy'}: shape {run_test_logits.shape}, expected {test_labels.shape} from test_records.csv")
            if not np.array_equal(run_test_labels, test_labels):
                raise MedleakError(f"{path / 'test_labels.npy'}: labels differ from {logdir / 'test_records.csv'}")
        row = len(kept)
        finite = np.isfinite(run_test_logits).all()
        for start in range(0, n_records, SCORE_CHUNK):
            chunk = np.asarray(logits[start:start + SCORE_CHUNK])
            if not np.isfinite(chunk).all():
                finite = False
                break
            scores[row, start:start + SCORE_CHUNK] = lira_scores(chunk, train_labels[start:start + SCORE_CHUNK], task=task)
        if not finite:
            skipped.append((run, "NaN/inf logits"))
            continue
        masks[row] = mask
        if test_labels is not None:
            if test_logits is None:
                test_logits = np.empty((len(usable),) + test_labels.shape, dtype=np.float32)
            test_logits[row] = run_test_logits
        kept.append(run)

    if skipped:
        listed = "; ".join(f"run_{run:04d} ({why})" for run, why in skipped)
        warnings.warn(f"skipped {len(skipped)} run(s): {listed}", stacklevel=2)
    if len(kept) < 2:
        raise MedleakError(
            f"{logdir}: {len(kept)} usable run(s); the audit compares models that did and did not train on each "
            "record, so it needs at least 2 (16 or more for stable per-record risk)"
        )
    n = len(kept)
    return Campaign(
        logdir=logdir,
        plan=plan,
        dataset=str(plan.get("dataset", logdir.name)),
        task=task,
        label_names=label_names,
        subgroups=list(plan.get("subgroups", [])),
        records=records,
        test_records=test_records,
        run_ids=np.array(kept),
        scores=scores[:n],
        masks=masks[:n],
        test_logits=None if test_logits is None else test_logits[:n],
        test_labels=test_labels,
        skipped=skipped,
    )
