"""Benchmark: can a CPU-sized model memorise mislabelled images, as WRN-28-2 does on a GPU? (issue 14)

A Fitzpatrick-layout set (tests/layouts.py `write_fitzpatrick`: noise plus a bright square in the
label's grid cell) with --flip of the records given a wrong label (another class, chosen at
random). Each --models candidate trains on all records with the demo's settings (scripts/demo.sh: no
augmentation, no weight decay, no EMA, SGD lr --learning_rate (0.05), batch 64, --epochs (60)) and reports,
one figure per line:

    <model>_<px>px_final_loss        mean training loss of the last epoch (~0 = memorised everything)
    <model>_<px>px_flipped_fit       share of the mislabelled records predicted as their WRONG label
    <model>_<px>px_clean_fit         share of the correctly labelled records predicted right
    <model>_<px>px_seconds           training seconds of one model (after a first, compiling run)

    python bench/memorisation.py [--models small_cnn,wrn_10_1,wrn_10_2 --img_size 16 --epochs 60 --n_records 400]

wrn_10_1 (the demo's model) is the smallest of these that fits every mislabelled record.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import report  # noqa: E402
from tests.layouts import write_fitzpatrick  # noqa: E402

CLASSES = ("non-neoplastic", "benign", "malignant")


def mislabelled_set(n_records, size, flip, seed=0):
    """uint8 images, the labels trained on (one-hot) and the mask of the flipped records."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fitzpatrick(tmp, n_patients=n_records, seed=seed, size=(size, size))
        table = pd.read_csv(root / "fitzpatrick17k.csv")
        images = np.stack([np.asarray(Image.open(root / f"{md5}.jpg").convert("RGB")) for md5 in table["md5hash"]])
    true = table["three_partition_label"].map(CLASSES.index).to_numpy()
    rng = np.random.default_rng(seed)
    flipped = np.zeros(n_records, bool)
    flipped[rng.choice(n_records, int(round(flip * n_records)), replace=False)] = True
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, len(CLASSES), flipped.sum())) % len(CLASSES)
    return images, np.eye(len(CLASSES), dtype=np.float32)[given], flipped


def measure(model, images, labels, flipped, epochs, learning_rate):
    from medleak.config import TrainConfig
    from medleak.train_utils.training import Trainer

    size = images.shape[1]
    config = TrainConfig(model=model, img_size=(size, size), epochs=epochs, batch_size=64, grad_accum=1,
                         learning_rate=learning_rate, weight_decay=0.0, warmup=0.02, ema_decay=0.0, augment="none",
                         eval_views=1)
    trainer = Trainer(config, images, labels, "multiclass")
    rows = np.arange(len(images))
    trainer.train(rows, seed=1, progress=False)  # compiles
    started = time.perf_counter()
    trained = trainer.train(rows, seed=0, progress=False)
    seconds = time.perf_counter() - started
    predicted = trainer.infer_train_views(trained)[:, 0].argmax(-1)
    hit = predicted == labels.argmax(-1)
    name = f"{model}_{size}px"
    report(f"{name}_final_loss", float(trained.losses[-trainer.steps_per_epoch:].mean()))
    report(f"{name}_flipped_fit", float(hit[flipped].mean()))
    report(f"{name}_clean_fit", float(hit[~flipped].mean()))
    report(f"{name}_seconds", seconds, "s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,wrn_10_1,wrn_10_2")
    parser.add_argument("--img_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=60, help="the demo's")
    parser.add_argument("--n_records", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=0.05, help="the demo's")
    parser.add_argument("--flip", type=float, default=0.04, help="share of records given a wrong label")
    args = parser.parse_args()
    images, labels, flipped = mislabelled_set(args.n_records, args.img_size, args.flip)
    report("records", len(images))
    report("mislabelled", int(flipped.sum()))
    for model in args.models.split(","):
        measure(model, images, labels, flipped, args.epochs, args.learning_rate)


if __name__ == "__main__":
    main()
