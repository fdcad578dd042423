"""A saved model's test metrics on any dataset, over the labels the two share (docs/TRANSFER.md).

    python evaluate.py --model_dir=logs/chexpert/eval_only/model --dataset=mimic --data_root=/data/mimic

AUROC with bootstrap CIs overall and per subgroup, thresholds from a validation split of the
dataset's train split, statistical parity by sex and age band, and with --compare_dir=DIR2 the paired
bootstrap p-value; writes a JSON and a CSV next to the model. All flags: --help.
"""

from medleak.evaluation.cli import main

if __name__ == "__main__":
    main()
