"""Shadow-model campaign on ChestX-ray14 (NIH chest radiographs, 14 findings).

    python chestxray14.py --data_root=/data/chestxray14 --logdir=./logs/chestxray14

Trains --n_runs shadow models, each on a random half of the patients; start the same command on as
many GPUs/machines as share the logdir (runs are shared out by file locks). --eval_only trains one
model on the whole training split and reports test metrics. All flags and their defaults: --help.
"""

from medleak.campaign.main import run_script

if __name__ == "__main__":
    run_script("chestxray14")
