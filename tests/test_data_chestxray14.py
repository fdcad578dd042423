"""ChestX-ray14 (NIH) loader on a tiny dataset written in its official layout (tests/layouts.py)."""

import numpy as np
import pandas as pd
import pytest

from medleak.data_utils import chestxray14, datasets, image_cache, records
from tests import layouts
from tests.checks import raises


def test_chestxray14(tmp_path):
    root = layouts.write_chestxray14(tmp_path, n_patients=9, seed=2)
    raw = pd.read_csv(root / "Data_Entry_2017.csv")
    test_names = set((root / "test_list.txt").read_text().split())
    table = datasets.load_dataset("chestxray14", root)

    assert table.task == "multilabel" and table.channels == 1
    assert table.label_names == chestxray14.FINDINGS == layouts.CHESTXRAY14_FINDINGS
    assert table.subgroups == ("sex", "age_group", "view")
    assert table.n_records == len(raw) and list(table.df["record_id"]) == list(raw["Image Index"])
    assert list(table.df["patient_id"]) == [str(p) for p in raw["Patient ID"]]
    assert set(table.split("test").df["record_id"]) == test_names
    assert sorted(table.split("test").patient_ids(), key=int) == ["8", "9"]  # the last 9 // 4 patients
    # Slow, obvious label parsing: a finding is positive iff its name is one of the '|' parts.
    for i, text in enumerate(raw["Finding Labels"]):
        parts = text.split("|")
        assert (parts == ["No Finding"]) == (table.labels()[i].sum() == 0)
        for j, finding in enumerate(chestxray14.FINDINGS):
            assert table.labels()[i, j] == float(finding in parts)
    assert (raw["Finding Labels"] == "No Finding").any() and raw["Finding Labels"].str.contains("|", regex=False).any()
    # Every image is found by name, in images_00N/images/ (Kaggle) and in the flat images/ (NIH box).
    assert all((root / path).is_file() for path in table.df["path"])
    folders = {path.rsplit("/", 1)[0] for path in table.df["path"]}
    assert "images" in folders and {"images_002/images", "images_003/images"} <= folders
    assert list(table.df["sex"]) == [{"M": "Male", "F": "Female"}[s] for s in raw["Patient Gender"]]
    assert list(table.df["view"]) == list(raw["View Position"])
    assert list(table.df["age_group"]) == list(records.age_group(raw["Patient Age"]))
    images, _ = image_cache.cached_images(table, root, (16, 16), cache_dir=tmp_path / "cache", num_workers=1)
    assert images.shape == (table.n_records, 16, 16, 1)


def test_ages_above_120_and_year_suffixes(tmp_path):
    assert list(chestxray14.ages(pd.Series(["058Y", "414", 37, "x"]))[:3].fillna(-1)) == [58, -1, 37]
    root = layouts.write_chestxray14(tmp_path, n_patients=4)
    raw = pd.read_csv(root / "Data_Entry_2017.csv")
    raw.loc[0, "Patient Age"] = 414
    raw.to_csv(root / "Data_Entry_2017.csv", index=False)
    assert chestxray14.load(root).df.loc[0, "age_group"] == "unknown"


def test_images_in_neither_list_are_dropped_and_missing_images_keep_a_path(tmp_path):
    root = layouts.write_chestxray14(tmp_path, n_patients=6)
    names = (root / "train_val_list.txt").read_text().split()
    (root / "train_val_list.txt").write_text("\n".join(names[1:]) + "\n")
    missing = next((root / "images").glob("*.png"))
    missing.unlink()
    table = chestxray14.load(root)
    assert names[0] not in set(table.df["record_id"])
    row = table.df.set_index("record_id").loc[missing.name]
    assert row["path"] == f"images/{missing.name}"
    kept, reduced = image_cache.cached_images(table, root, (8, 8), cache_dir=tmp_path / "c", num_workers=1,
                                              skip_unreadable=True)
    assert reduced.n_records == table.n_records - 1


def test_v2020_entries_file_is_found(tmp_path):
    root = layouts.write_chestxray14(tmp_path, n_patients=4)
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    assert chestxray14.load(root).n_records == len(pd.read_csv(root / "Data_Entry_2017_v2020.csv"))


@pytest.mark.parametrize("column", ["Image Index", "Finding Labels", "Patient ID", "Patient Gender",
                                    "Patient Age", "View Position"])
def test_missing_column_names_file_and_column(tmp_path, column):
    root = layouts.write_chestxray14(tmp_path)
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    df.drop(columns=[column]).to_csv(root / "Data_Entry_2017.csv", index=False)
    raises(lambda: datasets.load_dataset("chestxray14", root), "Data_Entry_2017.csv", repr(column), "missing column")


@pytest.mark.parametrize("relpath,flag", [("Data_Entry_2017.csv", "--entries_csv"),
                                          ("train_val_list.txt", "--train_list"),
                                          ("test_list.txt", "--test_list")])
def test_missing_file_names_the_file_and_flag(tmp_path, relpath, flag):
    root = layouts.write_chestxray14(tmp_path)
    (root / relpath).unlink()
    raises(lambda: chestxray14.load(root), relpath, "file not found", flag)


def test_bad_labels_and_lists_name_the_file_and_column(tmp_path):
    root = layouts.write_chestxray14(tmp_path)
    entries = root / "Data_Entry_2017.csv"
    raw = pd.read_csv(entries)
    for value, fragment in [("Cardiomegaly|Pneumonitis", "'Pneumonitis'"),
                            ("No Finding|Mass", "'No Finding' with findings"), ("", "blank")]:
        bad = raw.copy()
        bad.loc[1, "Finding Labels"] = value
        bad.to_csv(entries, index=False)
        raises(lambda: chestxray14.load(root), "Data_Entry_2017.csv", "'Finding Labels'", "row 3", fragment)
    raw.to_csv(entries, index=False)
    first_train = (root / "train_val_list.txt").read_text().split()[0]
    (root / "test_list.txt").write_text(first_train + "\n" + (root / "test_list.txt").read_text())
    raises(lambda: chestxray14.load(root), "test_list.txt", "also in train_val_list.txt", first_train)
    (root / "test_list.txt").write_text("\n")
    raises(lambda: chestxray14.load(root), "test_list.txt", "empty", "--test_list")


def test_a_patient_in_both_official_lists_is_refused(tmp_path):
    root = layouts.write_chestxray14(tmp_path, n_patients=8)
    raw = pd.read_csv(root / "Data_Entry_2017.csv")
    test_image = (root / "test_list.txt").read_text().split()[0]
    raw.loc[raw["Image Index"] == test_image, "Patient ID"] = 1
    raw.to_csv(root / "Data_Entry_2017.csv", index=False)
    raises(lambda: chestxray14.load(root), "both train and test")


def test_blank_patient_id_names_the_column(tmp_path):
    root = layouts.write_chestxray14(tmp_path)
    raw = pd.read_csv(root / "Data_Entry_2017.csv")
    raw["Patient ID"] = raw["Patient ID"].astype(float)
    raw.loc[0, "Patient ID"] = np.nan
    raw.to_csv(root / "Data_Entry_2017.csv", index=False)
    raises(lambda: chestxray14.load(root), "'Patient ID'", "blank", raw.loc[0, "Image Index"])


def test_empty_and_header_only_entries_file(tmp_path):
    root = layouts.write_chestxray14(tmp_path)
    entries = root / "Data_Entry_2017.csv"
    header = entries.read_text().splitlines()[0]
    entries.write_text("")
    raises(lambda: chestxray14.load(root), "Data_Entry_2017.csv", "empty")
    entries.write_text(header + "\n")
    raises(lambda: chestxray14.load(root), "Data_Entry_2017.csv", "no rows")
