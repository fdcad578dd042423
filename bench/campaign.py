"""Benchmark: shadow models per hour of a small CPU campaign with 1 and with 2 worker processes.

Generates the synthetic CheXpert-layout dataset, builds its image cache once (not timed), then runs
the same campaign (`chexpert.py`, small_cnn) twice into fresh logdirs: once with one worker, once
with two workers started together on one logdir. Reports, per setting, the end-to-end rate (wall
time from launch until the last worker exits: includes JAX start-up and one compile per worker) and
the steady rate (from the runs' own train + inference seconds, leaving out each worker's first,
compiling run).

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


if __name__ == "__main__":
    main()
