"""The synthetic CheXpert-layout demo dataset: layout, learnable findings, planted patients."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medleak import io_utils
from medleak.data_utils import chexpert, datasets, image_cache, synthetic

ROOT = Path(__file__).resolve().parents[1]


def _content(images, size):
    """Which findings each image shows, read off the pixels with the generator's masks (a detector
    independent of the labels): mean brightness inside a region vs the rest of the image."""
    masks = synthetic.shape_masks(size)
    flat = images[..., 0].astype(float)
    shown = {}
    for finding, mask in masks.items():
        shown[finding] = flat[:, mask].mean(axis=1) - flat[:, ~mask].mean(axis=1) > 40
    return shown


def test_layout_labels_and_planted_patients(tmp_path):
    info = synthetic.write_synthetic_chexpert(tmp_path, n_patients=80, img_size=32, seed=3, n_planted=4)
    table = datasets.load_dataset("chexpert", tmp_path)
    assert table.split("train").n_records == info["n_train_images"]
    assert table.split("test").n_records == info["n_test_images"]
    assert table.df["patient_id"].nunique() == 80
    per_patient = table.df.groupby("patient_id").size()
    assert per_patient.min() >= 1 and per_patient.max() <= 6 and per_patient.nunique() > 3
    assert set(table.df["race"]) - {"unknown"} and set(table.df["sex"]) == {"Male", "Female"}
    assert set(table.df["view"]) == {"Frontal", "Lateral"}
    labels = table.df[list(chexpert.FINDINGS)]
    other = [f for f in chexpert.FINDINGS if f not in synthetic.SIGNAL_FINDINGS and f != "No Finding"]
    assert (labels[other] == 0).all().all()
    assert (labels["No Finding"] == (labels[list(synthetic.SIGNAL_FINDINGS)].sum(axis=1) == 0)).all()

    planted = io_utils.read_json(tmp_path / "planted_patients.json")["patient_ids"]
    assert planted == info["planted_patients"] and len(planted) == 4
    assert set(planted) <= set(table.split("train").patient_ids())

    images, _ = image_cache.cached_images(table, tmp_path, 16, cache_dir=tmp_path / "cache")
    shown = _content(np.asarray(images), 16)
    is_planted = table.df["patient_id"].isin(planted).to_numpy()
    for finding in synthetic.SIGNAL_FINDINGS:
        label = table.df[finding].to_numpy() == 1
        # ordinary images: the label is what the image shows (the detector reads it at 16 px)
        assert (label[~is_planted] == shown[finding][~is_planted]).mean() > 0.97
        # planted patients: the label is the opposite, on every image
        assert (label[is_planted] != shown[finding][is_planted]).mean() > 0.97


def test_findings_are_learnable_at_16px(tmp_path):
    synthetic.write_synthetic_chexpert(tmp_path, n_patients=120, img_size=32, seed=1, n_planted=0)
    table = datasets.load_dataset("chexpert", tmp_path)
    images, _ = image_cache.cached_images(table, tmp_path, 16, cache_dir=tmp_path / "cache")
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0
    train = (table.df["split"] == "train").to_numpy()
    for finding in synthetic.SIGNAL_FINDINGS:
        y = table.df[finding].to_numpy()
        model = LogisticRegression(max_iter=500).fit(x[train], y[train])
        assert roc_auc_score(y[~train], model.predict_proba(x[~train])[:, 1]) > 0.95, finding


def test_seeded_and_command_line(tmp_path):
    a = synthetic.write_synthetic_chexpert(tmp_path / "a", n_patients=20, seed=7)
    b = synthetic.write_synthetic_chexpert(tmp_path / "b", n_patients=20, seed=7)
    synthetic.write_synthetic_chexpert(tmp_path / "c", n_patients=20, seed=8)
    csv = lambda d: (tmp_path / d / "CheXpert-v1.0-small/train.csv").read_text()  # noqa: E731
    assert csv("a") == csv("b") and csv("a") != csv("c")
    assert a["planted_patients"] == b["planted_patients"]

    result = subprocess.run([sys.executable, "-m", "medleak.data_utils.synthetic", f"--out_dir={tmp_path / 'cli'}",
                             "--n_patients=12", "--img_size=16", "--n_planted=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "12 patients" in result.stdout
    train = pd.read_csv(tmp_path / "cli/CheXpert-v1.0-small/train.csv")
    assert len(io_utils.read_json(tmp_path / "cli/planted_patients.json")["patient_ids"]) == 2
    assert (tmp_path / "cli" / train["Path"][0]).is_file()

    bad = subprocess.run([sys.executable, "-m", "medleak.data_utils.synthetic", f"--out_dir={tmp_path / 'bad'}",
                          "--n_patients=10", "--n_planted=50"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--n_planted" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
