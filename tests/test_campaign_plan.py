"""The patient-level plan: exact IN counts, LiRA's construction, storage and refusal of mismatches."""

import functools
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from medleak import rundir
from medleak.campaign import plan
from medleak.config import CampaignConfig, TrainConfig
from medleak.io_utils import write_json
from medleak.data_utils.records import RecordsTable
from medleak.errors import MedleakError


def slow_patient_mask(n_runs, n_patients, subset_ratio, seed):
    """Obviously-correct loop version of LiRA's `keep.argsort(0) < k`, from the same noise."""
    noise = np.random.default_rng(seed).uniform(size=(n_runs, n_patients))
    k = int(np.floor(subset_ratio * n_runs + 0.5))
    mask = np.zeros((n_runs, n_patients), dtype=bool)
    for patient in range(n_patients):
        runs_by_noise = sorted(range(n_runs), key=lambda run: noise[run, patient])
        for position in range(n_runs):
            mask[position, patient] = runs_by_noise[position] < k
    return mask


@pytest.mark.parametrize("n_runs,ratio", [(8, 0.5), (7, 0.5), (10, 0.3), (3, 0.9), (1, 0.5)])
def test_every_patient_in_for_exactly_k_runs(n_runs, ratio):
    mask = plan.make_patient_mask(n_runs, 53, ratio, seed=1)
    k = int(np.floor(ratio * n_runs + 0.5))
    assert mask.shape == (n_runs, 53) and mask.dtype == bool
    assert (mask.sum(axis=0) == k).all()


def test_matches_slow_loop_and_is_seeded():
    fast = plan.make_patient_mask(9, 40, 0.5, seed=3)
    np.testing.assert_array_equal(fast, slow_patient_mask(9, 40, 0.5, seed=3))
    np.testing.assert_array_equal(fast, plan.make_patient_mask(9, 40, 0.5, seed=3))
    assert not np.array_equal(fast, plan.make_patient_mask(9, 40, 0.5, seed=4))


def test_membership_is_uniform_and_independent_across_patients():
    # Known answer: each run holds each patient with probability k/n, and two runs share a
    # patient with probability k(k-1)/(n(n-1)); check both within 5 standard errors.
    n_runs, n_patients = 6, 20000
    mask = plan.make_patient_mask(n_runs, n_patients, 0.5, seed=0)
    p = 3 / 6
    sd = np.sqrt(n_patients * p * (1 - p))
    assert np.all(np.abs(mask.sum(axis=1) - n_patients * p) < 5 * sd)
    both = (mask[0] & mask[1]).mean()
    p_both = 3 * 2 / (6 * 5)
    assert abs(both - p_both) < 5 * np.sqrt(p_both * (1 - p_both) / n_patients)


def test_bad_settings_are_refused():
    for args in [(0, 5, 0.5), (4, 0, 0.5), (4, 5, 0.0), (4, 5, 1.0), (1, 5, 0.2)]:
        with pytest.raises(MedleakError):
            plan.make_patient_mask(*args, seed=0)


def test_records_inherit_their_patients_bit():
    patients, index = plan.patient_index(["p2", "p1", "p2", "p3", "p1"])
    assert list(patients) == ["p2", "p1", "p3"]
    np.testing.assert_array_equal(index, [0, 1, 0, 2, 1])
    row = np.array([True, False, True])
    np.testing.assert_array_equal(plan.record_mask(row, index), [True, False, True, True, False])


def test_run_seeds_differ_between_runs_and_campaigns():
    seeds = {plan.run_seed(0, run) for run in range(100)} | {plan.run_seed(1, run) for run in range(100)}
    assert len(seeds) == 200
    assert plan.run_seed(5, 7) == plan.run_seed(5, 7) == plan.run_seed(5, 7, attempt=1)
    assert len({plan.run_seed(5, 7, attempt) for attempt in (1, 2, 3)}) == 3  # retries re-seed


def make_tables(n_patients=6, images_per_patient=2):
    return uneven_tables(n_patients, images=lambda p: images_per_patient)


def uneven_tables(n_patients=30, images=lambda p: 1 + p % 4):
    """Patients with images(p) images each (by default 1 to 4), so runs differ in records and patients."""
    rows = []
    for p in range(n_patients + 2):
        for i in range(images(p)):
            rows.append(dict(record_id=f"r{p}_{i}", patient_id=f"p{p}", path=f"img/{p}_{i}.png",
                             split="train" if p < n_patients else "test", a=float(i == 0), b=float(i != 0),
                             sex="F" if p % 2 else "M"))
    table = RecordsTable("toy", pd.DataFrame(rows), ("a", "b"), "multiclass", ("sex",))
    return table.split("train"), table.split("test")


def document(train, test, **config):
    config = plan.resolve_backend_choices(TrainConfig(**config))
    return plan.plan_document("toy", train, test, config, CampaignConfig(n_runs=4, subset_ratio=0.5, seed=0))


def test_plan_is_written_once_and_then_checked(tmp_path):
    train, test = make_tables()
    wanted = document(train, test, epochs=2)
    stored, mask, created = plan.ensure_plan(tmp_path, wanted, train, test)
    assert created and mask.shape == (4, 6) and (mask.sum(axis=0) == 2).all()
    for name in (rundir.PLAN_FILE, rundir.MASK_FILE, rundir.PATIENTS_FILE, rundir.RECORDS_FILE, rundir.TEST_RECORDS_FILE):
        assert (tmp_path / name).is_file()
    records = pd.read_csv(tmp_path / rundir.RECORDS_FILE)
    assert list(records["record_id"]) == list(train.df["record_id"])
    assert "split" not in records.columns and {"a", "b", "sex", "path"} <= set(records.columns)
    patients = pd.read_csv(tmp_path / rundir.PATIENTS_FILE)["patient_id"].tolist()
    assert patients == [f"p{p}" for p in range(6)]
    assert stored["dataset_hash"] == train.content_hash() and stored["train_config"]["epochs"] == 2

    again, mask_again, created_again = plan.ensure_plan(tmp_path, document(train, test, epochs=2), train, test)
    assert not created_again
    np.testing.assert_array_equal(mask, mask_again)


def test_mismatched_config_or_dataset_is_refused_naming_the_keys(tmp_path):
    train, test = make_tables()
    plan.ensure_plan(tmp_path, document(train, test, epochs=2), train, test)
    with pytest.raises(MedleakError) as err:
        plan.ensure_plan(tmp_path, document(train, test, epochs=3, learning_rate=0.5), train, test)
    message = str(err.value)
    assert "\n" not in message
    assert "train_config.epochs (logdir: 2, now: 3)" in message
    assert "train_config.learning_rate" in message
    other_train, other_test = make_tables(n_patients=5)
    with pytest.raises(MedleakError, match="dataset_hash"):
        plan.ensure_plan(tmp_path, document(other_train, other_test, epochs=2), other_train, other_test)


def test_unreadable_plan_json_is_a_one_line_error(tmp_path):
    (tmp_path / rundir.PLAN_FILE).write_text('{"format": 1, "dataset": ')  # cut short (a hand edit, a full disk)
    with pytest.raises(MedleakError, match="plan.json: unreadable"):
        rundir.read_plan(tmp_path)


def test_plan_records_the_schedule_and_the_compute_dtype_auto_resolved_to(tmp_path):
    train, test = make_tables()  # 12 training records
    stored, _, _ = plan.ensure_plan(tmp_path, document(train, test, epochs=3, batch_size=4), train, test)
    assert stored["format"] == plan.PLAN_FORMAT
    # half of 12 records per run, 4 per update: 2 steps per epoch, 6 in all
    assert stored["schedule"] == {"expected_train_size": 6, "steps_per_epoch": 2, "steps": 6}
    assert stored["train_config"]["compute_dtype"] == "float32"  # "auto" on this CPU
    assert stored["train_config"]["warmup"] == TrainConfig().warmup
    assert stored["campaign"] == {"n_runs": 4, "subset_ratio": 0.5, "seed": 0}
    assert stored["created_on"].startswith("cpu")
    with pytest.raises(ValueError, match="auto"):
        plan.plan_document("toy", train, test, TrainConfig(), CampaignConfig())


def test_a_worker_given_auto_follows_the_plans_dtype_and_an_explicit_other_dtype_is_refused(tmp_path):
    train, test = make_tables()
    # Planned by a worker whose backend chose bfloat16 (an accelerator).
    plan.ensure_plan(tmp_path, document(train, test, compute_dtype="bfloat16"), train, test)
    requested = TrainConfig(compute_dtype="auto")
    here = document(train, test, compute_dtype="auto")  # resolved on this CPU: float32
    assert here["train_config"]["compute_dtype"] == "float32"
    stored, _, created = plan.ensure_plan(tmp_path, here, train, test, requested)
    assert not created and TrainConfig.from_dict(stored["train_config"]).compute_dtype == "bfloat16"
    explicit = document(train, test, compute_dtype="float32")
    with pytest.raises(MedleakError, match=r"train_config.compute_dtype \(logdir: bfloat16, now: float32\)"):
        plan.ensure_plan(tmp_path, explicit, train, test, TrainConfig(compute_dtype="float32"))
    with pytest.raises(MedleakError, match="compute_dtype"):  # without `requested`, nothing is followed
        plan.ensure_plan(tmp_path, here, train, test)


def format_1_plan(train, test, **config):
    """A plan.json as format 1 wrote it: warm-up in epochs, no schedule block."""
    doc = document(train, test, **config)
    train_config = dict(doc["train_config"])
    epochs = train_config["epochs"]
    train_config["warmup_epochs"] = train_config.pop("warmup") * epochs
    old = {k: v for k, v in doc.items() if k != "schedule"}
    return dict(old, format=1, train_config=train_config)


def test_an_older_plan_format_is_one_line_naming_the_migration_which_then_makes_it_current(tmp_path):
    train, test = make_tables()
    plan.ensure_plan(tmp_path, document(train, test, epochs=4, warmup=0.25), train, test)
    current = rundir.read_plan(tmp_path)
    old = format_1_plan(train, test, epochs=4, warmup=0.25)
    assert old["train_config"]["warmup_epochs"] == 1.0
    write_json(tmp_path / rundir.PLAN_FILE, old)
    with pytest.raises(MedleakError) as err:
        plan.ensure_plan(tmp_path, document(train, test, epochs=4, warmup=0.25), train, test)
    message = str(err.value)
    assert "\n" not in message and "format 1" in message
    assert f"python -m medleak.campaign.plan --migrate {tmp_path}" in message and "new --logdir" in message

    done = subprocess.run([sys.executable, "-m", "medleak.campaign.plan", "--migrate", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from format 1 to 2" in done.stdout
    migrated = rundir.read_plan(tmp_path)
    assert migrated["format"] == 2 and migrated["train_config"]["warmup"] == 0.25
    assert "warmup_epochs" not in migrated["train_config"]
    assert migrated["schedule"] == current["schedule"]
    assert plan.plan_differences(migrated, current) == []  # provenance aside, the same campaign
    assert (tmp_path / plan.superseded_plan_file(1)).is_file()
    stored, _, created = plan.ensure_plan(tmp_path, document(train, test, epochs=4, warmup=0.25), train, test)
    assert not created and stored["format"] == 2


def test_a_newer_plan_format_is_refused(tmp_path):
    train, test = make_tables()
    write_json(tmp_path / rundir.PLAN_FILE, dict(document(train, test), format=plan.PLAN_FORMAT + 1))
    with pytest.raises(MedleakError, match="newer than this medleak"):
        plan.ensure_plan(tmp_path, document(train, test), train, test)


# -- plan-time checks: a campaign that some run could not train fails before any run ----------------

def dp_document(train, test, **config):
    config = plan.resolve_backend_choices(TrainConfig(model="small_cnn", img_size=(8, 8), epochs=1, epsilon=8.0,
                                                      delta=1e-5, **config))
    return plan.plan_document("toy", train, test, config, CampaignConfig(n_runs=8, subset_ratio=0.5, seed=0))


def ensure_checked(tmp_path, doc, train, test):
    return plan.ensure_plan(tmp_path, doc, train, test, check=functools.partial(plan.check_trainable, train))


def slow_smallest_run(train, mask, unit):
    """Fewest units of any run, counted record by record."""
    patients = list(pd.read_csv(io.StringIO(train.df[["patient_id"]].to_csv(index=False)))["patient_id"].astype(str))
    order = list(dict.fromkeys(patients))
    counts = []
    for row in mask:
        if unit == "patient":
            counts.append(sum(bool(row[order.index(p)]) for p in order))
        else:
            counts.append(sum(bool(row[order.index(p)]) for p in patients))
    return min(counts)


@pytest.mark.parametrize("dp_unit, grad_accum", [("record", 1), ("patient", 1), ("record", 2)])
def test_a_dp_batch_size_too_large_for_some_run_fails_before_the_plan_is_written(tmp_path, dp_unit, grad_accum):
    # patient-level: two images each, so a step of b records expects exactly b / 2 patients
    train, test = uneven_tables(**({"images": lambda p: 2} if dp_unit == "patient" else {}))
    mask = plan.make_patient_mask(8, 30, 0.5, 0)
    smallest = slow_smallest_run(train, mask, dp_unit)
    records_per_unit = 2 if dp_unit == "patient" else 1
    # fits the whole split and a run's expected size, too large for the smallest run
    too_large = (records_per_unit * smallest + 2) // grad_accum * grad_accum
    doc = dp_document(train, test, dp_unit=dp_unit, batch_size=too_large, grad_accum=grad_accum)
    with pytest.raises(MedleakError) as info:
        ensure_checked(tmp_path, doc, train, test)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--batch_size={too_large} asks for more {dp_unit}s")
    assert f"({smallest}, the fewest of the 8 runs)" in message
    assert not (tmp_path / rundir.PLAN_FILE).exists()  # nothing planned: the corrected command starts afresh
    works = int(message.rsplit("--batch_size=", 1)[1].split()[0])
    assert works == records_per_unit * smallest // grad_accum * grad_accum  # the largest that fits
    ensure_checked(tmp_path, dp_document(train, test, dp_unit=dp_unit, batch_size=works, grad_accum=grad_accum),
                   train, test)  # the value it names works, for every run
    assert (tmp_path / rundir.PLAN_FILE).exists()


def test_a_stored_plan_with_a_bad_dp_batch_size_is_refused_before_any_run(tmp_path):
    train, test = uneven_tables()
    doc = dp_document(train, test, batch_size=30)
    plan.ensure_plan(tmp_path, doc, train, test)  # planned by a version that did not check
    with pytest.raises(MedleakError, match=r"^--batch_size=30 asks for more records"):
        ensure_checked(tmp_path, doc, train, test)


def test_a_batch_larger_than_a_run_or_a_zero_learning_rate_fails_when_planned(tmp_path):
    train, test = make_tables(n_patients=10)  # 20 records, a run expects 10
    with pytest.raises(MedleakError) as info:
        ensure_checked(tmp_path, document(train, test, model="small_cnn", batch_size=16, grad_accum=4), train, test)
    assert str(info.value) == ("--batch_size=16 is more than a run's 10 training records, so an epoch holds no "
                               "full batch; use --batch_size=8 or less")
    with pytest.raises(MedleakError, match=r"^--learning_rate=1e-50 gives every one of the 3 steps a learning "
                                           r"rate of 0 in float32; use --learning_rate=0.01$"):
        ensure_checked(tmp_path, document(train, test, model="small_cnn", batch_size=4, epochs=1,
                                          learning_rate=1e-50), train, test)
    assert not (tmp_path / rundir.PLAN_FILE).exists()
    ensure_checked(tmp_path, document(train, test, model="small_cnn", batch_size=8, grad_accum=4), train, test)
    assert (tmp_path / rundir.PLAN_FILE).exists()


def test_the_model_is_built_on_the_planned_image_size(monkeypatch):
    config = TrainConfig(model="small_cnn", img_size=(6, 10))
    plan.check_model_input(config, channels=3, n_classes=5)  # any size from 4 px up builds
    import flax.linen as nn

    from medleak.train_utils import models

    class NeedsEight(nn.Module):  # a model that, like a deep stem, needs at least 8x8 pixels
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (8, 8), padding="VALID")(x)
            return nn.Dense(5)(x.reshape(x.shape[0], -1)[:, :4])

    monkeypatch.setattr(models, "create_model", lambda *a, **k: NeedsEight())
    with pytest.raises(MedleakError) as info:
        plan.check_model_input(config, channels=3, n_classes=5)
    assert str(info.value) == "--img_size=6,10: --model=small_cnn cannot take images of this size; use --img_size=16,16"


def test_a_migrated_format_1_plan_keeps_the_steps_it_ran_and_workers_train_them(tmp_path):
    train, test = make_tables()  # 6 records per run; format 1 took ceil(6 / 5) = 2 batches an epoch
    plan.ensure_plan(tmp_path, document(train, test, epochs=4, warmup=0.25, batch_size=5), train, test)
    write_json(tmp_path / rundir.PLAN_FILE, format_1_plan(train, test, epochs=4, warmup=0.25, batch_size=5))
    migrated = plan.migrate_plan(tmp_path)
    assert migrated["schedule"] == {"expected_train_size": 6, "steps_per_epoch": 2, "steps": 8}
    wanted = document(train, test, epochs=4, warmup=0.25, batch_size=5)
    assert wanted["schedule"]["steps_per_epoch"] == 1  # today's rule: the nearest whole batch
    stored, _, created = plan.ensure_plan(tmp_path, wanted, train, test)
    assert not created and stored["schedule"] == migrated["schedule"]
