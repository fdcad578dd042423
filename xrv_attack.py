"""Attacks TorchXRayVision's public chest X-ray models using the logits from xrv_scores.py.

    python xrv_scores.py ...          # writes ./logs/torchxrayvision/{chexpert,mimic}/
    python xrv_attack.py              # writes ./figs/torchxrayvision/

Offline RMIA and offline LiRA of each target model (CheXpert's, MIMIC-CXR's) against the one
reference model (PadChest's). Needs no torch. Outputs are described in docs/XRV.md.
"""

from absl import app, flags

from medleak.cli import main_guard
from medleak.errors import MedleakError
from medleak.privacy_utils.rmia import DEFAULT_GAMMA
from medleak.xrv import attack

FLAGS = flags.FLAGS
flags.DEFINE_string("logdir", "./logs/torchxrayvision", "folder holding the per-dataset logdirs of xrv_scores.py")
flags.DEFINE_list("datasets", ["chexpert", "mimic"], "datasets whose target models are attacked")
flags.DEFINE_string("out_dir", "./figs/torchxrayvision", "where figures and tables are written")
flags.DEFINE_string("a", attack.DEFAULT_A, "offline RMIA's a in [0, 1], or 'auto': tuned on the other dataset's "
                    "target model (never on the model being attacked)")
flags.DEFINE_float("gamma", DEFAULT_GAMMA, "RMIA's likelihood-ratio threshold gamma")
flags.DEFINE_integer("n_population", 10_000, "RMIA population records (a seeded random subset of the audit sample)")
flags.DEFINE_integer("seed", 0, "seed of RMIA's population draw")
flags.DEFINE_float("top_share", 0.01, "share of member patients counted as the most exposed in the composition tables")


@main_guard
def main(argv):
    if len(argv) > 1:
        raise MedleakError(f"unexpected arguments {argv[1:]}; all settings are --flags (see --help)")
    if not 0.0 < FLAGS.top_share <= 1.0:
        raise MedleakError(f"--top_share must lie in (0, 1], got {FLAGS.top_share}")
    summary = attack.run(FLAGS.logdir, FLAGS.datasets, FLAGS.out_dir, a=FLAGS.a, gamma=FLAGS.gamma,
                         n_population=FLAGS.n_population, seed=FLAGS.seed, top_share=FLAGS.top_share)
    for dataset, result in summary.items():
        print(f"{dataset}: {result['target']} vs {result['reference']}: "
              f"RMIA AUC {result['rmia']['auc']['mean']:.3f} (a = {result['rmia_a']:.2f}), "
              f"LiRA AUC {result['lira']['auc']['mean']:.3f}")
    print(f"figures and tables: {FLAGS.out_dir}")


if __name__ == "__main__":
    app.run(main)
