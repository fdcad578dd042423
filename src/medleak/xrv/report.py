"""report.html of the TorchXRayVision audit, built with the audit's page helpers."""

import html

from medleak.privacy_utils import report

ROC_HOWTO = ("Each curve is one attack on one public model: the share of its training images flagged "
             "(true-positive rate) against the share of never-seen images wrongly flagged (false-positive "
             "rate). The diagonal is guessing. The log-log panel shows the regime that matters: how many "
             "members are exposed with almost no false alarms.")
COMPOSITION_HOWTO = ("Share of each group among all member patients and among the most exposed 1 % "
                     "(highest RMIA score); numbers are Pearson residuals (beyond ±2: over- or under-represented).")


def write(path, results: dict, attack_table, roc_png):
    """results: {dataset: audit_dataset(...) output}; attack_table: attack_summary.csv as a DataFrame."""
    headline = []
    for dataset, result in results.items():
        summary = result["summary"]
        headline.append((f"{summary['target']} (RMIA AUC)", f"{summary['rmia']['auc']['mean']:.3f}",
                         f"{summary['n_members']} members vs {summary['n_nonmembers']} non-members of {dataset}"))
        headline.append((f"{summary['target']} (TPR at 1 % FPR)", f"{summary['rmia']['tpr_at_1%_fpr']['mean']:.3f}",
                         "members flagged when 1 in 100 non-members is wrongly flagged"))
    sections = [("Attack success", report.figure_html(roc_png, "ROC curves of offline RMIA and LiRA", ROC_HOWTO)
                 + report.table_html(attack_table))]
    for dataset, result in results.items():
        summary = result["summary"]
        parts = [f"<p>Target {html.escape(summary['target'])}, reference {html.escape(summary['reference'])}; "
                 f"RMIA a = {summary['rmia_a']:.2f} ({html.escape(summary['rmia_a_chosen'])}).</p>",
                 "<h3>Most exposed member patients</h3>",
                 report.table_html(result["patients"][result["patients"]["member"]], max_rows=10),
                 "<h3>Attack success by subgroup</h3>", report.table_html(result["by_subgroup"])]
        for attribute, png in result["composition_figures"]:
            parts.append(report.figure_html(png, f"{dataset}: {attribute} of the most exposed members",
                                            COMPOSITION_HOWTO))
        sections.append((f"{dataset}: {summary['target']}", "".join(parts)))
    notes = ["Members are rebuilt from TorchXRayVision's published split procedure (patient-grouped "
             "GroupShuffleSplit, seed 0, applied twice); see docs/XRV.md for its caveats.",
             "Only one public reference model exists, so these are offline attacks; a is never tuned on "
             "the model being attacked."]
    return report.write_report(path, dataset="TorchXRayVision public models", headline=headline,
                               sections=sections, notes=notes)
