"""The parallel float32 scorer and the audit's score cache (`scoring.py`, `cache.py`).

The scorer is checked against the float64 reference (`scores.lira_scores`) and against itself on
one thread; the cache against scoring without it: same scores, masks and test logits, same audit
tables, only new or changed runs scored again, removed runs dropped.
"""

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from medleak.io_utils import load_npy, read_json, save_npy
from medleak.privacy_utils import scoring
from medleak.privacy_utils.audit import AuditOptions, run_audit
from medleak.privacy_utils.cache import CACHE_DIR, MANIFEST
from medleak.privacy_utils.calibration import unit_ranks
from medleak.privacy_utils.load import read_campaign_files, validate_runs
from medleak.privacy_utils.scores import lira_scores
from medleak.privacy_utils.scoring import LiraKernel, load_campaign, score_runs
from medleak.rundir import run_dir
from tests.campaigns import write_planted_campaign


@pytest.fixture
def scored_paths(monkeypatch):
    """The train_logits.npy paths the scorer reads, in call order (the real scorer still runs)."""
    paths = []
    real = scoring.score_into

    def counting(out, logits_path, *args, **kwargs):
        paths.append(logits_path.parent.name)
        return real(out, logits_path, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_into", counting)
    return paths


def _load(logdir, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_campaign(logdir, progress=False, cache=cache)


def _assert_same_campaign(a, b):
    np.testing.assert_array_equal(a.run_ids, b.run_ids)
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.test_logits, b.test_logits)
    assert a.skipped == b.skipped


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0, 3000.0])
def test_float32_kernel_matches_the_float64_reference(task, scale):
    rng = np.random.default_rng(1)
    n, views, classes = 3000, 4, 6
    logits = rng.normal(0.0, scale, size=(n, views, classes)).astype(np.float32)
    if task == "multilabel":
        labels = (rng.random((n, classes)) < 0.3).astype(np.float32)
    else:
        labels = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=n)]
    reference = lira_scores(logits, labels, task=task)
    out = np.full((n, views), np.nan, np.float32)
    assert LiraKernel(labels, task, views, block=700)(logits, 0, out)  # several blocks, the last one short
    np.testing.assert_allclose(out, reference, rtol=5e-5, atol=2e-5)


def test_kernel_refuses_non_finite_logits():
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    for bad in (np.nan, np.inf, -np.inf):
        logits = np.zeros((4, 2, 3), np.float32)
        logits[2, 1, 0] = bad
        for task in ("multilabel", "multiclass"):
            assert not LiraKernel(labels, task, 2)(logits, 0, np.empty((4, 2), np.float32))


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_parallel_scorer_equals_serial_and_reference(tmp_path, task):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=6, n_patients=40, n_views=3, task=task)
    files = read_campaign_files(logdir)
    runs, _ = validate_runs(files, progress=False)
    serial, kept_serial, _ = score_runs(files, runs, progress=False, threads=1)
    parallel, kept_parallel, _ = score_runs(files, runs, progress=False, threads=3)
    np.testing.assert_array_equal(serial, parallel)
    assert [r.run for r in kept_serial] == [r.run for r in kept_parallel] == list(range(6))
    reference = np.stack([lira_scores(load_npy(r.train_logits_path), files.train_labels, task=task) for r in runs])
    np.testing.assert_allclose(parallel, reference, rtol=5e-5, atol=2e-5)


def test_small_read_blocks_give_the_same_scores(tmp_path):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=2, n_patients=30)
    files = read_campaign_files(logdir)
    runs, _ = validate_runs(files, progress=False)
    whole, blocks = (np.empty((len(files.records), 2), np.float32) for _ in range(2))
    assert scoring.score_into(whole, runs[0].train_logits_path, files.train_labels, files.task)
    assert scoring.score_into(blocks, runs[0].train_logits_path, files.train_labels, files.task, read_block=7)
    np.testing.assert_array_equal(whole, blocks)


@pytest.mark.slow
def test_cached_and_uncached_audits_write_identical_tables(tmp_path, scored_paths):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=16, n_patients=60)
    outputs = {}
    for name, cache in (("uncached", False), ("cold", True), ("warm", True)):
        scored_paths.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_audit(logdir, AuditOptions(out_dir=tmp_path / name, progress=False, cache=cache, permutations=20))
        outputs[name] = len(scored_paths)
    assert outputs == {"uncached": 16, "cold": 16, "warm": 0}
    assert read_json(logdir / CACHE_DIR / MANIFEST)["rows"]
    for table in ("record_risk.csv", "patient_risk.csv", "privacy_by_subgroup.csv", "composition_top_patients.csv",
                  "utility_by_subgroup.csv"):
        expected = (tmp_path / "uncached" / table).read_bytes()
        assert (tmp_path / "cold" / table).read_bytes() == expected, table
        assert (tmp_path / "warm" / table).read_bytes() == expected, table
    summaries = [read_json(tmp_path / name / "attack_summary.json") for name in ("uncached", "cold", "warm")]
    assert summaries[0] == summaries[1] == summaries[2]


def test_uncached_audit_writes_no_cache(tmp_path):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=4, n_patients=20)
    _load(logdir, cache=False)
    assert not (logdir / CACHE_DIR).exists()


def test_a_run_added_after_caching_is_the_only_one_scored(tmp_path, scored_paths):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=8, n_patients=40)
    parked = tmp_path / "run_0005"
    shutil.move(run_dir(logdir, 5), parked)  # not finished yet when the first audit runs
    first = _load(logdir, cache=True)
    assert 5 not in first.run_ids.tolist() and len(scored_paths) == 7
    shutil.move(parked, run_dir(logdir, 5))  # the worker commits it
    scored_paths.clear()
    second = _load(logdir, cache=True)
    assert scored_paths == ["run_0005"]
    assert second.run_ids.tolist() == list(range(8))
    _assert_same_campaign(second, _load(logdir, cache=False))
    scored_paths.clear()
    _assert_same_campaign(_load(logdir, cache=True), second)
    assert scored_paths == []


def test_a_removed_or_changed_run_invalidates_what_depended_on_it(tmp_path, scored_paths):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=8, n_patients=40)
    _load(logdir, cache=True)
    key = read_json(logdir / CACHE_DIR / MANIFEST)["key"]
    shutil.rmtree(run_dir(logdir, 2))
    scored_paths.clear()
    removed = _load(logdir, cache=True)
    assert scored_paths == [] and 2 not in removed.run_ids.tolist()
    _assert_same_campaign(removed, _load(logdir, cache=False))
    manifest = read_json(logdir / CACHE_DIR / MANIFEST)
    assert manifest["key"] != key and len(manifest["rows"]) == 7
    assert not list((logdir / CACHE_DIR).glob(f"*{key}*"))  # the old key's files are gone

    logits_path = run_dir(logdir, 4) / "train_logits.npy"
    save_npy(logits_path, load_npy(logits_path) + 1.0)  # same size, new content and mtime
    scored_paths.clear()
    changed = _load(logdir, cache=True)
    assert scored_paths == ["run_0004"]
    _assert_same_campaign(changed, _load(logdir, cache=False))
    assert not np.array_equal(np.asarray(changed.scores[changed.run_ids.tolist().index(4)]),
                              np.asarray(removed.scores[removed.run_ids.tolist().index(4)]))

    metrics = run_dir(logdir, 6) / "metrics.json"
    metrics.write_text(metrics.read_text().replace("0.9", "0.8"))
    scored_paths.clear()
    _load(logdir, cache=True)
    assert scored_paths == ["run_0006"]


def test_a_run_with_non_finite_logits_is_skipped_once_and_remembered(tmp_path, scored_paths):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=6, n_patients=30)
    logits_path = run_dir(logdir, 1) / "train_logits.npy"
    logits = load_npy(logits_path)
    logits[-1, 0, 0] = np.nan
    save_npy(logits_path, logits)
    with pytest.warns(UserWarning, match=r"run_0001 \(NaN/inf logits\)"):
        first = load_campaign(logdir, progress=False, cache=True)
    assert len(scored_paths) == 6 and first.run_ids.tolist() == [0, 2, 3, 4, 5]
    scored_paths.clear()
    with pytest.warns(UserWarning, match=r"run_0001 \(NaN/inf logits\)"):
        second = load_campaign(logdir, progress=False, cache=True)
    assert scored_paths == []
    _assert_same_campaign(second, _load(logdir, cache=False))


def test_a_changed_plan_file_starts_the_cache_afresh(tmp_path, scored_paths):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=4, n_patients=20)
    _load(logdir, cache=True)
    records = pd.read_csv(logdir / "records.csv", dtype=str, keep_default_na=False)
    records.to_csv(logdir / "records.csv", index=False)  # rewritten: same rows, new mtime
    scored_paths.clear()
    _load(logdir, cache=True)
    assert len(scored_paths) == 4


def test_an_unwritable_cache_falls_back_to_scoring_with_one_warning(tmp_path):
    logdir = write_planted_campaign(tmp_path / "c", n_runs=4, n_patients=20)
    (logdir / CACHE_DIR).write_text("a file where the cache directory would go")
    with pytest.warns(UserWarning, match="cache not usable"):
        campaign = load_campaign(logdir, progress=False, cache=True)
    _assert_same_campaign(campaign, _load(logdir, cache=False))


def test_noise_floor_on_threads_equals_one_thread():
    from medleak.privacy_utils.noise_floor import share_floor

    rng = np.random.default_rng(3)
    patient_mask = (np.argsort(rng.random((30, 12)), axis=1) < 6).T
    unit_patient = np.repeat(np.arange(30), 1 + np.arange(30) % 3)
    summaries = rng.normal(size=(12, unit_patient.size)) + 0.5 * patient_mask[:, unit_patient]
    calls = []
    one = share_floor(summaries, patient_mask, unit_patient, n_permutations=25, seed=4, threads=1)
    many = share_floor(summaries, patient_mask, unit_patient, n_permutations=25, seed=4, threads=3,
                       on_permutation=lambda: calls.append(1))
    assert one == many and len(calls) == 25


def test_cached_fits_equal_fresh_ones(tmp_path):
    from medleak.privacy_utils.audit import audit_fit

    logdir = write_planted_campaign(tmp_path / "c", n_runs=8, n_patients=30)
    options = AuditOptions(progress=False)
    fresh = audit_fit(_load(logdir, cache=False), options)
    cached_campaign = _load(logdir, cache=True)
    first = audit_fit(cached_campaign, options)
    assert first.cache is not None and not any((logdir / CACHE_DIR).glob("derived-*-lira_fit"))
    first.lira_fit, first.rmia_fit, first.record_summary, first.record_ranks, first.patient_ranks  # computed, stored
    again = audit_fit(_load(logdir, cache=True), options)  # read back (memory-mapped), not recomputed
    assert isinstance(again.lira_fit.groups["in"]["mean"], np.memmap)
    assert isinstance(again.record_ranks.ranks, np.memmap)
    np.testing.assert_array_equal(again.record_summary, fresh.record_summary)
    for name in ("record_ranks", "patient_ranks"):
        np.testing.assert_array_equal(getattr(again, name).ranks, getattr(fresh, name).ranks, err_msg=name)
        np.testing.assert_array_equal(getattr(again, name).tied, getattr(fresh, name).tied, err_msg=name)
    for name in ("lira_fit", "rmia_fit"):
        a, b = getattr(fresh, name), getattr(again, name)
        np.testing.assert_array_equal(a.member_order, b.member_order)
        assert a.groups.keys() == b.groups.keys()
        for g in a.groups:
            assert a.groups[g].keys() == b.groups[g].keys()
            for stat in a.groups[g]:
                np.testing.assert_array_equal(a.groups[g][stat], b.groups[g][stat], err_msg=f"{name} {g} {stat}")
    targets = [6, 7]
    fresh_scores, cached_scores = fresh.attack(targets), again.attack(targets)
    for variant in fresh_scores:
        np.testing.assert_array_equal(fresh_scores[variant], cached_scores[variant], err_msg=variant)
    np.testing.assert_array_equal(fresh.record_auc_gaussian()[0], again.record_auc_gaussian()[0])


def test_planner_samples_records_with_a_recorded_seed(monkeypatch):
    from medleak.privacy_utils import audit

    rng = np.random.default_rng(0)
    patient_mask = (np.argsort(rng.random((40, 16)), axis=1) < 8).T
    record_patient = np.repeat(np.arange(40), 3)
    summaries = rng.normal(size=(16, 120)).astype(np.float32)
    risk = audit.RiskTables(None, None, None, summaries, summaries[:, ::3], patient_mask, record_patient,
                            unit_ranks(summaries), unit_ranks(summaries[:, ::3]))
    full = audit.run_planner(risk, 0.05, seed=1)
    assert full["records"]["n_units"] == 120 and full["records"]["sample_seed"] is None
    monkeypatch.setattr(audit, "PLANNER_MAX_UNITS", 50)
    sampled = audit.run_planner(risk, 0.05, seed=1)
    assert sampled["records"]["n_units"] == 50 and sampled["records"]["sample_seed"] == [1, 0]
    assert sampled["patients"]["sample_seed"] is None and sampled["patients"] == full["patients"]
    assert sampled == audit.run_planner(risk, 0.05, seed=1)  # seeded: the same sample again
    assert sampled["records"]["se_by_runs"] != full["records"]["se_by_runs"]


def test_cached_attacks_equal_fresh_ones_and_skip_the_step(tmp_path, monkeypatch):
    from medleak.privacy_utils import audit
    from medleak.privacy_utils.calibrated import FittedCampaign

    logdir = write_planted_campaign(tmp_path / "c", n_runs=8, n_patients=30)
    options = AuditOptions(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = audit.attack_suite(_load(logdir, cache=False), options)
        first = audit.attack_suite(_load(logdir, cache=True), options)  # computed and stored
        assert len(list((logdir / CACHE_DIR).glob("derived-*-attacks-*"))) == 1
        calls = []
        real = FittedCampaign.attack
        monkeypatch.setattr(FittedCampaign, "attack", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
        again = audit.attack_suite(_load(logdir, cache=True), options)  # read back, not recomputed
        assert calls == []
        other_seed = audit.attack_suite(_load(logdir, cache=True), AuditOptions(progress=False, seed=1))
        assert calls == [1]  # another attack option: computed again
    assert isinstance(again.scores["LiRA online"], np.memmap)
    for attacks in (first, again):
        assert attacks.scores.keys() == fresh.scores.keys() and attacks.extras == fresh.extras
        np.testing.assert_array_equal(attacks.target_masks, fresh.target_masks)
        for name in fresh.scores:
            np.testing.assert_array_equal(attacks.scores[name], fresh.scores[name], err_msg=name)
            assert attacks.results[name][0] == fresh.results[name][0], name
            np.testing.assert_array_equal(attacks.results[name][1], fresh.results[name][1], err_msg=name)
    assert not np.array_equal(other_seed.scores["LiRA online"], fresh.scores["LiRA online"])


def test_strongest_attack_floor_on_threads_equals_one_thread():
    from medleak.privacy_utils.noise_floor import strongest_attack_floor

    rng = np.random.default_rng(5)
    patients = np.repeat(np.arange(40), 1 + np.arange(40) % 3)
    target_masks = (np.argsort(rng.random((40, 6)), axis=1) < 3).T[:, patients]
    attack_scores = {name: rng.normal(size=target_masks.shape) + shift * target_masks for name, shift in (("a", 0.0), ("b", 0.8))}
    calls = []
    one = strongest_attack_floor(attack_scores, target_masks, patients, n_permutations=30, seed=2, threads=1)
    many = strongest_attack_floor(attack_scores, target_masks, patients, n_permutations=30, seed=2, threads=3,
                                  on_permutation=lambda: calls.append(1))
    assert one == many and len(calls) == 30 and one["strongest"] == "b"
