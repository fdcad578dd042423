"""Bad input gives one `MedleakError` line that names the problem (never a bare traceback)."""

import numpy as np
import pandas as pd
import pytest

from medleak.data_utils import datasets, image_cache
from tests import layouts
from tests.checks import raises


# (dataset, file written by the layout, a required column in it, loader options)
CASES = [
    ("chexpert", "CheXpert-v1.0-small/train.csv", "Sex", {}),
    ("mimic", "mimic-cxr-2.0.0-chexpert.csv.gz", "Cardiomegaly", {}),
    ("mimic", "mimic-cxr-2.0.0-split.csv.gz", "split", {}),
    ("fitzpatrick", "fitzpatrick17k.csv", "three_partition_label", {}),
    ("embed", "tables/EMBED_OpenData_clinical.csv", "tissueden", {"test_fraction": "0.25"}),
    ("embed", "tables/EMBED_OpenData_metadata.csv", "anon_dicom_path", {"test_fraction": "0.25"}),
    ("fairvision", "DR/ReadMe/data_summary_dr.csv", "use", {}),
]


@pytest.mark.parametrize("name,relpath,column,options", CASES)
def test_missing_column_names_file_and_column(tmp_path, name, relpath, column, options):
    root = getattr(layouts, f"write_{name}")(tmp_path)
    df = pd.read_csv(root / relpath)
    df.drop(columns=[column]).to_csv(root / relpath, index=False)
    raises(lambda: datasets.load_dataset(name, root, **options), relpath.split("/")[-1], repr(column),
           "missing column")


@pytest.mark.parametrize("name,relpath,column,options", CASES)
def test_missing_file_names_the_file(tmp_path, name, relpath, column, options):
    root = getattr(layouts, f"write_{name}")(tmp_path)
    (root / relpath).unlink()
    raises(lambda: datasets.load_dataset(name, root, **options), relpath.split("/")[-1], "file not found")


def test_missing_file_names_the_flag_to_set(tmp_path):
    root = layouts.write_chexpert(tmp_path)
    raises(lambda: datasets.load_dataset("chexpert", root, test_csv="nope.csv"), "nope.csv", "--test_csv")
    raises(lambda: datasets.load_dataset("chexpert", root, demographics_csv="demo.csv"), "demo.csv",
           "--demographics_csv")
    raises(lambda: datasets.load_dataset("mimic", layouts.write_mimic(tmp_path / "m"), patients_csv="p.csv"),
           "p.csv", "--patients_csv")


def test_empty_csv_and_header_only_csv(tmp_path):
    root = layouts.write_chexpert(tmp_path)
    train = root / "CheXpert-v1.0-small/train.csv"
    header = train.read_text().splitlines()[0]
    train.write_text("")
    raises(lambda: datasets.load_dataset("chexpert", root), "train.csv", "empty")
    train.write_text(header + "\n")
    raises(lambda: datasets.load_dataset("chexpert", root), "train.csv", "no rows")


def test_empty_csv_for_every_loader(tmp_path):
    for name, relpath, _, options in CASES:
        root = getattr(layouts, f"write_{name}")(tmp_path / name / relpath.replace("/", "_"))
        (root / relpath).write_text("")
        raises(lambda: datasets.load_dataset(name, root, **options), relpath.split("/")[-1], "empty")


def test_patient_in_both_splits(tmp_path):
    root = layouts.write_chexpert(tmp_path, n_patients=8)
    train = pd.read_csv(root / "CheXpert-v1.0-small/train.csv")
    valid = pd.read_csv(root / "CheXpert-v1.0-small/valid.csv")
    # another image of a training patient listed in the test CSV
    leaked = train.iloc[:1].assign(Path=train["Path"][0].replace("study1", "study9"))
    pd.concat([valid, leaked]).to_csv(root / "CheXpert-v1.0-small/valid.csv", index=False)
    raises(lambda: datasets.load_dataset("chexpert", root), "both train and test", "patient00001")


def test_patient_in_both_splits_of_the_official_mimic_split(tmp_path):
    root = layouts.write_mimic(tmp_path, n_patients=8)
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    counts = split.groupby("subject_id").size()
    subject = counts[counts >= 2].index[0]
    rows = split.index[split["subject_id"] == subject]
    split.loc[rows[0], "split"], split.loc[rows[1], "split"] = "train", "test"
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False, compression="gzip")
    raises(lambda: datasets.load_dataset("mimic", root), "both train and test", str(subject))


@pytest.mark.parametrize("bad_path", ["../outside/patient00001/study1/view1_frontal.jpg",
                                      "/etc/patient00001/view1_frontal.jpg"])
def test_path_escaping_data_root(tmp_path, bad_path):
    root = layouts.write_chexpert(tmp_path / "root")
    train = pd.read_csv(root / "CheXpert-v1.0-small/train.csv")
    train.loc[0, "Path"] = bad_path
    train.to_csv(root / "CheXpert-v1.0-small/train.csv", index=False)
    raises(lambda: datasets.load_dataset("chexpert", root), bad_path, "escapes --data_root")


def test_path_escaping_data_root_fitzpatrick_and_embed(tmp_path):
    root = layouts.write_fitzpatrick(tmp_path / "fitz")
    raw = pd.read_csv(root / "fitzpatrick17k.csv")
    raw.loc[0, "md5hash"] = "../../secret"
    raw.to_csv(root / "fitzpatrick17k.csv", index=False)
    raises(lambda: datasets.load_dataset("fitzpatrick", root), "../../secret.jpg", "escapes --data_root")

    root = layouts.write_embed(tmp_path / "embed")
    meta = pd.read_csv(root / "tables/EMBED_OpenData_metadata.csv")
    meta.loc[0, "anon_dicom_path"] = "/elsewhere/cohort_1/x.dcm"
    meta.to_csv(root / "tables/EMBED_OpenData_metadata.csv", index=False)
    raises(lambda: datasets.load_dataset("embed", root), "/elsewhere/cohort_1/x.dcm", "--dicom_prefix")


@pytest.mark.parametrize("dataset,csv,column,value,fragment", [
    ("chexpert", "CheXpert-v1.0-small/train.csv", "Edema", 2, "-1, 0 or 1"),
    ("fitzpatrick", "fitzpatrick17k.csv", "three_partition_label", "weird", "three_partition_label"),
    ("fairvision", "AMD/ReadMe/data_summary_amd.csv", "amd", "purple", "amd"),
])
def test_bad_label_values_name_the_column(tmp_path, dataset, csv, column, value, fragment):
    root = getattr(layouts, f"write_{dataset}")(tmp_path / dataset)
    table = pd.read_csv(root / csv)
    table.loc[0, column] = value
    table.to_csv(root / csv, index=False)
    raises(lambda: datasets.load_dataset(dataset, root), repr(str(value)) if isinstance(value, str) else repr(column), fragment)


def test_bad_dataset_name_option_and_root(tmp_path):
    raises(lambda: datasets.load_dataset("cifar", tmp_path), "unknown dataset", "'cifar'")
    raises(lambda: datasets.dataset_options("cifar"), "unknown dataset")
    raises(lambda: datasets.load_dataset("chexpert", tmp_path, colour="red"), "unknown option", "colour")
    raises(lambda: datasets.load_dataset("chexpert", tmp_path / "nowhere"), "--data_root", "not a directory")
    root = layouts.write_embed(tmp_path / "e")
    raises(lambda: datasets.load_dataset("embed", root, test_fraction="lots"), "--test_fraction", "'lots'")
    raises(lambda: datasets.load_dataset("embed", root, test_fraction="1.5"), "--test_fraction")
    raises(lambda: datasets.load_dataset("mimic", tmp_path, validate_split="maybe"), "--validate_split")


def _cache(table, root, tmp_path, **kwargs):
    return image_cache.cached_images(table, root, (16, 16), cache_dir=tmp_path / "cache", num_workers=2, **kwargs)


def test_undecodable_and_missing_images_are_counted_and_named(tmp_path):
    root = layouts.write_chexpert(tmp_path / "root", n_patients=6)
    table = datasets.load_dataset("chexpert", root)
    paths = list(table.df["path"])
    (root / paths[1]).write_bytes(b"this is not a jpeg")
    (root / paths[3]).unlink()
    message = raises(lambda: _cache(table, root, tmp_path), "2 of", paths[1], paths[3], "file not found",
                     "--skip_unreadable")
    assert str(len(paths)) in message
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-built is left behind

    images, kept = _cache(table, root, tmp_path, skip_unreadable=True)
    assert images.shape[0] == kept.n_records == len(paths) - 2
    assert paths[1] not in set(kept.df["path"]) and paths[3] not in set(kept.df["path"])
    # without the flag the same broken files still raise (the skip is never silent)
    raises(lambda: _cache(table, root, tmp_path), "2 of")


def test_truncated_jpeg_and_npz_without_the_key(tmp_path):
    root = layouts.write_fairvision(tmp_path / "fv", n_patients=4)
    table = datasets.load_dataset("fairvision", root)
    first = root / table.df["path"][0]
    np.savez(first, something_else=np.zeros((4, 4), np.uint8))
    raises(lambda: _cache(table, root, tmp_path), "1 of", table.df["path"][0], "slo_fundus")

    root = layouts.write_fitzpatrick(tmp_path / "fz", n_patients=6)
    table = datasets.load_dataset("fitzpatrick", root)
    jpg = root / table.df["path"][0]
    jpg.write_bytes(jpg.read_bytes()[:40])
    raises(lambda: _cache(table, root, tmp_path), "1 of", table.df["path"][0])


def test_symlinked_dataset_folder_is_not_an_escape(tmp_path):
    # Clusters keep datasets on shared storage and link them into data_root; the escape check judges
    # the path written in the CSV ("..", absolute), not where a symlink inside data_root points.
    store = layouts.write_chexpert(tmp_path / "store")
    root = tmp_path / "root"
    root.mkdir()
    (root / "CheXpert-v1.0-small").symlink_to(store / "CheXpert-v1.0-small", target_is_directory=True)
    linked = datasets.load_dataset("chexpert", root)
    assert linked.n_records == datasets.load_dataset("chexpert", store).n_records


@pytest.mark.parametrize("option,template", [("image_path", "{cohort}/{folder}/{filename}"),
                                             ("summary_csv", "{cohort}/{oops.csv")])
def test_bad_fairvision_path_template_names_the_flag(tmp_path, option, template):
    root = layouts.write_fairvision(tmp_path)
    raises(lambda: datasets.load_dataset("fairvision", root, **{option: template}), f"--{option}", template)
