"""The audit's pages and every sentence on them: report.html of one campaign (`audit_page`) and
budgets.html across privacy budgets (`budget_page`); `write_report` is the HTML frame they share.

Each page is self-contained (figures embedded as base64) and written for a data officer: a verdict
in one paragraph, headline numbers each beside its chance level, then each figure with a short "how
to read it", then the most vulnerable patients.
"""

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from medleak.io_utils import write_text
from medleak.privacy_utils.calibration import ADJUSTMENT_SENTENCE
from medleak.privacy_utils.figures import epsilon_text

N_TOP_PATIENTS_SHOWN = 20
EMPIRICAL_EPSILON_NOTE = ("empirical epsilon: the one-run audit (Steinke, Nasr & Jagielski 2023) of each held-out "
                          "target model, its patients as canaries (record-level DP: single-image patients only), each "
                          "with its own IN/OUT coin in that run; a lower bound at 95 % confidence, Bonferroni over "
                          "targets and attacks; 0 means the attack proved nothing, not that epsilon is 0")

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.headline{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.7em 1em;min-width:200px}
.card b{font-size:1.5em;display:block}.howto{background:#f7f9fc;border-left:4px solid #4a7bd0;padding:.5em 1em;font-size:.92em}
.verdict{font-size:1.08em;background:#fff8e6;border-left:4px solid #d09a1a;padding:.6em 1em}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}.warn{color:#a33}
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


def write_report(path, *, dataset, headline, sections, notes=(), verdict_text=None):
    """Writes the page. headline: [(label, value, explanation)]; sections: [(title, html)];
    verdict_text: the one-paragraph verdict shown above everything else."""
    cards = "".join(f'<div class="card">{html.escape(label)}<b>{html.escape(value)}</b><small>{html.escape(expl)}</small></div>'
                    for label, value, expl in headline)
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    verdict_html = f'<p class="verdict" id="verdict"><b>Verdict.</b> {html.escape(verdict_text)}</p>' if verdict_text else ""
    note_html = "".join(f'<p class="warn">{html.escape(n)}</p>' for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medleak privacy audit: {html.escape(dataset)}</title>
<style>{STYLE}</style></head>
<body><h1>Patient-level privacy audit: {html.escape(dataset)}</h1>
<p>This report estimates, for every training image and every patient, how well an attacker who
holds the released model could tell that they were in its training data (membership inference).
An attack AUC of 0.5 means the attacker cannot tell (no leak); 1.0 means they can always tell.</p>
{verdict_html}{note_html}
<div class="headline">{cards}</div>{body}
</body></html>
"""
    write_text(path, page)
    return Path(path)


def _pct(x):
    return f"{100 * x:.1f} %"


# --------------------------------------------------------------------- report.html (one campaign)


def _chance_text(floor, fmt=_pct):
    """'chance c (95 % up to hi); excess e [lo, hi]' of a `noise_floor.compare_to_chance` dict."""
    return (f"chance level {fmt(floor['chance_mean'])} (95 % up to {fmt(floor['chance_hi'])}); "
            f"excess {fmt(floor['excess'])} [{fmt(floor['excess_lo'])}, {fmt(floor['excess_hi'])}]")


def _auc(x):
    return f"{x:.3f}"


def above_chance(floor) -> bool:
    """True when the observed value lies above the whole chance interval (its excess interval excludes 0)."""
    return floor["excess_lo"] > 0


MIN_GROUP_PATIENTS = 10  # a group smaller than this is not named as "most exposed"
MIN_GROUP_AT_RISK = 5  # nor one with fewer patients at risk: a handful of flagged patients says nothing about groups


def most_exposed_group(privacy_table, level=0.05):
    """The group whose at-risk share most exceeds the other patients' after adjusting for images per
    patient, when that excess is significant at `level` with a Bonferroni correction over all the
    groups compared (one-sided z-test on the adjusted difference); else None."""
    if privacy_table is None or privacy_table.empty:
        return None
    z_needed = stats.norm.isf(level / len(privacy_table))
    n_at_risk = privacy_table["at_risk_share"] * privacy_table["n_patients"]
    table = privacy_table[(privacy_table["n_patients"] >= MIN_GROUP_PATIENTS) & (n_at_risk >= MIN_GROUP_AT_RISK - 1e-9)]
    z = table["at_risk_difference_adjusted"] / table["at_risk_difference_adjusted_se"]
    table = table[z.fillna(-np.inf) > z_needed]
    if table.empty:
        return None
    return table.sort_values("at_risk_difference_adjusted", ascending=False).iloc[0]


def verdict(summary, privacy_table) -> str:
    """The report's one-paragraph answer, computed from the calibrated numbers only."""
    patients = summary["noise_floor"]["patients"]["at_risk"]
    strongest = summary["noise_floor"]["strongest_attack"]
    attack_name, attack = strongest["strongest"], strongest["max_auc"]
    design = (f"{summary['n_runs']} runs ({summary['n_shadows']} shadows + {summary['n_targets']} targets per attack)")
    attack_text = (f"the strongest attack ({attack_name}) reaches AUC {_auc(attack['observed'])} on held-out models, "
                   f"against {_auc(attack['chance_mean'])} by chance (95 % up to {_auc(attack['chance_hi'])})")
    n_at_risk = summary["patient_risk"]["n_at_risk"]
    if not above_chance(patients) and not above_chance(attack):
        return (f"No leakage detectable above chance with {design}: {_pct(patients['observed'])} of patients are flagged "
                f"at risk, {_chance_text(patients)}; {attack_text}. This is not proof of privacy: weaker leaks than "
                f"these runs can resolve may remain (see the run planner below).")
    text = (f"{n_at_risk} of {summary['n_patients']} patients ({_pct(patients['observed'])}) are identifiable above chance "
            f"(Benjamini–Hochberg FDR {summary['fdr']:g}, patient AUC ≥ {summary['risk_auc']:g}; {_chance_text(patients)}); "
            f"{attack_text}.")
    group = most_exposed_group(privacy_table)
    if group is None:
        return text + (" No subgroup is significantly more exposed than the other patients after adjusting for images "
                       "per patient (Bonferroni over the groups compared).")
    return text + (f" The most exposed group is {group['attribute']} = {group['category']}: {_pct(group['at_risk_share'])} of its "
                   f"{int(group['n_patients'])} patients at risk, {_pct(group['at_risk_difference_adjusted'])} "
                   f"(± {_pct(group['at_risk_difference_adjusted_se'])}) more than comparable patients with as many images.")


def _planner_html(planner):
    rows = []
    for unit, plan in planner.items():
        if plan.get("n_runs") is None and "note" in plan:
            rows.append({"unit": unit, "runs for target SE": "–", "note": plan["note"]})
            continue
        ladder = ", ".join(f"{n}: {se:.3f}" for n, se in plan.get("se_by_runs", {}).items())
        rows.append({"unit": unit, "runs for target SE": "more than 2000" if plan["n_runs"] is None else str(plan["n_runs"]),
                     "note": f"median SE by runs: {ladder}"})
    target = next(iter(planner.values()))["target_se"]
    return (f"<p>How many runs give a standard error of {target:g} for the median record's and patient's AUC, "
            "from this campaign's own variances (DeLong components, the same share of runs per patient):</p>"
            + table_html(pd.DataFrame(rows)))


def audit_page(out_dir, summary, attacks, patient_table, privacy_table, utility_table, figs, slugs, unreadable_images=()):
    """Writes <out_dir>/report.html of one audit (`audit.audit_campaign`); returns its path.

    attacks: {name: (summary dict, tpr curves)}; figs: {key: PNG path}; slugs: {attribute: figure slug};
    unreadable_images: paths under --data_root of top images that could not be read.
    """
    floors = summary["noise_floor"]
    strongest = floors["strongest_attack"]
    best = attacks[strongest["strongest"]][0]
    patients_at_risk, records_at_risk = floors["patients"]["at_risk"], floors["records"]["at_risk"]
    top_patient = patient_table.iloc[0]
    headline = [
        ("Shadow models", f"{summary['n_shadows']} shadows + {summary['n_targets']} targets",
         f"{summary['n_runs']} runs; {summary['n_records']} images of {summary['n_patients']} patients"),
        ("Strongest attack", f"AUC {_auc(strongest['max_auc']['observed'])}",
         f"{strongest['strongest']}; {_chance_text(strongest['max_auc'], _auc)}; "
         f"TPR {_pct(best['tpr_at_1%_fpr']['mean'])} at 1 % FPR"),
        ("Patients at risk", _pct(patients_at_risk["observed"]), _chance_text(patients_at_risk)),
        ("Records at risk", _pct(records_at_risk["observed"]), _chance_text(records_at_risk)),
        ("Most exposed patient", f"AUC {_auc(top_patient['auc'])}",
         f"{top_patient['patient_id']}; p = {top_patient['p_value']:.2g}, q = {top_patient['q_value']:.2g}"),
    ]
    sections = []
    attack_floor = strongest["per_attack"]
    attack_rows = pd.DataFrame([
        {"attack": name, "AUC mean": s["auc"]["mean"], "AUC sd": s["auc"]["sd"],
         "AUC by chance": attack_floor[name]["chance_mean"], "chance 95 % up to": attack_floor[name]["chance_hi"],
         "TPR @ 0.1 % FPR": s["tpr_at_0.1%_fpr"]["mean"], "TPR @ 1 % FPR": s["tpr_at_1%_fpr"]["mean"]}
        for name, (s, _) in attacks.items()])
    sections.append(("Attacks on held-out models", "".join((
        table_html(attack_rows),
        figure_html(figs["roc"], "ROC curves of each attack (mean ± sd over target models)",
                    "Each curve trades false alarms (x) against caught members (y) for one attack. The dashed diagonal is "
                    "guessing. What matters for privacy is the left edge of the log-log panel: a curve far above the "
                    "diagonal at 0.1 % false-positive rate means some patients can be identified with confidence."),
        f"<p>Targets: runs {summary['target_runs']}, each attacked with the other runs as shadows less one model per "
        f"record ({summary['n_shadows']} shadows), so the shadows that describe a record do not depend on whether it is "
        "in the target. Chance levels come from permuting each patient's membership across the targets "
        f"({strongest['n_permutations']} permutations, seed {strongest['seed']}); TPR at 1 % FPR is 1 % by chance.</p>"))))
    share_rows = []
    for unit in ("records", "patients"):
        floor = floors[unit]
        for t, f in floor["share_above"].items():
            share_rows.append({"unit": unit, "AUC above": t, "observed": f["observed"], "by chance": f["chance_mean"],
                               "chance 95 % up to": f["chance_hi"], "excess": f["excess"]})
        share_rows.append({"unit": unit, "AUC above": "at risk", "observed": floor["at_risk"]["observed"],
                           "by chance": floor["at_risk"]["chance_mean"], "chance 95 % up to": floor["at_risk"]["chance_hi"],
                           "excess": floor["at_risk"]["excess"]})
    sections.append(("Record and patient risk", "".join((
        f"<p>Each record and each patient is ranked IN against OUT over all {summary['n_runs']} models: its AUC is the "
        "share of (IN model, OUT model) pairs in which the IN model scores it higher, with an exact p-value. A patient "
        "is scored as one unit per model (the mean of its images' standardised scores), so a patient with many images "
        f"is not flagged more often by chance. <i>At risk</i>: q-value ≤ {summary['fdr']:g} (Benjamini–Hochberg over "
        f"patients) and AUC ≥ {summary['risk_auc']:g}. Chance levels: seeded permutations of each patient's "
        f"IN/OUT bits across models ({floors['patients']['n_permutations']} for patients, "
        f"{floors['records']['n_permutations']} for records).</p>",
        table_html(pd.DataFrame(share_rows)),
        figure_html(figs["esf_records"], "Share of images whose attack AUC exceeds x",
                    "Read a point (x, y) as: a share y of images can be attacked with AUC above x. The y-axis is "
                    "logarithmic, so the rare, most exposed images are visible at the right; the shaded band is the "
                    "95 % confidence interval, the grey dashed line what the same campaign shows when nothing leaks."),
        figure_html(figs["esf_patients"], "Share of patients whose AUC exceeds x",
                    "The same for patients, each scored as one unit: this is the number to discuss with a "
                    "data-protection officer. Only the part of the curve above the grey chance band is leakage.")))))
    sections.append(("How many runs are enough", _planner_html(summary["run_planner"])))
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
    if parts or not privacy_table.empty:
        sections.append(("Subgroups and diagnoses", "".join(parts) + (
            "<p>Differences are each group against all other patients, raw and adjusted for images per patient. "
            f"{ADJUSTMENT_SENTENCE}</p>" + table_html(privacy_table) if not privacy_table.empty else "")))
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
    return write_report(Path(out_dir) / "report.html", dataset=summary["dataset"], headline=headline, sections=sections,
                        notes=notes, verdict_text=summary["verdict"])


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
        "patients at risk (chance)": chance_text(table, "at_risk", _pct),
        "strongest attack AUC (chance)": chance_text(table, "strongest_attack_auc", "{:.3f}".format),
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
            "<b>Empirical ε.</b> From the strongest LiRA or loss-threshold attack on the held-out models (RMIA "
            f"is left out: its scores are population ranks); {EMPIRICAL_EPSILON_NOTE}. "
            "<b>Chance level.</b> Beside the patients-at-risk share and the strongest attack's AUC of each "
            "campaign's own audit: their value when nothing leaks (mean and 95 % interval over permutations of "
            "each patient's IN/OUT bits, from that audit's noise floor); a number inside its chance interval "
            "is not evidence of leakage.</p>")),
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


def chance_text(table, stem, fmt):
    """"observed (chance mean [lo, hi])" per budgets.csv row from `budgets.chance_columns`' columns;
    "–" where the audit reported no noise floor."""
    columns = [stem, f"chance_{stem}", f"chance_{stem}_lo", f"chance_{stem}_hi"]
    if not set(columns) <= set(table.columns):
        return ["–"] * len(table)
    out = []
    for observed, mean, lo, hi in table[columns].to_numpy(float):
        if not np.isfinite(observed):
            out.append("–")
        elif not np.isfinite(mean):
            out.append(fmt(observed))
        else:
            out.append(f"{fmt(observed)} ({fmt(mean)} [{fmt(lo)}, {fmt(hi)}])")
    return out
