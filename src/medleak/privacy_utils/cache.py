"""The audit's cache next to a campaign's runs: `logdir/audit_cache/` (format: docs/RUNDIR.md).

Scoring 200 runs of CheXpert size reads 40 GB of logits; every later audit of the same runs (a
changed `--top_share`, plot_all.sh, a budget comparison) can reuse the float32 score array instead.

Keys, never a hash of the logits: a run is fingerprinted by its directory name, the size and
mtime of each of its files and the sha256 of its metrics.json (`run_fingerprint`); the plan files
by plan.json's content and the other files' sizes and mtimes (`plan_fingerprint`); the scoring by
`scoring.SCORER`. A run is written once (renamed into place complete), so a changed file changes
its fingerprint.

Files (`ScoreCache`): `scores.json` (the manifest: settings, one fingerprint per row, runs skipped
for non-finite logits, the file names), `scores-<key>.npy` float32 (rows, N, V) memory-mapped on
reuse, `masks-<key>.npy` bool (rows, N), `test_logits-<key>.npy` float32 (rows, n_test, C) and
`derived-<key>-<name>/` (arrays computed from the scores, e.g. shadow statistics; with the
audit's options hashed in, `-<hash>` more: the attack step's scores and summaries, the noise floor). `<key>` hashes
the settings and the ordered fingerprints: a run added, removed or changed gives a new key, so
nothing derived from the old set of runs is ever read for the new one. Every file is written
atomically (`io_utils`), the manifest last, under `.lock` (filelock): two audits started together
score once. Files of an older key are deleted when a new manifest replaces it.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import filelock
import numpy as np

from medleak.io_utils import load_npy, read_json, save_npy, write_json
from medleak.rundir import (ARRAY_FILES, MASK_FILE, METRICS_FILE, PATIENTS_FILE, PLAN_FILE, RECORDS_FILE,
                            TEST_RECORDS_FILE, run_dir)

CACHE_DIR = "audit_cache"
MANIFEST = "scores.json"
LOCK_FILE = ".lock"
FORMAT = 1
LOCK_TIMEOUT_S = 6 * 3600  # another audit scoring 200 runs holds the lock for minutes, not hours


def _stamp(path):
    """[size, mtime_ns] of a file, None when it is absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run_fingerprint(logdir, run) -> str:
    """Name, size and mtime of each array file, and the sha256 of metrics.json of one run (module doc)."""
    path = run_dir(logdir, run)
    return _digest({"run": path.name, "files": {name: _stamp(path / name) for name in ARRAY_FILES},
                    "metrics": _sha256_file(path / METRICS_FILE)})


def plan_fingerprint(logdir) -> dict:
    """plan.json's sha256 and the size and mtime of the other plan files (what runs are checked against)."""
    logdir = Path(logdir)
    return {"plan": _sha256_file(logdir / PLAN_FILE),
            **{name: _stamp(logdir / name) for name in (RECORDS_FILE, TEST_RECORDS_FILE, MASK_FILE, PATIENTS_FILE)}}


class ScoreCache:
    """One logdir's `audit_cache/` (module doc). `settings` (JSON-ready) must match for any reuse."""

    def __init__(self, logdir, settings: dict):
        self.dir = Path(logdir) / CACHE_DIR
        self.settings = {"format": FORMAT, **settings}

    def lock(self):
        """The cache's lock (a context manager); creates the directory. OSError when it cannot."""
        self.dir.mkdir(exist_ok=True)
        return filelock.FileLock(str(self.dir / LOCK_FILE), timeout=LOCK_TIMEOUT_S)

    def key(self, fingerprints) -> str:
        return _digest({"settings": self.settings, "rows": list(fingerprints)})[:20]

    def manifest(self):
        """The manifest when it was written with these settings and its files are there, else None."""
        path = self.dir / MANIFEST
        try:
            manifest = read_json(path)
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("settings") != self.settings:
            return None
        if not all((self.dir / manifest.get(name, "")).is_file() for name in ("scores", "masks", "test_logits")):
            return None
        return manifest

    def open(self, manifest):
        """(scores memmap (rows, N, V), masks (rows, N), test_logits (rows, n_test, C)) of a manifest."""
        n_rows = len(manifest["rows"])
        scores = load_npy(self.dir / manifest["scores"], mmap=True)[:n_rows]
        return scores, load_npy(self.dir / manifest["masks"]), load_npy(self.dir / manifest["test_logits"])

    def scores_path(self, key) -> Path:
        return self.dir / f"scores-{key}.npy"

    def commit(self, key, rows, masks, test_logits, *, n_views, skipped):
        """Writes masks and test logits, then the manifest (last: it makes the key current), and
        deletes the files of older keys. `rows`: fingerprints of the score file's first rows;
        `skipped`: {fingerprint: reason} of runs not to score again."""
        save_npy(self.dir / f"masks-{key}.npy", masks)
        save_npy(self.dir / f"test_logits-{key}.npy", test_logits)
        write_json(self.dir / MANIFEST, {"settings": self.settings, "key": key, "rows": list(rows), "n_views": int(n_views),
                                         "skipped": skipped, "scores": f"scores-{key}.npy", "masks": f"masks-{key}.npy",
                                         "test_logits": f"test_logits-{key}.npy"})
        for entry in self.dir.iterdir():
            if entry.name.startswith(("scores-", "masks-", "test_logits-", "derived-")) and f"-{key}" not in entry.name:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def derived(self, key, name, compute):
        """{array name: array} computed once from the scores of `key` (`compute()` → such a dict of
        numeric arrays), stored as one .npy per array in `derived-<key>-<name>/` and memory-mapped
        on reuse. Call with the lock held or accept that two audits may both compute it."""
        return self._derived_folder(self.dir / f"derived-{key}-{name}", lambda: (None, compute()))[1]

    def derived_result(self, key, name, settings, compute):
        """(JSON-ready result, {array name: array}) computed once per scores `key` and `settings`
        (e.g. the attack step, which depends on the targets and attack options too): `compute()` →
        that pair, stored in `derived-<key>-<name>-<hash>/` (result.json and one .npy per array,
        memory-mapped on reuse)."""
        return self._derived_folder(self.dir / f"derived-{key}-{name}-{_digest(settings)[:12]}", compute)

    def _derived_folder(self, folder, compute):
        """(result or None, arrays) of `derived` / `derived_result`; arrays.json, written last, marks a complete folder."""
        index, result_file = folder / "arrays.json", folder / "result.json"
        if index.is_file():
            try:
                names = read_json(index)
                result = read_json(result_file) if result_file.is_file() else None
                return result, {n: load_npy(folder / f"{n}.npy", mmap=True) for n in names}
            except (OSError, ValueError):
                pass  # half-deleted by a newer key: compute again
        result, arrays = compute()
        try:
            for n, array in arrays.items():
                save_npy(folder / f"{n}.npy", array)
            if result is not None:
                write_json(result_file, result)
            write_json(index, sorted(arrays))
        except OSError as e:  # a full or read-only disk costs the reuse, not the audit
            warnings.warn(f"{folder}: not cached ({e.strerror or e})", stacklevel=2)
        return result, arrays

    def derived_json(self, key, name, settings, compute):
        """A JSON-ready result computed once per scores `key` and `settings` (e.g. the noise floor,
        which depends on the audit's seed and thresholds too): `derived-<key>-<name>-<hash>.json`."""
        path = self.dir / f"derived-{key}-{name}-{_digest(settings)[:12]}.json"
        try:
            return read_json(path)
        except (OSError, ValueError):
            pass
        result = compute()
        try:
            write_json(path, result)
        except OSError as e:
            warnings.warn(f"{path}: not cached ({e.strerror or e})", stacklevel=2)
        return result
