"""BCE positive-class weights (`--pos_weight`), as DP_CXR weights its multi-label loss.

With weight w_c for label c, an example's loss for that label is
    -(w_c · y · log σ(x) + (1 - y) · log(1 - σ(x)))        (torch's BCEWithLogitsLoss(pos_weight))
averaged over labels. `--pos_weight=auto` takes w_c = n_negative / n_positive of label c over the
WHOLE training table of the plan (every record, IN or OUT for any run). Those frequencies are treated
as public: they are the same for every shadow model, recorded in plan.json, and known to the
attacker. They are never computed from one run's IN records, which would make the loss of every
record depend on which other records are in the run — information that would leave the run outside
the DP accounting. A label with no positive (or no negative) gets weight 1.
"""

import dataclasses

import numpy as np

from medleak.config import TrainConfig, parse_pos_weight
from medleak.errors import MedleakError


def auto_pos_weight(labels) -> np.ndarray:
    """(C,) n_negative / n_positive per label column of 0/1 `labels` (1 where a class is absent)."""
    positives = (np.asarray(labels, dtype=np.float64) > 0.5)
    n_positive = positives.sum(axis=0)
    n_negative = positives.shape[0] - n_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = n_negative / n_positive
    return np.where((n_positive > 0) & (n_negative > 0), weights, 1.0)


def format_weights(weights) -> str:
    """'w1,w2,…' with 6 significant digits (what plan.json records)."""
    return ",".join(f"{float(w):.6g}" for w in weights)


def resolve_pos_weight(config: TrainConfig, table_labels, task: str) -> TrainConfig:
    """`config` with --pos_weight=auto replaced by the weights of the whole training table's labels
    (`table_labels`, (N, C)), after checking the weights fit the task and the number of labels."""
    value = parse_pos_weight(config.pos_weight)
    n_classes = np.asarray(table_labels).shape[1]
    if value == "none":
        return config
    if task != "multilabel":
        raise MedleakError(f"--pos_weight={config.pos_weight} weights the multi-label BCE loss; this dataset is "
                           f"{task}: use --pos_weight=none")
    if value == "auto":
        return dataclasses.replace(config, pos_weight=format_weights(auto_pos_weight(table_labels)))
    if len(value) != n_classes:
        raise MedleakError(f"--pos_weight gives {len(value)} weights for the dataset's {n_classes} labels")
    return config


def pos_weight_values(config: TrainConfig, n_classes: int):
    """(C,) float32 weights of a resolved config, or None for --pos_weight=none."""
    value = parse_pos_weight(config.pos_weight)
    if value == "none":
        return None
    if value == "auto":
        raise MedleakError("--pos_weight=auto must be resolved from the training table first (resolve_pos_weight)")
    if len(value) != n_classes:
        raise MedleakError(f"--pos_weight gives {len(value)} weights for the dataset's {n_classes} labels")
    return np.asarray(value, dtype=np.float32)
