"""Benchmark: shadow models per hour of a small CPU campaign with 1 and with 2 worker processes.

Generates the synthetic CheXpert-layout dataset, builds its image cache once (not timed), then runs
the same campaign (`chexpert.py`, small_cnn) twice into fresh logdirs: once with one worker, once
with two workers started together on one logdir. Reports, per setting, the end-to-end rate (wall
time from launch until the last worker exits: includes JAX start-up and one compile per worker) and
the steady rate (from the runs' own train + inference seconds, leaving out each worker's first,
compiling run). Then the checkpoint overhead (target < 2 % of training time): the one-worker
campaign again with a checkpoint at every epoch boundary gives the seconds per save, and the share at
the default --checkpoint_minutes is one save per interval; the same for a save of the paper's
WRN-28-2 training state (parameters, momentum, EMA: ~4.4M floats), timed directly.

    python bench/campaign.py [--n_runs 8 --n_patients 120 --img_size 32 --epochs 2 --model small_cnn]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medleak import rundir
from medleak.data_utils import datasets, image_cache, synthetic

REPO = Path(__file__).resolve().parents[1]


def run_workers(n_workers, flags, logdir):
    """Starts n_workers chexpert.py workers on one logdir; returns wall seconds until all exit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "chexpert.py", f"--logdir={logdir}", *flags], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n_workers)]
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"worker failed ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    return time.perf_counter() - started


def steady_rate(logdir, n_workers):
    """Models per hour from the runs' train+infer seconds, leaving out each worker's first run."""
    by_worker = {}
    for index in rundir.list_complete_runs(logdir):
        metrics = json.loads((rundir.run_dir(logdir, index) / "metrics.json").read_text())
        seconds = metrics["timings"]["train_seconds"] + metrics["timings"]["infer_seconds"]
        by_worker.setdefault(metrics["pid"], []).append((index, seconds))
    later = [s for runs in by_worker.values() for _, s in sorted(runs)[1:]]
    if not later:
        return float("nan")
    return n_workers * 3600.0 / float(np.mean(later))


def checkpoint_figures(logdir):
    """(saves, seconds per save, share of step time) over the runs of a checkpointing campaign."""
    timings = [json.loads((rundir.run_dir(logdir, index) / "metrics.json").read_text())["timings"]
               for index in rundir.list_complete_runs(logdir)]
    saves = sum(t["checkpoints_saved"] for t in timings)
    save_seconds = sum(t["checkpoint_seconds"] for t in timings)
    step_seconds = sum(t["step_seconds"] for t in timings)
    return saves, save_seconds / max(saves, 1), save_seconds / step_seconds


def wrn_save_seconds(tmp, repeats=3):
    """Seconds per checkpoint of a WRN-28-2 TrainState (64x64, 14 labels; no training needed)."""
    import jax
    import jax.numpy as jnp

    from medleak.config import dataset_train_config
    from medleak.train_utils import optim
    from medleak.train_utils.checkpoint import RunCheckpoints
    from medleak.train_utils.models import create_model
    from medleak.train_utils.training import TrainState

    config = dataset_train_config("chexpert")
    model = create_model("wrn_28_2", 14)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False)["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                       opt_state=optim.make_optimizer(config, 1000).init(params),
                       ema_params=jax.tree.map(jnp.copy, params))
    n_floats = sum(leaf.size for leaf in jax.tree.leaves(state))
    checkpoints = RunCheckpoints(Path(tmp) / "wrn_checkpoints", every_seconds=0)
    losses = np.zeros(1000, np.float32)
    checkpoints.save(1, state, losses, seed=0, fingerprint="bench")  # first save creates the manager
    started = time.perf_counter()
    for step in range(2, 2 + repeats):
        checkpoints.save(step, state, losses, seed=0, fingerprint="bench")
    seconds = (time.perf_counter() - started) / repeats
    checkpoints.delete()
    return seconds, n_floats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_runs", type=int, default=8)
    parser.add_argument("--n_patients", type=int, default=120)
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--model", default="small_cnn")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medleak-bench-campaign-") as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        synthetic.write_synthetic_chexpert(root, n_patients=args.n_patients, img_size=args.img_size, seed=0)
        table = datasets.load_dataset("chexpert", root)
        for split in ("train", "test"):
            image_cache.cached_images(table.split(split), root, args.img_size, cache_dir=cache)
        flags = [f"--data_root={root}", f"--cache_dir={cache}", f"--n_runs={args.n_runs}", f"--model={args.model}",
                 f"--img_size={args.img_size},{args.img_size}", f"--epochs={args.epochs}",
                 f"--batch_size={args.batch_size}", "--eval_views=4", "--ema_decay=0"]
        n_train = table.split("train").n_records
        print(f"campaign_setup: {args.n_runs} runs · {args.model} {args.img_size}x{args.img_size} · "
              f"{n_train} training records · {args.epochs} epochs")
        for n_workers in (1, 2):
            logdir = Path(tmp) / f"logs_{n_workers}"
            seconds = run_workers(n_workers, flags, logdir)
            done = len(rundir.list_complete_runs(logdir))
            label = "worker" if n_workers == 1 else "workers"
            print(f"campaign_{n_workers}_{label}_end_to_end: {done * 3600.0 / seconds:.0f} models/h")
            print(f"campaign_{n_workers}_{label}_steady: {steady_rate(logdir, n_workers):.0f} models/h")
            print(f"campaign_{n_workers}_{label}_wall: {seconds:.1f} s")

        from medleak.config import CampaignConfig

        interval = 60.0 * CampaignConfig().checkpoint_minutes
        logdir = Path(tmp) / "logs_checkpoints"
        run_workers(1, [*flags, "--checkpoint_minutes=1e-9"], logdir)  # a save at every epoch boundary
        saves, per_save, share = checkpoint_figures(logdir)
        print(f"checkpoint_small_cnn_saves: {saves} ({args.epochs} per run)")
        print(f"checkpoint_small_cnn_seconds_per_save: {per_save:.3f} s")
        print(f"checkpoint_small_cnn_share_every_epoch: {100 * share:.1f} %")
        print(f"checkpoint_small_cnn_share_default: {100 * per_save / interval:.3f} % "
              f"(one save per {interval / 60:g} min of training)")
        wrn_seconds, n_floats = wrn_save_seconds(tmp)
        print(f"checkpoint_wrn_28_2_seconds_per_save: {wrn_seconds:.3f} s ({n_floats / 1e6:.2f}M floats)")
        print(f"checkpoint_wrn_28_2_share_default: {100 * wrn_seconds / interval:.3f} % "
              f"(one save per {interval / 60:g} min of training; target < 2 %)")


if __name__ == "__main__":
    main()
