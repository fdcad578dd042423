"""One comparison of DP fine-tuned models across ε (scripts/transfer_all.sh; docs/TRANSFER.md).

Reads evaluate.py's JSON files `<eval_dir>/<unit>_eps<E>_<dataset>.json` (one fine-tuned model per
DP unit and ε, scored on each dataset) and the audits' `<audit_dir>/<unit>_eps<E>/attack_summary.json`,
and writes `<out_dir>/transfer_comparison.csv` (one row per unit, ε and dataset: macro AUROC with its
CI, the largest |statistical parity difference| by sex and by age band, and the campaign's attack
risk), figures (utility and fairness gap against ε per dataset, attack risk against ε) and
`transfer.html` in the audit report's frame.

    python -m medleak.evaluation.transfer_report --eval_dir=… --audit_dir=… --out_dir=… --in_domain=mimic
"""

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.evaluation.stats import largest_parity_gap
from medleak.io_utils import read_json, write_csv

_NAME = re.compile(r"^(record|patient)_eps([^_]+)_(.+)\.json$")


def attack_risk(summary: dict) -> dict:
    """The attack-risk columns of one campaign's attack_summary.json (`privacy_utils.audit`): the
    strongest attack's mean AUC over held-out targets and its chance level, patients at risk and
    their chance share (the audit's noise floor)."""
    aucs = [a["auc"]["mean"] for a in summary.get("attacks", {}).values()]
    floor = summary.get("noise_floor", {})
    strongest = floor.get("strongest_attack", {}).get("max_auc", {})
    at_risk = floor.get("patients", {}).get("at_risk", {})
    return {"attack_auc_best": max(aucs) if aucs else None,
            "attack_auc_chance": strongest.get("chance_mean"),
            "patient_risk_mean_auc": summary.get("patient_risk", {}).get("mean"),
            "patients_at_risk": summary.get("patient_risk", {}).get("n_at_risk"),
            "patients_at_risk_share": at_risk.get("observed"),
            "patients_at_risk_chance": at_risk.get("chance_mean")}


def comparison_table(eval_dir, audit_dir=None, in_domain: str | None = None) -> pd.DataFrame:
    """The rows of transfer_comparison.csv (see the module doc), sorted by unit, ε and dataset."""
    rows = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        match = _NAME.match(path.name)
        if not match:
            continue
        unit, epsilon, dataset = match.groups()
        result = read_json(path)
        macro = result["overall"]["auroc"]["macro"]
        row = {"dp_unit": unit, "epsilon": float(epsilon), "dataset": dataset,
               "domain": "in" if dataset == in_domain else "out", "n_test": result["n_test"],
               "macro_auroc": macro["auroc"], "auroc_low": macro["low"], "auroc_high": macro["high"],
               "spd_sex_max": largest_parity_gap(result["statistical_parity"].get("sex", [])),
               "spd_age_max": largest_parity_gap(result["statistical_parity"].get("age_group", []))}
        summary_path = Path(audit_dir or "", f"{unit}_eps{epsilon}", "attack_summary.json")
        row.update(attack_risk(read_json(summary_path)) if audit_dir and summary_path.is_file() else attack_risk({}))
        rows.append(row)
    if not rows:
        raise MedleakError(f"{eval_dir}: no <unit>_eps<E>_<dataset>.json files of evaluate.py")
    return pd.DataFrame(rows).sort_values(["dp_unit", "epsilon", "dataset"]).reset_index(drop=True)


def _axis_value(epsilon: float, finite_max: float) -> float:
    return finite_max * 4 if math.isinf(epsilon) else epsilon


def figures(table: pd.DataFrame, out_dir) -> list:
    """[(png path, caption, how to read it)]: utility, fairness gap and attack risk against ε."""
    import matplotlib.pyplot as plt

    from medleak.privacy_utils.figures import save

    finite = table.loc[np.isfinite(table["epsilon"]), "epsilon"]
    finite_max = float(finite.max()) if len(finite) else 1.0
    x = table["epsilon"].map(lambda e: _axis_value(e, finite_max))
    made = []
    for column, ylabel, name, caption in (
            ("macro_auroc", "test macro AUROC", "transfer_utility", "Utility in and out of domain against ε"),
            ("spd_sex_max", "largest |SPD| female − male", "transfer_fairness_sex", "Fairness gap by sex against ε"),
            ("spd_age_max", "largest |SPD| age band − rest", "transfer_fairness_age", "Fairness gap by age against ε")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (unit, dataset), group in table.groupby(["dp_unit", "dataset"]):
            order = np.argsort(x[group.index].to_numpy())
            ax.plot(x[group.index].to_numpy()[order], group[column].to_numpy(dtype=float)[order], marker="o",
                    label=f"{dataset} ({unit}-level)")
        ax.set_xscale("log")
        ax.set_xlabel("ε (rightmost: ∞, no DP)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        made.append((save(fig, out_dir, name), caption, f"Each line is one evaluation dataset; {ylabel} of the "
                     "model fine-tuned at each ε."))
    per_campaign = table.drop_duplicates(["dp_unit", "epsilon"])
    if per_campaign["attack_auc_best"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 4))
        for unit, group in per_campaign.groupby("dp_unit"):
            order = np.argsort(x[group.index].to_numpy())
            ax.plot(x[group.index].to_numpy()[order], group["attack_auc_best"].to_numpy(dtype=float)[order],
                    marker="o", label=f"{unit}-level DP")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("ε (rightmost: ∞, no DP)")
        ax.set_ylabel("best membership attack AUC")
        ax.legend(fontsize=8)
        made.append((save(fig, out_dir, "transfer_attack_risk"), "Attack risk of the fine-tuned campaigns against ε",
                     "0.5 (dashed) is chance: the attacker cannot tell members from non-members."))
    return made


def write_comparison(eval_dir, out_dir, audit_dir=None, in_domain=None) -> Path:
    """Writes transfer_comparison.csv, the figures and transfer.html; returns the page's path."""
    import html

    from medleak.privacy_utils.report import figure_html, write_report

    out_dir = Path(out_dir)
    table = comparison_table(eval_dir, audit_dir, in_domain)
    write_csv(out_dir / "transfer_comparison.csv", table)
    made = figures(table, out_dir)
    best = table[table["domain"] == "in"].sort_values("epsilon")
    headline = [(f"in-domain AUROC at ε={row.epsilon:g} ({row.dp_unit})", f"{row.macro_auroc:.3f}"
                 if row.macro_auroc is not None and np.isfinite(row.macro_auroc) else "n/a", row.dataset)
                for row in best.itertuples()][:4]
    sections = [("Comparison", table.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a"))]
    sections += [(caption, figure_html(path, caption, howto)) for path, caption, howto in made]
    return write_report(out_dir / "transfer.html", dataset=f"transfer ({html.escape(str(in_domain))} fine-tuning)",
                        headline=headline, sections=sections,
                        notes=["Thresholds for the fairness gaps come from a validation split of each dataset's "
                               "train split; CIs are patient-level bootstrap intervals (evaluate.py)."])


def main(argv=None) -> None:
    from medleak.cli import main_guard

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_dir", required=True)
    parser.add_argument("--audit_dir")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--in_domain")
    args = parser.parse_args(argv)
    page = main_guard(write_comparison)(args.eval_dir, args.out_dir, args.audit_dir, args.in_domain)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
