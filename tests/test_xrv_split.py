"""TorchXRayVision's member / non-member partition rebuilt from our records tables.

The member set must equal, exactly, (a) the procedure applied by hand with plain numpy (sorted
unique patient ids permuted by RandomState(0), 20 % test, twice) and (b) TorchXRayVision's own
dataset classes + sklearn's GroupShuffleSplit, as its training script runs them, on the same files.
"""

import dataclasses
import gzip
import math

import numpy as np
import pandas as pd
import pytest

from medleak.data_utils.datasets import load_dataset
from medleak.data_utils.records import RecordsTable
from medleak.errors import MedleakError
from medleak.xrv import split
from tests.layouts import write_chexpert, write_mimic


def by_hand_split(patient_ids, seed=0):
    """One GroupShuffleSplit(0.8, 0.2) written out: (train patient set, test patient set)."""
    ids = np.array(sorted(set(patient_ids)), dtype=object)
    n = len(ids)
    n_test, n_train = math.ceil(0.2 * n), math.floor(0.8 * n)
    order = np.random.RandomState(seed).permutation(n)
    return set(ids[order[n_test:n_test + n_train]]), set(ids[order[:n_test]])


def toy_table(n_patients=23, seed=1) -> RecordsTable:
    """A MIMIC-like table in random row order: 1-4 images per patient, mixed views."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        subject = str(10000000 + 37 * p)
        for i in range(int(rng.integers(1, 5))):
            rows.append({"record_id": f"{subject}-{i}", "patient_id": subject, "path": f"files/{subject}/{i}.jpg",
                         "split": "train" if p % 3 else "test", "Edema": float(rng.integers(0, 2)),
                         "view": ["PA", "AP", "LATERAL", "unknown"][int(rng.integers(0, 4))]})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)
    return RecordsTable("mimic", df, ("Edema",), "multilabel", ("view",))


def test_roles_match_the_procedure_by_hand():
    table = toy_table()
    roles = split.xrv_roles(table)
    kept = table.df["view"].isin(["PA", "AP"])
    train, test = by_hand_split(table.df.loc[kept, "patient_id"])
    fit, validation = by_hand_split(train)
    expected = np.full(table.n_records, "excluded", dtype=object)
    patients = table.df["patient_id"]
    expected[(kept & patients.isin(fit)).to_numpy()] = "member"
    expected[(kept & patients.isin(validation)).to_numpy()] = "validation"
    expected[(kept & patients.isin(test)).to_numpy()] = "test"
    assert (roles == expected).all()
    assert {"member", "validation", "test", "excluded"} == set(roles)


def test_roles_do_not_depend_on_row_order_and_keep_patients_whole():
    table = toy_table()
    shuffled = dataclasses.replace(table, df=table.df.sample(frac=1.0, random_state=7).reset_index(drop=True))
    roles = pd.Series(split.xrv_roles(table), index=table.df["record_id"])
    roles_shuffled = pd.Series(split.xrv_roles(shuffled), index=shuffled.df["record_id"])
    assert roles.equals(roles_shuffled.loc[roles.index])
    kept = split.in_xrv_dataset(table)
    per_patient = pd.Series(roles.to_numpy()[kept]).groupby(table.df["patient_id"].to_numpy()[kept]).nunique()
    assert (per_patient == 1).all()


def test_view_filter_follows_xrv_spelling():
    table = toy_table()
    everything = split.in_xrv_dataset(table, views=["*"])
    assert everything.all()
    only_pa = split.in_xrv_dataset(table, views=["PA"])
    assert (only_pa == (table.df["view"] == "PA").to_numpy()).all()
    # medleak's 'unknown' is TorchXRayVision's 'UNKNOWN'
    assert (split.in_xrv_dataset(table, views=["UNKNOWN"]) == (table.df["view"] == "unknown").to_numpy()).all()


def test_sampling_draws_members_and_test_records_only():
    roles = split.xrv_roles(toy_table(n_patients=60))
    members, nonmembers = split.sample_members_and_nonmembers(roles, n_per=5, seed=3)
    assert len(members) == len(nonmembers) == 5
    assert (roles[members] == "member").all() and (roles[nonmembers] == "test").all()
    again = split.sample_members_and_nonmembers(roles, n_per=5, seed=3)
    assert (again[0] == members).all() and (again[1] == nonmembers).all()
    everything = split.sample_members_and_nonmembers(roles, n_per=10_000)
    assert len(everything[0]) == (roles == "member").sum() and len(everything[1]) == (roles == "test").sum()
    with pytest.raises(MedleakError, match="--n_per"):
        split.sample_members_and_nonmembers(roles, n_per=0)


def test_too_few_patients_is_a_one_line_error():
    table = toy_table(n_patients=3)
    with pytest.raises(MedleakError, match="at least 5 patients"):
        split.xrv_roles(table)
    with pytest.raises(MedleakError, match="views"):
        split.xrv_roles(toy_table(), views=["LL"])


def _xrv_members(dataset):
    """TorchXRayVision's training-script procedure on its own dataset object → (member, val, test) row sets."""
    import sklearn.model_selection
    import torchxrayvision as xrv

    xrv.datasets.relabel_dataset(xrv.datasets.default_pathologies, dataset, silent=True)
    gss = sklearn.model_selection.GroupShuffleSplit(train_size=0.8, test_size=0.2, random_state=0)
    train_inds, test_inds = next(gss.split(X=range(len(dataset)), groups=dataset.csv.patientid))
    train_dataset = xrv.datasets.SubsetDataset(dataset, train_inds)
    gss = sklearn.model_selection.GroupShuffleSplit(train_size=0.8, test_size=0.2, random_state=0)
    fit_inds, valid_inds = next(gss.split(X=range(len(train_dataset)), groups=train_dataset.csv.patientid))
    return (train_dataset.csv.iloc[fit_inds], train_dataset.csv.iloc[valid_inds], dataset.csv.iloc[test_inds])


def test_chexpert_members_equal_torchxrayvision_own_split(tmp_path):
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install -r requirements-xrv.txt)")
    root = write_chexpert(tmp_path, n_patients=48, seed=5, size=(8, 8))
    table = load_dataset("chexpert", root)
    roles = split.xrv_roles(table)
    dataset = xrv.datasets.CheX_Dataset(
        imgpath=str(root / "CheXpert-v1.0-small"), csvpath=str(root / "CheXpert-v1.0-small" / "train.csv"),
        views=["PA", "AP"], unique_patients=False)
    fit, validation, test = _xrv_members(dataset)
    for role, rows in (("member", fit), ("validation", validation), ("test", test)):
        ours = set(table.df.loc[roles == role, "record_id"])
        assert ours == set(rows["Path"]), role
    assert len(set(fit["Path"])) > 10


def test_mimic_members_equal_torchxrayvision_own_split(tmp_path):
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install -r requirements-xrv.txt)")
    root = write_mimic(tmp_path, n_patients=40, seed=5, size=(8, 8))
    table = load_dataset("mimic", root)
    roles = split.xrv_roles(table)
    # MIMIC_Dataset also reads StudyDate (not needed for the split; the test layout has none).
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as f:
        meta = pd.read_csv(f)
    meta["StudyDate"] = 21800101
    meta.to_csv(tmp_path / "metadata-with-dates.csv", index=False)
    dataset = xrv.datasets.MIMIC_Dataset(
        imgpath=str(root / "files"), csvpath=str(root / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        metacsvpath=str(tmp_path / "metadata-with-dates.csv"), views=["PA", "AP"], unique_patients=False)
    fit, validation, test = _xrv_members(dataset)
    for role, rows in (("member", fit), ("validation", validation), ("test", test)):
        ours = set(table.df.loc[roles == role, "record_id"])
        assert ours == set(rows["dicom_id"].astype(str)), role
    # TorchXRayVision ignores the official split file: members come from both of our splits.
    assert set(table.df.loc[roles == "member", "split"]) == {"train", "test"}
