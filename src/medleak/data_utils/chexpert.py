"""CheXpert (Stanford AIMI, `CheXpert-v1.0-small`): 14 findings, multi-label.

Layout under `--data_root`:

    CheXpert-v1.0-small/train.csv      Path, Sex, Age, Frontal/Lateral, AP/PA, 14 finding columns
    CheXpert-v1.0-small/valid.csv      same columns; the test split unless --test_csv names another
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg   (Path is relative to data_root)
    CHEXPERT DEMO.csv                  optional demographics (PATIENT, PRIMARY_RACE, ...)

Labels: blank → 0, uncertain −1 → 1 (the "U-ones" policy), 1 → 1. The patient id is the
`patientNNNNN` part of `Path`.
"""

import pandas as pd

from medleak.data_utils import records
from medleak.errors import MedleakError

NAME = "chexpert"
FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
DEMOGRAPHICS_FILES = ("CHEXPERT DEMO.csv", "CHEXPERT DEMO.xlsx")

OPTIONS = {
    "train_csv": ("CheXpert-v1.0-small/train.csv", "CheXpert training CSV, relative to --data_root"),
    "test_csv": ("CheXpert-v1.0-small/valid.csv", "CSV whose images form the test split"),
    "demographics_csv": (None, "CheXpert demographics file (CSV or .xlsx); default: 'CHEXPERT DEMO.csv' "
                               "in --data_root if present, else race is 'unknown'"),
    "path_column": ("Path", "image path column (relative to --data_root)"),
    "sex_column": ("Sex", "sex column"),
    "age_column": ("Age", "age column (years)"),
    "view_column": ("Frontal/Lateral", "frontal/lateral view column"),
    "ap_pa_column": ("AP/PA", "AP/PA projection column"),
    "demographics_patient_column": ("PATIENT", "patient id column of the demographics file"),
    "race_column": ("PRIMARY_RACE", "race column of the demographics file"),
}


def load(data_root, **options) -> records.RecordsTable:
    """Reads the official CheXpert CSVs into a validated RecordsTable (train + test)."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    train = _read_split(data_root, opts["train_csv"], "--train_csv", opts, "train")
    test = _read_split(data_root, opts["test_csv"], "--test_csv", opts, "test")
    df = pd.concat([train, test], ignore_index=True)
    race = _race(data_root, opts, df["patient_id"])
    return records.build_table(
        NAME, df, df[list(FINDINGS)].to_numpy(), FINDINGS, "multilabel",
        {
            "sex": df[opts["sex_column"]],
            "age_group": records.age_group(df[opts["age_column"]]),
            "race": race,
            "view": df[opts["view_column"]],
            "ap_pa": df[opts["ap_pa_column"]],
        },
        data_root,
    )


def uncertain_as_positive(values: pd.Series, source) -> pd.Series:
    """CheXpert label column → 0/1: blank → 0, −1 (uncertain) → 1, 0 → 0, 1 → 1."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & ~numeric.isin([-1.0, 0.0, 1.0])
    if bad.any():
        raise MedleakError(f"{source}: label column {values.name!r} holds {values[bad].iloc[0]!r}; "
                           "expected blank, -1, 0 or 1")
    return numeric.fillna(0.0).abs()


def _read_split(data_root, relpath, flag, opts, split) -> pd.DataFrame:
    path = records.resolve_file(data_root, relpath, flag)
    df = records.read_csv(path, flag)
    columns = [opts["path_column"], opts["sex_column"], opts["age_column"], opts["view_column"],
               opts["ap_pa_column"], *FINDINGS]
    records.require_columns(df, columns, path)
    out = df.copy()
    for finding in FINDINGS:
        out[finding] = uncertain_as_positive(df[finding], path)
    out["path"] = df[opts["path_column"]].astype(str)
    out["record_id"] = out["path"]
    out["patient_id"] = out["path"].str.extract(r"(patient\d+)", expand=False)
    no_patient = out["patient_id"].isna()
    if no_patient.any():
        raise MedleakError(f"{path}: {int(no_patient.sum())} path(s) have no 'patientNNNNN' part, "
                           f"e.g. {out.loc[no_patient, 'path'].iloc[0]!r} (check --path_column)")
    out["split"] = split
    return out


def _race(data_root, opts, patient_ids: pd.Series) -> pd.Series:
    path = records.optional_file(data_root, opts["demographics_csv"], "--demographics_csv", DEMOGRAPHICS_FILES)
    if path is None:
        return pd.Series(records.UNKNOWN, index=patient_ids.index)
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            demo = pd.read_excel(path)
        except ImportError:
            raise MedleakError(f"{path}: reading .xlsx needs openpyxl; pip install openpyxl or save the "
                               "sheet as CSV and pass --demographics_csv") from None
    else:
        demo = records.read_csv(path, "--demographics_csv")
    patient_col, race_col = opts["demographics_patient_column"], opts["race_column"]
    records.require_columns(demo, [patient_col, race_col], path)
    demo = demo.drop_duplicates(patient_col)
    race_by_patient = pd.Series(demo[race_col].to_numpy(), index=demo[patient_col].astype(str))
    return records.race_group(patient_ids.map(race_by_patient))
