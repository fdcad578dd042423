"""The audit across privacy budgets: several campaign logdirs of one dataset, each trained at its own
ε (DP-SGD, or ordinary training = ε ∞), compared side by side. `compare_budgets` is what
`mem_inf_stats.py --logdir=a,b,c` calls; everything else here is a pure function.

Per logdir: its guarantee (from the runs' metrics.json "dp"; ∞ when absent), test utility, the
record/patient risk of its single audit (the tables `audit_campaign` returns) and

- **the AUC bound its guarantee implies** (`medleak.dp.accounting`): runs differ slightly (each run
  calibrates σ for its own number of units and sampling rate q), so the bound is the largest over
  runs. Runs are sorted by (q, σ) and split into at most `MAX_BOUND_GROUPS` groups of neighbours;
  a group's bound uses the profile of the untruncated mechanism with its (smallest σ, largest q,
  most steps), which dominates each of its runs (more noise, a lower sampling rate or fewer steps
  are post-processing of it), plus (1 + e^ε)·η on δ for η = steps × the per-step truncation
  probability (the total-variation distance between truncated and untruncated sampling). So the
  bound is never smaller than any run's own; with one run per group and no truncation it is
  exactly the largest `auc_upper_bound_for_training(σ, q, steps)` over runs.
- **patient-level bounds**: with patient-level DP the same bound applies to a patient. With
  record-level DP a patient with k images is protected only through group privacy:
  (kε, k·e^{(k−1)ε}·δ), so each patient is compared with the bound for their own k.
- **an empirical ε lower bound**: the one-run audit of Steinke, Nasr & Jagielski 2023
  (`medleak.dp.auditing`, via `accounting.empirical_epsilon_lower_bound`) from the strongest
  LiRA/loss attack on each held-out target model, Bonferroni over targets and candidate attacks.
  A target's canaries are privacy units, each with its own IN/OUT coin in that run: one per
  patient (its records' mean attack score), and for record-level DP only patients with a single
  image (a record of a multi-image patient moves IN/OUT with the patient's other images, a group
  the record-level guarantee covers only as kε). The theorem needs fair coins: a patient is IN
  for k of the n_runs runs, so P(IN) = k/n_runs must be ½ (else the bound is NaN, with a
  warning). The attacks' shadows do not depend on the target's coins (`audit`'s per-target
  design), so on null campaigns the bound is 0 within its confidence. δ is the campaign's; for
  ordinary training (no δ) `default_delta` of the number of patients.
- **the chance level of each headline** (`chance_columns`): the patients-at-risk share and the
  strongest attack's AUC of the single audit beside their noise floor (observed, chance mean and
  interval, excess and interval) from the audit's summary["noise_floor"]; NaN where the audit
  reports none.
"""

import dataclasses
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from medleak.rundir import METRICS_FILE, list_complete_runs, load_patient_mask, run_dir
from medleak.errors import MedleakError
from medleak.io_utils import read_json, write_csv, write_json
from medleak.privacy_utils import figures, report
from medleak.privacy_utils.audit import (LIRA_VARIANTS, AuditOptions, audit_campaign, check_dataset, check_options,
                                         make_out_dir)
from medleak.privacy_utils.figures import epsilon_text
from medleak.privacy_utils.load import read_plan_files
from medleak.privacy_utils.report import EMPIRICAL_EPSILON_NOTE
from medleak.privacy_utils.roc import summarise_attack
from medleak.privacy_utils.scoring import load_campaign

MAX_BOUND_GROUPS = 8  # each group's bound composes a PLD over all steps (seconds): bounded work per logdir


# --------------------------------------------------------------------- reading the logdirs


def parse_logdirs(text):
    """`a,b,c` → [Path]; an empty entry or a repeated logdir is a one-line error."""
    parts = [p.strip() for p in str(text).split(",")]
    if any(not p for p in parts):
        raise MedleakError(f"--logdir={text}: empty entry in the comma-separated list")
    paths = [Path(p) for p in parts]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise MedleakError(f"--logdir={text}: a logdir is listed twice")
    return paths


def logdir_labels(logdirs):
    """Short unique names: the fewest trailing path parts that tell the logdirs apart, joined by '_'.

    `logs/dp_eps1/chexpert, logs/dp_eps8/chexpert` → `dp_eps1_chexpert, dp_eps8_chexpert`.
    """
    parts = [Path(p).resolve().parts for p in logdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["_".join(p[-depth:]).strip("/") for p in parts]
        names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("_") or "logdir" for n in names]
        if len(set(names)) == len(names):
            return names
    return [f"logdir{i}" for i in range(len(logdirs))]


def check_same_dataset(plans, logdirs):
    """All logdirs must hold campaigns of one dataset (same name and, when recorded, the same records)."""
    first = plans[0]
    for plan, logdir in zip(plans[1:], logdirs[1:]):
        for key in ("dataset", "dataset_hash", "test_dataset_hash", "label_names", "task"):
            if key in first and key in plan and first[key] != plan[key]:
                raise MedleakError(f"--logdir: {logdir} holds a different dataset than {logdirs[0]} (plan.json {key!r} differs); "
                                   "compare campaigns of one dataset only")


def read_run_metrics(logdir):
    """[metrics dict] of every complete run of `logdir` (one-line error for an unreadable file)."""
    out = []
    for run in list_complete_runs(logdir):
        path = run_dir(logdir, run) / METRICS_FILE
        if not path.is_file():
            continue
        try:
            out.append(read_json(path))
        except (ValueError, OSError) as e:
            raise MedleakError(f"{path}: unreadable ({str(e).splitlines()[0]}); delete the run directory and train it again") from None
    if not out:
        raise MedleakError(f"{Path(logdir) / 'runs'}: no complete runs with metrics.json; train the campaign first")
    return out


# --------------------------------------------------------------------- pure functions


def guarantee(dp_dicts, source="logdir"):
    """The campaign's guarantee from its runs' "dp" dicts (None = ordinary training).

    Returns dict target_epsilon (inf without DP), epsilon (largest spent over runs), delta (largest),
    unit ("none" without DP), sigma_min/sigma_max, q (largest), steps (most), truncation (largest
    per-step truncation probability), n_runs, mechanisms (sorted distinct (q, σ, steps, truncation)). Mixed DP/non-DP runs or mixed targets/units are an error.
    """
    has_dp = [d is not None for d in dp_dicts]
    if not dp_dicts:
        raise MedleakError(f"{source}: no runs")
    if any(has_dp) and not all(has_dp):
        raise MedleakError(f"{source}: some runs were trained with DP and some without; one campaign must use one --epsilon")
    if not any(has_dp):
        return dict(target_epsilon=math.inf, epsilon=math.inf, delta=math.nan, unit="none", sigma_min=0.0, sigma_max=0.0,
                    q=math.nan, steps=0, truncation=0.0, n_runs=len(dp_dicts), mechanisms=[])
    for key in ("target_epsilon", "unit"):
        values = {d.get(key) for d in dp_dicts}
        if len(values) > 1:
            raise MedleakError(f"{source}: runs disagree on dp {key} ({sorted(map(str, values))}); one campaign must use one setting")
    try:
        sigmas = [float(d["noise_multiplier"]) for d in dp_dicts]
        mechanisms = sorted({(float(d["sampling_rate"]), float(d["noise_multiplier"]), int(d["steps"]),
                              float(d.get("truncation_prob_per_step") or 0.0)) for d in dp_dicts})
        return dict(target_epsilon=float(dp_dicts[0]["target_epsilon"]),
                    epsilon=max(float(d["epsilon"]) for d in dp_dicts),
                    delta=max(float(d["delta"]) for d in dp_dicts),
                    unit=str(dp_dicts[0]["unit"]), sigma_min=min(sigmas), sigma_max=max(sigmas),
                    q=max(float(d["sampling_rate"]) for d in dp_dicts), steps=max(int(d["steps"]) for d in dp_dicts),
                    truncation=max(float(d.get("truncation_prob_per_step") or 0.0) for d in dp_dicts),
                    n_runs=len(dp_dicts), mechanisms=mechanisms)
    except (KeyError, TypeError, ValueError) as e:
        raise MedleakError(f"{source}: a run's metrics.json 'dp' lacks or garbles {e}; re-train it with the current version") from None


def auc_bound(facts, max_groups=MAX_BOUND_GROUPS, n_epsilons=400):
    """Upper bound on any membership test's AUC against one unit, the largest over runs (module doc)."""
    mechanisms = facts.get("mechanisms") or []
    if not math.isfinite(facts["target_epsilon"]) or not mechanisms:
        return dominating_auc_bound(facts, n_epsilons)
    bounds = []
    for group in np.array_split(np.array(mechanisms, dtype=np.float64), min(max_groups, len(mechanisms))):
        bounds.append(dominating_auc_bound(dict(target_epsilon=facts["target_epsilon"], q=float(group[:, 0].max()),
                                                sigma_min=float(group[:, 1].min()), steps=int(group[:, 2].max()),
                                                truncation=float(group[:, 3].max())), n_epsilons))
    return max(bounds)


def dominating_auc_bound(facts, n_epsilons=400):
    """AUC bound of the mechanism (facts' sigma_min, q, steps, truncation) that dominates a group of runs."""
    from medleak.dp.accounting import auc_upper_bound, auc_upper_bound_for_training, privacy_profile, spent_epsilon

    if not math.isfinite(facts["target_epsilon"]) or facts["sigma_min"] == 0:
        return 1.0
    sigma, q, steps = facts["sigma_min"], facts["q"], facts["steps"]
    eta = steps * facts["truncation"]
    if eta == 0:
        return auc_upper_bound_for_training(sigma, q, steps, n_epsilons=n_epsilons)
    eps_max = spent_epsilon(sigma, q, steps, 1e-12)
    epsilons = np.linspace(0.0, max(eps_max, 1e-3), n_epsilons)
    deltas = privacy_profile(sigma, q, steps, epsilons) + (1.0 + np.exp(epsilons)) * eta
    return auc_upper_bound(epsilons, np.minimum(deltas, 1.0))


def group_privacy(epsilon, delta, k):
    """(ε, δ)-DP for one unit → (kε, k·e^{(k−1)ε}·δ) for a group of k units (δ capped at 1)."""
    k = int(k)
    if k < 1:
        raise ValueError(f"group size must be ≥ 1, got {k}")
    with np.errstate(over="ignore"):
        return k * epsilon, float(min(1.0, k * math.exp(min((k - 1) * epsilon, 700.0)) * delta))


def patient_bounds(facts, record_bound, n_records_per_patient):
    """AUC bound per patient: the unit bound at patient level; group privacy of k records at record level."""
    from medleak.dp.accounting import auc_upper_bound

    k = np.asarray(n_records_per_patient, dtype=np.int64)
    if facts["unit"] != "record" or not math.isfinite(facts["epsilon"]):
        return np.full(k.shape, record_bound, dtype=np.float64)
    cache = {1: record_bound}
    for size in np.unique(k):
        if int(size) not in cache:
            eps_k, delta_k = group_privacy(facts["epsilon"], facts["delta"], size)
            cache[int(size)] = 1.0 if delta_k >= 1.0 else auc_upper_bound([eps_k], [delta_k])
    return np.array([cache[int(s)] for s in k], dtype=np.float64)


def mean_sd(values):
    """(mean, sd) over the finite values (NaN, NaN when none)."""
    values = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    values = values[np.isfinite(values)]
    return (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)


def utility_summary(metrics):
    """Mean ± sd over runs of test macro AUROC and accuracy from runs' metrics.json."""
    tests = [m.get("test") or {} for m in metrics]
    auroc, auroc_sd = mean_sd([t.get("macro_auroc") for t in tests])
    accuracy, accuracy_sd = mean_sd([t.get("accuracy") for t in tests])
    return dict(auroc_mean=auroc, auroc_sd=auroc_sd, accuracy_mean=accuracy, accuracy_sd=accuracy_sd)


def subgroup_utility(metrics):
    """DataFrame attribute, category, auroc_mean, auroc_sd, n_runs from runs' test subgroup metrics."""
    values = {}
    for m in metrics:
        for attribute, groups in ((m.get("test") or {}).get("subgroups") or {}).items():
            for category, group in (groups or {}).items():
                values.setdefault((attribute, str(category)), []).append((group or {}).get("macro_auroc"))
    rows = []
    for (attribute, category), aurocs in sorted(values.items()):
        mean, sd = mean_sd(aurocs)
        rows.append(dict(attribute=attribute, category=category, auroc_mean=mean, auroc_sd=sd, n_runs=len(aurocs)))
    return pd.DataFrame(rows, columns=["attribute", "category", "auroc_mean", "auroc_sd", "n_runs"])


def strongest_attack_scores(attack_scores, target_masks, unit_index):
    """(name, [in_scores], [out_scores], n_candidates): the strongest LiRA variant or loss threshold's
    unit scores, one array per held-out target (a target is one training run: its units are that
    run's canaries, `medleak.dp.auditing`; several runs' units pooled are not).

    attack_scores / target_masks: the single audit's held-out targets (`audit.AuditResult`);
    strongest = highest mean AUC over targets (RMIA is left out: its scores are population ranks).
    unit_index (n_records,) int gives each record's trial (a patient), −1 leaves the record out; a
    trial's score is the mean over its records, its membership that of its records (all equal).
    """
    candidates = {name: attack_scores[name] for name in LIRA_VARIANTS}
    candidates["Loss threshold"] = attack_scores["Loss threshold"]
    aucs = {name: summarise_attack(s, target_masks)[0]["auc"]["mean"] for name, s in candidates.items()}
    best = max(aucs, key=aucs.get)
    scores = np.asarray(candidates[best], dtype=np.float64)
    per_target = [unit_trials(s[None], m[None], unit_index) for s, m in zip(scores, np.asarray(target_masks, dtype=bool))]
    return best, [s[m] for s, m in per_target], [s[~m] for s, m in per_target], len(candidates)


def inclusion_probability(patient_mask):
    """P(IN) of one patient's coin in one run: k / n_runs for the plan's (n_runs, n_patients) mask, in
    which every patient is IN for the same k runs, drawn per patient; NaN when k differs between
    patients (not such a plan)."""
    patient_mask = np.asarray(patient_mask, dtype=bool)
    runs_in = np.unique(patient_mask.sum(axis=0))
    return float(runs_in[0]) / patient_mask.shape[0] if runs_in.size == 1 else math.nan


def unit_trials(target_scores, target_masks, unit_index):
    """Per target and unit: mean score over the unit's records (non-finite ones skipped), membership.

    Returns flat (scores, members) over targets × units that have a finite score.
    """
    unit_index = np.asarray(unit_index, dtype=np.int64)
    kept = unit_index >= 0
    n_units = int(unit_index.max()) + 1 if kept.any() else 0
    all_scores, all_members = [], []
    for scores, members in zip(target_scores, target_masks):
        ok = kept & np.isfinite(scores)
        total = np.bincount(unit_index[ok], weights=scores[ok], minlength=n_units)
        count = np.bincount(unit_index[ok], minlength=n_units)
        member = np.bincount(unit_index[kept], weights=members[kept].astype(float), minlength=n_units) > 0
        present = count > 0
        all_scores.append(total[present] / count[present])
        all_members.append(member[present])
    if not all_scores:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(all_scores), np.concatenate(all_members)


def trial_units(patient_ids, unit):
    """Record → trial index: the patient; for record-level DP only single-image patients (others −1)."""
    codes, uniques = pd.factorize(pd.Series(patient_ids).astype(str), sort=False)
    if unit == "record":
        sizes = np.bincount(codes, minlength=len(uniques))
        codes = np.where(sizes[codes] == 1, codes, -1)
    return codes


# Headlines shown beside their chance level: column stem → path in the audit's summary["noise_floor"]
CHANCE_HEADLINES = (("at_risk", ("patients", "at_risk")), ("strongest_attack_auc", ("strongest_attack",)))
CHANCE_FIELDS = ("", "chance_", "chance_{}_lo", "chance_{}_hi", "excess_", "excess_{}_lo", "excess_{}_hi")


def chance_columns(summary):
    """{column: value} of each CHANCE_HEADLINES entry: observed, chance mean and interval, excess and
    interval, from the single audit's summary["noise_floor"] (`noise_floor.compare_to_chance`'s
    fields; an interval also read as a [lo, hi] pair `chance_interval` / `excess_interval`; the
    strongest attack's entry may hold them under "max_auc"). NaN for whatever it does not report."""
    floor = (summary or {}).get("noise_floor") or {}
    out = {}
    for stem, path in CHANCE_HEADLINES:
        entry = floor
        for key in path:
            entry = entry.get(key) if isinstance(entry, dict) else None
        entry = entry if isinstance(entry, dict) else {}
        entry = entry.get("max_auc", entry) if isinstance(entry.get("max_auc"), dict) else entry
        values = [entry.get("observed"), entry.get("chance_mean"), *interval(entry, "chance"), entry.get("excess"),
                  *interval(entry, "excess")]
        for field, value in zip(CHANCE_FIELDS, values):
            column = field.format(stem) if "{}" in field else f"{field}{stem}"
            out[column] = finite_or_nan(value)
    return out


def interval(entry, name):
    """(lo, hi) of a noise-floor entry's `name` interval: name_lo/name_hi, or a pair name_interval."""
    if f"{name}_lo" in entry or f"{name}_hi" in entry:
        return entry.get(f"{name}_lo"), entry.get(f"{name}_hi")
    pair = entry.get(f"{name}_interval")
    return tuple(pair) if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, None)


def finite_or_nan(value):
    """float(value), or NaN for a missing or non-numeric value."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def budget_row(label, facts, utility, record_table, patient_table, bound, patient_bound, empirical, n_trials, attack,
               chance):
    """One row of budgets.csv (its columns, in order, are this dict's keys); `chance`: `chance_columns`."""
    auc, se = record_table["auc"].to_numpy(float), record_table["auc_se"].to_numpy(float)
    patient_auc = patient_table["auc_max"].to_numpy(float)
    return dict(
        logdir=label, target_epsilon=facts["target_epsilon"], spent_epsilon=facts["epsilon"], delta=facts["delta"],
        unit=facts["unit"], sigma_min=facts["sigma_min"], sigma_max=facts["sigma_max"], q=facts["q"], steps=facts["steps"],
        n_runs=facts["n_runs"], test_auroc_mean=utility["auroc_mean"], test_auroc_sd=utility["auroc_sd"],
        test_accuracy_mean=utility["accuracy_mean"], test_accuracy_sd=utility["accuracy_sd"],
        auc_bound=bound, share_records_above_bound=float(np.mean(auc > bound)),
        share_records_above_bound_2se=float(np.mean(auc - 2 * se > bound)),
        share_patients_above_bound=float(np.mean(patient_auc > patient_bound)), max_record_auc=float(auc.max()),
        max_patient_auc=float(patient_auc.max()), empirical_epsilon_lb=empirical, theoretical_epsilon=facts["epsilon"],
        n_trials=n_trials, attack=attack, **chance, note=EMPIRICAL_EPSILON_NOTE,
    )


# --------------------------------------------------------------------- orchestration


@dataclasses.dataclass
class _Budget:
    logdir: Path
    label: str
    facts: dict
    metrics: list


def audit_budget(budget: _Budget, options: AuditOptions, out_dir, dataset):
    """One logdir's step: its single audit into <out_dir>/<label>/, then (budgets.csv row, record eSF curve,
    patient eSF curve, utility per subgroup)."""
    single_dir = out_dir / budget.label
    audit = audit_campaign(load_campaign(budget.logdir, progress=options.progress),
                           dataclasses.replace(options, out_dir=single_dir, dataset=dataset))
    record_table, patient_table = audit.record_table, audit.patient_table
    bound = auc_bound(budget.facts)
    p_bounds = patient_bounds(budget.facts, bound, patient_table["n_records"].to_numpy())
    units = trial_units(record_table["patient_id"].to_numpy(), budget.facts["unit"])
    attack, in_scores, out_scores, n_candidates = strongest_attack_scores(audit.attack_scores, audit.target_masks, units)
    chance = chance_columns(audit.summary)
    del audit
    n_trials = sum(a.size + b.size for a, b in zip(in_scores, out_scores))
    empirical = empirical_epsilon(budget, in_scores, out_scores, n_candidates, len(patient_table))
    row = budget_row(budget.label, budget.facts, utility_summary(budget.metrics), record_table, patient_table,
                     bound, p_bounds, empirical, n_trials, attack, chance)
    name = epsilon_text(budget.facts["target_epsilon"])
    finite = math.isfinite(budget.facts["target_epsilon"])
    record_curve = (f"ε = {name} ({budget.facts['unit']}-level)" if finite else "ε = ∞ (no DP)",
                    record_table["auc"].to_numpy(float), bound if finite else None)
    if finite and budget.facts["unit"] == "record":
        p_line, p_text = float(p_bounds.max()), f"group privacy, {int(patient_table['n_records'].max())} images"
    else:
        p_line, p_text = (bound, "patient-level bound") if finite else (None, None)
    patient_curve = (record_curve[0], patient_table["auc_max"].to_numpy(float), p_line, p_text)
    groups = subgroup_utility(budget.metrics)
    groups.insert(0, "target_epsilon", budget.facts["target_epsilon"])
    groups.insert(0, "logdir", budget.label)
    return row, record_curve, patient_curve, groups


def empirical_epsilon(budget: _Budget, in_scores, out_scores, n_candidates, n_patients):
    """The one-run ε lower bound of one logdir (module doc); NaN (with a warning) when its plan's
    coins are not fair or no target has both IN and OUT units."""
    from medleak.dp.accounting import default_delta, empirical_epsilon_lower_bound

    if not any(a.size and b.size for a, b in zip(in_scores, out_scores)):
        return math.nan
    p_in = inclusion_probability(load_patient_mask(budget.logdir))
    if not abs(p_in - 0.5) < 1e-12:
        warnings.warn(f"{budget.logdir}: patients are IN with probability {p_in:.3g} per run, not 1/2; the empirical "
                      "epsilon (one-run audit) needs --subset_ratio=0.5 and an even --n_runs, so it is left out (NaN)",
                      stacklevel=2)
        return math.nan
    delta = budget.facts["delta"] if math.isfinite(budget.facts["delta"]) else default_delta(int(n_patients))
    return empirical_epsilon_lower_bound(in_scores, out_scores, delta, significance=0.05 / n_candidates,
                                         inclusion_probability=p_in)


def budget_figures(out_dir, table, subgroup_table, record_curves, patient_curves) -> dict:
    """The comparison's figures: {key: PNG path}."""
    figs = {
        "esf_records": figures.budget_esf_figure([(label, values, bound, "AUC bound") for label, values, bound in record_curves], out_dir,
                                                 "budgets_esf_records", "Record-level risk per privacy budget", "records"),
        "esf_patients": figures.budget_esf_figure(patient_curves, out_dir, "budgets_esf_patients",
                                                  "Patient-level risk (worst image) per privacy budget", "patients"),
        "utility": figures.utility_vs_epsilon_figure(table, out_dir, "budgets_utility"),
    }
    for attribute in subgroup_table["attribute"].unique():
        slug = re.sub(r"[^A-Za-z0-9]+", "_", str(attribute)).strip("_")
        figs[f"subgroup_{slug}"] = figures.subgroup_utility_vs_epsilon_figure(
            subgroup_table[subgroup_table["attribute"] == attribute], out_dir, f"budgets_utility_{slug}", attribute)
    return figs


def compare_budgets(logdirs, options: AuditOptions = AuditOptions()):
    """Audits each logdir into <out_dir>/<label>/ and compares them in <out_dir>/ (budgets.csv, figures,
    budgets.html). Returns a summary dict (also written as budgets.json). Checks every logdir first."""
    check_options(options)
    logdirs = [Path(p) for p in logdirs]
    if len(logdirs) < 2:
        raise MedleakError("--logdir: the comparison across budgets needs at least 2 comma-separated logdirs")
    plans = [read_plan_files(p)[0] for p in logdirs]  # one-line errors for a missing/bad logdir, before any work
    check_same_dataset(plans, logdirs)
    dataset = check_dataset(options, plans[0], logdirs[0])
    budgets = []
    for logdir, label in zip(logdirs, logdir_labels(logdirs)):
        metrics = read_run_metrics(logdir)
        budgets.append(_Budget(logdir, label, guarantee([m.get("dp") for m in metrics], source=str(logdir)), metrics))
    budgets.sort(key=lambda b: (b.facts["target_epsilon"], b.label))
    out_dir = make_out_dir(options, Path("figs") / f"{dataset}_dp")

    steps = [audit_budget(budget, options, out_dir, dataset)
             for budget in tqdm(budgets, desc="budgets", unit="logdir", disable=not options.progress)]
    rows, record_curves, patient_curves, subgroup_rows = (list(column) for column in zip(*steps))
    table = pd.DataFrame(rows)
    write_csv(out_dir / "budgets.csv", table)
    subgroup_table = pd.concat(subgroup_rows, ignore_index=True)
    write_csv(out_dir / "budgets_utility_by_subgroup.csv", subgroup_table)
    figs = budget_figures(out_dir, table, subgroup_table, record_curves, patient_curves)
    summary = {"dataset": dataset, "logdirs": [str(b.logdir) for b in budgets], "labels": [b.label for b in budgets],
               "budgets": table.drop(columns=["note"]).to_dict(orient="records"), "note": EMPIRICAL_EPSILON_NOTE}
    write_json(out_dir / "budgets.json", summary)
    summary["report"] = str(report.budget_page(out_dir, dataset, table, subgroup_table, figs))
    return summary
