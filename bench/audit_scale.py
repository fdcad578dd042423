"""Benchmark: `mem_inf_stats.py` end to end on a CheXpert-sized campaign logdir.

Writes a synthetic campaign once, in the run-directory format and through `medleak.rundir` (plan
files, then each run to a temporary directory committed as runs/run_NNNN, as a worker does):
224,316 records of 65,420 patients (1 + multinomial images each), 200 runs × 16 views × 14
labels of float32 logits (40 GB of train_logits.npy), every patient IN for exactly half the runs.
Everyone's IN logits move towards their labels by `--member_effect`, the planted patients' by
`--planted_effect`. Then times the audit as a user runs it, under /usr/bin/time -v:

  cold: the run files dropped from the page cache (posix_fadvise DONTNEED) and no audit_cache/;
  cached: again, the cache built by the cold audit reused.

Prints wall seconds, peak RSS, each stage's seconds (the audit's own `stage …: s` lines) and the
share of planted patients in the top 1 % by patient AUC. Targets: cold ≤ 120 s, cached ≤ 45 s,
peak ≤ 6 GB, planted patients in the top 1 %.

    python bench/audit_scale.py --logdir /tmp/chexpert_scale [--records 224316 --patients 65420 --runs 200]
        [--keep]  (default: the logdir is deleted afterwards)
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import report  # noqa: E402

from medleak import rundir  # noqa: E402
from medleak.campaign.plan import PLAN_FORMAT  # noqa: E402
from medleak.io_utils import save_npy, write_csv, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
          "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
          "Fracture", "Support Devices"]
N_TEST = 234  # CheXpert's validation set


def write_logdir(logdir, *, n_records, n_patients, n_runs, n_views, n_planted, planted_effect, member_effect, seed=0):
    """The campaign (module doc); returns the planted patient ids."""
    rng = np.random.default_rng(seed)
    images = 1 + rng.multinomial(n_records - n_patients, np.full(n_patients, 1.0 / n_patients))
    patient_of = np.repeat(np.arange(n_patients), images)
    patients = np.array([f"patient{i:05d}" for i in range(n_patients)])
    labels = (rng.random((n_records, len(LABELS))) < rng.uniform(0.05, 0.4, len(LABELS))).astype(np.float32)
    records = pd.DataFrame({"record_id": [f"r{i:06d}" for i in range(n_records)], "patient_id": patients[patient_of],
                            "path": [f"train/{patients[p]}/view{i}.jpg" for i, p in enumerate(patient_of)]})
    for c, name in enumerate(LABELS):
        records[name] = labels[:, c]
    records["sex"] = np.where(rng.random(n_patients) < 0.5, "F", "M")[patient_of]
    records["age"] = np.array(["18-39", "40-59", "60-79", "80+"])[rng.integers(0, 4, n_patients)][patient_of]
    test_labels = (rng.random((N_TEST, len(LABELS))) < 0.2).astype(np.float32)
    test = pd.DataFrame({"record_id": [f"t{i}" for i in range(N_TEST)], "patient_id": [f"t{i}" for i in range(N_TEST)],
                         "path": [f"valid/t{i}.jpg" for i in range(N_TEST)]})
    for c, name in enumerate(LABELS):
        test[name] = test_labels[:, c]
    test["sex"], test["age"] = "F", "40-59"
    patient_mask = (np.argsort(rng.random((n_patients, n_runs)), axis=1) < n_runs // 2).T
    planted = rng.choice(n_patients, n_planted, replace=False)

    logdir.mkdir(parents=True)
    save_npy(logdir / rundir.MASK_FILE, patient_mask)
    write_csv(logdir / rundir.PATIENTS_FILE, pd.DataFrame({"patient_id": patients}))
    write_csv(logdir / rundir.RECORDS_FILE, records)
    write_csv(logdir / rundir.TEST_RECORDS_FILE, test)
    write_json(logdir / rundir.PLAN_FILE, {"format": PLAN_FORMAT, "dataset": "chexpert", "task": "multilabel",
                                           "label_names": LABELS, "subgroups": ["sex", "age"],
                                           "campaign": {"n_runs": n_runs, "subset_ratio": 0.5, "seed": seed}})
    (logdir / rundir.RUNS_DIR).mkdir()

    signs = (2.0 * labels - 1.0)[:, None, :]
    base = rng.normal(0.0, 1.5, size=(n_records, 1, len(LABELS))).astype(np.float32)
    effect = np.full(n_patients, member_effect, np.float32)
    effect[planted] = planted_effect
    size = n_records * n_views * len(LABELS)
    pool = rng.standard_normal(size + 1_000_003, dtype=np.float32)  # per-run noise: the pool at a random offset
    logits = np.empty((n_records, n_views, len(LABELS)), np.float32)
    started = time.perf_counter()
    for run in range(n_runs):
        offset = int(rng.integers(0, 1_000_003))
        np.multiply(pool[offset:offset + size].reshape(logits.shape), 0.5, out=logits)
        logits += base
        mask = patient_mask[run][patient_of]
        logits += (effect[patient_of] * mask)[:, None, None] * signs
        tmp = rundir.write_run_tmp(logdir, run, train_logits=logits, train_labels=labels, record_mask=mask,
                                   test_logits=2.0 * test_labels - 1.0 + rng.normal(0, 1, test_labels.shape),
                                   test_labels=test_labels, metrics={"test_auroc": 0.8, "run": run})
        rundir.commit_run(tmp, logdir, run)
        if run % 20 == 19:
            print(f"  wrote {run + 1}/{n_runs} runs ({time.perf_counter() - started:.0f} s)", flush=True)
    return set(patients[planted])


def drop_page_cache(logdir):
    """Evicts the run files from the page cache (clean pages; no root needed)."""
    for path in Path(logdir, rundir.RUNS_DIR).rglob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_audit(logdir, out_dir, name, extra=()):
    """Runs mem_inf_stats.py under /usr/bin/time -v; prints its wall, peak RSS and stage times."""
    command = ["/usr/bin/time", "-v", sys.executable, str(REPO / "mem_inf_stats.py"), f"--logdir={logdir}",
               f"--out_dir={out_dir}", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{name} audit failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", done.stderr).group(1)
    report(f"{name}_wall", wall, "s")
    report(f"{name}_peak_rss", rss_kb / 1024**2, "GB")
    report(f"{name}_cpu_percent", int(cpu), "%")
    for stage, seconds in re.findall(r"^stage (.+?): ([\d.]+) s", done.stderr, flags=re.M):
        report(f"{name}_stage_{stage.replace(' ', '_')}", float(seconds), "s")
    for line in re.findall(r"^loading .*[kMG]?B/s.*$", done.stderr.replace("\r", "\n"), flags=re.M)[-1:]:
        print(f"  {name} loading bar: {line.strip()}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("/tmp/medleak_audit_scale"))
    parser.add_argument("--records", type=int, default=224_316)
    parser.add_argument("--patients", type=int, default=65_420)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--planted_effect", type=float, default=1.0)
    parser.add_argument("--member_effect", type=float, default=0.02)
    parser.add_argument("--keep", action="store_true", help="keep the logdir (default: delete it afterwards)")
    args = parser.parse_args()

    logdir = args.logdir
    planted_file = logdir / "planted.txt"
    if not planted_file.is_file():
        shutil.rmtree(logdir, ignore_errors=True)
        started = time.perf_counter()
        planted = write_logdir(logdir, n_records=args.records, n_patients=args.patients, n_runs=args.runs,
                               n_views=args.views, n_planted=args.planted, planted_effect=args.planted_effect,
                               member_effect=args.member_effect)
        planted_file.write_text("\n".join(sorted(planted)))
        report("write_logdir", time.perf_counter() - started, "s")
    planted = set(planted_file.read_text().split())
    logits_bytes = sum(p.stat().st_size for p in (logdir / rundir.RUNS_DIR).glob("run_*/train_logits.npy"))
    report("train_logits_total", logits_bytes / 1e9, "GB")
    try:
        shutil.rmtree(logdir / "audit_cache", ignore_errors=True)
        drop_page_cache(logdir)
        timed_audit(logdir, logdir.parent / f"{logdir.name}_out_cold", "cold")
        timed_audit(logdir, logdir.parent / f"{logdir.name}_out_cached", "cached")
        patients = pd.read_csv(logdir.parent / f"{logdir.name}_out_cached" / "patient_risk.csv", dtype={"patient_id": str})
        top = set(patients["patient_id"].head(max(1, len(patients) // 100)))
        report("planted_in_top_1pct_share", len(planted & top) / len(planted))
        report("planted_at_risk_share", float(patients.set_index("patient_id").loc[sorted(planted), "at_risk"].mean()))
    finally:
        if not args.keep:
            shutil.rmtree(logdir, ignore_errors=True)
            for suffix in ("_out_cold", "_out_cached"):
                shutil.rmtree(logdir.parent / f"{logdir.name}{suffix}", ignore_errors=True)


if __name__ == "__main__":
    main()
