"""The audit's pages and every sentence on them: report.html of one campaign (`audit_page`) and
budgets.html across privacy budgets (`budget_page`); `write_report` is the HTML frame they share.

Each page is self-contained (figures embedded as base64) and written for a data officer: headline
numbers first, then each figure with a short "how to read it", then the most vulnerable patients.
A tiny inline script marks every figure that decoded (`data-loaded`) and writes
"figures loaded: k/n" into the page, so a headless browser can check that nothing is broken.
"""

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.io_utils import write_text
from medleak.privacy_utils.figures import epsilon_text

N_TOP_PATIENTS_SHOWN = 20
INDEPENDENCE_NOTE = ("empirical epsilon: one trial per patient of each held-out target model (record-level DP: single-image "
                     "patients only); trials of one model share its training randomness and are not independent, so the "
                     "lower bound is optimistic (a diagnostic)")

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.headline{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.7em 1em;min-width:200px}
.card b{font-size:1.5em;display:block}.howto{background:#f7f9fc;border-left:4px solid #4a7bd0;padding:.5em 1em;font-size:.92em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}.warn{color:#a33}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok++; img.setAttribute('data-loaded', 'yes'); } });
  document.getElementById('figure-status').textContent = 'figures loaded: ' + ok + '/' + imgs.length;
});
"""


def embed_png(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table_html(df, float_format="{:.3f}", max_rows=None) -> str:
    df = df if max_rows is None else df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for value in row:
            if isinstance(value, (float, np.floating)):
                text = float_format.format(value) if np.isfinite(value) else "–"
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def figure_html(path, caption, howto) -> str:
    return (f'<figure><img class="figure" alt="{html.escape(caption)}" src="{embed_png(path)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure><div class=\"howto\"><b>How to read it.</b> {howto}</div>")


def write_report(path, *, dataset, headline, sections, notes=()):
    """Writes the page. headline: [(label, value, explanation)]; sections: [(title, html)]."""
    cards = "".join(f'<div class="card">{html.escape(label)}<b>{html.escape(value)}</b><small>{html.escape(expl)}</small></div>'
                    for label, value, expl in headline)
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    note_html = "".join(f'<p class="warn">{html.escape(n)}</p>' for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medleak privacy audit: {html.escape(dataset)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body><h1>Patient-level privacy audit: {html.escape(dataset)}</h1>
<p>This report estimates, for every training image and every patient, how well an attacker who
holds the released model could tell that they were in its training data (membership inference).
An attack AUC of 0.5 means the attacker cannot tell (no leak); 1.0 means they can always tell.</p>
<p id="figure-status">figures loaded: not checked (JavaScript disabled)</p>{note_html}
<div class="headline">{cards}</div>{body}
</body></html>
"""
    write_text(path, page)
    return Path(path)


def _pct(x):
    return f"{100 * x:.1f} %"


# --------------------------------------------------------------------- report.html (one campaign)


def audit_page(out_dir, summary, attacks, patient_table, privacy_table, utility_table, figs, slugs, unreadable_images=()):
    """Writes <out_dir>/report.html of one audit (`audit.audit_campaign`); returns its path.

    attacks: {name: (summary dict, tpr curves)}; figs: {key: PNG path}; slugs: {attribute: figure slug};
    unreadable_images: paths under --data_root of top images that could not be read.
    """
    best_name = max(attacks, key=lambda k: attacks[k][0]["auc"]["mean"])
    best = attacks[best_name][0]
    headline = [
        ("Shadow models", f"{summary['n_runs']}", f"{summary['n_records']} images of {summary['n_patients']} patients"),
        ("Strongest attack", f"AUC {best['auc']['mean']:.3f}", f"{best_name}; TPR {_pct(best['tpr_at_0.1%_fpr']['mean'])} at 0.1 % FPR"),
        ("Patients at risk", _pct(summary["patient_auc_max"]["share_above"]["0.6"]), "have an image with attack AUC > 0.6"),
        ("Highly exposed patients", _pct(summary["patient_auc_max"]["share_above"]["0.8"]), "have an image with attack AUC > 0.8"),
        ("Most exposed patient", f"AUC {summary['patient_auc_max']['max']:.3f}", str(patient_table["patient_id"].iloc[0])),
    ]
    sections = []
    attack_rows = pd.DataFrame([
        {"attack": name, "AUC mean": s["auc"]["mean"], "AUC sd": s["auc"]["sd"],
         "TPR @ 0.1 % FPR": s["tpr_at_0.1%_fpr"]["mean"], "TPR @ 1 % FPR": s["tpr_at_1%_fpr"]["mean"]}
        for name, (s, _) in attacks.items()])
    sections.append(("Attacks on held-out models", "".join((
        table_html(attack_rows),
        figure_html(figs["roc"], "ROC curves of each attack (mean ± sd over target models)",
                    "Each curve trades false alarms (x) against caught members (y) for one attack. The dashed diagonal is "
                    "guessing. What matters for privacy is the left edge of the log-log panel: a curve far above the "
                    "diagonal at 0.1 % false-positive rate means some patients can be identified with confidence."),
        f"<p>Targets: runs {summary['target_runs']} held out; {summary['n_shadows']} shadow models. "
        f"RMIA offline a = {summary['rmia_offline_a']} (tuned on a shadow model).</p>"))))
    shares = pd.DataFrame([{"AUC above": t, "records": summary["record_auc"]["share_above"][t],
                            "patients": summary["patient_auc_max"]["share_above"][t]} for t in summary["record_auc"]["share_above"]])
    sections.append(("Record and patient risk", "".join((
        table_html(shares),
        figure_html(figs["esf_records"], "Share of images whose attack AUC exceeds x",
                    "Read a point (x, y) as: a share y of images can be attacked with AUC above x. The y-axis is "
                    "logarithmic, so the rare, most exposed images are visible at the right; the shaded band is the "
                    "95 % confidence interval."),
        figure_html(figs["esf_patients"], "Share of patients whose most exposed image exceeds x",
                    "The same for patients, each represented by their most exposed image: this is the number to "
                    "discuss with a data-protection officer.")))))
    top = patient_table.head(N_TOP_PATIENTS_SHOWN)
    sections.append((f"The {len(top)} most vulnerable patients", table_html(top)))
    parts = []
    for attribute, slug in slugs.items():
        parts.append(figure_html(figs[f"group_esf_{slug}"], f"Patient risk by {attribute}",
                                 "One curve per group; a curve lying higher means that group's patients are more exposed."))
        comp = figs.get(f"composition_{slug}")
        if comp is not None:
            parts.append(figure_html(comp, f"Who is among the top {_pct(summary['top_share'])} most vulnerable patients ({attribute})",
                                     "Blue: the group's share of all patients; orange: its share among the most vulnerable. "
                                     "Numbers are Pearson residuals: above +2 or below −2 the group is clearly over- or "
                                     "under-represented; the title's χ² p-value tests the whole composition."))
        util = figs.get(f"utility_{slug}")
        if util is not None:
            parts.append(figure_html(util, f"Utility and privacy side by side ({attribute})",
                                     "Left: how well the models work for each group (test AUROC). Right: how exposed the "
                                     "group's patients are. Fairness concerns both."))
    sections.append(("Subgroups and diagnoses", "".join(parts) + table_html(privacy_table)))
    if utility_table is not None:
        sections.append(("Model utility by subgroup", table_html(utility_table)))
    if "vulnerable_images" in figs:
        sections.append(("Most vulnerable images", figure_html(
            figs["vulnerable_images"], "Images with the highest record-level attack AUC",
            "Outliers and unusual acquisitions are typically memorised first; these are the images a release would expose most.")))
    notes = []
    if unreadable_images:
        notes.append(f"{len(unreadable_images)} of the top images could not be read under --data_root (e.g. {unreadable_images[0]})")
    if summary["skipped_runs"]:
        notes.append(f"Skipped runs: {summary['skipped_runs']}")
    notes += list(summary.get("warnings", []))
    return write_report(Path(out_dir) / "report.html", dataset=summary["dataset"], headline=headline, sections=sections, notes=notes)


# --------------------------------------------------------------------- budgets.html (several ε)


def budget_page(out_dir, dataset, table, subgroup_table, figs):
    """Writes <out_dir>/budgets.html from budgets.csv's rows (`budgets.compare_budgets`); returns its path."""
    shown = pd.DataFrame({
        "ε target": [epsilon_text(e) for e in table["target_epsilon"]], "ε spent": table["spent_epsilon"],
        "δ": [f"{d:.2g}" for d in table["delta"]], "unit": table["unit"], "σ": table["sigma_min"],
        "test AUROC": [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["test_auroc_mean"], table["test_auroc_sd"])],
        "AUC bound": table["auc_bound"], "records > bound": table["share_records_above_bound"],
        "patients > bound": table["share_patients_above_bound"], "max record AUC": table["max_record_auc"],
        "empirical ε ≥": table["empirical_epsilon_lb"], "attack": table["attack"],
    })
    record_level = (table["unit"] == "record").any()
    headline = [
        ("Budgets compared", str(len(table)), ", ".join(epsilon_text(e) for e in table["target_epsilon"])),
        ("Strictest budget", f"ε = {epsilon_text(table['target_epsilon'].iloc[0])}",
         f"test AUROC {table['test_auroc_mean'].iloc[0]:.3f}; max record AUC {table['max_record_auc'].iloc[0]:.3f}"),
        ("Reference (largest ε)", f"ε = {epsilon_text(table['target_epsilon'].iloc[-1])}",
         f"test AUROC {table['test_auroc_mean'].iloc[-1]:.3f}; max record AUC {table['max_record_auc'].iloc[-1]:.3f}"),
    ]
    unit_text = ("<p><b>Which unit is protected.</b> Record-level DP protects one image. A patient with k images "
                 "is then protected only through group privacy, roughly (kε, k·e<sup>(k−1)ε</sup>·δ), which is much "
                 "weaker; the dashed lines of the patient-level figure for record-level campaigns are those group "
                 "bounds. The patient-level risk of this audit (patients are IN or OUT as a whole) should be compared "
                 "with a <i>patient-level</i> guarantee (<code>--dp_unit=patient</code>). Strictly, the same holds for a "
                 "record of a multi-image patient: its IN/OUT models differ by all of the patient's images, so the "
                 "single-image bound describes the guarantee, not a hard limit for that record's AUC in this audit.</p>")
    sections = [
        ("Privacy budgets", table_html(shown) + unit_text + (
            "<p>The AUC bound is what the guarantee implies for any membership test on one unit (from the trained "
            "models' privacy profile, for the weakest run). Records whose estimated AUC exceeds it by more than two "
            "standard errors would contradict the guarantee; a few above it are expected from estimation noise. "
            "<b>Empirical ε.</b> A Clopper–Pearson lower bound (95 %, Bonferroni over thresholds and attacks) from the "
            "strongest LiRA or loss-threshold attack "
            f"on held-out models (RMIA is not re-run here); {INDEPENDENCE_NOTE}.</p>")),
        ("Risk per budget", "".join((
            figure_html(figs["esf_records"], "Record-level risk per ε, with each guarantee's AUC bound",
                        "Each curve is the share of images whose attack AUC exceeds x (log scale, 95 % band). "
                        "The vertical line of the same colour is the largest AUC the guarantee allows: the curve "
                        "should drop to zero left of it."),
            figure_html(figs["esf_patients"], "Patient-level risk per ε, with patient-level bounds",
                        "Share of patients whose worst image has attack AUC above x. For record-level DP the "
                        "line is the group-privacy bound of the patient with the most images."),
        ))),
        ("Utility against ε", "".join(
            [figure_html(figs["utility"], "Test utility against ε",
                         "Mean ± sd over the shadow models of test macro AUROC and accuracy; ∞ is ordinary training.")]
            + [figure_html(path, f"Utility per subgroup against ε ({key[len('subgroup_'):]})",
                           "Test macro AUROC per subgroup value: DP often costs small groups more.")
               for key, path in figs.items() if key.startswith("subgroup_")]
            + [table_html(subgroup_table)])),
    ]
    notes = ["Record-level guarantees on patients with several images: see 'Which unit is protected'."] if record_level else []
    return write_report(Path(out_dir) / "budgets.html", dataset=f"{dataset}: privacy budgets", headline=headline,
                        sections=sections, notes=notes)
