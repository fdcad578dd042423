"""ChestX-ray14 (NIH Clinical Center, Wang et al. 2017): 14 findings, multi-label, PNG images.

Layout under `--data_root` (the NIH box download, or Kaggle's "nih-chest-xrays/data"):

    Data_Entry_2017.csv     Image Index, Finding Labels ('|'-separated, or 'No Finding'), Follow-up #,
                            Patient ID, Patient Age, Patient Gender, View Position, OriginalImage[Width,
                            Height], OriginalImagePixelSpacing[x, y]   (Data_Entry_2017_v2020.csv also read)
    train_val_list.txt      image names of the official train+validation split, one per line
    test_list.txt           image names of the official test split
    images_001/images/00000001_000.png ...   (Kaggle) or images/00000001_000.png (NIH box, extracted):
                            every folder matching --image_dirs is searched, each image found by name

Labels: one 0/1 column per finding; 'No Finding' is all zeros (data_utils/label_maps.py derives a
'No Finding' column from that when a model has one). The official split is patient-wise; images
in neither list are dropped (with a warning). An image listed in the CSV but found in no image
folder keeps the path `images/<name>`, so that the image cache reports it (or skips it with
--skip_unreadable). Sex is 'Male'/'Female' (M/F in the file); ages above 120 years (a few
entries of the release) are 'unknown'.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
from absl import logging

from medleak.data_utils import records
from medleak.errors import MedleakError

NAME = "chestxray14"
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
MAX_AGE = 120  # larger ages in the release are data-entry errors (e.g. 414)
SEX_NAMES = {"M": "Male", "F": "Female"}

OPTIONS = {
    "entries_csv": (None, "image table; default: Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv) in --data_root"),
    "train_list": ("train_val_list.txt", "image names of the official train+validation split"),
    "test_list": ("test_list.txt", "image names of the official test split"),
    "image_dirs": ("images*", "glob of the image folders under --data_root (each searched, and its images/ subfolder)"),
    "image_column": ("Image Index", "image file name column"),
    "labels_column": ("Finding Labels", "'|'-separated findings column"),
    "patient_column": ("Patient ID", "patient id column"),
    "sex_column": ("Patient Gender", "sex column (M/F)"),
    "age_column": ("Patient Age", "age column (years)"),
    "view_column": ("View Position", "view column (PA/AP)"),
}


def load(data_root, **options) -> records.RecordsTable:
    """Reads the official ChestX-ray14 files into a validated RecordsTable (train + test)."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    path = records.optional_file(data_root, opts["entries_csv"], "--entries_csv", ENTRY_FILES)
    if path is None:
        raise MedleakError(f"{Path(data_root) / ENTRY_FILES[0]}: file not found (check --data_root={data_root} "
                           "or set --entries_csv)")
    image_col, labels_col = opts["image_column"], opts["labels_column"]
    columns = [image_col, labels_col, opts["patient_column"], opts["sex_column"], opts["age_column"],
               opts["view_column"]]
    df = records.read_csv(path, "--entries_csv")
    records.require_columns(df, columns, path)
    df[image_col] = df[image_col].astype(str).str.strip()

    df["split"] = official_split(data_root, df[image_col], opts)
    dropped = df["split"].isna()
    if dropped.any():
        logging.warning("chestxray14: dropped %d image(s) in neither %s nor %s", int(dropped.sum()),
                        opts["train_list"], opts["test_list"])
        df = df[~dropped].reset_index(drop=True)
    if len(df) == 0:
        raise MedleakError(f"{path}: no image is in {opts['train_list']} or {opts['test_list']}; "
                           "check --train_list/--test_list")

    patients = records.id_strings(df[opts["patient_column"]])
    if patients.isna().any():
        raise MedleakError(f"{path}: column {opts['patient_column']!r} is blank for "
                           f"{int(patients.isna().sum())} image(s), e.g. {df.loc[patients.isna(), image_col].iloc[0]!r}")
    found = find_images(data_root, opts["image_dirs"])
    base = pd.DataFrame({
        "record_id": df[image_col],
        "patient_id": patients,
        "path": [found.get(name, f"images/{name}") for name in df[image_col]],
        "split": df["split"],
    })
    missing = int((~df[image_col].isin(found)).sum())
    if missing:
        logging.warning("chestxray14: %d of %d image(s) not found under %s/%s", missing, len(df), data_root,
                        opts["image_dirs"])
    return records.build_table(
        NAME, base, finding_matrix(df[labels_col], path), FINDINGS, "multilabel",
        {
            "sex": df[opts["sex_column"]].astype("string").str.strip().replace(SEX_NAMES),
            "age_group": records.age_group(ages(df[opts["age_column"]])),
            "view": df[opts["view_column"]],
        },
        data_root,
    )


def finding_matrix(labels: pd.Series, source) -> np.ndarray:
    """'|'-separated finding names → (n, 14) float32 0/1 matrix; 'No Finding' → all zeros."""
    index = {name: j for j, name in enumerate(FINDINGS)}
    out = np.zeros((len(labels), len(FINDINGS)), dtype=np.float32)
    for i, text in enumerate(labels.fillna("").astype(str)):
        names = [part.strip() for part in text.split("|") if part.strip()]
        if not names:
            raise MedleakError(f"{source}: column {labels.name!r} is blank in row {i + 2}; "
                               f"expected finding names or {NO_FINDING!r}")
        for name in names:
            if name == NO_FINDING:
                continue
            if name not in index:
                raise MedleakError(f"{source}: column {labels.name!r} holds unknown finding {name!r} in row {i + 2}; "
                                   f"expected '|'-separated names of {', '.join(FINDINGS)} or {NO_FINDING!r}")
            out[i, index[name]] = 1.0
        if NO_FINDING in names and out[i].any():
            raise MedleakError(f"{source}: column {labels.name!r} row {i + 2} lists {NO_FINDING!r} with findings ({text!r})")
    return out


def ages(values: pd.Series) -> pd.Series:
    """Years as numbers ('058Y' in early releases → 58); above MAX_AGE → missing."""
    years = pd.to_numeric(values.astype(str).str.strip().str.rstrip("Yy"), errors="coerce")
    return years.where(years <= MAX_AGE)


def official_split(data_root, image_names: pd.Series, opts) -> pd.Series:
    """'train' / 'test' per image from the two official lists; missing where in neither."""
    train = _read_list(data_root, opts["train_list"], "--train_list")
    test = _read_list(data_root, opts["test_list"], "--test_list")
    both = train & test
    if both:
        raise MedleakError(f"{opts['test_list']}: {len(both)} image(s) are also in {opts['train_list']}, "
                           f"e.g. {sorted(both)[0]!r}; each image belongs to one split")
    split = pd.Series(np.nan, index=image_names.index, dtype=object)
    split[image_names.isin(train)] = "train"
    split[image_names.isin(test)] = "test"
    return split


def _read_list(data_root, relpath, flag) -> set:
    path = records.resolve_file(data_root, relpath, flag)
    try:
        names = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as e:
        raise MedleakError(f"{path}: cannot be read as a list of image names ({e})") from None
    if not names:
        raise MedleakError(f"{path}: the image list is empty (set {flag})")
    return names


def find_images(data_root, pattern) -> dict:
    """{file name: path relative to data_root} of the images in the folders matching `pattern`
    (and anywhere below them: Kaggle's images_001/images/, the extracted box archives' images/)."""
    root = Path(data_root)
    found = {}
    for folder in sorted(p for p in root.glob(str(pattern)) if p.is_dir()):
        for dirpath, _, files in os.walk(folder):
            relative = Path(dirpath).relative_to(root).as_posix()
            for name in files:
                if name.lower().endswith(".png"):
                    found.setdefault(name, f"{relative}/{name}")
    return found
