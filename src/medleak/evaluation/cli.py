"""evaluate.py / medleak-evaluate: a saved model's test metrics on any dataset (docs/TRANSFER.md).

    python evaluate.py --model_dir=logs/chexpert/eval_only/model --dataset=mimic --data_root=/data/mimic \
        [--compare_dir=DIR2] [--split=test] [--seed=0] [--bootstrap=1000] [--output=PREFIX]

Scores the model on the labels it shares with the dataset (refused with one line naming both label
sets when none is), overall and per subgroup, with seeded bootstrap CIs (patients resampled), a
decision threshold per label chosen on a validation split — a patient-level split of the dataset's
TRAIN split (`--val_fraction` of its patients, drawn with `--seed`), never the test set — and
statistical parity differences by sex and age band at it; with `--compare_dir` the paired bootstrap
p-value of the AUROC difference. Writes PREFIX.json (everything) and PREFIX.csv (one row per group
and label) and prints a short table.
"""

import dataclasses

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.evaluation.external import eval_set
from medleak.train_utils.optim import HEAD
from medleak.data_utils.label_maps import PRIVACYDOMAIN_LABELS, shared_labels
from medleak.evaluation.stats import THRESHOLD_RULES, evaluate_predictions, largest_parity_gap

LABEL_SETS = {"shared": None, "privacydomain": PRIVACYDOMAIN_LABELS}


def validation_split(train_table, fraction: float, seed: int):
    """The rows of `train_table` whose patients are in a seeded `fraction` of its patients."""
    if not 0 < fraction < 1:
        raise MedleakError(f"--val_fraction must be strictly between 0 and 1, got {fraction}")
    patients = np.asarray(sorted(train_table.df["patient_id"].astype(str).unique()))
    n_val = max(1, int(round(fraction * len(patients))))
    chosen = np.random.default_rng(seed).choice(patients, size=n_val, replace=False)
    rows = train_table.df["patient_id"].astype(str).isin(set(chosen)).to_numpy()
    return dataclasses.replace(train_table, df=train_table.df[rows].reset_index(drop=True))


def evaluate_model(model_dir, dataset: str, data_root, *, compare_dir=None, split: str = "test", seed: int = 0,
                   n_resamples: int = 1000, val_fraction: float = 0.2, threshold_rule: str = "youden",
                   labels: str = "shared", cache_dir=None, options=None) -> dict:
    """The JSON document evaluate.py writes (see the module doc)."""
    from medleak.data_utils.datasets import load_dataset
    from medleak.train_utils.saved_model import load_model

    if labels not in LABEL_SETS:
        raise MedleakError(f"--labels={labels!r}: use one of {', '.join(LABEL_SETS)}")
    if split not in ("train", "test"):
        raise MedleakError(f"--split={split!r}: use test (or train)")
    model = load_model(model_dir)
    other = load_model(compare_dir) if compare_dir else None
    table = load_dataset(dataset, data_root, **(options or {}))
    val_table = validation_split(table.split("train"), val_fraction, seed)
    model_labels = model.label_names or [str(c) for c in range(model.variables["params"][HEAD]["bias"].shape[0])]
    only = LABEL_SETS[labels]
    if other is not None:  # score both on the labels all three share
        only = [name for _, _, name in shared_labels(model_labels, other.label_names or [], only=only)]
    test_set = eval_set(dataset, table.split(split), data_root, model_labels, model.config.img_size, model.channels,
                        cache_dir=cache_dir, only=only)
    val_set = eval_set(dataset, val_table, data_root, model_labels, model.config.img_size, model.channels,
                       cache_dir=cache_dir, only=test_set.label_names)
    other_scores = None
    if other is not None:
        other_set = eval_set(dataset, table.split(split), data_root, other.label_names, other.config.img_size,
                             other.channels, cache_dir=cache_dir, only=test_set.label_names)
        if other_set.label_names != test_set.label_names:
            raise MedleakError(f"--compare_dir={compare_dir} predicts {other_set.label_names}, not all of "
                               f"{test_set.label_names}")
        other_scores = other_set.scores(other.logits(other_set.images))
    result = evaluate_predictions(
        test_set.scores(model.logits(test_set.images)), test_set.labels, val_set.scores(model.logits(val_set.images)),
        val_set.labels, test_set.label_names, test_set.subgroups, test_set.patient_ids, other_scores,
        n_resamples=n_resamples, seed=seed, threshold_rule=threshold_rule)
    trained_on = model.trained_on or {}
    result.update(model_dir=str(model_dir), compare_dir=None if compare_dir is None else str(compare_dir),
                  dataset=dataset, split=split, n_test=int(test_set.table.n_records),
                  n_validation=int(val_set.table.n_records), val_fraction=val_fraction,
                  model_trained_on=trained_on or None,
                  # thresholds from a model's own training patients are tuned on data it fitted
                  validation_from_training_data=trained_on.get("dataset") == dataset)
    return result


def result_rows(result: dict) -> pd.DataFrame:
    """One row per (group, value, label): n, AUROC with CI, accuracy/sensitivity/specificity, and for
    'all' the statistical parity differences and the paired p-value (the CSV evaluate.py writes)."""
    rows = []
    groups = [("all", "all", result["overall"])] + [
        (name, value, summary) for name, values in result["subgroups"].items() for value, summary in values.items()]
    names = result["labels"] + ["macro"]
    for group, value, summary in groups:
        for c, label in enumerate(names):
            auroc = summary["auroc"]["macro"] if label == "macro" else summary["auroc"]["per_label"][c]
            row = {"group": group, "value": value, "label": label, "n": summary["n"], "auroc": auroc["auroc"],
                   "auroc_low": auroc["low"], "auroc_high": auroc["high"]}
            for metric in ("accuracy", "sensitivity", "specificity"):
                row[metric] = None if label == "macro" else summary[metric][c]
            if group == "all" and label != "macro":
                for kind, per_label in result["statistical_parity"].items():
                    for band, spd in per_label[c].items():
                        row[f"spd_{kind}_{band}"] = spd
            if group == "all" and "paired_test" in result:
                test = result["paired_test"]["macro" if label == "macro" else "per_label"]
                test = test if label == "macro" else test[c]
                row["auroc_difference"], row["p_value"] = test["difference"], test["p_value"]
            rows.append(row)
    return pd.DataFrame(rows)


def short_table(result: dict) -> str:
    """Macro AUROC with its CI overall and per subgroup value, and the p-value against --compare_dir."""
    def fmt(auroc):
        if auroc["auroc"] is None:
            return "n/a"
        ci = "" if auroc["low"] is None else f" [{auroc['low']:.3f}, {auroc['high']:.3f}]"
        return f"{auroc['auroc']:.3f}{ci}"

    lines = [f"{result['dataset']} {result['split']}: {result['n_test']} records, labels {', '.join(result['labels'])}",
             f"{'group':<28} {'n':>6}  macro AUROC (95 % CI, {result['n_resamples']} bootstrap resamples)",
             f"{'all':<28} {result['overall']['n']:>6}  {fmt(result['overall']['auroc']['macro'])}"]
    for name, values in result["subgroups"].items():
        for value, summary in values.items():
            lines.append(f"{name + '=' + value:<28} {summary['n']:>6}  {fmt(summary['auroc']['macro'])}")
    for kind, per_label in result["statistical_parity"].items():
        largest = largest_parity_gap(per_label)
        if largest is not None:
            lines.append(f"largest |statistical parity difference| by {kind}: {largest:.3f}")
    if "paired_test" in result:
        macro = result["paired_test"]["macro"]
        if macro["difference"] is not None:
            lines.append(f"macro AUROC difference vs --compare_dir: {macro['difference']:+.3f} "
                         f"(paired bootstrap p = {macro['p_value']:.4f})")
    return "\n".join(lines)


def write_result(result: dict, prefix) -> tuple:
    """PREFIX.json and PREFIX.csv (atomic writes)."""
    from pathlib import Path

    from medleak.io_utils import write_csv, write_json

    prefix = Path(prefix)
    json_path, csv_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
    write_json(json_path, result)
    write_csv(csv_path, result_rows(result))
    return json_path, csv_path


def define_flags(flag_values=None) -> None:
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    flags.DEFINE_string("model_dir", None, "a model saved by medleak (…/model of --eval_only or --save_weights)",
                        flag_values=flag_values)
    flags.DEFINE_string("dataset", None, "dataset to evaluate on (chexpert, mimic, chestxray14, …)", flag_values=flag_values)
    flags.DEFINE_string("data_root", None, "the dataset in its official layout", flag_values=flag_values)
    flags.DEFINE_string("compare_dir", None, "a second saved model: paired bootstrap p-value of the AUROC difference",
                        flag_values=flag_values)
    flags.DEFINE_string("split", "test", "split to evaluate on", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seed of the bootstrap resamples and of the validation patients", flag_values=flag_values)
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples (of patients) for the CIs and the p-value",
                         flag_values=flag_values)
    flags.DEFINE_float("val_fraction", 0.2, "share of the TRAIN split's patients the thresholds are chosen on",
                       flag_values=flag_values)
    flags.DEFINE_string("threshold_rule", "youden", f"decision threshold rule: {', '.join(THRESHOLD_RULES)}",
                        flag_values=flag_values)
    flags.DEFINE_string("labels", "shared", "labels scored: shared (all the model and dataset share) or "
                        "privacydomain (its five)", flag_values=flag_values)
    flags.DEFINE_string("output", None, "output prefix (default <model_dir>/../evaluation_<dataset>_<split>)",
                        flag_values=flag_values)
    flags.DEFINE_string("cache_dir", None, "image cache folder (default $MEDLEAK_CACHE_DIR or ~/.cache/medleak)",
                        flag_values=flag_values)


def main_from_flags(argv) -> int:
    from pathlib import Path

    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise MedleakError(f"unexpected argument(s) {argv[1:]}; all settings are --flags (see --help)")
    for name in ("model_dir", "dataset", "data_root"):
        if not FLAGS[name].value:
            raise MedleakError(f"--{name} is required (see --help)")
    result = evaluate_model(FLAGS.model_dir, FLAGS.dataset, FLAGS.data_root, compare_dir=FLAGS.compare_dir,
                            split=FLAGS.split, seed=FLAGS.seed, n_resamples=FLAGS.bootstrap,
                            val_fraction=FLAGS.val_fraction, threshold_rule=FLAGS.threshold_rule,
                            labels=FLAGS.labels, cache_dir=FLAGS.cache_dir)
    prefix = FLAGS.output or Path(FLAGS.model_dir).resolve().parent / f"evaluation_{FLAGS.dataset}_{FLAGS.split}"
    json_path, csv_path = write_result(result, prefix)
    print(short_table(result))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def main() -> None:
    """Console entry point `medleak-evaluate` (= python evaluate.py)."""
    from medleak.cli import quiet_console, run_absl

    quiet_console()
    define_flags()
    run_absl(main_from_flags)
