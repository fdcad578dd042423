"""Tiny datasets in each official layout, written as real files, for tests.

Every writer has the same shape and returns the `data_root` to pass to the loader:

    write_chexpert(root, n_patients=8, seed=0, size=(24, 24)) -> Path
        root/CheXpert-v1.0-small/{train,valid}.csv, .../train|valid/patientNNNNN/studyK/viewJ_frontal.jpg,
        root/"CHEXPERT DEMO.csv". Patients patient00001..; the last max(1, n // 4) are in valid.csv.
        Patients have 1–3 images; labels use blanks, 0, 1 and -1 (uncertain).
    write_mimic(root, n_patients=8, seed=0, size=(24, 24)) -> Path
        mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz, files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom>.jpg,
        patients.csv.gz, admissions.csv.gz. Subjects 10000001..; official split cycles
        train, train, validate, test, ... by subject.
    write_fitzpatrick(root, n_patients=12, seed=0, size=(24, 24)) -> Path
        fitzpatrick17k.csv + <md5hash>.jpg (RGB), one image per patient; every third row has
        qc == "1 Diagnostic" (test).
    write_embed(root, n_patients=8, seed=0, size=(24, 24)) -> Path
        tables/EMBED_OpenData_{clinical,metadata}.csv + png/cohort_1/<empi>/<acc>/<id>.png;
        4 screening MLO/CC images per patient, plus rows the loader must filter out (a diagnostic
        exam, an ML view, density 5).
    write_fairvision(root, n_patients=8, seed=0, size=(24, 24)) -> Path
        {Glaucoma,DR,AMD}/ReadMe/data_summary_<cohort>.csv + <Cohort>/{Training,Validation,Test}/data_NNNNN.npz
        (n_patients scans per cohort; arrays slo_fundus (H, W) uint8 and a few attributes).
    write_chestxray14(root, n_patients=8, seed=0, size=(24, 24)) -> Path
        Data_Entry_2017.csv, train_val_list.txt, test_list.txt and PNGs named <patient>_<follow-up>.png,
        patient p's in images_00<p % 3 + 1>/images/ (Kaggle) except every third patient's, in a flat
        images/ folder (NIH box); the last max(1, n // 4) patients are in test_list.txt. Patients
        have 1-3 images; labels are 'No Finding' or 1-3 '|'-separated findings.

Images carry a learnable signal: Gaussian noise with one bright square per positive label at a
label-specific grid position (see `signal_image`), so a tiny CNN can fit them.
"""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
RACES = ("White", "Black or African American", "Asian", "Other", "Unknown")
CHESTXRAY14_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)


def signal_image(rng, size, positives, n_slots, channels=1) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3): noise plus a bright square in grid cell k for each k in positives."""
    height, width = size
    image = rng.normal(90.0, 20.0, (height, width, channels))
    grid = int(np.ceil(np.sqrt(n_slots)))
    cell_h, cell_w = height / grid, width / grid
    for k in positives:
        row, col = divmod(int(k), grid)
        y0, x0 = int(row * cell_h), int(col * cell_w)
        image[y0:int(y0 + cell_h), x0:int(x0 + cell_w)] = 235.0
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image[..., 0] if channels == 1 else image


def _save(path, array, **kwargs):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _write_csv_gz(path, df):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        df.to_csv(f, index=False)


def write_chexpert(root, n_patients=8, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    base = root / "CheXpert-v1.0-small"
    n_test = max(1, n_patients // 4)
    rows = {"train": [], "valid": []}
    demo = []
    for p in range(1, n_patients + 1):
        patient = f"patient{p:05d}"
        folder = "valid" if p > n_patients - n_test else "train"
        sex = ["Male", "Female", "Unknown"][p % 3]
        age = int(rng.integers(18, 90))
        for i in range(int(rng.integers(1, 4))):
            frontal = i % 2 == 0
            rel = f"CheXpert-v1.0-small/{folder}/{patient}/study1/view{i + 1}_{'frontal' if frontal else 'lateral'}.jpg"
            values = rng.choice([np.nan, 0.0, 1.0, -1.0], size=len(CHEXPERT_FINDINGS), p=[0.4, 0.2, 0.3, 0.1])
            positives = [k for k, v in enumerate(values) if v in (1.0, -1.0)]
            _save(root / rel, signal_image(rng, size, positives, len(CHEXPERT_FINDINGS)), quality=95)
            row = {"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": "Frontal" if frontal else "Lateral",
                   "AP/PA": ("AP" if p % 2 else "PA") if frontal else np.nan}
            row.update(dict(zip(CHEXPERT_FINDINGS, values)))
            rows[folder].append(row)
        demo.append({"PATIENT": patient, "GENDER": sex, "AGE_AT_CXR": age,
                     "PRIMARY_RACE": RACES[p % len(RACES)], "ETHNICITY": "Non-Hispanic/Non-Latino"})
    pd.DataFrame(rows["train"]).to_csv(base / "train.csv", index=False)
    pd.DataFrame(rows["valid"]).to_csv(base / "valid.csv", index=False)
    pd.DataFrame(demo).to_csv(root / "CHEXPERT DEMO.csv", index=False)
    return root


def write_mimic(root, n_patients=8, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, meta, split, patients, admissions = [], [], [], [], []
    official = ("train", "train", "validate", "test")
    for p in range(n_patients):
        subject = 10000001 + p
        for s in range(int(rng.integers(1, 3))):
            study = 50000000 + 10 * p + s
            values = rng.choice([np.nan, 0.0, 1.0, -1.0], size=len(CHEXPERT_FINDINGS), p=[0.4, 0.2, 0.3, 0.1])
            labels.append({"subject_id": subject, "study_id": study, **dict(zip(CHEXPERT_FINDINGS, values))})
            positives = [k for k, v in enumerate(values) if v in (1.0, -1.0)]
            for d in range(int(rng.integers(1, 3))):
                dicom = hashlib.sha1(f"{subject}-{study}-{d}".encode()).hexdigest()[:20]
                view = ["PA", "AP", "LATERAL"][d % 3]
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                             "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                             "Rows": size[0], "Columns": size[1]})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                              "split": official[p % len(official)]})
                rel = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
                _save(root / rel, signal_image(rng, size, positives, len(CHEXPERT_FINDINGS)), quality=95)
        patients.append({"subject_id": subject, "gender": "F" if p % 2 else "M", "anchor_age": 20 + 7 * p,
                         "anchor_year": 2150, "anchor_year_group": "2008 - 2010", "dod": np.nan})
        for a in range(2):  # two admissions; the first may be unknown
            race = "UNKNOWN" if a == 0 and p % 2 else ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN - CHINESE",
                                                      "HISPANIC/LATINO - PUERTO RICAN"][p % 4]
            admissions.append({"subject_id": subject, "hadm_id": 20000000 + 10 * p + a, "race": race})
    _write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame(labels))
    _write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta))
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(split))
    _write_csv_gz(root / "patients.csv.gz", pd.DataFrame(patients))
    _write_csv_gz(root / "admissions.csv.gz", pd.DataFrame(admissions))
    return root


def write_fitzpatrick(root, n_patients=12, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = ("non-neoplastic", "benign", "malignant")
    rows = []
    for i in range(n_patients):
        md5 = hashlib.md5(f"fitz-{seed}-{i}".encode()).hexdigest()
        label = i % 3
        _save(root / f"{md5}.jpg", signal_image(rng, size, [label], 3, channels=3), quality=95)
        rows.append({"md5hash": md5, "fitzpatrick_scale": [1, 2, 3, 4, 5, 6, -1][i % 7],
                     "fitzpatrick_centaur": 2, "label": "psoriasis", "nine_partition_label": "inflammatory",
                     "three_partition_label": classes[label], "qc": "1 Diagnostic" if i % 3 == 2 else np.nan,
                     "url": f"http://127.0.0.1/{md5}.jpg", "url_alphanum": f"http127001{md5}jpg"})
    pd.DataFrame(rows).to_csv(root / "fitzpatrick17k.csv", index=False)
    return root


def write_embed(root, n_patients=8, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    (root / "tables").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = "/mnt/NAS2/mammo/anon_dicom/"
    clinical, meta = [], []
    races = ("Caucasian or White", "African American  or Black", "Asian", "Unknown, Unavailable or Unreported")
    for p in range(n_patients):
        empi = 70000000 + p
        exams = [(3000000000000000 + 10 * p, "MG Screening Bilateral w/CAD", 1 + p % 4),
                 (3000000000000001 + 10 * p, "MG Diagnostic Left", 1 + p % 4)]
        if p == 0:
            exams.append((3000000000000002, "MG Screening Bilateral", 5))  # density 5: filtered out
        for acc, desc, density in exams:
            for finding in range(2):  # the clinical table has one row per finding
                clinical.append({"empi_anon": empi, "acc_anon": acc, "desc": desc, "numfind": finding + 1,
                                 "side": "L", "asses": "N", "tissueden": density, "GENDER_DESC": "Female",
                                 "RACE_DESC": races[p % len(races)], "age_at_study": 40 + 5 * p})
            views = ["CC", "MLO", "CC", "MLO", "ML"]
            for v, view in enumerate(views):
                rel = f"cohort_1/{empi}/{acc}/1.2.826.{acc}.{v}"
                meta.append({"empi_anon": empi, "acc_anon": acc, "anon_dicom_path": f"{prefix}{rel}.dcm",
                             "ViewPosition": view, "ImageLateralityFinal": "L" if v % 2 else "R",
                             "FinalImageType": "2D"})
                _save(root / "png" / f"{rel}.png", signal_image(rng, size, [min(density, 4) - 1], 4))
    pd.DataFrame(clinical).to_csv(root / "tables" / "EMBED_OpenData_clinical.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "tables" / "EMBED_OpenData_metadata.csv", index=False)
    return root


FAIRVISION_DIAGNOSES = {
    "Glaucoma": ("no", "yes"),
    "DR": ("normal", "non-vision threatening dr", "vision threatening dr"),
    "AMD": ("normal", "early amd", "intermediate amd", "late amd"),
}
FAIRVISION_CLASSES = ("healthy", "non-vision threatening dr", "vision threatening dr", "glaucoma",
                      "early amd", "intermediate amd", "late amd")


def write_fairvision(root, n_patients=8, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    uses = ("training", "training", "validation", "test")
    for cohort, diagnoses in FAIRVISION_DIAGNOSES.items():
        key = cohort.lower()
        rows = []
        for i in range(n_patients):
            filename = f"data_{i + 1:05d}.npz"
            use = uses[i % len(uses)]
            diagnosis = diagnoses[i % len(diagnoses)]
            class_name = {"no": "healthy", "normal": "healthy", "yes": "glaucoma"}.get(diagnosis, diagnosis)
            image = signal_image(rng, size, [FAIRVISION_CLASSES.index(class_name)], len(FAIRVISION_CLASSES))
            path = root / cohort / use.title() / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, slo_fundus=image, oct_bscans=rng.integers(0, 255, (2, 8, 8), dtype=np.uint8),
                     race=np.array(i % 3), male=np.array(i % 2), age=np.array(30.0 + i))
            rows.append({"filename": filename, "age": 30.0 + i, "gender": ["female", "male"][i % 2],
                         "race": ["asian", "black", "white"][i % 3], "ethnicity": "non-hispanic",
                         "language": "english", "maritalstatus": "single", key: diagnosis, "use": use})
        (root / cohort / "ReadMe").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(root / cohort / "ReadMe" / f"data_summary_{key}.csv", index=False)
    return root


def write_chestxray14(root, n_patients=8, seed=0, size=(24, 24)) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_test = max(1, n_patients // 4)
    rows, lists = [], {"train": [], "test": []}
    for p in range(1, n_patients + 1):
        split = "test" if p > n_patients - n_test else "train"
        folder = "images" if p % 3 == 0 else f"images_{p % 3 + 1:03d}/images"
        for follow_up in range(int(rng.integers(1, 4))):
            name = f"{p:08d}_{follow_up:03d}.png"
            positives = [] if rng.random() < 0.3 else sorted(rng.choice(14, int(rng.integers(1, 4)), replace=False))
            _save(root / folder / name, signal_image(rng, size, positives, 14))
            rows.append({
                "Image Index": name,
                "Finding Labels": "|".join(CHESTXRAY14_FINDINGS[k] for k in positives) or "No Finding",
                "Follow-up #": follow_up, "Patient ID": p, "Patient Age": int(rng.integers(1, 95)),
                "Patient Gender": "MF"[p % 2], "View Position": ["PA", "AP"][follow_up % 2],
                "OriginalImage[Width": 2500, "Height]": 2048,
                "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143,
            })
            lists[split].append(name)
    pd.DataFrame(rows).to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "train_val_list.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")
    return root
