"""Privacy audit of a shadow-model campaign: LiRA/RMIA attacks, record/patient/subgroup risk, report.

    python mem_inf_stats.py --logdir=./logs/fitzpatrick [--out_dir=./figs/fitzpatrick]   # or: medleak-audit …

Reads every complete run of --logdir (ids, labels and subgroups come from its records.csv) and
writes record_risk.csv, patient_risk.csv, attack_summary.json, figures (PNG + PDF) and a
self-contained report.html into --out_dir (default ./figs/<dataset>). --data_root adds a grid of the
most vulnerable images.

    python mem_inf_stats.py --logdir=logs/dp_eps1/chexpert,logs/dp_eps8/chexpert,logs/dp_epsinf/chexpert

Several comma-separated logdirs of one dataset (e.g. campaigns at different --epsilon, from
scripts/dp_all.sh): each is audited into <out_dir>/<logdir name>/, and the comparison across privacy
budgets (budgets.csv, eSF per epsilon with its AUC bound, utility against epsilon, budgets.html) goes
into --out_dir (default ./figs/<dataset>_dp).

The flags (all of them: --help) and the work live in the package: `medleak.privacy_utils.cli`.
"""

from medleak.privacy_utils.cli import main

if __name__ == "__main__":
    main()
