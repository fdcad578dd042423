"""`xrv_attack.py`'s work: offline attacks on TorchXRayVision's models with one reference model.

Per dataset logdir written by `xrv_scores.py` (docs/XRV.md), the target model's scores on its
members and non-members are compared with the reference model's (PadChest) on the same images:

- offline LiRA with one reference: log Φ((s_target − s_ref) / σ) — with one OUT model σ is one
  pooled constant, so the ranking is that of the score difference s_target − s_ref;
- offline RMIA: LR(x) = p_target(x) / Pr(x), Pr(x) = ½((1 + a)·p_ref(x) + (1 − a)), scored against
  a population of the other audited records.

`a` is never tuned on the model being attacked. The usual recipe (a reference model as pretend
target) needs two reference models; with one, `a="auto"` tunes it on the *other* dataset's target
model, whose members are known from the same rebuilt split, against the same reference — an attack
setting the attacker controls. A number for `a` skips tuning.

Outputs (into `out_dir`): ROC curves (linear and log-log) of both attacks on both targets, their
AUC and TPR at 0.1 % / 1 % FPR, per-record and per-patient risk tables, attack AUC per subgroup,
and the subgroup / disease composition of the most exposed member patients vs all member patients.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from absl import logging

from medleak.errors import MedleakError
from medleak.io_utils import write_csv, write_json
from medleak.privacy_utils import figures, roc, subgroups
from medleak.privacy_utils.lira import lira
from medleak.privacy_utils.scoring import load_campaign
from medleak.privacy_utils.risk import patient_risk
from medleak.privacy_utils.rmia import DEFAULT_GAMMA, population_indices, rmia, tune_offline_a
from medleak.privacy_utils.scores import rmia_from_lira
from medleak.xrv import logdir as logdir_format
from medleak.xrv import report as xrv_report

ATTACKS = ("rmia", "lira")
DEFAULT_A = "auto"


class XrvAudit:
    """One dataset logdir: the target's and the reference's per-record scores and the truth."""

    def __init__(self, logdir):
        self.campaign = load_campaign(logdir, progress=False)
        roles = logdir_format.model_runs(self.campaign.plan, logdir)
        rows = {int(run): i for i, run in enumerate(self.campaign.run_ids)}
        self.target_name, self.reference_name = roles["target"]["name"], roles["reference"]["name"]
        self.target_row, self.reference_row = rows[roles["target"]["run"]], rows[roles["reference"]["run"]]
        self.dataset = self.campaign.dataset
        self.members = self.campaign.masks[self.target_row].copy()
        if self.members.all() or not self.members.any():
            raise MedleakError(f"{logdir}: the audit sample needs both members and non-members")

    def lira_scores(self, row):
        return self.campaign.scores[row]  # (N, 1) LiRA log-odds of the correct label vector

    def rmia_scores(self, row):
        return rmia_from_lira(self.campaign.scores[row])  # (N, 1) p(correct label vector)

    def reference_inputs(self, kind):
        """(shadow scores (1, N, 1), shadow masks (1, N)): the reference as the only OUT model."""
        scores = self.rmia_scores(self.reference_row) if kind == "rmia" else self.lira_scores(self.reference_row)
        return scores[None], np.zeros((1, len(self.members)), dtype=bool)


def tune_a(pretend: XrvAudit, gamma=DEFAULT_GAMMA, n_population=10_000, seed=0):
    """Offline RMIA `a` maximising AUC on `pretend`'s target (never the attacked one); (a, {a: auc})."""
    reference, reference_mask = pretend.reference_inputs("rmia")
    shadows = np.concatenate([pretend.rmia_scores(pretend.target_row)[None], reference])
    masks = np.concatenate([pretend.members[None], reference_mask])
    population = population_indices(len(pretend.members), n_population, seed)
    return tune_offline_a(shadows, masks, gamma=gamma, population=population)  # shadow 0 = pretend target


def choose_a(audits: dict, a=DEFAULT_A, **kwargs) -> dict:
    """{dataset: (a, how it was chosen)} for every audit."""
    if a != DEFAULT_A:
        try:
            value = float(a)
        except (TypeError, ValueError):
            raise MedleakError(f"--a must be 'auto' or a number in [0, 1], got {a!r}") from None
        if not 0.0 <= value <= 1.0:
            raise MedleakError(f"--a must lie in [0, 1], got {a!r}")
        return {d: (value, "given (--a)") for d in audits}
    if len(audits) < 2:
        raise MedleakError("--a=auto tunes RMIA's `a` on the other dataset's target model; with one dataset "
                           "give --a=<number in [0, 1]>")
    chosen = {}
    for dataset in audits:
        other = next(d for d in audits if d != dataset)
        value, aucs = tune_a(audits[other], **kwargs)
        chosen[dataset] = (value, f"tuned on {audits[other].target_name} ({other} records) vs "
                                  f"{audits[other].reference_name}; AUC {aucs[value]:.3f}")
        logging.info("%s: RMIA a = %.2f (%s)", dataset, value, chosen[dataset][1])
    return chosen


def attack_scores(audit: XrvAudit, a: float, gamma=DEFAULT_GAMMA, n_population=10_000, seed=0) -> dict:
    """{"rmia": (N,), "lira": (N,)} membership scores of the target's records (higher = member)."""
    reference, mask = audit.reference_inputs("rmia")
    rmia_attack = rmia(reference, mask, audit.rmia_scores(audit.target_row), offline=True, a=a, gamma=gamma,
                       n_population=n_population, seed=seed)
    reference, mask = audit.reference_inputs("lira")
    lira_attack = lira(reference, mask, audit.lira_scores(audit.target_row), offline=True)
    return {"rmia": np.asarray(rmia_attack, dtype=np.float64), "lira": np.asarray(lira_attack, dtype=np.float64)}


def detection_fpr(scores, members) -> np.ndarray:
    """Per record: share of non-members scoring at least as high — the FPR at which it is flagged."""
    nonmember_scores = np.sort(scores[~members])
    at_least = len(nonmember_scores) - np.searchsorted(nonmember_scores, scores, side="left")
    return at_least / len(nonmember_scores)


def record_table(audit: XrvAudit, attack: dict) -> pd.DataFrame:
    """Per record: ids, membership, both attack scores, detection FPR, labels text and subgroups."""
    records = audit.campaign.records
    df = pd.DataFrame({"record_id": records["record_id"], "patient_id": records["patient_id"],
                       "path": records.get("path", ""), "member": audit.members})
    for kind in ATTACKS:
        df[f"{kind}_score"] = attack[kind]
        df[f"{kind}_detection_fpr"] = detection_fpr(attack[kind], audit.members)
    df["labels"] = subgroups.record_label_text(records, audit.campaign.label_names, audit.campaign.task)
    for column in audit.campaign.subgroups:
        df[column] = records[column].to_numpy()
    return df.sort_values("rmia_score", ascending=False, kind="stable").reset_index(drop=True)


def patient_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per patient: max and mean RMIA score over their audited images, member flag, image count."""
    risk = patient_risk(records["rmia_score"].to_numpy(), records["patient_id"].to_numpy())
    risk = risk.rename(columns={"auc_max": "rmia_max", "auc_mean": "rmia_mean"})
    member = records.groupby("patient_id")["member"].first()
    risk.insert(1, "member", risk["patient_id"].map(member).to_numpy())
    return risk


def subgroup_attack_table(records: pd.DataFrame, subgroup_columns, levels=roc.FPR_LEVELS) -> pd.DataFrame:
    """Attack AUC and TPR at low FPR within each subgroup value (NaN where it lacks members or non-members)."""
    rows = []
    groups = [("all", "all", np.ones(len(records), dtype=bool))]
    for column in subgroup_columns:
        values = records[column].astype(str).to_numpy()
        groups += [(column, value, values == value) for value in np.unique(values)]
    members = records["member"].to_numpy(dtype=bool)
    for attribute, category, selected in groups:
        row = {"attribute": attribute, "category": category, "n_members": int((selected & members).sum()),
               "n_nonmembers": int((selected & ~members).sum())}
        for kind in ATTACKS:
            scores = records[f"{kind}_score"].to_numpy()[selected]
            if row["n_members"] and row["n_nonmembers"]:
                fpr, tpr = roc.roc_curve(scores, members[selected])
                row[f"{kind}_auc"] = roc.auc_score(scores, members[selected])
                for level in levels:
                    row[f"{kind}_tpr_at_{level * 100:g}%_fpr"] = roc.tpr_at_fpr(fpr, tpr, level)
            else:
                row[f"{kind}_auc"] = np.nan
                for level in levels:
                    row[f"{kind}_tpr_at_{level * 100:g}%_fpr"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def member_composition(audit: XrvAudit, patients: pd.DataFrame, top_share=subgroups.TOP_SHARE):
    """Subgroup and disease composition of the most exposed member patients (by max RMIA score)."""
    member_patients = patients[patients["member"]]
    campaign = audit.campaign
    attributes = subgroups.patient_attributes(campaign.records, member_patients["patient_id"].to_numpy(),
                                              campaign.subgroups, campaign.label_names, campaign.task)
    return subgroups.composition(attributes, member_patients["rmia_max"].to_numpy(), top_share)


def audit_dataset(dataset, audit: XrvAudit, a: float, how: str, out_dir, gamma=DEFAULT_GAMMA,
                  n_population=10_000, seed=0, top_share=subgroups.TOP_SHARE) -> dict:
    """Attacks one target, writes its tables and composition figures; returns them and its summary."""
    attack = attack_scores(audit, a, gamma, n_population, seed)
    records = record_table(audit, attack)
    patients = patient_table(records)
    by_subgroup = subgroup_attack_table(records, audit.campaign.subgroups)
    composition, tests = member_composition(audit, patients, top_share)
    write_csv(out_dir / f"{dataset}_record_risk.csv", records)
    write_csv(out_dir / f"{dataset}_patient_risk.csv", patients)
    write_csv(out_dir / f"{dataset}_subgroup_attack.csv", by_subgroup)
    write_csv(out_dir / f"{dataset}_top_composition.csv", composition)
    composition_figures = []
    for attribute, test in tests.items():
        if test["dof"] > 0:
            safe = "".join(ch if ch.isalnum() else "_" for ch in attribute)
            composition_figures.append((attribute, figures.composition_figure(
                composition[composition["attribute"] == attribute], test, out_dir, f"{dataset}_composition_{safe}",
                attribute)))
    summary = {"target": audit.target_name, "reference": audit.reference_name,
               "n_members": int(audit.members.sum()), "n_nonmembers": int((~audit.members).sum()),
               "n_member_patients": int(patients["member"].sum()),
               "rmia_a": a, "rmia_a_chosen": how, "gamma": gamma, "composition_tests": tests}
    curves = {}
    for kind in ATTACKS:
        stats, grid_tpr = roc.summarise_attack(records[f"{kind}_score"].to_numpy()[None],
                                               records["member"].to_numpy()[None])
        summary[kind] = stats
        curves[f"{audit.target_name} on {dataset} · offline {kind.upper()}"] = (grid_tpr, stats)
    return dict(summary=summary, curves=curves, records=records, patients=patients, by_subgroup=by_subgroup,
                composition_figures=composition_figures)


def summary_rows(dataset, summary) -> list:
    """attack_summary.csv rows of one dataset: AUC and TPR at low FPR per attack."""
    rows = []
    for kind in ATTACKS:
        row = {"dataset": dataset, "target": summary["target"], "attack": f"offline {kind.upper()}",
               "auc": summary[kind]["auc"]["mean"], "n_members": summary["n_members"],
               "n_nonmembers": summary["n_nonmembers"]}
        row.update({k: v["mean"] for k, v in summary[kind].items() if k.startswith("tpr_at")})
        rows.append(row)
    return rows


def run(logroot, datasets, out_dir, a=DEFAULT_A, gamma=DEFAULT_GAMMA, n_population=10_000, seed=0,
        top_share=subgroups.TOP_SHARE) -> dict:
    """Attacks every dataset's target and writes figures, tables and report.html; returns the summary."""
    audits = {}
    for dataset in datasets:
        logdir = Path(logroot) / dataset
        if not logdir.is_dir():
            raise MedleakError(f"{logdir}: no such logdir; run xrv_scores.py first (or fix --logdir/--datasets)")
        audits[dataset] = XrvAudit(logdir)
    if not audits:
        raise MedleakError("--datasets is empty")
    chosen_a = choose_a(audits, a, gamma=gamma, n_population=n_population, seed=seed)
    out_dir = Path(out_dir)
    results = {dataset: audit_dataset(dataset, audit, *chosen_a[dataset], out_dir, gamma, n_population, seed,
                                      top_share) for dataset, audit in audits.items()}
    summary = {dataset: result["summary"] for dataset, result in results.items()}
    roc_png = figures.roc_figure({k: v for r in results.values() for k, v in r["curves"].items()}, roc.FPR_GRID,
                                 out_dir, name="roc")
    table = pd.DataFrame([row for dataset in summary for row in summary_rows(dataset, summary[dataset])])
    write_csv(out_dir / "attack_summary.csv", table)
    write_json(out_dir / "summary.json", summary)
    xrv_report.write(out_dir / "report.html", results, table, roc_png)
    return summary
