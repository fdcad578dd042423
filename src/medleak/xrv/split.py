"""TorchXRayVision's train/validation/test partition, rebuilt from a medleak RecordsTable.

TorchXRayVision trains its models with `scripts/train_model.py` + `scripts/train_utils.py`:

1. the dataset is `CheX_Dataset(csvpath=".../train.csv", unique_patients=False)` or
   `MIMIC_Dataset(chexpert.csv.gz, metadata.csv.gz, unique_patients=False, views=["PA", "AP"])`;
2. `GroupShuffleSplit(train_size=0.8, test_size=0.2, random_state=seed)` with the dataset's
   `patientid` as groups cuts off the test set (seed 0);
3. `train_utils.train` applies the same split again to the remainder: 80 % of its patients are
   trained on, 20 % are the validation set used to pick the best checkpoint.

So a record is a *member* (its model was trained on it) when it survives both splits, and a clean
*non-member* when it falls in the first split's test part. Validation records steered checkpoint
selection but were never trained on; they are neither, and are left out of the audit.

What decides the split is only the set of patient ids (sklearn sorts the unique group labels and
permutes them with `RandomState(seed)`), so we must reproduce exactly which images TorchXRayVision's
dataset class keeps and how it spells the patient id:

- CheXpert: rows of `train.csv` only (medleak's "train" split; `valid.csv` is not used), view =
  `AP/PA` for frontal images, "L" for lateral ones, "UNKNOWN" where missing; `patientid` = the
  digits of `patientNNNNN` (zero-padded, so their string order is the same as ours).
- MIMIC-CXR: every image whose study has a row in the CheXpert label file (medleak's MIMIC loader
  keeps exactly those, in both of its splits; TorchXRayVision ignores the official split file),
  view = `ViewPosition`; `patientid` = `str(subject_id)`.

The views default to ["PA", "AP"]: TorchXRayVision's training script passes that for MIMIC, and the
paper being reproduced used it for both datasets (CheXpert's `CheX_Dataset` default is ["PA"]).
"""

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from medleak.data_utils.records import UNKNOWN, RecordsTable
from medleak.errors import MedleakError

DATASETS = ("chexpert", "mimic")
DEFAULT_VIEWS = ("PA", "AP")
SPLIT_SEED = 0  # train_model.py's --seed default, which the released models used
TRAIN_FRACTION, TEST_FRACTION = 0.8, 0.2  # train_model.py / train_utils.py literals

MEMBER, VALIDATION, TEST, EXCLUDED = "member", "validation", "test", "excluded"
ROLES = (MEMBER, VALIDATION, TEST, EXCLUDED)


def xrv_views(table: RecordsTable, view_column="view", ap_pa_column="ap_pa") -> pd.Series:
    """Each record's view as TorchXRayVision's dataset class spells it ("PA", "AP", "L", "UNKNOWN" …)."""
    df = table.df
    _require(table, [view_column] + ([ap_pa_column] if table.name == "chexpert" else []))
    view = df[view_column].astype(str)
    if table.name == "chexpert":
        # CheX_Dataset: view = Frontal/Lateral; frontal images take their AP/PA value; Lateral → "L".
        view = view.where(view != "Frontal", df[ap_pa_column].astype(str)).replace({"Lateral": "L"})
    return view.replace({UNKNOWN: "UNKNOWN"})


def xrv_patient_ids(table: RecordsTable) -> pd.Series:
    """Each record's `patientid` as TorchXRayVision's dataset class spells it (the split's groups)."""
    patient = table.df["patient_id"].astype(str)
    if table.name == "chexpert":
        return patient.str.replace("patient", "", n=1, regex=False)
    return patient


def in_xrv_dataset(table: RecordsTable, views=DEFAULT_VIEWS, **columns) -> np.ndarray:
    """Bool (n_records,): the record is one of the images TorchXRayVision's dataset class keeps."""
    if table.name not in DATASETS:
        raise MedleakError(f"TorchXRayVision's split is only defined for {DATASETS}, not {table.name!r}")
    views = list(views)
    keep = np.ones(table.n_records, dtype=bool)
    if "*" not in views:
        keep &= xrv_views(table, **columns).isin(views).to_numpy()
    if table.name == "chexpert":
        keep &= (table.df["split"] == "train").to_numpy()  # CheX_Dataset reads train.csv only
    return keep


def group_shuffle_split(groups, seed=SPLIT_SEED):
    """(train positions, test positions) of one `GroupShuffleSplit(0.8, 0.2, seed)` — xrv's call."""
    groups = np.asarray(groups)
    splitter = GroupShuffleSplit(train_size=TRAIN_FRACTION, test_size=TEST_FRACTION, random_state=seed)
    train, test = next(splitter.split(X=np.arange(len(groups)), groups=groups))
    return train, test


def xrv_roles(table: RecordsTable, views=DEFAULT_VIEWS, seed=SPLIT_SEED, **columns) -> np.ndarray:
    """Per record: "member", "validation", "test" or "excluded" (not in TorchXRayVision's dataset).

    Row order of `table` does not matter: the split depends only on the set of patient ids.
    """
    keep = np.flatnonzero(in_xrv_dataset(table, views, **columns))
    if len(keep) == 0:
        raise MedleakError(f"{table.name}: no record has one of the views {list(views)}; check --views")
    groups = xrv_patient_ids(table).to_numpy()[keep]
    if len(np.unique(groups)) < 5:
        raise MedleakError(f"{table.name}: TorchXRayVision's split needs at least 5 patients with views "
                           f"{list(views)}, found {len(np.unique(groups))}")
    train, test = group_shuffle_split(groups, seed)
    fit, validation = group_shuffle_split(groups[train], seed)
    roles = np.full(table.n_records, EXCLUDED, dtype=object)
    roles[keep[test]] = TEST
    roles[keep[train[validation]]] = VALIDATION
    roles[keep[train[fit]]] = MEMBER
    return roles.astype(str)


def sample_members_and_nonmembers(roles, n_per: int, seed: int = 0):
    """Sorted record indices of up to `n_per` members and `n_per` non-members (test records).

    Drawn uniformly without replacement with `seed`; a pool smaller than `n_per` is taken whole.
    Returns (member_indices, nonmember_indices).
    """
    if n_per < 1:
        raise MedleakError(f"--n_per must be at least 1, got {n_per}")
    roles = np.asarray(roles)
    rng = np.random.default_rng(seed)
    out = []
    for role in (MEMBER, TEST):
        pool = np.flatnonzero(roles == role)
        if len(pool) == 0:
            raise MedleakError(f"no {role} records to audit; the dataset is too small or --views too narrow")
        take = rng.choice(pool, size=min(n_per, len(pool)), replace=False)
        out.append(np.sort(take))
    return out[0], out[1]


def _require(table, columns):
    missing = [c for c in columns if c not in table.df.columns]
    if missing:
        raise MedleakError(f"{table.name}: records table lacks subgroup column(s) {missing} needed for "
                           "TorchXRayVision's view filter")
