"""Reads and validates a campaign logdir (format: docs/ARCHITECTURE.md "Run directory", file names in
`medleak.rundir`); turning its logits into scores is the next step (`scoring.py`).

Three steps: `read_campaign_files` (plan.json, records.csv, test_records.csv), `discover_runs` (the
complete run directories, minus those missing a file) and `validate_run` (one run's arrays against
the plan files). A validated run keeps only its small arrays (record mask, test logits) and the path
of its train logits, which the scoring step memory-maps chunk by chunk.

Tolerant of extra files and directories; strict about shapes and labels: every run must agree
with records.csv / test_records.csv and plan.json. Runs that are incomplete (a file missing or
unreadable) or hold NaN/inf logits are skipped (and listed by the caller in one warning).
"""

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from medleak.data_utils.records import TASKS, read_csv, require_columns
from medleak.errors import MedleakError
from medleak.io_utils import load_npy
from medleak.rundir import (MASK_FILE, PATIENTS_FILE, PLAN_FILE, RECORDS_FILE, RUN_FILES, RUNS_DIR, TEST_RECORDS_FILE,
                            list_complete_runs, read_plan, run_dir)

SKIP_NON_FINITE = "NaN/inf logits"  # the reason a run with non-finite logits is skipped


@dataclasses.dataclass
class CampaignFiles:
    """A logdir's plan files: what every run is checked against."""

    logdir: Path
    plan: dict
    records: pd.DataFrame  # records.csv: row i is logit row i
    test_records: pd.DataFrame | None

    @property
    def dataset(self) -> str:
        return str(self.plan.get("dataset", self.logdir.name))

    @property
    def task(self) -> str:
        return self.plan["task"]

    @property
    def label_names(self) -> list:
        return list(self.plan["label_names"])

    @property
    def subgroups(self) -> list:
        return list(self.plan.get("subgroups", []))

    @functools.cached_property
    def train_labels(self) -> np.ndarray:
        return self.records[self.label_names].to_numpy(dtype=np.float32)

    @functools.cached_property
    def test_labels(self) -> np.ndarray | None:
        return None if self.test_records is None else self.test_records[self.label_names].to_numpy(dtype=np.float32)


@dataclasses.dataclass
class RunFiles:
    """One validated run: its train logits stay on disk until they are scored."""

    run: int
    train_logits_path: Path
    n_views: int
    mask: np.ndarray  # (N,) bool
    test_logits: np.ndarray | None  # (n_test, C) float32


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
    files = read_campaign_files(logdir)
    return files.plan, files.records, files.test_records


def read_campaign_files(logdir) -> CampaignFiles:
    """The plan files of `logdir`, with one-line errors for a logdir that is not a campaign."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise MedleakError(f"--logdir={logdir}: no such directory")
    plan_path = logdir / PLAN_FILE
    if not plan_path.is_file():
        raise MedleakError(f"{plan_path}: missing; --logdir must be a campaign logdir written by a dataset script (e.g. chexpert.py)")
    plan = read_plan(logdir)
    for key in ("label_names", "task"):
        if key not in plan:
            raise MedleakError(f"{plan_path}: lacks {key!r}; re-create the campaign with the current version")
    if plan["task"] not in TASKS:
        raise MedleakError(f"{plan_path}: task must be one of {TASKS}, got {plan['task']!r}")
    label_names, subgroups = list(plan["label_names"]), list(plan.get("subgroups", []))
    records = _read_table(logdir / RECORDS_FILE, label_names, subgroups)
    test_path = logdir / TEST_RECORDS_FILE
    test_records = _read_table(test_path, label_names, subgroups) if test_path.is_file() else None
    return CampaignFiles(logdir, plan, records, test_records)


def discover_runs(logdir):
    """(runs with every file, [(run, reason)] of complete runs missing one); error when there is none."""
    candidates = list_complete_runs(logdir)
    if not candidates:
        raise MedleakError(f"{Path(logdir) / RUNS_DIR}: no complete runs yet; train shadow models first "
                           f"(the dataset script with --logdir={logdir})")
    usable, skipped = [], []
    for run in candidates:
        missing = [f for f in RUN_FILES if not (run_dir(logdir, run) / f).is_file()]
        if missing:
            skipped.append((run, f"missing {', '.join(missing)}"))
        else:
            usable.append(run)
    return usable, skipped


def expected_masks(files: CampaignFiles, run_ids):
    """run → record mask implied by patient_mask.npy + patients.csv (None when those are absent)."""
    mask_path, patients_path = files.logdir / MASK_FILE, files.logdir / PATIENTS_FILE
    if not (mask_path.is_file() and patients_path.is_file()):
        return None
    patient_mask = load_npy(mask_path)
    patients = read_csv(patients_path, dtype={"patient_id": str}, keep_default_na=False)["patient_id"]
    position = pd.Series(np.arange(len(patients)), index=patients.to_numpy())
    index = position.reindex(files.records["patient_id"].to_numpy()).to_numpy()
    if np.isnan(index).any() or patient_mask.ndim != 2 or patient_mask.shape[1] != len(patients):
        raise MedleakError(f"{mask_path}: does not match {patients_path} and {RECORDS_FILE}; the plan files are inconsistent")
    if max(run_ids, default=-1) >= patient_mask.shape[0]:
        raise MedleakError(f"{mask_path}: has {patient_mask.shape[0]} runs but run_{max(run_ids):04d} exists")
    return lambda run: patient_mask[run][index.astype(np.int64)]


def validate_run(files: CampaignFiles, run: int, expected_mask=None):
    """(RunFiles, None) for a run that agrees with the plan files, (None, reason) for one to skip;
    MedleakError for a run of another plan or dataset (shapes, labels or mask differ)."""
    path = run_dir(files.logdir, run)
    train_labels, test_labels = files.train_labels, files.test_labels
    n_records, n_classes = train_labels.shape
    try:
        logits = load_npy(path / "train_logits.npy", mmap=True)
        labels = load_npy(path / "train_labels.npy")
        mask = load_npy(path / "record_mask.npy")
        test_logits = load_npy(path / "test_logits.npy")
        run_test_labels = load_npy(path / "test_labels.npy")
    except (ValueError, OSError) as e:
        return None, f"unreadable ({str(e).splitlines()[0]})"
    if logits.ndim != 3 or logits.shape[0] != n_records or logits.shape[2] != n_classes:
        raise MedleakError(f"{path / 'train_logits.npy'}: shape {logits.shape}, expected ({n_records}, n_views, {n_classes}) "
                           f"from {RECORDS_FILE} and {PLAN_FILE} label_names")
    if labels.shape != train_labels.shape or not np.array_equal(labels, train_labels):
        raise MedleakError(f"{path / 'train_labels.npy'}: labels differ from {files.logdir / RECORDS_FILE}; "
                           "the run belongs to another dataset or plan")
    if mask.shape != (n_records,) or mask.dtype != bool:
        raise MedleakError(f"{path / 'record_mask.npy'}: expected bool ({n_records},), got {mask.dtype} {mask.shape}")
    if expected_mask is not None and not np.array_equal(mask, expected_mask(run)):
        raise MedleakError(f"{path / 'record_mask.npy'}: differs from row {run} of {MASK_FILE}; the run was trained on another plan")
    if test_labels is not None:
        if test_logits.shape != test_labels.shape:
            raise MedleakError(f"{path / 'test_logits.npy'}: shape {test_logits.shape}, expected {test_labels.shape} "
                               f"from {TEST_RECORDS_FILE}")
        if not np.array_equal(run_test_labels, test_labels):
            raise MedleakError(f"{path / 'test_labels.npy'}: labels differ from {files.logdir / TEST_RECORDS_FILE}")
    if not np.isfinite(test_logits).all():
        return None, SKIP_NON_FINITE
    return RunFiles(run, path / "train_logits.npy", int(logits.shape[1]), mask,
                    None if test_labels is None else np.asarray(test_logits, dtype=np.float32)), None


def validate_runs(files: CampaignFiles, *, progress=True, runs=None, n_views=None):
    """([RunFiles] of the usable runs in run order, [(run, reason)] skipped); all runs must agree on
    views (and with `n_views` when given: the cached runs'). `runs`: the run indices to check
    (complete runs with every file, e.g. from `discover_runs`), default every run of the logdir."""
    if runs is None:
        usable, skipped = discover_runs(files.logdir)
    else:
        usable, skipped = list(runs), []
    expected_mask = expected_masks(files, usable) if usable else None
    checked = []
    for run in tqdm(usable, desc="checking runs", unit="run", disable=not progress or not usable):
        run_files, reason = validate_run(files, run, expected_mask)
        if run_files is None:
            skipped.append((run, reason))
            continue
        views = checked[0].n_views if checked else n_views
        if views and run_files.n_views != views:
            raise MedleakError(f"{run_files.train_logits_path}: {run_files.n_views} views, other runs have {views}")
        checked.append(run_files)
    return checked, skipped
