"""EMBED (Emory Breast Imaging Dataset, AWS Open Data): BI-RADS breast density, 4 classes.

Layout under `--data_root`:

    tables/EMBED_OpenData_clinical.csv   empi_anon, acc_anon, desc, tissueden, RACE_DESC, age_at_study, ...
    tables/EMBED_OpenData_metadata.csv   empi_anon, acc_anon, anon_dicom_path, ViewPosition, ...
    png/cohort_1/<empi>/<acc>/<image>.png   written once from the DICOMs by
        python -m medleak.data_utils.embed_prepare --data_root=<dir> --dicom_root=<downloaded DICOM tree>

An image's PNG path is `anon_dicom_path` with `--dicom_prefix` removed, `.dcm` → `.png`, under
`--png_dir`. Kept as in the paper: screening exams (`desc` contains "screen"), MLO/CC views,
`tissueden` 1–4 (A–D), female patients. EMBED has no official split: a seeded patient-grouped
split puts `--test_fraction` of the patients in test.
"""

import pandas as pd
from absl import logging

from medleak.data_utils import records
from medleak.errors import MedleakError

NAME = "embed"
CLASSES = ("BI-RADS A", "BI-RADS B", "BI-RADS C", "BI-RADS D")

OPTIONS = {
    "clinical_csv": ("tables/EMBED_OpenData_clinical.csv", "clinical table (density, race, age)"),
    "metadata_csv": ("tables/EMBED_OpenData_metadata.csv", "image metadata table (paths, views)"),
    "png_dir": ("png", "folder of the converted PNG tree, relative to --data_root"),
    "dicom_prefix": ("/mnt/NAS2/mammo/anon_dicom/", "prefix of anon_dicom_path removed to form the PNG path"),
    "patient_column": ("empi_anon", "patient id column"),
    "exam_column": ("acc_anon", "exam (accession) id column"),
    "path_column": ("anon_dicom_path", "DICOM path column of the metadata table"),
    "density_column": ("tissueden", "BI-RADS density column (1-4)"),
    "race_column": ("RACE_DESC", "race column of the clinical table"),
    "age_column": ("age_at_study", "age column of the clinical table"),
    "view_column": ("ViewPosition", "view column of the metadata table"),
    "exam_description_column": ("desc", "exam description column (used by --exam_filter)"),
    "exam_filter": ("screen", "keep exams whose description contains this (case-insensitive); empty keeps all"),
    "views": ("MLO,CC", "comma-separated views to keep; empty keeps all"),
    "test_fraction": ("0.025", "share of patients in the seeded test split"),
    "split_seed": ("0", "seed of the patient-grouped split"),
}


def dicom_relpath(dicom_path, dicom_prefix) -> str:
    """`anon_dicom_path` with `--dicom_prefix` removed: the DICOM's path inside the downloaded tree."""
    path = str(dicom_path).strip()
    if dicom_prefix and path.startswith(dicom_prefix):
        return path[len(dicom_prefix):]
    if path.startswith("/"):
        raise MedleakError(f"anon_dicom_path {path!r} does not start with --dicom_prefix={dicom_prefix!r}; "
                           "set --dicom_prefix to the part to strip")
    return path


def png_relpath(dicom_path, dicom_prefix, png_dir) -> str:
    """Where the PNG of one `anon_dicom_path` lives, relative to --data_root (shared with embed_prepare)."""
    path = dicom_relpath(dicom_path, dicom_prefix)
    if path.lower().endswith(".dcm"):
        path = path[:-4]
    png_dir = str(png_dir or "").strip().strip("/")
    return f"{png_dir}/{path}.png" if png_dir else f"{path}.png"


def load(data_root, **options) -> records.RecordsTable:
    """Reads the EMBED clinical + metadata tables into a validated RecordsTable."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    patient, exam, density = opts["patient_column"], opts["exam_column"], opts["density_column"]
    test_fraction = records.parse_float(opts["test_fraction"], "--test_fraction", 0.0, 1.0)
    seed = int(records.parse_float(opts["split_seed"], "--split_seed"))

    clinical_path = records.resolve_file(data_root, opts["clinical_csv"], "--clinical_csv")
    clinical = records.read_csv(clinical_path, "--clinical_csv", low_memory=False)
    clinical_columns = [patient, exam, density, opts["race_column"], opts["age_column"]]
    if opts["exam_filter"]:
        clinical_columns.append(opts["exam_description_column"])
    records.require_columns(clinical, clinical_columns, clinical_path)

    meta_path = records.resolve_file(data_root, opts["metadata_csv"], "--metadata_csv")
    meta = records.read_csv(meta_path, "--metadata_csv", low_memory=False)
    records.require_columns(meta, [patient, exam, opts["path_column"], opts["view_column"]], meta_path)

    for table in (clinical, meta):
        table[patient], table[exam] = records.id_strings(table[patient]), records.id_strings(table[exam])
    if opts["exam_filter"]:
        description = clinical[opts["exam_description_column"]].astype(str)
        clinical = clinical[description.str.contains(opts["exam_filter"], case=False, regex=False)]
    if "GENDER_DESC" in clinical.columns:  # density grading is for female patients (as in the paper)
        clinical = clinical[clinical["GENDER_DESC"].astype(str).str.strip().str.lower() != "male"]
    tissue = pd.to_numeric(clinical[density], errors="coerce")
    clinical = clinical[tissue.isin([1, 2, 3, 4])]
    # The clinical table has one row per finding; density, race and age are per exam.
    clinical = clinical.drop_duplicates([patient, exam])[[patient, exam, density, opts["race_column"],
                                                          opts["age_column"]]]
    df = meta.drop(columns=[c for c in clinical.columns if c in meta.columns and c not in (patient, exam)])
    df = df.merge(clinical, on=[patient, exam], how="inner")
    views = records.parse_list(opts["views"])
    if views:
        df = df[df[opts["view_column"]].astype(str).str.strip().isin(views)]
    df = df.drop_duplicates(opts["path_column"]).reset_index(drop=True)
    if len(df) == 0:
        raise MedleakError(f"{NAME}: no images left after joining {clinical_path.name} and {meta_path.name} "
                           "and filtering (check --exam_filter, --views and the id columns)")
    logging.info("embed: %d images of %d patients", len(df), df[patient].nunique())

    base = pd.DataFrame({
        "path": [png_relpath(p, opts["dicom_prefix"], opts["png_dir"]) for p in df[opts["path_column"]]],
        "patient_id": df[patient].astype(str),
    })
    base["record_id"] = base["path"]
    base["split"] = records.patient_split(base["patient_id"], test_fraction, seed).to_numpy()
    class_index = pd.to_numeric(df[density]).astype(int).to_numpy() - 1
    return records.build_table(
        NAME, base, records.one_hot(class_index, len(CLASSES)), CLASSES, "multiclass",
        {"race": records.race_group(df[opts["race_column"]]), "age_group": records.age_group(df[opts["age_column"]]),
         "view": df[opts["view_column"]]},
        data_root,
    )
