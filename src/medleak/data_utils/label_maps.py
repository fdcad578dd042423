"""One vocabulary for chest X-ray labels across datasets, so a model can be scored on another one.

Every label name is mapped to a canonical name (CheXpert's spelling): case, underscores and spaces
do not matter, and the synonyms below map names that mean the same finding. CheXpert and MIMIC-CXR
share all 14 CheXpert findings by name. ChestX-ray14 shares Atelectasis, Cardiomegaly,
Consolidation, Edema, Pneumonia, Pneumothorax and Effusion (= Pleural Effusion) with them, and
'No Finding', derived (`transfer_labels`: no positive among its 14 findings). Its other findings
(Infiltration, Mass, Nodule, Emphysema, Fibrosis, Pleural_Thickening, Hernia) have no CheXpert
counterpart with the same meaning (CheXpert's Lung Lesion, Lung Opacity and Pleural Other are
broader) and are not mapped. privacydomain's five labels are `PRIVACYDOMAIN_LABELS`.
"""

import numpy as np

from medleak.data_utils import chestxray14
from medleak.errors import MedleakError

NO_FINDING = "No Finding"
# normalised name -> canonical name, for the names that differ between datasets
SYNONYMS = {"effusion": "Pleural Effusion"}
# privacydomain (Tayebi Arasteh et al. 2023): cardiomegaly, effusion, pneumonia, atelectasis, no finding
PRIVACYDOMAIN_LABELS = ("Cardiomegaly", "Pleural Effusion", "Pneumonia", "Atelectasis", NO_FINDING)
# Datasets whose findings are exhaustive, so that "none of them" is 'No Finding'.
DERIVED_NO_FINDING = {chestxray14.NAME: chestxray14.FINDINGS}


def _normal(name) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def canonical_label(name) -> str:
    """The canonical name of a dataset's label ('Effusion' -> 'Pleural Effusion', 'No_Finding' ->
    'No Finding'); names without a synonym keep their own spelling, underscores as spaces."""
    normal = _normal(name)
    return SYNONYMS.get(normal, " ".join(str(name).replace("_", " ").split()))


def shared_labels(model_labels, dataset_labels, only=None) -> list:
    """[(model_index, dataset_index, canonical name)] of the labels both sets share, in the model's
    order; `only` (e.g. PRIVACYDOMAIN_LABELS) restricts them to those canonical names.

    A one-line MedleakError naming both label sets when none is shared.
    """
    dataset_index = {}
    for j, name in enumerate(dataset_labels):
        dataset_index.setdefault(_normal(canonical_label(name)), j)
    allowed = None if only is None else {_normal(canonical_label(name)) for name in only}
    pairs = []
    for i, name in enumerate(model_labels):
        key = _normal(canonical_label(name))
        if key in dataset_index and (allowed is None or key in allowed):
            pairs.append((i, dataset_index[key], canonical_label(name)))
    if not pairs:
        restriction = "" if only is None else f" among {list(only)}"
        raise MedleakError(f"the model's labels {list(model_labels)} and the dataset's labels {list(dataset_labels)} "
                           f"share none{restriction} (docs/TRANSFER.md lists the mapping)")
    return pairs


def transfer_labels(dataset: str, labels, label_names) -> tuple:
    """(labels, label_names) of a dataset for evaluation across datasets: with a derived 'No Finding'
    column (1 where no finding is positive) appended for datasets whose findings are exhaustive."""
    labels = np.asarray(labels, dtype=np.float32)
    label_names = tuple(label_names)
    if dataset in DERIVED_NO_FINDING and NO_FINDING not in label_names:
        findings = [label_names.index(name) for name in DERIVED_NO_FINDING[dataset]]
        no_finding = (labels[:, findings].max(axis=1, initial=0.0) == 0).astype(np.float32)
        return np.column_stack([labels, no_finding]), label_names + (NO_FINDING,)
    return labels, label_names
