"""The audit of one campaign logdir, in named steps: read the plan files → validate and score the
runs (`load`, `scoring`) → calibrated record and patient risk (`record_risk_tables`) → attacks on
held-out targets (`attack_suite`) → the campaign's noise floor (`noise_floors`) → subgroups and
diseases (`subgroup_tables`) → tables (`write_tables`) → figures (`audit_figures`,
`vulnerable_images`) → attack_summary.json → report.html (`report`). `run_audit` is what
`medleak-audit` / `mem_inf_stats.py` calls (`cli.py`).

Every headline is measured against chance. Record and patient risk rank each unit's IN models
against its OUT models over all runs (`calibration`: exact rank-null p-values, Benjamini–Hochberg
q-values, `at_risk`); a patient is scored as one unit per model, so its null does not depend on
its number of images. Attacks are evaluated on `eval_size` held-out target runs (the last runs),
each with its own leave-one-out shadows (`attacks.attack_targets`), so the shadows that describe
a record do not depend on whether it is IN the target. Chance levels of the shares, the eSF
curves and the strongest attack come from seeded permutations of each patient's IN/OUT bits
(`noise_floor`); their seeds are recorded in attack_summary.json.
"""

import dataclasses
import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.config import runs_in_per_patient
from medleak.errors import MedleakError
from medleak.io_utils import write_csv, write_json
from medleak.privacy_utils import figures, report
from medleak.privacy_utils.calibrated import LOSS_THRESHOLD, FittedCampaign, campaign_noise_floors, fit_campaign
from medleak.privacy_utils.calibration import (DEFAULT_ALPHA, DEFAULT_AUC_THRESHOLD, UnitRanks, delong_components,
                                               group_differences, plan_runs)
from medleak.privacy_utils.load import read_campaign_files
from medleak.privacy_utils.noise_floor import AUC_GRID, DEFAULT_PERMUTATIONS
from medleak.privacy_utils.progress import Stages
from medleak.privacy_utils.risk import RISK_THRESHOLDS, patient_risk, require_in_and_out, share_above
from medleak.privacy_utils.rmia import DEFAULT_GAMMA, DEFAULT_POPULATION
from medleak.privacy_utils.roc import FPR_GRID, summarise_attack
from medleak.privacy_utils.scores import rmia_from_lira
from medleak.privacy_utils.scoring import score_campaign
from medleak.privacy_utils.subgroups import (TOP_SHARE, composition, patient_attributes, privacy_by_subgroup,
                                             record_label_text, utility_by_subgroup)
from medleak.rundir import list_complete_runs

RECORD_PERMUTATIONS = 50  # the audit's default for the record-level floor (--record_permutations)
N_GRID_IMAGES = 16
# Display name → `attacks.attack_targets` variant.
ATTACK_VARIANTS = {"LiRA online": "lira_online", "LiRA online, fixed variance": "lira_online_fixed",
                   "LiRA offline": "lira_offline", "LiRA offline, fixed variance": "lira_offline_fixed",
                   "RMIA online": "rmia_online", "RMIA offline": "rmia_offline"}
LIRA_VARIANTS = tuple(name for name, variant in ATTACK_VARIANTS.items() if variant.startswith("lira"))
# Fewer runs than this cannot audit: a patient IN for half of n runs has an exact rank p-value of at
# least 1/C(n, n/2) (1/20 at 6 runs, 1/70 at 8), so nothing could be told from chance.
MIN_RUNS = 8
RECOMMENDED_RUNS = 16  # below this the audit warns: few shadows, wide intervals
MAX_DEFAULT_TARGETS = 10


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """The audit's settings; its command-line flags are generated from these fields (`cli.py`)."""

    out_dir: Path | None = None
    dataset: str | None = None
    eval_size: int = 0  # 0: about a quarter of the runs, at most MAX_DEFAULT_TARGETS (`n_targets`)
    data_root: Path | None = None
    seed: int = 0
    rmia_gamma: float = DEFAULT_GAMMA
    rmia_trim: float = 0.1
    rmia_population: int = DEFAULT_POPULATION
    top_share: float = TOP_SHARE
    fdr: float = DEFAULT_ALPHA
    risk_auc: float = DEFAULT_AUC_THRESHOLD
    permutations: int = DEFAULT_PERMUTATIONS
    # records: 224,316 units at CheXpert size, and a record share's chance interval is narrow already
    record_permutations: int = RECORD_PERMUTATIONS
    target_se: float = 0.02
    progress: bool = True
    cache: bool = True  # scores (and shadow statistics) reused from logdir/audit_cache/ (`cache.py`)


def check_options(options: AuditOptions) -> None:
    """Refuses bad audit settings up front (before loading runs), naming the audit's flag."""
    if options.eval_size < 0:
        raise MedleakError(f"--eval_size must be ≥ 1 (or 0 for about a quarter of the runs), got {options.eval_size}")
    if not 0.0 < options.top_share <= 1.0:
        raise MedleakError(f"--top_share must lie in (0, 1], got {options.top_share}")
    if not 0.0 <= options.rmia_trim < 0.5:
        raise MedleakError(f"--rmia_trim must lie in [0, 0.5), got {options.rmia_trim}")
    if not options.rmia_gamma > 0:
        raise MedleakError(f"--rmia_gamma must be > 0, got {options.rmia_gamma}")
    if options.rmia_population < 1:
        raise MedleakError(f"--rmia_population must be at least 1, got {options.rmia_population}")
    if not 0.0 < options.fdr < 1.0:
        raise MedleakError(f"--fdr must lie in (0, 1), got {options.fdr}")
    if not 0.5 <= options.risk_auc < 1.0:
        raise MedleakError(f"--risk_auc must lie in [0.5, 1), got {options.risk_auc}")
    if options.permutations < 20:
        raise MedleakError(f"--permutations must be at least 20 (the chance interval needs them), got {options.permutations}")
    if options.record_permutations < 20:
        raise MedleakError(f"--record_permutations must be at least 20 (the chance interval needs them), "
                           f"got {options.record_permutations}")
    if not 0.0 < options.target_se < 0.5:
        raise MedleakError(f"--target_se must lie in (0, 0.5), got {options.target_se}")
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


def n_targets(n_runs, eval_size=0):
    """How many held-out targets the attacks are evaluated on: `eval_size`, or (0) about a quarter
    of the runs, at most MAX_DEFAULT_TARGETS. Too few runs, or more targets than runs, is a one-line error."""
    if n_runs < MIN_RUNS:
        raise MedleakError(f"{n_runs} usable runs: the audit needs at least {MIN_RUNS} (each patient IN for half of them) "
                           f"and {RECOMMENDED_RUNS} or more for stable risk; train {MIN_RUNS - n_runs} more with the "
                           f"dataset script (e.g. --n_runs={RECOMMENDED_RUNS} on a new --logdir)")
    if eval_size > n_runs:
        raise MedleakError(f"--eval_size={eval_size} asks for more target runs than the campaign's {n_runs}; "
                           f"use at most {n_runs} (0 picks {min(MAX_DEFAULT_TARGETS, max(1, round(n_runs / 4)))})")
    if n_runs < RECOMMENDED_RUNS:
        warnings.warn(f"only {n_runs} runs: the audit's intervals are wide and weak leaks go unseen; "
                      f"train {RECOMMENDED_RUNS} or more", stacklevel=2)
    return eval_size or min(MAX_DEFAULT_TARGETS, max(1, round(n_runs / 4)))


@dataclasses.dataclass
class RiskTables:
    """Calibrated record and patient risk over all runs, and the per-model summaries behind it."""

    record_table: pd.DataFrame  # record_risk.csv's rows in records.csv order (row i = record i)
    patient_table: pd.DataFrame  # patient_risk.csv: most vulnerable first (by auc), with subgroup columns
    attributes: pd.DataFrame  # patients (patient_table order) × subgroup and disease attributes
    record_summary: np.ndarray  # (n_runs, n_records) float32 `calibration.record_summaries`
    patient_summary: np.ndarray  # (n_runs, n_patients) float32, patients in patient_codes order
    patient_mask: np.ndarray  # (n_runs, n_patients) bool, same order
    record_patient: np.ndarray  # (n_records,) int index of each record's patient in that order
    record_ranks: UnitRanks  # `calibration.unit_ranks` of record_summary and of patient_summary:
    patient_ranks: UnitRanks  # the risk step's sorts, reused by the noise floor

    @property
    def record_auc(self) -> np.ndarray:
        return self.record_table["auc"].to_numpy()

    @property
    def patient_auc(self) -> np.ndarray:
        return self.patient_table["auc"].to_numpy()


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
    tests: dict  # attribute → χ² test of the top patients' composition (only where it can say something)
    privacy: pd.DataFrame  # privacy_by_subgroup.csv: raw and images-adjusted differences per group
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


def audit_fit(campaign, options: AuditOptions) -> FittedCampaign:
    """The campaign's `calibrated.FittedCampaign` (one fit behind risk, attacks and noise floor); with
    the score cache, its record summary and shadow fits are stored with the scores and reused."""
    n_in = campaign.masks.sum(axis=0)  # first, to name the record (fit_campaign can only give its index)
    require_in_and_out(n_in, campaign.n_runs - n_in, campaign.records["record_id"].to_numpy(), what=f"{campaign.n_runs} runs")
    cache = None
    if getattr(campaign, "cache", None) is not None:
        store, key = campaign.cache
        cache = functools.partial(store.derived, key)
    return fit_campaign(campaign.scores, campaign.masks, campaign.records["patient_id"].to_numpy(),
                        rmia_trim=options.rmia_trim, rmia_transform=rmia_from_lira, cache=cache)


def record_risk_tables(campaign, options: AuditOptions, fitted: FittedCampaign | None = None) -> RiskTables:
    """The risk step: each record and each patient ranked IN against OUT over all runs.

    record_risk.csv: `auc` (rank AUC, not clipped), `auc_se`, `p_value` (exact rank null),
    `q_value` (BH over records), `at_risk`, and `auc_gaussian` (the paper's analytic
    Φ((μ_in−μ_out)/√(σ_in²+σ_out²)) from the LiRA fit's IN/OUT moments, with `auc_gaussian_se`).
    patient_risk.csv: the patient-level statistic (`auc`, `auc_se`, `p_value`, `q_value`, `at_risk`)
    and, for comparison with the paper, `auc_max` / `auc_mean` over the patient's records' `auc_gaussian`.
    `fitted`: the campaign's `audit_fit` (made here when not given).
    """
    records = campaign.records
    fitted = audit_fit(campaign, options) if fitted is None else fitted
    thresholds = dict(alpha=options.fdr, auc_threshold=options.risk_auc)
    ranked = fitted.record_risk(**thresholds)
    gaussian_auc, gaussian_se = fitted.record_auc_gaussian()
    record_table = pd.DataFrame({
        "record_id": records["record_id"], "patient_id": records["patient_id"],
        "auc": ranked["auc"].to_numpy(), "auc_se": ranked["auc_se"].to_numpy(), "p_value": ranked["p_value"].to_numpy(),
        "q_value": ranked["q_value"].to_numpy(), "at_risk": ranked["at_risk"].to_numpy(),
        "auc_gaussian": gaussian_auc, "auc_gaussian_se": gaussian_se,
        "n_in": ranked["n_in"].to_numpy(), "n_out": ranked["n_out"].to_numpy(),
        "label": record_label_text(records, campaign.label_names, campaign.task),
    })
    for column in campaign.subgroups:
        record_table[column] = records[column].to_numpy()
    if "path" in records:
        record_table["path"] = records["path"].to_numpy()

    patient_ids = records["patient_id"].to_numpy()
    _, codes, patient_mask = fitted.patients
    calibrated = fitted.patient_risk(**thresholds)
    paper = patient_risk(gaussian_auc, patient_ids).set_index("patient_id")[["auc_max", "auc_mean"]]
    patients = calibrated.join(paper, on="patient_id")[
        ["patient_id", "auc", "auc_se", "p_value", "q_value", "at_risk", "auc_max", "auc_mean", "n_records", "n_in", "n_out"]]
    order = np.lexsort((patients["p_value"].to_numpy(), -patients["auc"].to_numpy()))  # most exposed first
    patients = patients.iloc[order].reset_index(drop=True)
    attributes = patient_attributes(records, patients["patient_id"], campaign.subgroups, campaign.label_names, campaign.task)
    patient_table = patients.join(attributes[campaign.subgroups], on="patient_id") if campaign.subgroups else patients
    return RiskTables(record_table, patient_table, attributes, fitted.record_summary, fitted.patient_summary,
                      patient_mask, codes, fitted.record_ranks, fitted.patient_ranks)


# The options the attack step depends on (with the runs' scores and the targets): cached attacks are
# reused only when they match. ATTACK_FORMAT changes when the scoring of targets does.
ATTACK_SETTINGS = ("seed", "rmia_gamma", "rmia_trim", "rmia_population")
ATTACK_FORMAT = 2


def attack_suite(campaign, options: AuditOptions, targets=None, fitted: FittedCampaign | None = None) -> Attacks:
    """The attack step: every attack against the held-out targets (rows `targets` of the campaign,
    default the last `n_targets`), each target with its own leave-one-out shadows, from the
    campaign's fits (`fitted`, default `audit_fit`). With the score cache, the attack scores and
    their ROC summaries are stored with the scores for these targets and ATTACK_SETTINGS and reused
    (a re-run with other report options skips the step)."""
    scores, masks = campaign.scores, campaign.masks
    if targets is None:
        targets = np.arange(campaign.n_runs - n_targets(campaign.n_runs, options.eval_size), campaign.n_runs)
    targets = np.asarray(targets, dtype=np.int64)
    target_masks = masks[targets]

    def compute():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_variant = (audit_fit(campaign, options) if fitted is None else fitted).attack(
                targets, list(ATTACK_VARIANTS.values()) + [LOSS_THRESHOLD], drop_seed=options.seed,
                gamma=options.rmia_gamma, n_population=options.rmia_population, population_seed=options.seed)
            attack_scores = {name: by_variant[variant] for name, variant in ATTACK_VARIANTS.items()}
            # Global loss threshold (Yeom et al.): the target's own log-likelihood, no shadow models.
            attack_scores["Loss threshold"] = by_variant[LOSS_THRESHOLD]
            results = {name: summarise_attack(values, target_masks) for name, values in attack_scores.items()}
        names = list(attack_scores)
        arrays = {}
        for i, name in enumerate(names):
            arrays[f"scores_{i}"], arrays[f"curves_{i}"] = attack_scores[name], results[name][1]
        return ({"names": names, "summaries": [results[name][0] for name in names],
                 "warnings": sorted({str(w.message) for w in caught})}, arrays)

    cache = getattr(campaign, "cache", None)
    if cache is None:
        result, arrays = compute()
    else:
        store, key = cache
        settings = {"format": ATTACK_FORMAT, "targets": targets.tolist(),
                    **{field: getattr(options, field) for field in ATTACK_SETTINGS}}
        result, arrays = store.derived_result(key, "attacks", settings, compute)
    names, messages = result["names"], result["warnings"]
    attack_scores = {name: arrays[f"scores_{i}"] for i, name in enumerate(names)}
    results = {name: (summary, arrays[f"curves_{i}"]) for i, (name, summary) in enumerate(zip(names, result["summaries"]))}
    for message in messages:
        warnings.warn(message, stacklevel=2)
    extras = {"target_runs": campaign.run_ids[targets].tolist(), "n_targets": int(len(targets)),
              "n_shadows": int(campaign.n_runs - 2),  # per target: the other runs, less one per record
              "drop_seed": int(options.seed), "rmia_gamma": options.rmia_gamma, "rmia_trim": options.rmia_trim,
              "rmia_population": int(min(options.rmia_population, scores.shape[1])),
              "rmia_population_seed": int(options.seed), "warnings": messages}
    return Attacks(results, extras, attack_scores, target_masks)


# The options a noise floor depends on (with the runs' scores): a cached floor is reused only when they match.
# FLOOR_FORMAT changes when the permutations drawn for a seed do (2: one spawned generator per permutation).
FLOOR_SETTINGS = ("seed", "permutations", "record_permutations", "fdr", "risk_auc", "eval_size", "rmia_gamma", "rmia_trim", "rmia_population")
FLOOR_FORMAT = 2


def cached_result(campaign, name, settings, options: AuditOptions, compute, result_format):
    """compute(), or its JSON result cached with the campaign's scores (`cache.py`) for these options
    and this `result_format`."""
    if campaign.cache is None:
        return compute()
    store, key = campaign.cache
    chosen = {field: getattr(options, field) for field in settings}
    return store.derived_json(key, name, {"format": result_format, **chosen}, compute)


def noise_floors(risk: RiskTables, attacks: Attacks, options: AuditOptions, on_permutation=None) -> dict:
    """The noise-floor step: what the headlines look like when nothing leaks, from seeded
    permutations of each patient's IN/OUT bits (`noise_floor`); JSON-ready, seeds included."""
    floors = campaign_noise_floors(risk.record_summary, risk.patient_summary, risk.patient_mask, risk.record_patient,
                                   attack_scores=attacks.scores, target_masks=attacks.target_masks, alpha=options.fdr,
                                   auc_threshold=options.risk_auc, thresholds=RISK_THRESHOLDS,
                                   n_permutations=options.permutations, record_permutations=options.record_permutations,
                                   seed=options.seed, on_permutation=on_permutation, record_ranks=risk.record_ranks,
                                   patient_ranks=risk.patient_ranks)
    for unit in ("patients", "records"):  # JSON keys, as in the summary's other share_above tables
        floors[unit]["share_above"] = {f"{t:g}": v for t, v in floors[unit]["share_above"].items()}
    return floors


PLANNER_MAX_UNITS = 20_000  # the planner predicts a median SE: a seeded sample of this many units is plenty


def run_planner(risk: RiskTables, target_se: float, seed: int = 0) -> dict:
    """How many runs give `target_se` for the median record's and patient's AUC, from this
    campaign's own DeLong variance components (the share of runs a patient is IN for is kept).

    Above PLANNER_MAX_UNITS records (patients) the components come from a uniform sample of that
    many, drawn with default_rng([seed, 0]) (patients: [seed, 1]); `n_units` and `sample_seed`
    say so in the result."""
    share_in = float(risk.patient_mask.sum(axis=0).mean() / risk.patient_mask.shape[0])

    def runs_in(n):
        return runs_in_per_patient(n, share_in)

    out = {}
    for stream, (unit, summaries, unit_patient) in enumerate((
            ("records", risk.record_summary, risk.record_patient),
            ("patients", risk.patient_summary, np.arange(risk.patient_mask.shape[1])))):
        n_units = summaries.shape[1]
        sample, sample_seed = slice(None), None
        if n_units > PLANNER_MAX_UNITS:
            sample_seed = [int(seed), stream]
            sample = np.sort(np.random.default_rng(sample_seed).choice(n_units, PLANNER_MAX_UNITS, replace=False))
        var_in, var_out = delong_components(np.asarray(summaries[:, sample]), risk.patient_mask[:, unit_patient[sample]])
        try:
            out[unit] = plan_runs(var_in, var_out, target_se, runs_in=runs_in)
        except MedleakError as e:  # too few runs for variance components: say so instead of planning
            out[unit] = {"n_runs": None, "target_se": float(target_se), "note": str(e)}
        out[unit].update(n_units=int(min(n_units, PLANNER_MAX_UNITS)), sample_seed=sample_seed)
    return out


MIN_TOP_FOR_TEST = 10  # a χ² test of the top patients' composition on fewer patients says nothing


def subgroup_tables(campaign, risk: RiskTables, top_share) -> SubgroupTables:
    """The subgroup step: composition of the most vulnerable patients (by the patient-level `auc`),
    privacy per group raw and adjusted for images per patient, utility per group."""
    comp_table, comp_tests = composition(risk.attributes, risk.patient_auc, top_share)
    # tests that cannot say anything are dropped: one category (0 dof) or a handful of top patients
    comp_tests = {attribute: test for attribute, test in comp_tests.items()
                  if test["dof"] >= 1 and test["n_top"] >= MIN_TOP_FOR_TEST}
    utility = None
    if campaign.test_logits is not None and campaign.test_records is not None:
        utility = utility_by_subgroup(campaign.test_logits, campaign.test_labels, campaign.test_records,
                                      campaign.subgroups, campaign.task)
    return SubgroupTables(comp_table, comp_tests, privacy_table(risk), utility)


def privacy_table(risk: RiskTables) -> pd.DataFrame:
    """Per attribute and category: patients, median patient AUC, at-risk share, and the group's
    difference from the other patients in AUC and in at-risk share, raw and adjusted for images per
    patient (`calibration.group_differences`; attributes with a single category are left out)."""
    patients = risk.patient_table
    n_images = patients["n_records"].to_numpy()
    base = privacy_by_subgroup(risk.attributes, risk.patient_auc, thresholds=())
    rows = []
    for attribute in risk.attributes.columns:
        values = risk.attributes[attribute].astype(str).to_numpy()
        if len(np.unique(values)) < 2:
            continue
        diffs = {measure: group_differences(patients[measure].to_numpy(np.float64), values, n_images).set_index("group")
                 for measure in ("auc", "at_risk")}
        for category, auc_diff in diffs["auc"].iterrows():
            risk_diff = diffs["at_risk"].loc[category]
            rows.append(dict(attribute=attribute, category=category, n_patients=int(auc_diff["n_patients"]),
                             mean_images=auc_diff["mean_images"], at_risk_share=risk_diff["risk_group"],
                             auc_difference=auc_diff["raw_difference"], auc_difference_se=auc_diff["raw_se"],
                             auc_difference_adjusted=auc_diff["adjusted_difference"],
                             auc_difference_adjusted_se=auc_diff["adjusted_se"],
                             at_risk_difference=risk_diff["raw_difference"],
                             at_risk_difference_adjusted=risk_diff["adjusted_difference"],
                             at_risk_difference_adjusted_se=risk_diff["adjusted_se"]))
    if not rows:
        return base.iloc[0:0]
    table = pd.DataFrame(rows)
    median = base.set_index(["attribute", "category"])["median_auc"]
    table.insert(3, "median_auc", median.reindex(pd.MultiIndex.from_frame(table[["attribute", "category"]])).to_numpy())
    return table


def write_tables(out_dir, risk: RiskTables, groups: SubgroupTables) -> None:
    write_csv(out_dir / "record_risk.csv", risk.record_table.sort_values("auc", ascending=False, kind="stable"))
    write_csv(out_dir / "patient_risk.csv", risk.patient_table)
    if groups.utility is not None:
        write_csv(out_dir / "utility_by_subgroup.csv", groups.utility)
    write_csv(out_dir / "composition_top_patients.csv", groups.composition)
    write_csv(out_dir / "privacy_by_subgroup.csv", groups.privacy)


def audit_figures(out_dir, risk: RiskTables, attacks: Attacks, groups: SubgroupTables, floors: dict, subgroups):
    """The figures step: ({key: PNG path}, {attribute: file-name slug}). Attributes with a single
    category get no per-group figures (nothing to compare)."""
    varied = [a for a in risk.attributes.columns if risk.attributes[a].astype(str).nunique() > 1]
    slugs = {attribute: re.sub(r"[^A-Za-z0-9]+", "_", attribute).strip("_") for attribute in varied}
    jobs = {  # key: (figure function, its arguments), drawn together by `figures.draw_all`
        "roc": (figures.roc_figure, {name: (curves, summary) for name, (summary, curves) in attacks.results.items()},
                FPR_GRID, out_dir),
        "esf_records": (figures.esf_figure, risk.record_auc, out_dir, "esf_records", "Record-level risk", "records",
                        floors["records"]["curve"], AUC_GRID),
        "esf_patients": (figures.esf_figure, risk.patient_auc, out_dir, "esf_patients", "Patient-level risk", "patients",
                         floors["patients"]["curve"], AUC_GRID),
    }
    for attribute, slug in slugs.items():
        values = risk.attributes[attribute].astype(str).to_numpy()
        by_category = {c: risk.patient_auc[values == c] for c in np.unique(values)}
        jobs[f"group_esf_{slug}"] = (figures.subgroup_esf_figure, by_category, out_dir, f"esf_by_{slug}", attribute)
        if attribute in groups.tests:
            jobs[f"composition_{slug}"] = (figures.composition_figure,
                                           groups.composition[groups.composition["attribute"] == attribute],
                                           groups.tests[attribute], out_dir, f"composition_{slug}", attribute)
        if groups.utility is not None and attribute in subgroups:
            jobs[f"utility_{slug}"] = (figures.utility_privacy_figure, groups.utility[groups.utility["attribute"] == attribute],
                                       groups.privacy[groups.privacy["attribute"] == attribute], out_dir,
                                       f"utility_privacy_{slug}", attribute)
    figs = figures.draw_all(jobs)
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


def _moments(values) -> dict:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def audit_summary(campaign, dataset, risk: RiskTables, attacks: Attacks, groups: SubgroupTables, floors: dict,
                  planner: dict, options: AuditOptions) -> dict:
    """attack_summary.json: every headline with its chance level (`noise_floor`), and the verdict."""
    patients, records = risk.patient_table, risk.record_table
    summary = {
        "dataset": dataset,
        "logdir": str(Path(campaign.logdir)),
        "task": campaign.task,
        "n_runs": campaign.n_runs,
        "n_records": int(len(campaign.records)),
        "n_patients": int(len(patients)),
        "n_views": int(campaign.scores.shape[2]),
        "skipped_runs": [{"run": int(r), "reason": why} for r, why in campaign.skipped],
        "attacks": {name: summary for name, (summary, _) in attacks.results.items()},
        **attacks.extras,
        "fdr": options.fdr,
        "risk_auc": options.risk_auc,
        "record_risk": {**_moments(risk.record_auc), "n_at_risk": int(records["at_risk"].sum()),
                        "share_above": {f"{t:g}": v for t, v in share_above(risk.record_auc).items()}},
        "patient_risk": {**_moments(risk.patient_auc), "n_at_risk": int(patients["at_risk"].sum()),
                         "most_exposed": str(patients["patient_id"].iloc[0]),
                         "share_above": {f"{t:g}": v for t, v in share_above(risk.patient_auc).items()}},
        # the paper's statistics (Gaussian record AUC; patient = worst image), for comparison only
        "record_auc_gaussian": {**_moments(records["auc_gaussian"]),
                                "share_above": {f"{t:g}": v for t, v in share_above(records["auc_gaussian"]).items()}},
        "patient_auc_max": {**_moments(patients["auc_max"]),
                            "share_above": {f"{t:g}": v for t, v in share_above(patients["auc_max"]).items()}},
        "noise_floor": floors,
        "run_planner": planner,
        "composition_tests": groups.tests,
        "top_share": options.top_share,
        "seeds": {"drop": int(options.seed), "rmia_population": int(options.seed),
                  "noise_floor": {unit: floors[unit]["seed"] for unit in ("patients", "records", "strongest_attack")}},
    }
    summary["verdict"] = report.verdict(summary, groups.privacy)
    return summary


def run_audit(logdir, options: AuditOptions = AuditOptions()):
    """Runs the whole audit; returns the attack_summary dict (also written to out_dir)."""
    check_options(options)
    files = read_campaign_files(logdir)
    check_dataset(options, files.plan, files.logdir)  # before the runs are read
    n_targets(len(list_complete_runs(files.logdir)), options.eval_size)  # too few runs / too many targets: say so now
    return audit_campaign(score_campaign(files, progress=options.progress, cache=options.cache), options).summary


def audit_campaign(campaign, options: AuditOptions) -> AuditResult:
    """The audit of a scored campaign (`scoring.load_campaign`): writes every output to out_dir."""
    dataset = check_dataset(options, campaign.plan, campaign.logdir)
    targets = np.arange(campaign.n_runs - n_targets(campaign.n_runs, options.eval_size), campaign.n_runs)
    out_dir = make_out_dir(options, Path("figs") / dataset)
    stages = Stages(options.progress)
    fitted = audit_fit(campaign, options)
    with stages.stage("risk"):
        risk = record_risk_tables(campaign, options, fitted)
    with stages.stage("attacks"):
        attacks = attack_suite(campaign, options, targets, fitted)
    n_permutations = 2 * options.permutations + options.record_permutations  # patients, strongest attack, records
    with stages.stage("noise floor", total=n_permutations, unit="permutation") as bar:
        floors = cached_result(campaign, "noise_floor", FLOOR_SETTINGS, options,
                               lambda: noise_floors(risk, attacks, options, on_permutation=bar.update), FLOOR_FORMAT)
    with stages.stage("subgroups"):
        groups = subgroup_tables(campaign, risk, options.top_share)
        write_tables(out_dir, risk, groups)
    with stages.stage("figures"):
        figs, slugs = audit_figures(out_dir, risk, attacks, groups, floors, campaign.subgroups)
        unreadable = []
        if options.data_root is not None and "path" in risk.record_table:
            grid, unreadable = vulnerable_images(out_dir, risk.record_table, options.data_root, dataset)
            if grid is not None:
                figs["vulnerable_images"] = grid
    with stages.stage("planner and report"):
        summary = audit_summary(campaign, dataset, risk, attacks, groups, floors, run_planner(risk, options.target_se, options.seed), options)
        write_json(out_dir / "attack_summary.json", summary)
        summary["report"] = str(report.audit_page(out_dir, summary, attacks.results, risk.patient_table, groups.privacy,
                                                  groups.utility, figs, slugs, unreadable))
    return AuditResult(summary, risk.record_table, risk.patient_table, groups, attacks.scores, attacks.target_masks)
