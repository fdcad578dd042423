"""The scoring step: a campaign's validated runs (`load.py`) → one (n_runs, N, V) LiRA score array.

Streaming: each run's `train_logits.npy` (N, V, C) is memory-mapped and turned into LiRA scores
chunk by chunk, straight into one preallocated float32 (n_runs, N, V) array, so memory is bounded
by the score array plus one chunk's buffers, never by all logits. RMIA's p is recovered from it when
needed (`scores.rmia_from_lira`: LiRA = logit(p) exactly). Test logits (small) are kept for utility.
"""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from medleak.errors import MedleakError
from medleak.io_utils import load_npy
from medleak.privacy_utils.load import SKIP_NON_FINITE, CampaignFiles, read_campaign_files, validate_runs
from medleak.privacy_utils.scores import lira_scores

SCORE_CHUNK = 8192  # records per scoring chunk: bounded float64 temporaries


@dataclasses.dataclass
class Campaign:
    """Everything the audit needs from a logdir: its plan files and every usable run's scores."""

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


def score_into(out, logits_path, labels, task, chunk=SCORE_CHUNK) -> bool:
    """Writes the LiRA scores of one run's memory-mapped logits into `out` (N, V), chunk by chunk;
    False (out partly written) as soon as a chunk holds a NaN/inf logit."""
    logits = load_npy(logits_path, mmap=True)
    for start in range(0, len(labels), chunk):
        block = np.asarray(logits[start:start + chunk])
        if not np.isfinite(block).all():
            return False
        out[start:start + chunk] = lira_scores(block, labels[start:start + chunk], task=task)
    return True


def score_runs(files: CampaignFiles, runs, *, progress=True):
    """(scores (n_kept, N, V) float32, kept RunFiles, [(run, reason)] skipped for non-finite logits)."""
    labels = files.train_labels
    n_views = runs[0].n_views if runs else 1
    scores = np.empty((len(runs), len(labels), n_views), dtype=np.float32)
    kept, skipped = [], []
    for run in tqdm(runs, desc="scoring runs", unit="run", disable=not progress):
        if score_into(scores[len(kept)], run.train_logits_path, labels, files.task):
            kept.append(run)
        else:
            skipped.append((run.run, SKIP_NON_FINITE))
    return scores[:len(kept)], kept, skipped


def score_campaign(files: CampaignFiles, *, progress=True) -> Campaign:
    """Validates and scores every run of a campaign (module doc). Raises MedleakError on bad input."""
    runs, skipped = validate_runs(files, progress=progress)
    scores, kept, non_finite = score_runs(files, runs, progress=progress)
    skipped = sorted(skipped + non_finite)
    if skipped:
        listed = "; ".join(f"run_{run:04d} ({why})" for run, why in skipped)
        warnings.warn(f"skipped {len(skipped)} run(s): {listed}", stacklevel=3)
    if len(kept) < 2:
        raise MedleakError(
            f"{files.logdir}: {len(kept)} usable run(s); the audit compares models that did and did not train on each "
            "record, so it needs at least 2 (16 or more for stable per-record risk)"
        )
    test_labels = files.test_labels
    return Campaign(
        logdir=files.logdir, plan=files.plan, dataset=files.dataset, task=files.task, label_names=files.label_names,
        subgroups=files.subgroups, records=files.records, test_records=files.test_records,
        run_ids=np.array([r.run for r in kept]), scores=scores, masks=np.stack([r.mask for r in kept]),
        test_logits=None if test_labels is None else np.stack([r.test_logits for r in kept]),
        test_labels=test_labels, skipped=skipped,
    )


def load_campaign(logdir, *, progress=True) -> Campaign:
    """Reads, validates and scores every complete run of `logdir` (`load.py`, then this module)."""
    return score_campaign(read_campaign_files(logdir), progress=progress)
