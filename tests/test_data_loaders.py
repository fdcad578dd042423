"""Each loader reads a tiny dataset written in its official layout (tests/layouts.py)."""

import gzip

import numpy as np
import pandas as pd
import pytest

from medleak.data_utils import chexpert, datasets, embed, fairvision, fitzpatrick, mimic, records
from tests import layouts


def test_registry_lists_every_loader_with_string_or_none_defaults():
    assert set(datasets.DATASETS) == {"chexpert", "mimic", "fitzpatrick", "embed", "fairvision", "chestxray14"}
    for name in datasets.DATASETS:
        options = datasets.dataset_options(name)
        assert options, name
        for option, (default, help_text) in options.items():
            assert default is None or isinstance(default, str), (name, option)
            assert help_text, (name, option)


def test_chexpert(tmp_path):
    root = layouts.write_chexpert(tmp_path, n_patients=8, seed=1)
    raw_train = pd.read_csv(root / "CheXpert-v1.0-small/train.csv")
    raw_valid = pd.read_csv(root / "CheXpert-v1.0-small/valid.csv")
    table = datasets.load_dataset("chexpert", root)

    assert table.task == "multilabel" and table.channels == 1
    assert table.label_names == chexpert.FINDINGS and len(table.label_names) == 14
    assert table.subgroups == ("sex", "age_group", "race", "view", "ap_pa")
    train, test = table.split("train"), table.split("test")
    assert train.n_records == len(raw_train) and test.n_records == len(raw_valid)
    assert list(train.df["path"]) == list(raw_train["Path"])
    # the last 8 // 4 = 2 patients are the validation (test) patients
    assert sorted(test.patient_ids()) == ["patient00007", "patient00008"]
    assert set(train.patient_ids()) == {f"patient{p:05d}" for p in range(1, 7)}
    # blank → 0, -1 (uncertain) → 1, 0 → 0, 1 → 1
    expected = raw_train[list(chexpert.FINDINGS)].fillna(0).replace(-1, 1).to_numpy(np.float32)
    np.testing.assert_array_equal(train.labels(), expected)
    assert (raw_train[list(chexpert.FINDINGS)] == -1).to_numpy().any()  # the layout exercises -1
    assert list(train.df["sex"]) == list(raw_train["Sex"])
    assert list(train.df["view"]) == list(raw_train["Frontal/Lateral"])
    assert set(train.df.loc[train.df["view"] == "Lateral", "ap_pa"]) <= {"unknown"}
    ages = raw_train["Age"].to_numpy()
    assert all(records.age_group(pd.Series([a])).iloc[0] == g for a, g in zip(ages, train.df["age_group"]))
    demo = pd.read_csv(root / "CHEXPERT DEMO.csv").set_index("PATIENT")["PRIMARY_RACE"]
    coarse = {"White": "White", "Black or African American": "Black", "Asian": "Asian", "Other": "Other",
              "Unknown": "unknown"}
    for patient, race in zip(table.df["patient_id"], table.df["race"]):
        assert race == coarse[demo[patient]]


def test_chexpert_without_demographics_file_has_unknown_race(tmp_path):
    root = layouts.write_chexpert(tmp_path, n_patients=4)
    (root / "CHEXPERT DEMO.csv").unlink()
    table = chexpert.load(root)
    assert set(table.df["race"]) == {"unknown"}


def test_chexpert_test_csv_flag_names_another_file(tmp_path):
    root = layouts.write_chexpert(tmp_path, n_patients=8)
    valid = pd.read_csv(root / "CheXpert-v1.0-small/valid.csv")
    valid.iloc[:1].to_csv(root / "my_test.csv", index=False)
    table = datasets.load_dataset("chexpert", root, test_csv="my_test.csv")
    assert table.split("test").n_records == 1


def test_mimic(tmp_path):
    root = layouts.write_mimic(tmp_path, n_patients=8, seed=2)
    read = lambda name: pd.read_csv(root / name)  # noqa: E731
    meta, split = read("mimic-cxr-2.0.0-metadata.csv.gz"), read("mimic-cxr-2.0.0-split.csv.gz")
    labels = read("mimic-cxr-2.0.0-chexpert.csv.gz")
    table = datasets.load_dataset("mimic", root)

    assert table.n_records == len(meta)
    assert table.task == "multilabel" and table.label_names == chexpert.FINDINGS
    assert set(table.df["record_id"]) == set(meta["dicom_id"])
    df = table.df.set_index("record_id")
    official = split.set_index("dicom_id")["split"]
    for dicom, row in df.iterrows():
        assert row["split"] == ("test" if official[dicom] in ("validate", "test") else "train")
        m = meta.set_index("dicom_id").loc[dicom]
        assert row["patient_id"] == str(m["subject_id"])
        assert row["path"] == f"files/p{str(m['subject_id'])[:2]}/p{m['subject_id']}/s{m['study_id']}/{dicom}.jpg"
        assert (root / row["path"]).is_file()
        assert row["view"] == m["ViewPosition"]
        study_labels = labels.set_index("study_id").loc[m["study_id"], list(chexpert.FINDINGS)]
        np.testing.assert_array_equal(row[list(chexpert.FINDINGS)].to_numpy(float),
                                      study_labels.fillna(0).replace(-1, 1).to_numpy(float))
    # MIMIC-IV demographics: subject 10000001 (p=0) is male, 20 years, WHITE;
    # subject 10000002 (p=1) has an UNKNOWN and a BLACK admission → Black.
    first = table.df[table.df["patient_id"] == "10000001"].iloc[0]
    assert (first["sex"], first["age_group"], first["race"]) == ("M", "20-39", "White")
    second = table.df[table.df["patient_id"] == "10000002"].iloc[0]
    assert (second["sex"], second["race"]) == ("F", "Black")

    moved = datasets.load_dataset("mimic", root, validate_split="train")
    validate_ids = set(split.loc[split["split"] == "validate", "dicom_id"])
    assert set(moved.df.loc[moved.df["record_id"].isin(validate_ids), "split"]) == {"train"}


def test_mimic_without_mimic_iv_tables(tmp_path):
    root = layouts.write_mimic(tmp_path, n_patients=4)
    (root / "patients.csv.gz").unlink()
    (root / "admissions.csv.gz").unlink()
    table = mimic.load(root)
    assert set(table.df["sex"]) == {"unknown"} and set(table.df["race"]) == {"unknown"}


def test_fitzpatrick(tmp_path):
    root = layouts.write_fitzpatrick(tmp_path, n_patients=12)
    raw = pd.read_csv(root / "fitzpatrick17k.csv")
    table = datasets.load_dataset("fitzpatrick", root)

    assert table.task == "multiclass" and table.channels == 3
    assert table.label_names == ("non-neoplastic", "benign", "malignant")
    assert list(table.df["record_id"]) == list(raw["md5hash"]) == list(table.df["patient_id"])
    assert list(table.df["path"]) == [f"{h}.jpg" for h in raw["md5hash"]]
    assert list(table.label_index()) == [fitzpatrick.CLASSES.index(c) for c in raw["three_partition_label"]]
    assert list(table.df["split"]) == ["test" if q == "1 Diagnostic" else "train" for q in raw["qc"]]
    assert list(table.df["skin_type"]) == [
        {1: "I/II", 2: "I/II", 3: "III/IV", 4: "III/IV", 5: "V/VI", 6: "V/VI", -1: "unknown"}[s]
        for s in raw["fitzpatrick_scale"]]


def test_fitzpatrick_prefers_the_downloaders_csv_and_drops_failed_downloads(tmp_path):
    root = layouts.write_fitzpatrick(tmp_path, n_patients=6)
    raw = pd.read_csv(root / "fitzpatrick17k.csv")
    raw["download_success"] = [True, True, False, True, True, True]
    (root / f"{raw['md5hash'][2]}.jpg").unlink()
    raw.to_csv(root / fitzpatrick.DOWNLOADED_CSV, index=False)
    table = fitzpatrick.load(root)
    assert list(table.df["record_id"]) == [h for i, h in enumerate(raw["md5hash"]) if i != 2]


def test_embed(tmp_path):
    root = layouts.write_embed(tmp_path, n_patients=8)
    table = datasets.load_dataset("embed", root, test_fraction="0.25", split_seed="3")
    assert table.task == "multiclass" and table.n_classes == 4 and table.channels == 1
    # 4 screening MLO/CC images per patient; diagnostic exam, ML view and density 5 left out
    assert table.n_records == 8 * 4
    assert set(table.df["view"]) == {"CC", "MLO"}
    assert sorted(table.patient_ids()) == [str(70000000 + p) for p in range(8)]
    for patient, density in zip(table.df["patient_id"], table.label_index()):
        assert density == (int(patient) - 70000000) % 4  # layouts: tissueden = 1 + p % 4
    assert all((root / p).is_file() for p in table.df["path"])
    test_patients = set(table.split("test").patient_ids())
    assert len(test_patients) == 2  # 0.25 of 8 patients
    race = dict(zip(table.df["patient_id"], table.df["race"]))
    assert [race[str(70000000 + p)] for p in range(4)] == ["White", "Black", "Asian", "unknown"]
    again = embed.load(root, test_fraction="0.25", split_seed="3")
    assert set(again.split("test").patient_ids()) == test_patients  # seeded
    by_seed = {frozenset(embed.load(root, test_fraction="0.25", split_seed=str(s)).split("test").patient_ids())
               for s in range(6)}
    assert len(by_seed) > 1  # the seed matters


def test_embed_png_path_mapping():
    assert embed.png_relpath("/mnt/NAS2/mammo/anon_dicom/cohort_1/1/2/x.dcm", "/mnt/NAS2/mammo/anon_dicom/",
                             "png") == "png/cohort_1/1/2/x.png"


def test_fairvision(tmp_path):
    root = layouts.write_fairvision(tmp_path, n_patients=8)
    table = datasets.load_dataset("fairvision", root)
    assert table.task == "multiclass" and table.label_names == fairvision.CLASSES and table.n_classes == 7
    assert table.image_key == "slo_fundus" and table.channels == 1
    assert table.n_records == 3 * 8 and table.df["patient_id"].is_unique
    glaucoma = pd.read_csv(root / "Glaucoma/ReadMe/data_summary_glaucoma.csv")
    rows = table.df[table.df["patient_id"].str.startswith("glaucoma_")]
    assert list(rows["path"]) == [f"Glaucoma/{u.title()}/{f}" for u, f in zip(glaucoma["use"], glaucoma["filename"])]
    assert list(rows["split"]) == [{"training": "train", "validation": "train", "test": "test"}[u]
                                   for u in glaucoma["use"]]
    names = [table.label_names[i] for i in table.label_index()]
    expected = []
    for cohort, diagnoses in layouts.FAIRVISION_DIAGNOSES.items():
        for i in range(8):
            d = diagnoses[i % len(diagnoses)]
            expected.append({"no": "healthy", "normal": "healthy", "yes": "glaucoma"}.get(d, d))
    assert names == expected
    assert set(names) == set(fairvision.CLASSES)
    assert list(rows["race"]) == [g.title() for g in glaucoma["race"]]
    assert list(rows["sex"]) == list(glaucoma["gender"])
    moved = fairvision.load(root, validation_split="test")
    assert moved.split("test").n_records == 3 * 4  # validation + test: 2 of every 4 scans


def test_csv_gz_is_really_gzip(tmp_path):
    root = layouts.write_mimic(tmp_path, n_patients=2)
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "rt") as f:
        assert f.readline().startswith("dicom_id")


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
def test_every_loader_output_round_trips_through_validate(tmp_path, name):
    root = getattr(layouts, f"write_{name}")(tmp_path)
    options = {"test_fraction": "0.25"} if name == "embed" else {}
    table = datasets.load_dataset(name, root, **options)
    assert records.validate(table, root) is table
    train, test = set(table.split("train").patient_ids()), set(table.split("test").patient_ids())
    assert train and test and not train & test


def test_integer_ids_read_as_float_because_of_blanks_match_the_other_tables():
    # pandas reads an integer id column with a blank as float64 (10.0); its ids must still read
    # "10", as in a table without blanks, or joins on the id silently drop every row.
    with_blank = records.id_strings(pd.Series([10.0, np.nan, 12.0]))
    assert with_blank[0] == "10" and with_blank[2] == "12" and pd.isna(with_blank[1])
    assert records.id_strings(pd.Series([10, 12])).tolist() == ["10", "12"]
    assert records.id_strings(pd.Series(["a1", None, " b2 "])).tolist()[::2] == ["a1", "b2"]


def test_non_hispanic_race_descriptions_are_not_counted_as_hispanic():
    # CheXpert's PRIMARY_RACE spells ethnicity into the race ("Other, non-Hispanic"); "non-Hispanic"
    # must not put a patient in the Hispanic/Latino group.
    values = pd.Series(["Other, non-Hispanic", "Pacific Islander, non-Hispanic", "Native American, non-Hispanic",
                        "Not Hispanic or Latino", "White, non-Hispanic", "Other, Hispanic",
                        "HISPANIC/LATINO - PUERTO RICAN", "Black, non-Hispanic", "Asian, non-Hispanic"])
    assert records.race_group(values).tolist() == ["Other", "Other", "Other", "Other", "White", "Hispanic/Latino",
                                                   "Hispanic/Latino", "Black", "Asian"]
