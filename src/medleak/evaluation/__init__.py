"""Evaluating a trained model's predictions on any dataset (issue 15; docs/TRANSFER.md).

Pure functions on host arrays (numpy/scipy), above `train_utils.metrics` (the one AUROC) and
`data_utils` (the datasets' label names) and below any command-line tool:

labels.py   label names mapped onto one vocabulary across datasets: shared_labels(model, dataset),
            transfer_labels(table) (ChestX-ray14's derived 'No Finding'), PRIVACYDOMAIN_LABELS
stats.py    bootstrap AUROC CIs (patients resampled when ids are given), paired bootstrap p-value
            between two models, decision thresholds from a validation split, accuracy/sensitivity/
            specificity at them, statistical parity difference (female - male; each age band vs the
            rest), and evaluate_predictions() that puts them together, overall and per subgroup
"""

from medleak.data_utils.label_maps import PRIVACYDOMAIN_LABELS, canonical_label, shared_labels, transfer_labels
from medleak.evaluation.stats import (
    auroc_ci,
    bootstrap_aurocs,
    choose_thresholds,
    evaluate_predictions,
    paired_auroc_test,
    parity_differences,
    resample_indices,
    statistical_parity,
    threshold_metrics,
)

__all__ = [
    "PRIVACYDOMAIN_LABELS", "auroc_ci", "bootstrap_aurocs", "canonical_label", "choose_thresholds",
    "evaluate_predictions", "paired_auroc_test", "parity_differences", "resample_indices", "shared_labels",
    "statistical_parity", "threshold_metrics", "transfer_labels",
]
