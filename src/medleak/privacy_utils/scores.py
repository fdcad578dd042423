"""Per-view membership scores from logits: LiRA's logit-scaled confidence and RMIA's probability.

Both attacks look at one number per record and view: how much probability the model puts on the
record's *correct* label.

Multi-class (softmax) — labels are class indices `(n,)` or one-hot rows `(n, C)`:

    p       = softmax(z)_y
    LiRA    = log p_y − log Σ_{y'≠y} p_y'  =  z_y − logsumexp_{y'≠y} z_y'
    RMIA    = p_y

Multi-label and binary (independent sigmoids) — labels are 0/1 rows `(n, C)` (`C = 1` is binary):
the per-label equivalent is the probability of the *whole correct label vector*,

    p       = Π_c σ(s_c z_c),   s_c = +1 if label c is set else −1
    log p   = −Σ_c softplus(−s_c z_c)
    LiRA    = log p − log(1 − p)   (computed as log p − log1mexp(log p))
    RMIA    = p

For a multi-class model the same identity holds (LiRA = logit(RMIA)), so in both tasks
`lira = log(rmia) − log(1 − rmia)`: one score determines the other, which lets the audit keep a
single score array in memory (`rmia_from_lira`).

All arithmetic is float64 with log-sum-exp / softplus / log1mexp, so large logits (±1e4) neither
overflow nor lose the tail. Results are float32 (the bulk arrays are float32; float64 is only needed
inside). Scores are clipped to ±`MAX_SCORE` where p rounds to exactly 0 or 1 in float64.
"""

import numpy as np
from scipy import special

from medleak.data_utils.records import TASKS
from medleak.errors import MedleakError

# |log-odds| beyond which float64 probabilities are exactly 0 or 1; keeps scores finite.
MAX_SCORE = 700.0


def infer_task(labels, n_classes) -> str:
    """'multiclass' for integer class indices or one-hot rows, else 'multilabel'.

    A (n, C) 0/1 matrix whose rows each have exactly one label set is read as one-hot multi-class
    unless C == 1 (binary: a single sigmoid). Pass `task=` explicitly when a multi-label dataset
    happens to have exactly one finding per record.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return "multiclass"
    if n_classes == 1:
        return "multilabel"
    return "multiclass" if np.all(labels.sum(axis=-1) == 1) else "multilabel"


def _check(logits, labels, task):
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim < 2:
        raise MedleakError(f"logits must have shape (..., n_records, [n_views,] n_classes), got {logits.shape}")
    n_classes = logits.shape[-1]
    if task is None:
        task = infer_task(labels, n_classes)
    if task not in TASKS:
        raise MedleakError(f"task must be one of {TASKS}, got {task!r}")
    if labels.ndim == 1:
        if task != "multiclass":
            raise MedleakError("integer class labels (n,) need task='multiclass'; give (n, C) 0/1 labels for multi-label")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise MedleakError(f"class labels must lie in [0, {n_classes}), found {labels.min()}..{labels.max()}")
        onehot = np.zeros((labels.shape[0], n_classes), dtype=bool)
        onehot[np.arange(labels.shape[0]), labels.astype(np.int64)] = True
        labels = onehot
    elif labels.ndim == 2:
        if labels.shape[1] != n_classes:
            raise MedleakError(f"labels have {labels.shape[1]} classes but logits have {n_classes}")
        if not np.isin(labels, (0, 1)).all():
            raise MedleakError("label matrix must hold only 0/1 values")
        labels = labels.astype(bool)
        if task == "multiclass" and not np.all(labels.sum(axis=1) == 1):
            raise MedleakError("multi-class labels must have exactly one class set per record")
    else:
        raise MedleakError(f"labels must be (n,) class indices or (n, C) 0/1 rows, got shape {labels.shape}")
    # Find the record axis: the one matching len(labels), counted so labels broadcast over views.
    n = labels.shape[0]
    if logits.ndim == 2:
        record_axis = 0
    elif logits.shape[-3] == n:
        record_axis = logits.ndim - 3  # (..., n, V, C)
    elif logits.shape[-2] == n:
        record_axis = logits.ndim - 2  # (..., n, C)
    else:
        raise MedleakError(f"logits {logits.shape} do not have a records axis of length {n} (the number of labels)")
    if logits.shape[record_axis] != n:
        raise MedleakError(f"logits have {logits.shape[record_axis]} records but labels have {n}")
    # Insert singleton axes so labels (n, C) broadcast against logits.
    extra = logits.ndim - record_axis - 2
    labels = labels.reshape(labels.shape[:1] + (1,) * extra + labels.shape[1:])
    return logits, labels, task


def log_prob_correct(logits, labels, task=None):
    """float64 log p(correct label vector) and log(1 − p), both stable; shapes = logits minus C."""
    logits, labels, task = _check(logits, labels, task)
    z = logits.astype(np.float64)
    if task == "multiclass":
        z_true = np.where(labels, z, -np.inf).max(axis=-1)
        z_rest = np.where(labels, -np.inf, z)
        lse_rest = _logsumexp(z_rest)
        lse_all = np.logaddexp(z_true, lse_rest)
        return z_true - lse_all, lse_rest - lse_all
    signed = np.where(labels, z, -z)
    log_p = -np.logaddexp(0.0, -signed).sum(axis=-1)  # Σ log σ(s_c z_c)
    return log_p, log1mexp(log_p)


def _logsumexp(z):
    top = z.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]


def log1mexp(x):
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = np.minimum(np.asarray(x, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def lira_scores(logits, labels, task=None):
    """LiRA's logit-scaled confidence log p − log(1 − p), per record (and view); float32.

    logits: (..., n_records, n_views, C) or (..., n_records, C); labels: (n_records,) class indices
    or (n_records, C) 0/1 rows. See the module docstring for the multi-label definition.
    """
    log_p, log_rest = log_prob_correct(logits, labels, task)
    return np.clip(log_p - log_rest, -MAX_SCORE, MAX_SCORE).astype(np.float32)


def rmia_scores(logits, labels, task=None):
    """RMIA's score: p(correct label vector), per record (and view); float32."""
    log_p, _ = log_prob_correct(logits, labels, task)
    return np.exp(log_p).astype(np.float32)


def rmia_from_lira(lira):
    """p from log-odds (exact inverse of the LiRA score); float32 in, float32 out, no overflow."""
    lira = np.asarray(lira)
    return special.expit(lira.astype(np.float32, copy=False))  # float32 σ(x): stable, keeps tiny p


def log_p_from_lira(lira):
    """log p from log-odds: −softplus(−x); the loss-threshold baseline scores with it."""
    return -np.logaddexp(0.0, -np.asarray(lira, dtype=np.float64))
