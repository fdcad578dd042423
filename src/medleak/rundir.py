"""The layout of a campaign logdir (documented in docs/RUNDIR.md): its plan files and run directories.

Every stage that reads or writes a logdir (campaign, audit, xrv, tests) names its files through this
module, which imports nothing above `io_utils`.

A run is written into `runs/.tmp-<run>-<host>-<pid>` and renamed to `runs/run_NNNN` only when every
file is there, so later stages (and users' own tools) never see a partial run: a directory named
`run_NNNN` is complete by construction.
"""

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from medleak.errors import MedleakError
from medleak.io_utils import load_npy, read_json, save_npy, write_json

PLAN_FILE = "plan.json"
MASK_FILE = "patient_mask.npy"
PATIENTS_FILE = "patients.csv"
RECORDS_FILE = "records.csv"
TEST_RECORDS_FILE = "test_records.csv"
RUNS_DIR = "runs"
CHECKPOINTS_DIR = "checkpoints"  # per-run training checkpoints; deleted when the run is published
ARRAY_FILES = ("train_logits.npy", "train_labels.npy", "record_mask.npy", "test_logits.npy", "test_labels.npy")
METRICS_FILE = "metrics.json"
RUN_FILES = ARRAY_FILES + (METRICS_FILE,)
MODEL_DIR = "model"  # optional: the run's weights (--save_weights; --eval_only), train_utils/saved_model.py
_RUN_NAME = re.compile(r"^run_(\d{4,})$")
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-(.+)-(\d+)$")
_VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "dp-accounting", "jax-privacy")


def read_plan(logdir) -> dict | None:
    """plan.json of a logdir, or None when no plan has been written yet."""
    path = Path(logdir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise MedleakError(f"{path}: unreadable ({e}); restore it or start a new --logdir") from None


def load_patient_mask(logdir) -> np.ndarray:
    """patient_mask.npy of a logdir: bool (n_runs, n_patients)."""
    path = Path(logdir) / MASK_FILE
    if not path.is_file():
        raise MedleakError(f"{path}: missing; the logdir's plan is incomplete (delete plan.json to recreate it)")
    return load_npy(path)


def run_dir_name(run_index: int) -> str:
    return f"run_{int(run_index):04d}"


def run_dir(logdir, run_index: int) -> Path:
    return Path(logdir) / RUNS_DIR / run_dir_name(run_index)


def is_complete(logdir, run_index: int) -> bool:
    """True when `runs/run_NNNN` exists (it only ever appears complete)."""
    return run_dir(logdir, run_index).is_dir()


def list_complete_runs(logdir) -> list[int]:
    """Sorted indices of the complete runs of a logdir (temporary directories are ignored)."""
    root = Path(logdir) / RUNS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _RUN_NAME.match(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def checkpoint_dir(logdir, run_index: int) -> Path:
    """Where run `run_index` keeps its training checkpoints while it trains: `checkpoints/run_NNNN`.

    Outside `runs/` and not named after a worker, so it outlives the worker that wrote it and the
    next claim of the run resumes from it.
    """
    return Path(logdir) / CHECKPOINTS_DIR / run_dir_name(run_index)


def tmp_run_dir(logdir, run_index: int) -> Path:
    """Where this process writes a run before renaming it into place."""
    return Path(logdir) / RUNS_DIR / f".tmp-{int(run_index)}-{socket.gethostname()}-{os.getpid()}"


def write_run_tmp(logdir, run_index: int, *, train_logits, train_labels, record_mask, test_logits,
                  test_labels, metrics: dict) -> Path:
    """Writes one run's files into a fresh temporary directory and returns it (not yet visible).

    Shapes: train_logits float32 (N, V, C), train_labels (N, C), record_mask bool (N,),
    test_logits (M, C), test_labels (M, C). `commit_run` makes it visible.
    """
    tmp = tmp_run_dir(logdir, run_index)
    write_run_files(tmp, train_logits=train_logits, train_labels=train_labels, record_mask=record_mask,
                    test_logits=test_logits, test_labels=test_labels, metrics=metrics)
    return tmp


def write_run_files(directory, *, train_logits, train_labels, record_mask, test_logits, test_labels,
                    metrics: dict) -> Path:
    """Checks the shapes and writes the run files into `directory` (replaced if it exists)."""
    train_logits = np.asarray(train_logits, dtype=np.float32)
    test_logits = np.asarray(test_logits, dtype=np.float32)
    train_labels = np.asarray(train_labels, dtype=np.float32)
    test_labels = np.asarray(test_labels, dtype=np.float32)
    record_mask = np.asarray(record_mask, dtype=bool)
    if train_logits.ndim != 3:
        raise ValueError(f"train_logits must be (N, V, C), got shape {train_logits.shape}")
    n, _, c = train_logits.shape
    expected = {
        "train_labels": (train_labels.shape, (n, c)),
        "record_mask": (record_mask.shape, (n,)),
        "test_logits": (test_logits.shape[1:], (c,)),
        "test_labels": (test_labels.shape, test_logits.shape),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"{name} has shape {got}, expected {want}")
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    arrays = dict(train_logits=train_logits, train_labels=train_labels, record_mask=record_mask,
                  test_logits=test_logits, test_labels=test_labels)
    for name, array in arrays.items():
        save_npy(directory / f"{name}.npy", array)
    write_json(directory / METRICS_FILE, metrics)
    return directory


def replace_dir(tmp_dir, final) -> None:
    """Moves a finished directory onto `final`, replacing an older one (used for --eval_only)."""
    final = Path(final)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp_dir, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def commit_run(tmp_dir, logdir, run_index: int) -> bool:
    """Renames a finished temporary run directory to `runs/run_NNNN`.

    Returns False (and deletes `tmp_dir`) when the run is already complete: a run finished by another
    worker is never replaced. Either way the run's checkpoints (`checkpoint_dir`) are deleted. Call with the queue lock held so the check and the rename are one step.
    """
    final = run_dir(logdir, run_index)
    if final.exists():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(checkpoint_dir(logdir, run_index), ignore_errors=True)
        return False
    missing = [f for f in RUN_FILES if not (Path(tmp_dir) / f).is_file()]
    if missing:
        raise MedleakError(f"{tmp_dir}: incomplete run directory, missing {missing}")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp_dir, final)
    _fsync_dir(final.parent)
    shutil.rmtree(checkpoint_dir(logdir, run_index), ignore_errors=True)  # published: nothing to resume
    return True


def remove_stale_tmp_dirs(logdir) -> list[Path]:
    """Deletes temporary run directories left by dead processes of this host; returns them.

    Directories of other hosts are left alone (their pid means nothing here).
    """
    root = Path(logdir) / RUNS_DIR
    if not root.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for entry in root.iterdir():
        match = _TMP_NAME.match(entry.name)
        if not match or match.group(2) != host:
            continue
        pid = int(match.group(3))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def read_run(logdir, run_index: int, mmap: bool = True) -> dict:
    """The arrays (memory-mapped by default) and metrics of one complete run."""
    path = run_dir(logdir, run_index)
    if not path.is_dir():
        raise MedleakError(f"{path}: no such complete run")
    out = {name[: -len(".npy")]: load_npy(path / name, mmap=mmap) for name in ARRAY_FILES}
    out["metrics"] = read_json(path / METRICS_FILE)
    return out


def environment_info() -> dict:
    """Host, accelerator and library versions, recorded in every run's metrics.json."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version()}
    versions = {}
    for package in _VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info["versions"] = versions
    try:
        import jax

        devices = jax.devices()
        info["device"] = f"{devices[0].platform}:{devices[0].device_kind}"
        info["n_devices"] = len(devices)
    except Exception as e:  # recorded, never fatal: metrics are still worth writing
        info["device"] = f"unknown ({type(e).__name__})"
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
