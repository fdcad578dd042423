"""The audit of one campaign logdir: load → record risk → patient risk → attacks → subgroups →
figures → CSV/JSON tables → report.html. `run_audit` is what `mem_inf_stats.py` calls.

Attacks are evaluated against `eval_size` held-out target runs (the last runs); the other runs are
the shadows, shared by all targets, so shadow statistics are computed once per score type.
"""

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.io_utils import write_csv, write_json
from medleak.privacy_utils import figures, report
from medleak.privacy_utils.lira import campaign_stats, lira_from_stats, shadow_stats
from medleak.privacy_utils.load import load_campaign
from medleak.privacy_utils.risk import (patient_risk, record_auc_from_moments,
                                    require_in_and_out, share_above)
from medleak.privacy_utils.rmia import (DEFAULT_GAMMA, DEFAULT_POPULATION, population_indices,
                                    reference_probability, rmia_from_reference, tune_offline_a)
from medleak.privacy_utils.roc import FPR_GRID, summarise_attack
from medleak.privacy_utils.scores import log_p_from_lira, rmia_from_lira
from medleak.privacy_utils.subgroups import (TOP_SHARE, composition, patient_attributes, privacy_by_subgroup,
                                         record_label_text, utility_by_subgroup)

N_TOP_PATIENTS_SHOWN = 20
N_GRID_IMAGES = 16


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    out_dir: Path | None = None
    dataset: str | None = None
    eval_size: int = 10
    data_root: Path | None = None
    seed: int = 0
    rmia_gamma: float = DEFAULT_GAMMA
    rmia_trim: float = 0.1
    rmia_population: int = DEFAULT_POPULATION
    top_share: float = TOP_SHARE
    progress: bool = True


def check_options(options: AuditOptions) -> None:
    """Refuses bad audit settings up front (before loading runs), naming mem_inf_stats.py's flag."""
    if options.eval_size < 1:
        raise MedleakError(f"--eval_size must be ≥ 1, got {options.eval_size}")
    if not 0.0 < options.top_share <= 1.0:
        raise MedleakError(f"--top_share must lie in (0, 1], got {options.top_share}")
    if not 0.0 <= options.rmia_trim < 0.5:
        raise MedleakError(f"--rmia_trim must lie in [0, 0.5), got {options.rmia_trim}")
    if not options.rmia_gamma > 0:
        raise MedleakError(f"--rmia_gamma must be > 0, got {options.rmia_gamma}")
    if options.rmia_population < 1:
        raise MedleakError(f"--rmia_population must be at least 1, got {options.rmia_population}")
    if options.data_root is not None and not Path(options.data_root).is_dir():
        raise MedleakError(f"--data_root={options.data_root} is not a directory (it is only needed for the image grid)")


def split_targets(n_runs, eval_size):
    """(target rows, shadow rows): the last `eval_size` runs are targets, clamped to leave ≥ 2 shadows."""
    if eval_size < 1:
        raise MedleakError(f"--eval_size must be ≥ 1, got {eval_size}")
    n_targets = min(eval_size, n_runs - 2) if n_runs >= 3 else 1
    if n_targets < eval_size:
        warnings.warn(f"only {n_runs} runs: evaluating attacks on {n_targets} target(s) instead of --eval_size={eval_size}", stacklevel=2)
    return np.arange(n_runs - n_targets, n_runs), slice(0, n_runs - n_targets)


LIRA_VARIANTS = (("LiRA online", {}), ("LiRA online, fixed variance", {"fix_variance": True}),
                 ("LiRA offline", {"offline": True}), ("LiRA offline, fixed variance", {"offline": True, "fix_variance": True}))


@dataclasses.dataclass
class AuditResult:
    summary: dict  # what attack_summary.json holds, plus the report path
    attack_scores: dict  # attack name → (n_targets, n_records) membership scores of the held-out targets
    target_masks: np.ndarray  # (n_targets, n_records) bool: the targets' true membership


def attack_suite(campaign, options, split=None, stats=None):
    """All attacks against the held-out targets.

    Returns ({name: (summary dict, tpr curves)}, extras, {name: (n_targets, n_records) scores}, target masks).
    `split` (targets, shadows) and the shadows' LiRA `stats`, if already computed (`run_audit`
    computes them in its pass over the scores, `campaign_stats`).
    """
    targets, shadows = split if split is not None else split_targets(campaign.n_runs, options.eval_size)
    scores, masks = campaign.scores, campaign.masks
    target_scores = scores[targets[0]:targets[-1] + 1]
    target_masks = masks[targets[0]:targets[-1] + 1]
    shadow_scores, shadow_masks = scores[shadows], masks[shadows]
    results, attack_scores = {}, {}

    def evaluate(name, target_attack_scores):
        attack_scores[name] = target_attack_scores
        results[name] = summarise_attack(target_attack_scores, target_masks)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stats is None:
            stats = shadow_stats(shadow_scores, shadow_masks)
        for name, kwargs in LIRA_VARIANTS:
            evaluate(name, lira_from_stats(stats, target_scores, **kwargs))
        del stats
        population = population_indices(scores.shape[1], options.rmia_population, options.seed)
        target_p = rmia_from_lira(target_scores)
        p_stats = shadow_stats(shadow_scores, shadow_masks, medians=False, trim=options.rmia_trim or None, transform=rmia_from_lira)
        online = rmia_from_reference(reference_probability(p_stats), target_p, gamma=options.rmia_gamma, population=population)
        evaluate("RMIA online", online)
        a = None
        if shadow_scores.shape[0] >= 2 and 0 < shadow_masks[0].sum() < shadow_masks.shape[1]:
            a, _ = tune_offline_a(shadow_scores, shadow_masks, trim=options.rmia_trim, gamma=options.rmia_gamma,
                                  population=population, transform=rmia_from_lira)
            offline = rmia_from_reference(reference_probability(p_stats, offline=True, a=a), target_p,
                                          gamma=options.rmia_gamma, population=population)
            evaluate("RMIA offline", offline)
        del p_stats
        # Global loss threshold (Yeom et al.): the target's own log-likelihood, no shadow models.
        loss_scores = log_p_from_lira(target_scores).mean(axis=2)
        evaluate("Loss threshold", loss_scores)
    messages = sorted({str(w.message) for w in caught})
    for message in messages:
        warnings.warn(message, stacklevel=2)
    extras = {"target_runs": campaign.run_ids[targets].tolist(), "n_shadows": int(shadow_scores.shape[0]),
              "rmia_offline_a": a, "rmia_gamma": options.rmia_gamma, "rmia_trim": options.rmia_trim,
              "rmia_population": int(len(population)), "warnings": messages}
    return results, extras, attack_scores, target_masks


def _read_image(data_root, relative_path):
    from PIL import Image

    path = Path(data_root) / str(relative_path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = [archive[k] for k in archive.files if archive[k].ndim in (2, 3)]
        return arrays[0] if arrays else None
    with Image.open(path) as image:
        return np.asarray(image.convert("L") if image.mode not in ("RGB", "L") else image)


def run_audit(logdir, options: AuditOptions = AuditOptions()):
    """Runs the whole audit; returns the attack_summary dict (also written to out_dir)."""
    check_options(options)
    return audit_campaign(load_campaign(logdir, progress=options.progress), options).summary


def audit_campaign(campaign, options: AuditOptions) -> AuditResult:
    """The audit of a loaded campaign (`load.load_campaign`): writes every output to out_dir."""
    dataset = options.dataset or campaign.dataset
    out_dir = Path(options.out_dir) if options.out_dir else Path("figs") / dataset
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MedleakError(f"--out_dir={out_dir}: cannot create it ({e.strerror or e})") from None
    records = campaign.records

    # --- record and patient risk over all runs; the attacks' shadow statistics in the same pass
    split = split_targets(campaign.n_runs, options.eval_size)
    moments, shadow_statistics = campaign_stats(campaign.scores, campaign.masks, split[1])
    require_in_and_out(moments["n_in"], moments["n_out"], records["record_id"].to_numpy(), what=f"{campaign.n_runs} runs")
    auc, se = record_auc_from_moments(moments)
    del moments
    record_table = pd.DataFrame({
        "record_id": records["record_id"], "patient_id": records["patient_id"], "auc": auc, "auc_se": se,
        "n_in": campaign.masks.sum(axis=0), "n_out": campaign.n_runs - campaign.masks.sum(axis=0),
        "label": record_label_text(records, campaign.label_names, campaign.task),
    })
    for column in campaign.subgroups:
        record_table[column] = records[column].to_numpy()
    if "path" in records:
        record_table["path"] = records["path"].to_numpy()
    patients = patient_risk(auc, records["patient_id"].to_numpy())
    attributes = patient_attributes(records, patients["patient_id"], campaign.subgroups, campaign.label_names, campaign.task)
    patient_table = patients.join(attributes[campaign.subgroups], on="patient_id") if campaign.subgroups else patients
    write_csv(out_dir / "record_risk.csv", record_table.sort_values("auc", ascending=False, kind="stable"))
    write_csv(out_dir / "patient_risk.csv", patient_table)

    # --- attacks against held-out targets
    attacks, attack_extras, attack_scores, target_masks = attack_suite(campaign, options, split, shadow_statistics)
    del shadow_statistics

    # --- subgroups and diseases
    comp_table, comp_tests = composition(attributes, patients["auc_max"].to_numpy(), options.top_share)
    privacy_table = privacy_by_subgroup(attributes, patients["auc_max"].to_numpy())
    utility_table = None
    if campaign.test_logits is not None and campaign.test_records is not None:
        utility_table = utility_by_subgroup(campaign.test_logits, campaign.test_labels, campaign.test_records, campaign.subgroups, campaign.task)
        write_csv(out_dir / "utility_by_subgroup.csv", utility_table)
    write_csv(out_dir / "composition_top_patients.csv", comp_table)
    write_csv(out_dir / "privacy_by_subgroup.csv", privacy_table)

    # --- figures
    figs = {}
    slugs = {attribute: re.sub(r"[^A-Za-z0-9]+", "_", attribute).strip("_") for attribute in attributes.columns}
    figs["roc"] = figures.roc_figure({name: (curves, summary) for name, (summary, curves) in attacks.items()}, FPR_GRID, out_dir)
    figs["esf_records"] = figures.esf_figure(auc, out_dir, "esf_records", "Record-level risk", "records")
    figs["esf_patients"] = figures.esf_figure(patients["auc_max"].to_numpy(), out_dir, "esf_patients", "Patient-level risk (worst image)", "patients")
    for attribute in attributes.columns:
        slug = slugs[attribute]
        values = attributes[attribute].astype(str).to_numpy()
        groups = {c: patients["auc_max"].to_numpy()[values == c] for c in np.unique(values)}
        figs[f"group_esf_{slug}"] = figures.subgroup_esf_figure(groups, out_dir, f"esf_by_{slug}", attribute)
        figs[f"composition_{slug}"] = figures.composition_figure(comp_table[comp_table["attribute"] == attribute], comp_tests[attribute],
                                                                 out_dir, f"composition_{slug}", attribute)
        if utility_table is not None and attribute in campaign.subgroups:
            figs[f"utility_{slug}"] = figures.utility_privacy_figure(utility_table[utility_table["attribute"] == attribute],
                                                                     privacy_table[privacy_table["attribute"] == attribute],
                                                                     out_dir, f"utility_privacy_{slug}", attribute)
    notes = []
    if options.data_root is not None and "path" in records:
        top = record_table.sort_values("auc", ascending=False, kind="stable").head(N_GRID_IMAGES)
        images, captions, unreadable = [], [], []
        for _, row in top.iterrows():
            try:
                image = _read_image(options.data_root, row["path"])
            except (OSError, ValueError, IndexError) as e:
                image, _ = None, e
            if image is None:
                unreadable.append(str(row["path"]))
                continue
            images.append(image)
            captions.append(f"{row['patient_id']}\nAUC {row['auc']:.3f}")
        if unreadable:
            notes.append(f"{len(unreadable)} of the top images could not be read under --data_root (e.g. {unreadable[0]})")
        if images:
            figs["vulnerable_images"] = figures.vulnerable_grid(images, captions, out_dir)

    # --- tables
    record_shares = share_above(auc)
    patient_shares = share_above(patients["auc_max"].to_numpy())
    summary = {
        "dataset": dataset,
        "logdir": str(Path(campaign.logdir)),
        "task": campaign.task,
        "n_runs": campaign.n_runs,
        "n_records": int(len(records)),
        "n_patients": int(len(patients)),
        "n_views": int(campaign.scores.shape[2]),
        "skipped_runs": [{"run": int(r), "reason": why} for r, why in campaign.skipped],
        "attacks": {name: summary_ for name, (summary_, _) in attacks.items()},
        **attack_extras,
        "record_auc": {"mean": float(auc.mean()), "median": float(np.median(auc)), "max": float(auc.max()),
                       "share_above": {f"{t:g}": v for t, v in record_shares.items()}},
        "patient_auc_max": {"mean": float(patients["auc_max"].mean()), "median": float(patients["auc_max"].median()),
                            "max": float(patients["auc_max"].max()),
                            "share_above": {f"{t:g}": v for t, v in patient_shares.items()}},
        "composition_tests": comp_tests,
        "top_share": options.top_share,
    }
    write_json(out_dir / "attack_summary.json", summary)
    report_path = _write_report(out_dir, dataset, summary, attacks, patient_table, privacy_table, utility_table, figs, slugs, notes)
    summary["report"] = str(report_path)
    return AuditResult(summary, attack_scores, target_masks)


def _pct(x):
    return f"{100 * x:.1f} %"


def _write_report(out_dir, dataset, summary, attacks, patient_table, privacy_table, utility_table, figs, slugs, notes):
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
        report.table_html(attack_rows),
        report.figure_html(figs["roc"], "ROC curves of each attack (mean ± sd over target models)",
                           "Each curve trades false alarms (x) against caught members (y) for one attack. The dashed diagonal is "
                           "guessing. What matters for privacy is the left edge of the log-log panel: a curve far above the "
                           "diagonal at 0.1 % false-positive rate means some patients can be identified with confidence."),
        f"<p>Targets: runs {summary['target_runs']} held out; {summary['n_shadows']} shadow models. "
        f"RMIA offline a = {summary['rmia_offline_a']} (tuned on a shadow model).</p>"))))
    shares = pd.DataFrame([{"AUC above": t, "records": summary["record_auc"]["share_above"][t],
                            "patients": summary["patient_auc_max"]["share_above"][t]} for t in summary["record_auc"]["share_above"]])
    sections.append(("Record and patient risk", "".join((
        report.table_html(shares),
        report.figure_html(figs["esf_records"], "Share of images whose attack AUC exceeds x",
                           "Read a point (x, y) as: a share y of images can be attacked with AUC above x. The y-axis is "
                           "logarithmic, so the rare, most exposed images are visible at the right; the shaded band is the "
                           "95 % confidence interval."),
        report.figure_html(figs["esf_patients"], "Share of patients whose most exposed image exceeds x",
                           "The same for patients, each represented by their most exposed image: this is the number to "
                           "discuss with a data-protection officer.")))))
    top = patient_table.head(N_TOP_PATIENTS_SHOWN)
    sections.append((f"The {len(top)} most vulnerable patients", report.table_html(top)))
    parts = []
    for attribute, slug in slugs.items():
        parts.append(report.figure_html(figs[f"group_esf_{slug}"], f"Patient risk by {attribute}",
                                        "One curve per group; a curve lying higher means that group's patients are more exposed."))
        comp = figs.get(f"composition_{slug}")
        if comp is not None:
            parts.append(report.figure_html(comp, f"Who is among the top {_pct(summary['top_share'])} most vulnerable patients ({attribute})",
                                            "Blue: the group's share of all patients; orange: its share among the most vulnerable. "
                                            "Numbers are Pearson residuals: above +2 or below −2 the group is clearly over- or "
                                            "under-represented; the title's χ² p-value tests the whole composition."))
        util = figs.get(f"utility_{slug}")
        if util is not None:
            parts.append(report.figure_html(util, f"Utility and privacy side by side ({attribute})",
                                            "Left: how well the models work for each group (test AUROC). Right: how exposed the "
                                            "group's patients are. Fairness concerns both."))
    sections.append(("Subgroups and diagnoses", "".join(parts) + report.table_html(privacy_table)))
    if utility_table is not None:
        sections.append(("Model utility by subgroup", report.table_html(utility_table)))
    if "vulnerable_images" in figs:
        sections.append(("Most vulnerable images", report.figure_html(
            figs["vulnerable_images"], "Images with the highest record-level attack AUC",
            "Outliers and unusual acquisitions are typically memorised first; these are the images a release would expose most.")))
    if summary["skipped_runs"]:
        notes = list(notes) + [f"Skipped runs: {summary['skipped_runs']}"]
    notes = list(notes) + list(summary.get("warnings", []))
    return report.write_report(out_dir / "report.html", dataset=dataset, headline=headline, sections=sections, notes=notes)

