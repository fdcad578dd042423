"""Synthetic demo dataset in the CheXpert-v1.0-small layout, with planted vulnerable patients.

    python -m medleak.data_utils.synthetic --out_dir=demo_out/data [--n_patients=240 --img_size=32 --seed=0 --n_planted=5]

Writes `<out_dir>/CheXpert-v1.0-small/{train,valid}.csv` + JPEGs, `<out_dir>/CHEXPERT DEMO.csv`
(race) and `<out_dir>/planted_patients.json`; load it with `chexpert.py --data_root=<out_dir>`.

Each patient has 1–6 images (studies of a frontal and sometimes a lateral view), a sex, an age, a race
and a smooth patient-specific texture ("anatomy") shared by all of their images. Four findings are
drawn into the image as bright shapes on that background (plus per-image noise), large enough to
survive resizing to 16 px, so a small CNN learns them in a few epochs:

    Cardiomegaly      bright disc in the centre
    Pleural Effusion  bright band along the bottom edge
    Pneumothorax      bright vertical bar along the left edge
    Support Devices   bright square in the top-right corner

"No Finding" is 1 when none of the four is present; the other nine CheXpert columns are 0. A few
planted training patients are consistently mislabelled: on every one of their images the four
labels are the opposite of what the image shows. A model can only fit them by memorising them (by
their texture), so they should come out as the most vulnerable patients of an audit. (Checked once
with small_cnn at 16 px, 30 epochs: test AUROC 1.0 on the four findings; the planted images' loss
was 2.0 when their patient was trained on vs 3.6 when not, against ≈0.1–0.16 for other images.)
"""

from pathlib import Path

import numpy as np
import pandas as pd
from absl import flags
from PIL import Image

from medleak import io_utils
from medleak.cli import run_absl
from medleak.data_utils.chexpert import FINDINGS
from medleak.errors import MedleakError

SIGNAL_FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices")
RACES = ("White", "Black or African American", "Asian", "Other", "Unknown")
RACE_WEIGHTS = (0.55, 0.15, 0.15, 0.1, 0.05)
TEST_FRACTION = 0.15
PREVALENCE = 0.35


def shape_masks(size: int) -> dict:
    """Boolean (size, size) mask per signal finding (regions scale with the image)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return {
        "Cardiomegaly": (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.18 ** 2,
        "Pleural Effusion": yy >= 0.8,
        "Pneumothorax": (xx < 0.2) & (yy < 0.8),
        "Support Devices": (yy < 0.3) & (xx >= 0.7),
    }


def draw_image(rng, size, shown, background) -> np.ndarray:
    """uint8 (size, size): the patient's background + noise + the shapes of the findings `shown`."""
    image = background + rng.normal(0.0, 10.0, (size, size))
    masks = shape_masks(size)
    for finding in shown:
        image[masks[finding]] += 110.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _background(rng, size) -> np.ndarray:
    """A patient-specific smooth texture ("anatomy"), the same on all of a patient's images: it is
    what lets a model recognise, and memorise, a patient."""
    coarse = rng.normal(0.0, 28.0, (6, 6)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    return 75.0 + rng.uniform(-10, 10) + texture.astype(np.float64)


def write_synthetic_chexpert(out_dir, n_patients=240, img_size=32, seed=0, n_planted=5) -> dict:
    """Writes the demo dataset under `out_dir` (the --data_root for the chexpert loader).

    Returns `{data_root, n_patients, n_train_images, n_test_images, planted_patients, findings}`.
    """
    n_patients, img_size, n_planted = int(n_patients), int(img_size), int(n_planted)
    if n_patients < 4:
        raise MedleakError(f"--n_patients must be at least 4, got {n_patients}")
    if img_size < 8:
        raise MedleakError(f"--img_size must be at least 8, got {img_size}")
    n_test = max(1, int(round(TEST_FRACTION * n_patients)))
    if not 0 <= n_planted <= n_patients - n_test:
        raise MedleakError(f"--n_planted must be between 0 and {n_patients - n_test}, got {n_planted}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    ids = [f"patient{p:05d}" for p in range(1, n_patients + 1)]
    test_ids = {str(p) for p in rng.choice(ids, size=n_test, replace=False)}
    train_ids = [p for p in ids if p not in test_ids]
    planted = {str(p) for p in rng.choice(train_ids, size=n_planted, replace=False)} if n_planted else set()

    rows = {"train": [], "valid": []}
    demographics = []
    for patient in ids:
        folder = "valid" if patient in test_ids else "train"
        sex = str(rng.choice(["Male", "Female"]))
        age = int(rng.integers(18, 91))
        background = _background(rng, img_size)
        n_images = int(rng.integers(3 if patient in planted else 1, 7))
        image_index, study = 0, 0
        while image_index < n_images:
            study += 1
            shown = [f for f in SIGNAL_FINDINGS if rng.random() < PREVALENCE]
            labelled = [f for f in SIGNAL_FINDINGS if f not in shown] if patient in planted else shown
            for view in range(1, min(2, n_images - image_index) + 1):
                frontal = view == 1
                rel = (f"CheXpert-v1.0-small/{folder}/{patient}/study{study}/"
                       f"view{view}_{'frontal' if frontal else 'lateral'}.jpg")
                image = draw_image(rng, img_size, shown, background)
                path = out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path, format="JPEG", quality=95)
                row = {"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": "Frontal" if frontal else "Lateral",
                       "AP/PA": str(rng.choice(["AP", "PA"])) if frontal else ""}
                row.update({f: 0.0 for f in FINDINGS})
                row.update({f: 1.0 for f in labelled})
                row["No Finding"] = 0.0 if labelled else 1.0
                rows[folder].append(row)
                image_index += 1
        demographics.append({"PATIENT": patient, "GENDER": sex, "AGE_AT_CXR": age,
                             "PRIMARY_RACE": str(rng.choice(RACES, p=RACE_WEIGHTS)),
                             "ETHNICITY": "Non-Hispanic/Non-Latino"})

    base = out_dir / "CheXpert-v1.0-small"
    io_utils.write_csv(base / "train.csv", pd.DataFrame(rows["train"]))
    io_utils.write_csv(base / "valid.csv", pd.DataFrame(rows["valid"]))
    io_utils.write_csv(out_dir / "CHEXPERT DEMO.csv", pd.DataFrame(demographics))
    planted_ids = sorted(planted)
    io_utils.write_json(out_dir / "planted_patients.json", {
        "patient_ids": planted_ids,
        "findings": list(SIGNAL_FINDINGS),
        "rule": "on every image of these patients the four findings' labels are the opposite of the image content",
    })
    return {"data_root": str(out_dir), "n_patients": n_patients, "n_train_images": len(rows["train"]),
            "n_test_images": len(rows["valid"]), "planted_patients": planted_ids, "findings": list(SIGNAL_FINDINGS)}


def planted_ranks(data_root, patient_risk_csv, column="auc") -> tuple:
    """(1-based ranks of the planted patients in an audit's patient_risk.csv by `column`, n_patients)."""
    planted = set(io_utils.read_json(Path(data_root) / "planted_patients.json")["patient_ids"])
    risk = pd.read_csv(patient_risk_csv, dtype={"patient_id": str})
    order = risk.sort_values(column, ascending=False, kind="stable")["patient_id"].tolist()
    return sorted(order.index(p) + 1 for p in planted if p in order), len(order)


def _define_flags():
    flags.DEFINE_string("out_dir", None, "folder to write the dataset into (the chexpert --data_root)")
    flags.DEFINE_integer("n_patients", 240, "number of patients")
    flags.DEFINE_integer("img_size", 32, "image side in pixels")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_integer("n_planted", 5, "number of mislabelled (planted vulnerable) training patients")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.out_dir:
        raise MedleakError("--out_dir is required")
    info = write_synthetic_chexpert(FLAGS.out_dir, FLAGS.n_patients, FLAGS.img_size, FLAGS.seed, FLAGS.n_planted)
    print(f"synthetic chexpert: {info['n_patients']} patients, {info['n_train_images']} train + "
          f"{info['n_test_images']} test images, planted {info['planted_patients']} → {info['data_root']}")


if __name__ == "__main__":
    _define_flags()
    run_absl(main)
