"""The audit's command line (`medleak-audit`, `python mem_inf_stats.py`): flags → `run_audit` or,
for several comma-separated logdirs, `budgets.compare_budgets`; prints where the report is.

The flags are generated from `AuditOptions`, one per field (its default, a flag type that follows
the default, the help below), so defaults live only in the dataclass; `--logdir` is the one extra.
"""

import dataclasses
import sys

from absl import flags

from medleak.cli import run_absl
from medleak.errors import MedleakError
from medleak.privacy_utils.audit import AuditOptions, run_audit

# AuditOptions field → help.
AUDIT_FLAG_HELP = {
    "out_dir": "Where tables, figures and report.html go (default: ./figs/<dataset>; several logdirs: ./figs/<dataset>_dp).",
    "dataset": "Name used in titles and the default --out_dir (default: from plan.json; another name than plan.json's is refused).",
    "eval_size": "Number of held-out target runs the attacks are evaluated on (0: about a quarter of the runs, at most 10).",
    "data_root": "Dataset root; only needed for the grid of most vulnerable images.",
    "seed": "Seed of RMIA's population sample, the shadow model dropped per record, and the noise-floor permutations.",
    "rmia_gamma": "RMIA γ: LR(x)/LR(z) must exceed it for x to beat a population record z.",
    "rmia_trim": "Share trimmed at each end of RMIA's mean over reference models.",
    "rmia_population": "Population records RMIA compares against.",
    "top_share": "Share of most vulnerable patients whose composition is tested.",
    "fdr": "False-discovery rate q of the Benjamini–Hochberg step that flags records and patients at risk.",
    "risk_auc": "A record or patient is at risk when significant after FDR control and its AUC is at least this.",
    "permutations": "Seeded permutations of each patient's IN/OUT bits that give every headline its chance level.",
    "record_permutations": "Permutations for the record-level chance levels (fewer than --permutations: one costs a pass over every record).",
    "target_se": "Standard error of record and patient AUC the run planner sizes the campaign for.",
    "progress": "Show progress bars while runs are read, scored and audited.",
    "cache": "Reuse the scores of unchanged runs from <logdir>/audit_cache/ (written there on first use); false: read and score every run.",
}
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}


def define_audit_flags(flag_values=flags.FLAGS, module_name=None) -> None:
    """Defines --logdir and one flag per AuditOptions field in `flag_values`."""
    module_name = module_name or sys.argv[0]
    flags.DEFINE_string("logdir", None, "Campaign logdir written by a dataset script (plan.json, runs/); several, "
                        "comma-separated, compare privacy budgets.", flag_values=flag_values, module_name=module_name)
    for field in dataclasses.fields(AuditOptions):
        define = _DEFINE.get(type(field.default), flags.DEFINE_string)  # None defaults (paths, names): strings
        define(field.name, field.default, AUDIT_FLAG_HELP[field.name], flag_values=flag_values, module_name=module_name)


def options_from_flags(flag_values=flags.FLAGS) -> AuditOptions:
    return AuditOptions(**{field.name: flag_values[field.name].value for field in dataclasses.fields(AuditOptions)})


def main_from_flags(argv, flag_values=flags.FLAGS) -> None:
    del argv
    if not flag_values.logdir:
        raise MedleakError("--logdir is required (the campaign directory written by e.g. chexpert.py)")
    options = options_from_flags(flag_values)
    if "," in flag_values.logdir:
        from medleak.privacy_utils.budgets import compare_budgets, parse_logdirs

        summary = compare_budgets(parse_logdirs(flag_values.logdir), options)
        for row in summary["budgets"]:
            print(f"{row['logdir']}: epsilon {row['target_epsilon']:g} ({row['unit']}), test AUROC {row['test_auroc_mean']:.3f}, "
                  f"AUC bound {row['auc_bound']:.3f}, records above it {100 * row['share_records_above_bound']:.1f} %, "
                  f"empirical epsilon >= {row['empirical_epsilon_lb']:.3g}")
        print(f"report: {summary['report']}")
        return
    summary = run_audit(flag_values.logdir, options)
    best = max(summary["attacks"], key=lambda k: summary["attacks"][k]["auc"]["mean"])
    print(f"{summary['n_runs']} runs, {summary['n_records']} records, {summary['n_patients']} patients")
    print(f"strongest attack: {best}, AUC {summary['attacks'][best]['auc']['mean']:.3f}")
    print(f"verdict: {summary['verdict']}")
    print(f"report: {summary['report']}")


def main() -> None:
    """Console entry point `medleak-audit` (and `python mem_inf_stats.py`)."""
    define_audit_flags()
    run_absl(main_from_flags)
