"""Harvard FairVision30k: SLO fundus scans of three disease cohorts, 7 classes, grayscale.

Layout under `--data_root` (one folder per disease, 10,000 scans each):

    Glaucoma/ReadMe/data_summary_glaucoma.csv   filename, age, gender, race, ethnicity, language, ..., glaucoma, use
    DR/ReadMe/data_summary_dr.csv               ... dr, use
    AMD/ReadMe/data_summary_amd.csv             ... amd, use
    Glaucoma/Training/data_00001.npz            arrays incl. `slo_fundus` (the image used here)
    Glaucoma/Validation/...  Glaucoma/Test/...

Classes: healthy, non-vision-threatening DR, vision-threatening DR, glaucoma, early / intermediate /
late AMD (a cohort's negatives are 'healthy'). One scan per patient; file numbers repeat across
cohorts, so the patient id is `<cohort>_<number>`. The official split (`use`) is kept;
'validation' scans go to train unless `--validation_split=test`.
"""

import pandas as pd

from medleak.data_utils import records
from medleak.errors import MedleakError

NAME = "fairvision"
CLASSES = ("healthy", "non-vision threatening dr", "vision threatening dr", "glaucoma",
           "early amd", "intermediate amd", "late amd")
COHORTS = ("Glaucoma", "DR", "AMD")

# Diagnosis strings seen in the summary CSVs of different releases → class name.
DIAGNOSIS_CLASSES = {
    "glaucoma": {"no": "healthy", "0": "healthy", "false": "healthy", "normal": "healthy",
                 "yes": "glaucoma", "1": "glaucoma", "true": "glaucoma"},
    "dr": {"normal": "healthy", "no dr": "healthy", "no.dr.diagnosis": "healthy", "not.in.icd.table": "healthy",
           "non-vision threatening dr": "non-vision threatening dr", "non vision threatening dr":
           "non-vision threatening dr", "mild.npdr": "non-vision threatening dr",
           "moderate.npdr": "non-vision threatening dr", "vision threatening dr": "vision threatening dr",
           "vision-threatening dr": "vision threatening dr", "severe.npdr": "vision threatening dr",
           "pdr": "vision threatening dr"},
    "amd": {"normal": "healthy", "no amd": "healthy", "no.amd.diagnosis": "healthy", "not.in.icd.table": "healthy",
            "early amd": "early amd", "early.dry": "early amd", "intermediate amd": "intermediate amd",
            "intermediate.dry": "intermediate amd", "late amd": "late amd",
            "advanced.atrophic.dry.with.subfoveal.involvement": "late amd",
            "advanced.atrophic.dry.without.subfoveal.involvement": "late amd",
            "wet.amd.active.choroidal.neovascularization": "late amd",
            "wet.amd.inactive.choroidal.neovascularization": "late amd", "wet.amd.inactive.scar": "late amd"},
}

OPTIONS = {
    "cohorts": (",".join(COHORTS), "comma-separated cohort folders to load"),
    "summary_csv": ("{cohort}/ReadMe/data_summary_{cohort_lower}.csv", "summary CSV per cohort (template)"),
    "image_path": ("{cohort}/{Use}/{filename}", "scan path per row (template; {Use} is the title-cased split)"),
    "image_key": ("slo_fundus", "array inside each .npz used as the image"),
    "validation_split": ("train", "where the official 'validation' scans go: train or test"),
    "filename_column": ("filename", "scan file name column"),
    "split_column": ("use", "official split column (training/validation/test)"),
    "race_column": ("race", "race column"),
    "sex_column": ("gender", "sex column"),
    "ethnicity_column": ("ethnicity", "ethnicity column"),
    "language_column": ("language", "preferred language column"),
    "age_column": ("age", "age column (years)"),
}


def load(data_root, **options) -> records.RecordsTable:
    """Reads the FairVision summary CSVs of all cohorts into one validated 7-class RecordsTable."""
    opts = {k: v for k, (v, _) in OPTIONS.items()} | options
    if opts["validation_split"] not in ("train", "test"):
        raise MedleakError(f"--validation_split must be 'train' or 'test', got {opts['validation_split']!r}")
    cohorts = records.parse_list(opts["cohorts"])
    unknown = [c for c in cohorts if c.lower() not in DIAGNOSIS_CLASSES]
    if not cohorts or unknown:
        raise MedleakError(f"--cohorts must name some of {list(COHORTS)}, got {opts['cohorts']!r}")
    df = pd.concat([_read_cohort(data_root, cohort, opts) for cohort in cohorts], ignore_index=True)
    class_index = df["class_name"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return records.build_table(
        NAME, df, records.one_hot(class_index, len(CLASSES)), CLASSES, "multiclass",
        {
            "race": records.race_group(df[opts["race_column"]]),
            "sex": df[opts["sex_column"]],
            "ethnicity": df[opts["ethnicity_column"]],
            "language": df[opts["language_column"]],
            "age_group": records.age_group(df[opts["age_column"]]),
        },
        data_root, channels=1, image_key=opts["image_key"],
    )


def _read_cohort(data_root, cohort, opts) -> pd.DataFrame:
    key = cohort.lower()
    flag = "--summary_csv"
    path = records.resolve_file(data_root, _fill(opts["summary_csv"], "--summary_csv", cohort=cohort, cohort_lower=key), flag)
    df = records.read_csv(path, flag)
    filename, use = opts["filename_column"], opts["split_column"]
    records.require_columns(df, [filename, use, key, opts["race_column"], opts["sex_column"],
                                 opts["ethnicity_column"], opts["language_column"], opts["age_column"]], path)
    diagnosis = df[key].astype(str).str.strip().str.lower()
    df["class_name"] = diagnosis.map(DIAGNOSIS_CLASSES[key])
    bad = df["class_name"].isna()
    if bad.any():
        raise MedleakError(f"{path}: {key} value {df.loc[bad, key].iloc[0]!r} is not a known diagnosis "
                           f"(expected one of {sorted(DIAGNOSIS_CLASSES[key])})")
    official = df[use].astype(str).str.strip().str.lower()
    split = official.map({"training": "train", "train": "train", "test": "test",
                          "validation": opts["validation_split"], "val": opts["validation_split"]})
    if split.isna().any():
        raise MedleakError(f"{path}: {use} value {df.loc[split.isna(), use].iloc[0]!r} is not "
                           "training/validation/test (check --split_column)")
    names = df[filename].astype(str).str.strip()
    df["split"] = split
    df["path"] = [_fill(opts["image_path"], "--image_path", cohort=cohort, Use=u.title(), use=u, filename=n)
                  for u, n in zip(official, names)]
    df["patient_id"] = key + "_" + names.str.replace(r"^data_|\.npz$", "", regex=True)
    df["record_id"] = df["patient_id"]
    return df


def _fill(template, flag, **values) -> str:
    """A path template filled in, or a one-line error naming the flag and the fields it may use."""
    try:
        return str(template).format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise MedleakError(f"{flag}={template!r} is not a valid template ({type(e).__name__}: {e}); "
                           f"it may use {{{'}, {'.join(values)}}}") from None
