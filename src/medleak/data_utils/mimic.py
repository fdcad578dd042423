"""MIMIC-CXR-JPG 2.0.0 (PhysioNet): the 14 CheXpert findings, multi-label, per study.

Layout under `--data_root`:

    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 finding columns (per study)
    mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train/validate/test)
    files/p10/p10000032/s50414267/<dicom_id>.jpg
    patients.csv.gz, admissions.csv.gz   optional MIMIC-IV hosp tables (sex, anchor_age, race)

Labels: blank → 0, uncertain −1 → 1. Images whose study has no label row are dropped. The
official split is used; its 'validate' images go to the test split (`--validate_split=train` moves
them to train instead). Age is MIMIC-IV `anchor_age` (age in the patient's anchor year).
"""

import pandas as pd
from absl import logging

from medleak.data_utils import records
from medleak.data_utils.chexpert import FINDINGS, uncertain_as_positive
from medleak.errors import MedleakError

NAME = "mimic"

OPTIONS = {
    "chexpert_csv": ("mimic-cxr-2.0.0-chexpert.csv.gz", "per-study CheXpert labels"),
    "metadata_csv": ("mimic-cxr-2.0.0-metadata.csv.gz", "per-image metadata (dicom_id, ViewPosition)"),
    "split_csv": ("mimic-cxr-2.0.0-split.csv.gz", "official train/validate/test split"),
    "image_dir": ("files", "folder of the JPEG tree, relative to --data_root"),
    "validate_split": ("test", "where the official 'validate' images go: test or train"),
    "patients_csv": (None, "MIMIC-IV patients table (gender, anchor_age); default: patients.csv[.gz] or "
                           "hosp/patients.csv[.gz] in --data_root if present"),
    "admissions_csv": (None, "MIMIC-IV admissions table (race); default: admissions.csv[.gz] or "
                             "hosp/admissions.csv[.gz] in --data_root if present"),
    "subject_column": ("subject_id", "patient id column"),
    "study_column": ("study_id", "study id column"),
    "dicom_column": ("dicom_id", "image id column"),
    "view_column": ("ViewPosition", "view column of the metadata file"),
    "split_column": ("split", "split column of the split file"),
    "sex_column": ("gender", "sex column of the patients table"),
    "age_column": ("anchor_age", "age column of the patients table"),
    "race_column": (None, "race column of the admissions table (default: 'race', or 'ethnicity' in MIMIC-IV 1.0)"),
}


def _fallbacks(stem):
    return (f"{stem}.csv.gz", f"{stem}.csv", f"hosp/{stem}.csv.gz", f"hosp/{stem}.csv")


def load(data_root, **options) -> records.RecordsTable:
    """Reads the MIMIC-CXR-JPG CSVs (+ optional MIMIC-IV demographics) into a validated RecordsTable."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    subject, study, dicom = opts["subject_column"], opts["study_column"], opts["dicom_column"]
    if opts["validate_split"] not in ("test", "train"):
        raise MedleakError(f"--validate_split must be 'test' or 'train', got {opts['validate_split']!r}")

    labels_path = records.resolve_file(data_root, opts["chexpert_csv"], "--chexpert_csv")
    labels = records.read_csv(labels_path, "--chexpert_csv")
    records.require_columns(labels, [subject, study, *FINDINGS], labels_path)
    for finding in FINDINGS:
        labels[finding] = uncertain_as_positive(labels[finding], labels_path)
    labels = labels.drop_duplicates([subject, study])

    meta_path = records.resolve_file(data_root, opts["metadata_csv"], "--metadata_csv")
    meta = records.read_csv(meta_path, "--metadata_csv")
    records.require_columns(meta, [dicom, subject, study, opts["view_column"]], meta_path)

    split_path = records.resolve_file(data_root, opts["split_csv"], "--split_csv")
    split = records.read_csv(split_path, "--split_csv")
    records.require_columns(split, [dicom, opts["split_column"]], split_path)
    official = split[opts["split_column"]].astype(str).str.strip().str.lower()
    unknown = ~official.isin(["train", "validate", "test"])
    if unknown.any():
        raise MedleakError(f"{split_path}: split value {split.loc[unknown, opts['split_column']].iloc[0]!r} "
                           "is not train/validate/test (check --split_column)")
    split = pd.DataFrame({dicom: split[dicom].astype(str),
                          "split": official.replace({"validate": opts["validate_split"]})})

    meta[dicom] = meta[dicom].astype(str)
    for key in (subject, study):
        meta[key], labels[key] = records.id_strings(meta[key]), records.id_strings(labels[key])
    df = meta.merge(labels[[subject, study, *FINDINGS]], on=[subject, study], how="inner")
    _log_dropped(len(meta) - len(df), "image(s) whose study has no row in", labels_path)
    n_before = len(df)
    df = df.merge(split.drop_duplicates(dicom), on=dicom, how="inner")
    _log_dropped(n_before - len(df), "image(s) missing from", split_path)

    df["record_id"] = df[dicom]
    df["patient_id"] = df[subject]
    df["path"] = [f"{opts['image_dir']}/p{s[:2]}/p{s}/s{st}/{d}.jpg"
                  for s, st, d in zip(df[subject], df[study], df[dicom])]
    sex, age, race = _demographics(data_root, opts, df[subject])
    return records.build_table(
        NAME, df, df[list(FINDINGS)].to_numpy(), FINDINGS, "multilabel",
        {"sex": sex, "age_group": records.age_group(age), "race": race, "view": df[opts["view_column"]]},
        data_root,
    )


def _log_dropped(n, what, path):
    if n:
        logging.warning("mimic: dropped %d %s %s", n, what, path)


def _demographics(data_root, opts, subjects: pd.Series):
    """Sex, age and race per image from the optional MIMIC-IV tables ('unknown' without them)."""
    subject = opts["subject_column"]
    unknown = pd.Series(records.UNKNOWN, index=subjects.index)
    sex, age, race = unknown, pd.Series(float("nan"), index=subjects.index), unknown

    patients_path = records.optional_file(data_root, opts["patients_csv"], "--patients_csv", _fallbacks("patients"))
    if patients_path is not None:
        patients = records.read_csv(patients_path, "--patients_csv")
        records.require_columns(patients, [subject, opts["sex_column"], opts["age_column"]], patients_path)
        patients[subject] = records.id_strings(patients[subject])
        patients = patients.drop_duplicates(subject).set_index(subject)
        sex = subjects.map(patients[opts["sex_column"]])
        age = subjects.map(patients[opts["age_column"]])

    admissions_path = records.optional_file(data_root, opts["admissions_csv"], "--admissions_csv",
                                            _fallbacks("admissions"))
    if admissions_path is not None:
        admissions = records.read_csv(admissions_path, "--admissions_csv")
        race_column = opts["race_column"] or ("ethnicity" if "race" not in admissions.columns
                                              and "ethnicity" in admissions.columns else "race")
        records.require_columns(admissions, [subject, race_column], admissions_path)
        admissions[subject] = records.id_strings(admissions[subject])
        admissions["race_group"] = records.race_group(admissions[race_column])
        # A patient's admissions may disagree; take the most frequent known group.
        known = admissions[admissions["race_group"] != records.UNKNOWN]
        per_patient = known.groupby(subject)["race_group"].agg(lambda s: s.value_counts().index[0])
        race = subjects.map(per_patient)
    return sex, age, race
