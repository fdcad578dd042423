"""The audit of one campaign logdir, in named steps: read the plan files → validate and score the
runs (`load`, `scoring`) → record and patient risk (`record_risk_tables`) → attacks on held-out
targets (`attack_suite`) → subgroups and diseases (`subgroup_tables`) → tables (`write_tables`) →
figures (`audit_figures`, `vulnerable_images`) → attack_summary.json → report.html (`report`).
`run_audit` is what `medleak-audit` / `mem_inf_stats.py` calls (`cli.py`).

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
from medleak.privacy_utils.load import read_campaign_files
from medleak.privacy_utils.risk import patient_risk, record_auc_from_moments, require_in_and_out, share_above
from medleak.privacy_utils.rmia import (DEFAULT_GAMMA, DEFAULT_POPULATION, population_indices,
                                        reference_probability, rmia_from_reference, tune_offline_a)
from medleak.privacy_utils.roc import FPR_GRID, summarise_attack
from medleak.privacy_utils.scores import log_p_from_lira, rmia_from_lira
from medleak.privacy_utils.scoring import score_campaign
from medleak.privacy_utils.subgroups import (TOP_SHARE, composition, patient_attributes, privacy_by_subgroup,
                                             record_label_text, utility_by_subgroup)

N_GRID_IMAGES = 16
LIRA_VARIANTS = (("LiRA online", {}), ("LiRA online, fixed variance", {"fix_variance": True}),
                 ("LiRA offline", {"offline": True}), ("LiRA offline, fixed variance", {"offline": True, "fix_variance": True}))


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """The audit's settings; its command-line flags are generated from these fields (`cli.py`)."""

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
    """Refuses bad audit settings up front (before loading runs), naming the audit's flag."""
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


def check_dataset(options: AuditOptions, plan: dict, logdir) -> str:
    """The dataset the audit is titled with: plan.json's; a different --dataset is a one-line error."""
    planned = plan.get("dataset")
    if options.dataset and planned is not None and options.dataset != planned:
        raise MedleakError(f"--dataset={options.dataset} but {Path(logdir) / 'plan.json'} is a {planned} campaign; "
                           f"drop --dataset (it defaults to plan.json's) or point --logdir at a {options.dataset} campaign")
    return str(options.dataset or planned or Path(logdir).name)


def make_out_dir(options: AuditOptions, default) -> Path:
    out_dir = Path(options.out_dir) if options.out_dir else Path(default)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MedleakError(f"--out_dir={out_dir}: cannot create it ({e.strerror or e})") from None
    return out_dir


def split_targets(n_runs, eval_size):
    """(target rows, shadow rows): the last `eval_size` runs are targets, clamped to leave ≥ 2 shadows."""
    if eval_size < 1:
        raise MedleakError(f"--eval_size must be ≥ 1, got {eval_size}")
    n_targets = min(eval_size, n_runs - 2) if n_runs >= 3 else 1
    if n_targets < eval_size:
        warnings.warn(f"only {n_runs} runs: evaluating attacks on {n_targets} target(s) instead of --eval_size={eval_size}", stacklevel=2)
    return np.arange(n_runs - n_targets, n_runs), slice(0, n_runs - n_targets)


@dataclasses.dataclass
class RiskTables:
    """Record and patient risk over all runs."""

    record_table: pd.DataFrame  # record_risk.csv's rows in records.csv order (row i = record i)
    patient_table: pd.DataFrame  # patient_risk.csv: most vulnerable first, with subgroup columns
    attributes: pd.DataFrame  # patients (patient_table order) × subgroup and disease attributes

    @property
    def record_auc(self) -> np.ndarray:
        return self.record_table["auc"].to_numpy()

    @property
    def patient_auc(self) -> np.ndarray:
        return self.patient_table["auc_max"].to_numpy()


@dataclasses.dataclass
class Attacks:
    """The attack step's results on the held-out targets."""

    results: dict  # name → (summary dict, tpr curves (n_targets, len(FPR_GRID)))
    extras: dict  # target runs, shadows, RMIA settings, warnings (go into attack_summary.json)
    scores: dict  # name → (n_targets, n_records) membership scores
    target_masks: np.ndarray  # (n_targets, n_records) bool: the targets' true membership


@dataclasses.dataclass
class SubgroupTables:
    composition: pd.DataFrame  # composition_top_patients.csv
    tests: dict  # attribute → χ² test of the top patients' composition
    privacy: pd.DataFrame  # privacy_by_subgroup.csv
    utility: pd.DataFrame | None  # utility_by_subgroup.csv (None without test logits)


@dataclasses.dataclass
class AuditResult:
    """What one audit computed, so callers (`budgets.py`) need not re-read what it wrote."""

    summary: dict  # what attack_summary.json holds, plus the report path
    record_table: pd.DataFrame  # RiskTables.record_table (records.csv order)
    patient_table: pd.DataFrame  # RiskTables.patient_table
    subgroups: SubgroupTables
    attack_scores: dict  # attack name → (n_targets, n_records) membership scores of the held-out targets
    target_masks: np.ndarray  # (n_targets, n_records) bool: the targets' true membership


def record_risk_tables(campaign, split):
    """The risk step: (RiskTables, the shadows' LiRA statistics), from one pass over the scores."""
    records = campaign.records
    moments, shadow_statistics = campaign_stats(campaign.scores, campaign.masks, split[1])
    require_in_and_out(moments["n_in"], moments["n_out"], records["record_id"].to_numpy(), what=f"{campaign.n_runs} runs")
    auc, se = record_auc_from_moments(moments)
    del moments
    n_in = campaign.masks.sum(axis=0)
    record_table = pd.DataFrame({
        "record_id": records["record_id"], "patient_id": records["patient_id"], "auc": auc, "auc_se": se,
        "n_in": n_in, "n_out": campaign.n_runs - n_in,
        "label": record_label_text(records, campaign.label_names, campaign.task),
    })
    for column in campaign.subgroups:
        record_table[column] = records[column].to_numpy()
    if "path" in records:
        record_table["path"] = records["path"].to_numpy()
    patients = patient_risk(auc, records["patient_id"].to_numpy())
    attributes = patient_attributes(records, patients["patient_id"], campaign.subgroups, campaign.label_names, campaign.task)
    patient_table = patients.join(attributes[campaign.subgroups], on="patient_id") if campaign.subgroups else patients
    return RiskTables(record_table, patient_table, attributes), shadow_statistics


def attack_suite(campaign, options, split=None, stats=None) -> Attacks:
    """The attack step: every attack against the held-out targets.

    `split` (targets, shadows) and the shadows' LiRA `stats`, if already computed (`audit_campaign`
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
    return Attacks(results, extras, attack_scores, target_masks)


def subgroup_tables(campaign, risk: RiskTables, top_share) -> SubgroupTables:
    """The subgroup step: composition of the most vulnerable patients, privacy and utility per group."""
    comp_table, comp_tests = composition(risk.attributes, risk.patient_auc, top_share)
    utility = None
    if campaign.test_logits is not None and campaign.test_records is not None:
        utility = utility_by_subgroup(campaign.test_logits, campaign.test_labels, campaign.test_records,
                                      campaign.subgroups, campaign.task)
    return SubgroupTables(comp_table, comp_tests, privacy_by_subgroup(risk.attributes, risk.patient_auc), utility)


def write_tables(out_dir, risk: RiskTables, groups: SubgroupTables) -> None:
    write_csv(out_dir / "record_risk.csv", risk.record_table.sort_values("auc", ascending=False, kind="stable"))
    write_csv(out_dir / "patient_risk.csv", risk.patient_table)
    if groups.utility is not None:
        write_csv(out_dir / "utility_by_subgroup.csv", groups.utility)
    write_csv(out_dir / "composition_top_patients.csv", groups.composition)
    write_csv(out_dir / "privacy_by_subgroup.csv", groups.privacy)


def audit_figures(out_dir, risk: RiskTables, attacks: Attacks, groups: SubgroupTables, subgroups):
    """The figures step: ({key: PNG path}, {attribute: file-name slug})."""
    slugs = {attribute: re.sub(r"[^A-Za-z0-9]+", "_", attribute).strip("_") for attribute in risk.attributes.columns}
    figs = {
        "roc": figures.roc_figure({name: (curves, summary) for name, (summary, curves) in attacks.results.items()}, FPR_GRID, out_dir),
        "esf_records": figures.esf_figure(risk.record_auc, out_dir, "esf_records", "Record-level risk", "records"),
        "esf_patients": figures.esf_figure(risk.patient_auc, out_dir, "esf_patients", "Patient-level risk (worst image)", "patients"),
    }
    for attribute, slug in slugs.items():
        values = risk.attributes[attribute].astype(str).to_numpy()
        by_category = {c: risk.patient_auc[values == c] for c in np.unique(values)}
        figs[f"group_esf_{slug}"] = figures.subgroup_esf_figure(by_category, out_dir, f"esf_by_{slug}", attribute)
        figs[f"composition_{slug}"] = figures.composition_figure(groups.composition[groups.composition["attribute"] == attribute],
                                                                 groups.tests[attribute], out_dir, f"composition_{slug}", attribute)
        if groups.utility is not None and attribute in subgroups:
            figs[f"utility_{slug}"] = figures.utility_privacy_figure(groups.utility[groups.utility["attribute"] == attribute],
                                                                     groups.privacy[groups.privacy["attribute"] == attribute],
                                                                     out_dir, f"utility_privacy_{slug}", attribute)
    return figs, slugs


def _read_image(data_root, relative_path):
    from PIL import Image

    path = Path(data_root) / str(relative_path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = [archive[k] for k in archive.files if archive[k].ndim in (2, 3)]
        return arrays[0] if arrays else None
    with Image.open(path) as image:
        return np.asarray(image.convert("L") if image.mode not in ("RGB", "L") else image)


def _console(message):
    print(message, flush=True)


def vulnerable_images(out_dir, record_table, data_root, dataset, log=None):
    """The image-grid step: (grid PNG path or None, [top image paths that could not be read]).

    When some of the top images are not found under `data_root`, one console line says so, naming
    data_root and an example path (a data_root of another dataset would otherwise just drop the grid).
    """
    top = record_table.sort_values("auc", ascending=False, kind="stable").head(N_GRID_IMAGES)
    images, captions, unreadable = [], [], []
    for _, row in top.iterrows():
        try:
            image = _read_image(data_root, row["path"])
        except (OSError, ValueError, IndexError):
            image = None
        if image is None:
            unreadable.append(str(row["path"]))
            continue
        images.append(image)
        captions.append(f"{row['patient_id']}\nAUC {row['auc']:.3f}")
    if unreadable:
        left_out = "the image grid is left out" if not images else f"the grid shows the other {len(images)}"
        (log or _console)(f"--data_root={data_root}: {len(unreadable)} of the {len(top)} most vulnerable images were not found or "
            f"unreadable under it (e.g. {Path(data_root) / unreadable[0]}); {left_out}. Is it the data root of this "
            f"{dataset} campaign?")
    return (figures.vulnerable_grid(images, captions, out_dir) if images else None), unreadable


def audit_summary(campaign, dataset, risk: RiskTables, attacks: Attacks, groups: SubgroupTables, top_share) -> dict:
    """attack_summary.json."""
    record_shares, patient_shares = share_above(risk.record_auc), share_above(risk.patient_auc)
    return {
        "dataset": dataset,
        "logdir": str(Path(campaign.logdir)),
        "task": campaign.task,
        "n_runs": campaign.n_runs,
        "n_records": int(len(campaign.records)),
        "n_patients": int(len(risk.patient_table)),
        "n_views": int(campaign.scores.shape[2]),
        "skipped_runs": [{"run": int(r), "reason": why} for r, why in campaign.skipped],
        "attacks": {name: summary for name, (summary, _) in attacks.results.items()},
        **attacks.extras,
        "record_auc": {"mean": float(risk.record_auc.mean()), "median": float(np.median(risk.record_auc)),
                       "max": float(risk.record_auc.max()), "share_above": {f"{t:g}": v for t, v in record_shares.items()}},
        "patient_auc_max": {"mean": float(risk.patient_auc.mean()), "median": float(np.median(risk.patient_auc)),
                            "max": float(risk.patient_auc.max()),
                            "share_above": {f"{t:g}": v for t, v in patient_shares.items()}},
        "composition_tests": groups.tests,
        "top_share": top_share,
    }


def run_audit(logdir, options: AuditOptions = AuditOptions()):
    """Runs the whole audit; returns the attack_summary dict (also written to out_dir)."""
    check_options(options)
    files = read_campaign_files(logdir)
    check_dataset(options, files.plan, files.logdir)  # before the runs are read
    return audit_campaign(score_campaign(files, progress=options.progress), options).summary


def audit_campaign(campaign, options: AuditOptions) -> AuditResult:
    """The audit of a scored campaign (`scoring.load_campaign`): writes every output to out_dir."""
    dataset = check_dataset(options, campaign.plan, campaign.logdir)
    out_dir = make_out_dir(options, Path("figs") / dataset)
    split = split_targets(campaign.n_runs, options.eval_size)
    risk, shadow_statistics = record_risk_tables(campaign, split)
    attacks = attack_suite(campaign, options, split, shadow_statistics)
    del shadow_statistics
    groups = subgroup_tables(campaign, risk, options.top_share)
    write_tables(out_dir, risk, groups)
    figs, slugs = audit_figures(out_dir, risk, attacks, groups, campaign.subgroups)
    unreadable = []
    if options.data_root is not None and "path" in risk.record_table:
        grid, unreadable = vulnerable_images(out_dir, risk.record_table, options.data_root, dataset)
        if grid is not None:
            figs["vulnerable_images"] = grid
    summary = audit_summary(campaign, dataset, risk, attacks, groups, options.top_share)
    write_json(out_dir / "attack_summary.json", summary)
    summary["report"] = str(report.audit_page(out_dir, summary, attacks.results, risk.patient_table, groups.privacy,
                                              groups.utility, figs, slugs, unreadable))
    return AuditResult(summary, risk.record_table, risk.patient_table, groups, attacks.scores, attacks.target_masks)
