"""Runs TorchXRayVision's public chest X-ray models on known members and non-members.

    pip install -r requirements-xrv.txt
    python xrv_scores.py --chexpert_root=./data/chexpert --mimic_root=./data/mimic
    python xrv_attack.py

Writes ./logs/torchxrayvision/{chexpert,mimic}/ (layout in docs/XRV.md). Weights are read from
TorchXRayVision's cache folder and never downloaded unless --download is given.
"""

import os

from absl import app, flags

from medleak.cli import main_guard
from medleak.data_utils.datasets import dataset_options
from medleak.errors import MedleakError

DATASETS = ("chexpert", "mimic")

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", list(DATASETS), "datasets to audit (their TorchXRayVision models are the targets)")
flags.DEFINE_string("chexpert_root", "./data/chexpert", "the downloaded CheXpert dataset (official layout)")
flags.DEFINE_string("mimic_root", "./data/mimic", "the downloaded MIMIC-CXR-JPG dataset (official layout)")
flags.DEFINE_string("logdir", "./logs/torchxrayvision", "output: one logdir per dataset is written inside")
flags.DEFINE_string("weights_dir", None, "folder holding TorchXRayVision's weights files under their release "
                    "names (default: TorchXRayVision's cache, ~/.torchxrayvision/models_data)")
flags.DEFINE_bool("download", False, "download missing weights files from TorchXRayVision's release page")
flags.DEFINE_bool("trust_pickle", False, "load weights files that need arbitrary pickled objects, as "
                  "TorchXRayVision itself does (only for files from its release page)")
flags.DEFINE_integer("n_per", 25_000, "members and non-members drawn per dataset (fewer if not available)")
flags.DEFINE_integer("seed", 0, "seed of the member / non-member draw")
flags.DEFINE_list("views", ["PA", "AP"], "views kept by TorchXRayVision's dataset classes when the model was "
                  "trained ('*' for all)")
flags.DEFINE_string("reference", "densenet121-res224-pc", "TorchXRayVision model used as the reference (OUT) model")
flags.DEFINE_integer("batch_size", 32, "images per forward pass")
flags.DEFINE_integer("num_workers", min(8, os.cpu_count() or 1), "processes decoding and resizing images")
flags.DEFINE_string("device", "auto", "torch device: auto (GPU if available), cpu, cuda, cuda:1 ...")
flags.DEFINE_bool("overwrite", False, "replace existing logdirs")

for _dataset in DATASETS:
    for _option, (_default, _help) in dataset_options(_dataset).items():
        flags.DEFINE_string(f"{_dataset}_{_option}", None if _default is None else str(_default),
                            f"[{_dataset} loader] {_help}")


def loader_options(dataset) -> dict:
    """The dataset's loader options from its --<dataset>_<option> flags."""
    return {option: FLAGS[f"{dataset}_{option}"].value for option in dataset_options(dataset)}


@main_guard
def main(argv):
    if len(argv) > 1:
        raise MedleakError(f"unexpected arguments {argv[1:]}; all settings are --flags (see --help)")
    try:  # torch is optional for medleak: import it only here, so --help works without it
        from medleak.xrv import scores
    except ImportError as e:
        raise MedleakError(f"xrv_scores.py needs torch and torchxrayvision ({e}); "
                           "pip install -r requirements-xrv.txt") from None

    config = scores.ScoreConfig(
        datasets=tuple(FLAGS.datasets), n_per=FLAGS.n_per, seed=FLAGS.seed, views=tuple(FLAGS.views),
        reference=FLAGS.reference, weights_dir=FLAGS.weights_dir, download=FLAGS.download,
        trust_pickle=FLAGS.trust_pickle, batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers,
        device=FLAGS.device, overwrite=FLAGS.overwrite)
    roots = {"chexpert": FLAGS.chexpert_root, "mimic": FLAGS.mimic_root}
    written = scores.run(roots, {d: loader_options(d) for d in config.datasets}, FLAGS.logdir, config)
    for dataset, logdir in written.items():
        print(f"{dataset}: {logdir}")


if __name__ == "__main__":
    app.run(main)
