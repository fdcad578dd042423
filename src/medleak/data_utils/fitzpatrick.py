"""Fitzpatrick17k: dermatology photographs, 3-class `three_partition_label`, RGB.

Layout under `--data_root` (the dataset ships only URLs; fetch the images with
`python -m medleak.data_utils.fitzpatrick_download --csv=fitzpatrick17k.csv --data_root=<dir>`):

    fitzpatrick17k.csv               md5hash, fitzpatrick_scale, three_partition_label, qc, url, ...
    fitzpatrick17k_downloaded.csv    written by the download command (adds download_success)
    <md5hash>.jpg

Without `--csv`, the downloader's CSV is used when present (images that failed to download are
left out), else `fitzpatrick17k.csv`. Test split = the `qc == "1 Diagnostic"` images (as in the
paper). Each image is its own patient (the dataset has no patient ids); duplicate md5hash rows
keep the first. Skin type: `fitzpatrick_scale` 1–6 grouped I/II, III/IV, V/VI; −1/blank → unknown.
"""

from pathlib import Path

import pandas as pd
from absl import logging

from medleak.data_utils import records
from medleak.errors import MedleakError

NAME = "fitzpatrick"
CLASSES = ("non-neoplastic", "benign", "malignant")
DOWNLOADED_CSV = "fitzpatrick17k_downloaded.csv"
ORIGINAL_CSV = "fitzpatrick17k.csv"
SKIN_TYPE_GROUPS = {1: "I/II", 2: "I/II", 3: "III/IV", 4: "III/IV", 5: "V/VI", 6: "V/VI"}

OPTIONS = {
    "csv": (None, f"dataset CSV; default: {DOWNLOADED_CSV} if present, else {ORIGINAL_CSV}"),
    "image_dir": ("", "folder holding <md5hash>.jpg, relative to --data_root (default: --data_root)"),
    "id_column": ("md5hash", "image id column (file name without .jpg)"),
    "label_column": ("three_partition_label", "3-class label column"),
    "skin_type_column": ("fitzpatrick_scale", "Fitzpatrick skin type column (1-6, -1 unknown)"),
    "qc_column": ("qc", "quality-control column; its test value marks the test split"),
    "test_qc_value": ("1 Diagnostic", "qc value of the test images"),
}


def load(data_root, **options) -> records.RecordsTable:
    """Reads the Fitzpatrick17k CSV into a validated RecordsTable."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    path = records.optional_file(data_root, opts["csv"], "--csv", (DOWNLOADED_CSV, ORIGINAL_CSV))
    if path is None:
        raise MedleakError(f"{Path(data_root) / ORIGINAL_CSV}: file not found (nor {DOWNLOADED_CSV}); "
                           "check --data_root or pass --csv")
    df = records.read_csv(path, "--csv")
    id_col, label_col, skin_col = opts["id_column"], opts["label_column"], opts["skin_type_column"]
    records.require_columns(df, [id_col, label_col, skin_col, opts["qc_column"]], path)

    if "download_success" in df.columns:
        ok = df["download_success"].astype(str).str.strip().str.lower().isin(["true", "1"])
        if (~ok).any():
            logging.warning("fitzpatrick: leaving out %d image(s) that failed to download (%s)", int((~ok).sum()), path)
        df = df[ok]
    df = df[df[id_col].notna()].copy()
    df[id_col] = df[id_col].astype(str).str.strip()
    df = df.drop_duplicates(id_col)

    label = df[label_col].astype(str).str.strip().str.lower()
    unknown = ~label.isin(CLASSES)
    if unknown.any():
        raise MedleakError(f"{path}: {label_col} value {df.loc[unknown, label_col].iloc[0]!r} is not one of "
                           f"{list(CLASSES)} (check --label_column)")
    class_index = label.map({c: i for i, c in enumerate(CLASSES)}).to_numpy()

    image_dir = str(opts["image_dir"] or "").strip().strip("/")
    base = pd.DataFrame({
        "record_id": df[id_col],
        "patient_id": df[id_col],
        "path": [f"{image_dir}/{h}.jpg" if image_dir else f"{h}.jpg" for h in df[id_col]],
        "split": (df[opts["qc_column"]].astype(str).str.strip() == opts["test_qc_value"]).map(
            {True: "test", False: "train"}),
    })
    return records.build_table(
        NAME, base, records.one_hot(class_index, len(CLASSES)), CLASSES, "multiclass",
        {"skin_type": skin_type_group(df[skin_col])}, data_root, channels=3,
    )


def skin_type_group(scale: pd.Series) -> pd.Series:
    """Fitzpatrick scale 1–6 → 'I/II', 'III/IV', 'V/VI'; anything else (−1, blank) → 'unknown'."""
    numeric = pd.to_numeric(scale, errors="coerce")
    return numeric.map(SKIN_TYPE_GROUPS).fillna(records.UNKNOWN).astype(str)
