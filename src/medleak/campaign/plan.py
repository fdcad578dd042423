"""Stage 2: the patient-level plan of a shadow-model campaign.

Run i trains on the records of the patients that are IN for run i. The mask is drawn as in LiRA
(Carlini et al.): per patient, argsort uniform noise over the runs and take the first k runs, so
every patient is IN for exactly k = round(subset_ratio * n_runs) runs and OUT for the rest. Records
inherit their patient's bit, so all images of a patient are in or out together.

The plan is written once per logdir (by the first worker, while it holds the queue lock) with
everything that decides the models: the dataset and its hash, label names, the full TrainConfig
(with choices made for the backend of the worker that wrote it, such as the compute dtype that
"auto" stood for), the planned campaign fields and the step schedule. A later worker whose dataset
or config differs is refused (`check_plan`) rather than mixing models; one given "auto" follows the
plan's choice whatever its own backend.

Plan format 2 (this version): warm-up as a fraction of all steps (`train_config.warmup`), the
resolved compute dtype, and the `schedule` block. A format-1 plan (warm-up in epochs) is refused
with one line; `python -m medleak.campaign.plan --migrate LOGDIR` rewrites it as format 2.
"""

import argparse
import dataclasses
import datetime
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.config import CampaignConfig, TrainConfig, runs_in_per_patient
from medleak.errors import MedleakError
from medleak.io_utils import save_npy, write_csv, write_json
from medleak.rundir import (MASK_FILE, PATIENTS_FILE, PLAN_FILE, RECORDS_FILE, TEST_RECORDS_FILE,
                            load_patient_mask, read_plan)

PLAN_FORMAT = 2
# TrainConfig fields whose flag value "auto" is resolved per backend when the plan is made.
BACKEND_CHOICES = ("compute_dtype",)


def make_patient_mask(n_runs: int, n_patients: int, subset_ratio: float, seed: int) -> np.ndarray:
    """Bool (n_runs, n_patients): patient j is IN for run i; every column has exactly k True.

    k = round(subset_ratio * n_runs). Per patient, uniform noise over the runs is argsorted and the
    first k positions are IN (LiRA's `keep.argsort(0) < k`): the runs a patient is IN for are a
    uniformly random k-subset, independently across patients. Deterministic given `seed`.
    """
    if n_runs < 1:
        raise MedleakError(f"--n_runs must be at least 1, got {n_runs}")
    if n_patients < 1:
        raise MedleakError("the training split has no patients; check --data_root")
    if not 0.0 < subset_ratio < 1.0:
        raise MedleakError(f"--subset_ratio must be strictly between 0 and 1, got {subset_ratio}")
    if runs_in_per_patient(n_runs, subset_ratio) == 0:
        raise MedleakError(f"--subset_ratio={subset_ratio} with --n_runs={n_runs} puts no patient in any run")
    rng = np.random.default_rng(seed)
    noise = rng.uniform(size=(n_runs, n_patients))
    # Each column of the argsort is a uniformly random permutation of 0..n_runs-1, so exactly k of
    # its entries are < k (LiRA's `order < int(pkeep * num_experiments)`).
    order = noise.argsort(axis=0, kind="stable")
    return order < runs_in_per_patient(n_runs, subset_ratio)


def patient_index(record_patient_ids) -> tuple[np.ndarray, np.ndarray]:
    """(patient_ids in order of first appearance, per-record index into them)."""
    codes, patients = pd.factorize(pd.Series(record_patient_ids).astype(str), sort=False)
    return np.asarray(patients, dtype=object), codes.astype(np.int64)


def record_mask(patient_mask_row: np.ndarray, record_patient_index: np.ndarray) -> np.ndarray:
    """Bool (n_records,): each record inherits the IN/OUT bit of its patient for one run."""
    return np.asarray(patient_mask_row, dtype=bool)[np.asarray(record_patient_index)]


def run_seed(campaign_seed: int, run_index: int, attempt: int = 1) -> int:
    """Training seed of one run, derived from the campaign seed (independent streams per run).

    A retried attempt (e.g. after a NaN loss, which the same seed would reproduce) gets a fresh
    seed; the seed actually used is recorded in the run's metrics.json.
    """
    entropy = [int(campaign_seed), int(run_index)] + ([int(attempt)] if attempt > 1 else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def expected_train_size(n_train_records: int, subset_ratio: float) -> int:
    """Records a run is expected to train on (fixes steps per epoch for every run of a campaign)."""
    return max(1, round(subset_ratio * n_train_records))


def step_schedule(train_config: TrainConfig, n_train_records: int, subset_ratio: float) -> dict:
    """The `schedule` block of plan.json: optimiser steps every run of the campaign takes
    (the Trainer's rule, `training.steps_per_epoch`: an epoch is one pass over a run's rows)."""
    from medleak.train_utils.training import steps_per_epoch

    expected = expected_train_size(n_train_records, subset_ratio)
    return schedule_block(expected, steps_per_epoch(expected, train_config.batch_size), train_config.epochs)


def schedule_block(expected: int, per_epoch: int, epochs: int) -> dict:
    """plan.json's `schedule`: records per run, steps per epoch and steps in all."""
    return {"expected_train_size": int(expected), "steps_per_epoch": int(per_epoch), "steps": int(per_epoch * epochs)}


def format_1_steps_per_epoch(expected: int, batch_size: int) -> int:
    """Steps per epoch as format-1 campaigns trained them (and format-2 plans made before the
    nearest-batch rule, whose plan.json stores them): ceil(n / B), up to one batch more than a pass."""
    return max(1, math.ceil(expected / batch_size))


def follow_stored_schedule(document: dict, stored: dict) -> dict:
    """`document` with the stored plan's steps: a campaign trains the schedule it was planned with,
    even if a later medleak computes steps per epoch differently (the inputs, records, subset ratio,
    batch size and epochs, are compared as the rest of the plan is)."""
    schedule = stored.get("schedule")
    if not isinstance(schedule, dict) or schedule.get("expected_train_size") != document["schedule"]["expected_train_size"]:
        return document
    return dict(document, schedule=dict(schedule))


# -- what can be checked before any run trains --------------------------------------------------

def check_trainable(train_table, train_config: TrainConfig, schedule: dict, patient_mask: np.ndarray) -> None:
    """Refuses (one line naming the flag and a value that works) a plan some run could not train.

    Called when the plan is made (and by later workers on the stored plan), so a campaign fails
    before its first run rather than part-way: steps per epoch, the learning-rate schedule, the
    model on the image size, and with DP the batch size against every run's number of units.
    """
    check_steps(train_config, schedule)
    check_model_input(train_config, train_table.channels, len(train_table.label_names))
    if train_config.dp:
        check_dp_batches(train_config, train_table, schedule, patient_mask)


def check_steps(train_config: TrainConfig, schedule: dict) -> None:
    """A run takes at least one full batch per epoch and some step has a non-zero learning rate."""
    from medleak.train_utils.optim import learning_rate_schedule

    expected = schedule["expected_train_size"]
    if expected // train_config.batch_size == 0:
        works = max(train_config.grad_accum, expected - expected % train_config.grad_accum)
        raise MedleakError(f"--batch_size={train_config.batch_size} is more than a run's {expected} training "
                           f"records, so an epoch holds no full batch; use --batch_size={works} or less")
    steps = np.arange(schedule["steps"])
    rates = np.asarray(learning_rate_schedule(train_config, schedule["steps"])(steps), dtype=np.float32)
    if not (rates > 0).any():
        raise MedleakError(f"--learning_rate={train_config.learning_rate} gives every one of the "
                           f"{schedule['steps']} steps a learning rate of 0 in float32; use --learning_rate=0.01")


def check_model_input(train_config: TrainConfig, channels: int, n_classes: int) -> None:
    """The model builds on one image of `--img_size` and gives one logit per class (jax.eval_shape:
    traced, nothing computed)."""
    height, width = train_config.img_size

    def output_shape(h, w):
        import jax
        import jax.numpy as jnp

        from medleak.train_utils.models import create_model

        model = create_model(train_config.model, n_classes, norm=train_config.norm)
        sample = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)
        return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, sample).shape

    def works(h, w):
        try:
            return output_shape(h, w) == (1, n_classes)
        except MedleakError:
            raise
        except Exception:
            return False

    if works(height, width):
        return
    bigger = next((side for side in (8, 16, 32, 64, 128, 256, 512) if side >= max(height, width)
                   and works(side, side)), None)
    hint = f"use --img_size={bigger},{bigger}" if bigger else "use another --model"
    raise MedleakError(f"--img_size={height},{width}: --model={train_config.model} cannot take images of "
                       f"this size; {hint}")


def run_unit_counts(train_config: TrainConfig, train_table, patient_mask: np.ndarray) -> np.ndarray:
    """DP units (records, or patients with --dp_unit=patient) each run trains on, from the mask."""
    if train_config.dp_unit == "patient":
        return np.asarray(patient_mask, dtype=bool).sum(axis=1)
    _, record_patient_index = patient_index(train_table.df["patient_id"])
    return np.asarray(patient_mask, dtype=bool)[:, record_patient_index].sum(axis=1)


def check_dp_batches(train_config: TrainConfig, train_table, schedule: dict, patient_mask: np.ndarray) -> None:
    """Every run can be Poisson-sampled at --batch_size (the DP code's own rule, for every run)."""
    counts = run_unit_counts(train_config, train_table, patient_mask)
    smallest = int(np.argmin(counts))
    if _dp_batch_error(train_config, train_table, schedule, int(counts[smallest])) is None:
        return
    # units per step grow linearly with the batch size: start at the proportional size, step down
    from medleak.dp.estimator import dp_batch_shape

    shape = dp_batch_shape(dataclasses.replace(train_config, batch_size=train_config.grad_accum),
                           train_table.df["patient_id"].astype(str).to_numpy())
    per_record = shape.expected_units / train_config.grad_accum
    works = int(counts[smallest] / per_record) // train_config.grad_accum * train_config.grad_accum
    while works > train_config.grad_accum and _dp_batch_error(
            dataclasses.replace(train_config, batch_size=works), train_table, schedule, int(counts[smallest])):
        works -= train_config.grad_accum
    raise MedleakError(f"--batch_size={train_config.batch_size} asks for more {train_config.dp_unit}s per DP step "
                       f"than run {smallest} has ({counts[smallest]}, the fewest of the {len(counts)} runs); "
                       f"use --batch_size={max(works, train_config.grad_accum)} or less")


def _dp_batch_error(train_config: TrainConfig, train_table, schedule: dict, n_units: int) -> str | None:
    """The DP code's objection to a run of `n_units` units at this batch size, or None."""
    from medleak.dp import sampling
    from medleak.dp.estimator import dp_batch_shape

    try:
        shape = dp_batch_shape(train_config, train_table.df["patient_id"].astype(str).to_numpy())
        sampling.make_schedule(shape, n_units, schedule["steps"])
    except MedleakError as e:
        return str(e)
    return None


def plan_document(dataset: str, train_table, test_table, train_config: TrainConfig,
                  campaign_config: CampaignConfig) -> dict:
    """The identity of a campaign: what plan.json stores and what later workers must match.

    `train_config` must have its per-backend choices resolved (`resolve_backend_choices`).
    """
    if train_config.compute_dtype == "auto":
        raise ValueError("resolve compute_dtype='auto' before making the plan (resolve_backend_choices)")
    campaign = campaign_config.planned()
    return {
        "format": PLAN_FORMAT,
        "dataset": dataset,
        "dataset_hash": train_table.content_hash(),
        "test_dataset_hash": test_table.content_hash(),
        "train_config": train_config.to_dict(),
        "campaign": {"n_runs": int(campaign["n_runs"]), "subset_ratio": float(campaign["subset_ratio"]),
                     "seed": int(campaign["seed"])},
        "schedule": step_schedule(train_config, train_table.n_records, campaign["subset_ratio"]),
        "n_patients": int(len(train_table.patient_ids())),
        "n_train_records": int(train_table.n_records),
        "n_test_records": int(test_table.n_records),
        "label_names": list(train_table.label_names),
        "task": train_table.task,
        "subgroups": list(train_table.subgroups),
        "channels": int(train_table.channels),
        # --init_from: the pretrained weights every run starts from (an attacker knows them too)
        **({"init_from": _init_from_summary(train_config)} if train_config.init_from else {}),
    }


def _init_from_summary(train_config: TrainConfig) -> dict:
    from medleak.train_utils.finetune import init_from_summary

    return init_from_summary(train_config)


def resolve_train_config(train_config: TrainConfig, train_table) -> TrainConfig:
    """`resolve_backend_choices`, and --pos_weight=auto from the WHOLE training table's label
    frequencies (public; train_utils/class_weights.py), as plan.json records them."""
    from medleak.train_utils.class_weights import resolve_pos_weight

    return resolve_pos_weight(resolve_backend_choices(train_config), train_table.labels(), train_table.task)


def resolve_backend_choices(train_config: TrainConfig) -> TrainConfig:
    """`train_config` with "auto" choices made for this process's backend (bfloat16 on GPU/TPU…)."""
    from medleak.train_utils.device import resolve_compute_dtype

    return dataclasses.replace(train_config, compute_dtype=resolve_compute_dtype(train_config.compute_dtype))


def follow_plan(document: dict, stored: dict, requested: TrainConfig) -> dict:
    """`document` with the stored plan's per-backend choices where the worker asked for "auto".

    A worker on a CPU joining a campaign planned on GPUs trains in the plan's bfloat16, so all runs
    are the same models; an explicit --compute_dtype that differs is still refused by `check_plan`.
    """
    followed = dict(document, train_config=dict(document["train_config"]))
    for name in BACKEND_CHOICES:
        if getattr(requested, name) == "auto" and name in stored.get("train_config", {}):
            followed["train_config"][name] = stored["train_config"][name]
    return followed


# Keys that only describe how/when a plan was written; they never make two workers incomparable.
_PROVENANCE_KEYS = ("created", "created_by", "created_on", "migrated")


def check_format(logdir, stored: dict) -> None:
    """Refuses (one line) a plan written in another format, saying how to migrate it."""
    found = stored.get("format")
    if found == PLAN_FORMAT:
        return
    path = Path(logdir) / PLAN_FILE
    if isinstance(found, int) and found > PLAN_FORMAT:
        raise MedleakError(f"{path}: plan format {found} is newer than this medleak's ({PLAN_FORMAT}); "
                           "upgrade medleak or start a new --logdir")
    raise MedleakError(f"{path}: plan format {found} is older than this medleak's ({PLAN_FORMAT}); migrate it "
                       f"with `python -m medleak.campaign.plan --migrate {logdir}` or start a new --logdir")


def plan_differences(stored: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between two plan documents (nested dicts compared per key)."""
    differences = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            if not prefix and key in _PROVENANCE_KEYS:
                continue
            name = f"{prefix}{key}"
            va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, name + ".")
            elif va != vb:
                differences.append(name)

    walk(stored, wanted, "")
    return differences


def check_plan(logdir, stored: dict, wanted: dict) -> None:
    """Refuses (one-line MedleakError) a worker whose plan document differs from the stored one."""
    differences = plan_differences(stored, wanted)
    if not differences:
        return
    shown = []
    for key in differences[:6]:
        a, b = _lookup(stored, key), _lookup(wanted, key)
        if key.endswith("hash"):
            a, b = str(a)[:12], str(b)[:12]
        shown.append(f"{key} (logdir: {a}, now: {b})")
    more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
    raise MedleakError(
        f"{Path(logdir) / PLAN_FILE}: this logdir holds a campaign with a different dataset or config: "
        f"{'; '.join(shown)}{more}. Use the same flags and data, or a new --logdir"
    )


def _lookup(doc: dict, dotted: str):
    value = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<missing>"
        value = value[part]
    return value


def write_plan(logdir, document: dict, patient_mask: np.ndarray, patient_ids, train_table,
               test_table) -> None:
    """Writes the plan files; plan.json last, so its presence means the plan is complete.

    Call only while holding the queue lock (`WorkQueue.locked()`), so two workers never both write.
    """
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    save_npy(logdir / MASK_FILE, np.asarray(patient_mask, dtype=bool))
    write_csv(logdir / PATIENTS_FILE, pd.DataFrame({"patient_id": [str(p) for p in patient_ids]}))
    record_columns = [c for c in train_table.columns() if c != "split"]
    write_csv(logdir / RECORDS_FILE, train_table.df[record_columns])
    write_csv(logdir / TEST_RECORDS_FILE, test_table.df[record_columns])
    stamped = dict(document)
    stamped["created"] = _now()
    stamped["created_by"] = f"{socket.gethostname()}:{os.getpid()}"
    stamped["created_on"] = _backend_description()  # where the per-backend choices were made
    write_json(logdir / PLAN_FILE, stamped)


def ensure_plan(logdir, document: dict, train_table, test_table,
                requested: TrainConfig | None = None, check=None) -> tuple[dict, np.ndarray, bool]:
    """Creates the plan if the logdir has none, else checks that it matches `document`.

    `requested`: the worker's TrainConfig before per-backend choices were resolved; where it says
    "auto", the stored plan's choice is followed (`follow_plan`). `check(train_config, schedule,
    patient_mask)` (e.g. `check_trainable` on the table) runs before a new plan is written, and on
    a stored one. Returns (stored plan document, patient mask, created). Must be called with the
    queue lock held.
    """
    stored = read_plan(logdir)
    if stored is not None:
        check_format(logdir, stored)
        if requested is not None:
            document = follow_plan(document, stored, requested)
        document = follow_stored_schedule(document, stored)
        check_plan(logdir, stored, document)
        mask = load_patient_mask(logdir)
        if check is not None:
            check(TrainConfig.from_dict(stored["train_config"]), stored["schedule"], mask)
        return stored, mask, False
    campaign = document["campaign"]
    patient_ids, _ = patient_index(train_table.df["patient_id"])
    mask = make_patient_mask(campaign["n_runs"], len(patient_ids), campaign["subset_ratio"], campaign["seed"])
    if check is not None:
        check(TrainConfig.from_dict(document["train_config"]), document["schedule"], mask)
    write_plan(logdir, document, mask, patient_ids, train_table, test_table)
    return read_plan(logdir), mask, True


def superseded_plan_file(plan_format) -> str:
    """Where `migrate_plan` keeps the plan.json it replaced, beside it in the logdir."""
    return f"plan.format{plan_format}.json"


def migrate_plan(logdir) -> dict:
    """Rewrites a format-1 plan.json as format 2 (atomically; the old file is kept beside it).

    Format 1 stored the warm-up in epochs (`warmup_epochs`); the same number of warm-up steps is
    the fraction warmup_epochs / epochs of all steps. The `schedule` block is computed as the
    format-1 campaign ran (`format_1_steps_per_epoch`). Returns the new document.
    """
    logdir = Path(logdir)
    stored = read_plan(logdir)
    if stored is None:
        raise MedleakError(f"{logdir / PLAN_FILE}: no plan to migrate")
    if stored.get("format") == PLAN_FORMAT:
        return stored
    if stored.get("format") != 1:
        check_format(logdir, stored)  # a newer format: says so
    config = dict(stored["train_config"])
    warmup_epochs = float(config.pop("warmup_epochs", 0.0))
    if warmup_epochs >= config["epochs"]:
        raise MedleakError(f"{logdir / PLAN_FILE}: warm-up of {warmup_epochs} epochs covers the whole run, which "
                           "format 2 cannot express (warm-up < all steps); start a new --logdir")
    config["warmup"] = warmup_epochs / config["epochs"]
    train_config = TrainConfig.from_dict(config)
    expected = expected_train_size(stored["n_train_records"], stored["campaign"]["subset_ratio"])
    migrated = dict(stored, format=PLAN_FORMAT, train_config=train_config.to_dict(),
                    schedule=schedule_block(expected, format_1_steps_per_epoch(expected, train_config.batch_size),
                                            train_config.epochs),
                    migrated=f"from format {stored['format']} on {_now()}")
    write_json(logdir / superseded_plan_file(stored["format"]), stored)
    write_json(logdir / PLAN_FILE, migrated)
    return migrated


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _backend_description() -> str:
    from medleak.rundir import environment_info

    return environment_info()["device"]


def main(argv=None) -> int:
    """`python -m medleak.campaign.plan --migrate LOGDIR`: bring an older logdir's plan up to date."""
    from medleak.cli import main_guard

    parser = argparse.ArgumentParser(prog="python -m medleak.campaign.plan", description=main.__doc__)
    parser.add_argument("--migrate", metavar="LOGDIR", required=True, help="logdir whose plan.json to rewrite")
    args = parser.parse_args(argv)

    @main_guard
    def migrate():
        path = Path(args.migrate) / PLAN_FILE
        old_format = (read_plan(args.migrate) or {}).get("format")
        migrate_plan(args.migrate)
        if old_format == PLAN_FORMAT:
            print(f"{path} is already format {PLAN_FORMAT}")
        else:
            print(f"migrated {path} from format {old_format} to {PLAN_FORMAT} "
                  f"(the old file is kept as {path.with_name(superseded_plan_file(old_format))})")
        return 0

    return migrate()


if __name__ == "__main__":
    sys.exit(main())
