"""Privacy audit of a shadow-model campaign: LiRA/RMIA attacks, record/patient/subgroup risk, report.

    python mem_inf_stats.py --logdir=./logs/fitzpatrick [--dataset=fitzpatrick] [--out_dir=./figs/fitzpatrick]

Reads every complete run of --logdir (ids, labels and subgroups come from its records.csv) and
writes record_risk.csv, patient_risk.csv, attack_summary.json, figures (PNG + PDF) and a
self-contained report.html into --out_dir (default ./figs/<dataset>). --data_root adds a grid of the
most vulnerable images.

    python mem_inf_stats.py --logdir=logs/dp_eps1/chexpert,logs/dp_eps8/chexpert,logs/dp_epsinf/chexpert

Several comma-separated logdirs of one dataset (e.g. campaigns at different --epsilon, from
scripts/dp_all.sh): each is audited into <out_dir>/<logdir name>/, and the comparison across privacy
budgets (budgets.csv, eSF per epsilon with its AUC bound, utility against epsilon, budgets.html) goes
into --out_dir (default ./figs/<dataset>_dp).
"""

from absl import app, flags

from medleak.cli import main_guard

FLAGS = flags.FLAGS
flags.DEFINE_string("logdir", None, "Campaign logdir written by a dataset script (plan.json, runs/); several, comma-separated, "
                    "compare privacy budgets.")
flags.DEFINE_string("dataset", None, "Name used in titles and the default --out_dir (default: from plan.json).")
flags.DEFINE_string("out_dir", None, "Where tables, figures and report.html go (default: ./figs/<dataset>).")
flags.DEFINE_string("data_root", None, "Dataset root; only needed for the grid of most vulnerable images.")
flags.DEFINE_integer("eval_size", 10, "Number of held-out target runs the attacks are evaluated on.")
flags.DEFINE_integer("seed", 0, "Seed for RMIA's population sample.")
flags.DEFINE_float("rmia_gamma", 1.0, "RMIA γ: LR(x)/LR(z) must exceed it for x to beat a population record z.")
flags.DEFINE_float("rmia_trim", 0.1, "Share trimmed at each end of RMIA's mean over reference models.")
flags.DEFINE_integer("rmia_population", 10_000, "Population records RMIA compares against.")
flags.DEFINE_float("top_share", 0.01, "Share of most vulnerable patients whose composition is tested.")


@main_guard
def main(argv):
    del argv
    from medleak.errors import MedleakError
    from medleak.privacy_utils.audit import AuditOptions, run_audit

    if not FLAGS.logdir:
        raise MedleakError("--logdir is required (the campaign directory written by e.g. chexpert.py)")
    options = AuditOptions(out_dir=FLAGS.out_dir, dataset=FLAGS.dataset, eval_size=FLAGS.eval_size, data_root=FLAGS.data_root,
                           seed=FLAGS.seed, rmia_gamma=FLAGS.rmia_gamma, rmia_trim=FLAGS.rmia_trim,
                           rmia_population=FLAGS.rmia_population, top_share=FLAGS.top_share)
    if "," in FLAGS.logdir:
        from medleak.privacy_utils.budgets import compare_budgets, parse_logdirs

        summary = compare_budgets(parse_logdirs(FLAGS.logdir), options)
        for row in summary["budgets"]:
            print(f"{row['logdir']}: epsilon {row['target_epsilon']:g} ({row['unit']}), test AUROC {row['test_auroc_mean']:.3f}, "
                  f"AUC bound {row['auc_bound']:.3f}, records above it {100 * row['share_records_above_bound']:.1f} %, "
                  f"empirical epsilon >= {row['empirical_epsilon_lb']:.3g}")
        print(f"report: {summary['report']}")
        return
    summary = run_audit(FLAGS.logdir, options)
    best = max(summary["attacks"], key=lambda k: summary["attacks"][k]["auc"]["mean"])
    print(f"{summary['n_runs']} runs, {summary['n_records']} records, {summary['n_patients']} patients")
    print(f"strongest attack: {best}, AUC {summary['attacks'][best]['auc']['mean']:.3f}")
    print(f"patients with AUC > 0.6: {100 * summary['patient_auc_max']['share_above']['0.6']:.1f} %")
    print(f"report: {summary['report']}")


if __name__ == "__main__":
    app.run(main)
