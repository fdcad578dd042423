"""The two xrv command lines: `xrv_scores.py` / `medleak-xrv-scores` and `xrv_attack.py` / `medleak-xrv-attack`.

Each entry point defines its own flags when it is called (the two share flag names such as
--logdir, so they cannot both be defined in one process). torch is imported only inside the scores
entry point, after flag parsing: --help and the attack work without it.
"""

import os
import sys
from pathlib import Path

from absl import flags

from medleak.cli import run_absl
from medleak.data_utils.datasets import dataset_options
from medleak.errors import MedleakError
from medleak.privacy_utils.rmia import DEFAULT_GAMMA
from medleak.xrv import attack as xrv_attack

FLAGS = flags.FLAGS
SCORE_DATASETS = ("chexpert", "mimic")


def _flag(define, name, default, help_text) -> None:
    # Registered as flags of the running script, so its --help lists them (absl shows the main
    # module's flags).
    define(name, default, help_text, module_name=sys.argv[0])


def _refuse_arguments(argv) -> None:
    if len(argv) > 1:
        raise MedleakError(f"unexpected arguments {argv[1:]}; all settings are --flags (see --help)")


def define_score_flags() -> None:
    string, integer, boolean, listing = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_bool, flags.DEFINE_list
    _flag(listing, "datasets", list(SCORE_DATASETS), "datasets to audit (their TorchXRayVision models are the targets)")
    _flag(string, "chexpert_root", "./data/chexpert", "the downloaded CheXpert dataset (official layout)")
    _flag(string, "mimic_root", "./data/mimic", "the downloaded MIMIC-CXR-JPG dataset (official layout)")
    _flag(string, "logdir", "./logs/torchxrayvision", "output: one logdir per dataset is written inside")
    _flag(string, "weights_dir", None, "folder holding TorchXRayVision's weights files under their release names "
          "(default: TorchXRayVision's cache, ~/.torchxrayvision/models_data)")
    _flag(boolean, "download", False, "download missing weights files from TorchXRayVision's release page")
    _flag(boolean, "trust_pickle", False, "load weights files that need arbitrary pickled objects, as "
          "TorchXRayVision itself does (only for files from its release page)")
    _flag(integer, "n_per", 25_000, "members and non-members drawn per dataset (fewer if not available)")
    _flag(integer, "seed", 0, "seed of the member / non-member draw")
    _flag(listing, "views", ["PA", "AP"], "views kept by TorchXRayVision's dataset classes when the model was "
          "trained ('*' for all)")
    _flag(string, "reference", "densenet121-res224-pc", "TorchXRayVision model used as the reference (OUT) model")
    _flag(integer, "batch_size", 32, "images per forward pass")
    _flag(integer, "num_workers", min(8, os.cpu_count() or 1), "processes decoding and resizing images")
    _flag(string, "device", "auto", "torch device: auto (GPU if available), cpu, cuda, cuda:1 ...")
    _flag(boolean, "overwrite", False, "replace existing logdirs")
    for dataset in SCORE_DATASETS:
        for option, (default, help_text) in dataset_options(dataset).items():
            _flag(string, f"{dataset}_{option}", None if default is None else str(default),
                  f"[{dataset} loader] {help_text}")


def loader_options(dataset) -> dict:
    """The dataset's loader options from its --<dataset>_<option> flags."""
    return {option: FLAGS[f"{dataset}_{option}"].value for option in dataset_options(dataset)}


def scores_main(argv):
    _refuse_arguments(argv)
    try:  # torch is optional for medleak: import it only here, so --help works without it
        from medleak.xrv import scores
    except ImportError as e:
        raise MedleakError(f"{Path(sys.argv[0]).name} needs torch and torchxrayvision ({e}); "
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


def define_attack_flags() -> None:
    string, integer, real = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float
    _flag(string, "logdir", "./logs/torchxrayvision", "folder holding the per-dataset logdirs of xrv_scores.py")
    _flag(flags.DEFINE_list, "datasets", list(SCORE_DATASETS), "datasets whose target models are attacked")
    _flag(string, "out_dir", "./figs/torchxrayvision", "where figures and tables are written")
    _flag(string, "a", xrv_attack.DEFAULT_A, "offline RMIA's a in [0, 1], or 'auto': tuned on the other dataset's "
          "target model (never on the model being attacked)")
    _flag(real, "gamma", DEFAULT_GAMMA, "RMIA's likelihood-ratio threshold gamma")
    _flag(integer, "n_population", 10_000, "RMIA population records (a seeded random subset of the audit sample)")
    _flag(integer, "seed", 0, "seed of RMIA's population draw")
    _flag(real, "top_share", 0.01, "share of member patients counted as the most exposed in the composition tables")


def attack_main(argv):
    _refuse_arguments(argv)
    if not 0.0 < FLAGS.top_share <= 1.0:
        raise MedleakError(f"--top_share must lie in (0, 1], got {FLAGS.top_share}")
    summary = xrv_attack.run(FLAGS.logdir, FLAGS.datasets, FLAGS.out_dir, a=FLAGS.a, gamma=FLAGS.gamma,
                         n_population=FLAGS.n_population, seed=FLAGS.seed, top_share=FLAGS.top_share)
    for dataset, result in summary.items():
        print(f"{dataset}: {result['target']} vs {result['reference']}: "
              f"RMIA AUC {result['rmia']['auc']['mean']:.3f} (a = {result['rmia_a']:.2f}), "
              f"LiRA AUC {result['lira']['auc']['mean']:.3f}")
    print(f"figures and tables: {FLAGS.out_dir}")


# Console entry points (pyproject.toml); the top-level xrv_scores.py / xrv_attack.py call them too.
def scores() -> None:
    define_score_flags()
    run_absl(scores_main)


def attack() -> None:
    define_attack_flags()
    run_absl(attack_main)
