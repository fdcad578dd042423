"""mem_inf_stats.py on synthetic campaign logdirs written in the run-directory format
(docs/ARCHITECTURE.md), with planted vulnerable patients whose IN logits are shifted up."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medleak import rundir
from medleak.errors import MedleakError
from medleak.privacy_utils.audit import AuditOptions, run_audit
from medleak.privacy_utils.scoring import load_campaign
from tests.campaigns import LABELS, PLANTED, write_planted_campaign

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audited(planted_campaign, tmp_path_factory):
    logdir, data_root = planted_campaign
    out_dir = tmp_path_factory.mktemp("audit") / "figs"
    summary = run_audit(logdir, AuditOptions(out_dir=out_dir, eval_size=4, data_root=data_root, progress=False))
    return logdir, out_dir, summary


def test_planted_patients_top_the_patient_ranking(audited):
    _, out_dir, summary = audited
    patients = pd.read_csv(out_dir / "patient_risk.csv", dtype={"patient_id": str})
    top_decile = set(patients["patient_id"].head(int(np.ceil(0.1 * len(patients)))))
    assert set(PLANTED) <= top_decile
    planted = patients["patient_id"].isin(PLANTED)
    assert (patients.loc[planted, "at_risk"] == 1).all() and patients.loc[planted, "auc"].min() > 0.9
    assert patients.loc[planted, "auc_max"].min() > 0.9  # the paper's statistic agrees
    assert list(patients.columns[:6]) == ["patient_id", "auc", "auc_se", "p_value", "q_value", "at_risk"]
    assert {"auc_max", "auc_mean", "n_records", "sex", "age"} <= set(patients.columns)
    assert ((patients["q_value"] >= patients["p_value"]) & (patients["p_value"] > 0) & (patients["p_value"] <= 1)).all()
    records = pd.read_csv(out_dir / "record_risk.csv", dtype={"patient_id": str})
    assert {"record_id", "patient_id", "auc", "auc_se", "p_value", "q_value", "at_risk", "auc_gaussian", "n_in", "n_out",
            "label", "sex", "age"} <= set(records.columns)
    assert (records["n_in"] + records["n_out"] == 16).all() and records["auc"].between(0, 1).all()
    assert summary["n_runs"] == 16 and summary["patient_risk"]["n_at_risk"] >= len(PLANTED)
    assert summary["verdict"].startswith(f"{summary['patient_risk']['n_at_risk']} of 50 patients")
    assert "identifiable above chance" in summary["verdict"]


def test_attacks_beat_chance_and_summary_is_complete(audited):
    _, out_dir, summary = audited
    on_disk = json.loads((out_dir / "attack_summary.json").read_text())
    assert set(on_disk["attacks"]) == {"LiRA online", "LiRA online, fixed variance", "LiRA offline",
                                       "LiRA offline, fixed variance", "RMIA online", "RMIA offline", "Loss threshold"}
    for name, attack in on_disk["attacks"].items():
        assert attack["n_targets"] == 4 and len(attack["auc"]["per_target"]) == 4
        assert set(attack) >= {"auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr"}
    assert on_disk["attacks"]["LiRA online"]["auc"]["mean"] > 0.55
    assert on_disk["target_runs"] == [12, 13, 14, 15] and on_disk["n_targets"] == 4 and on_disk["n_shadows"] == 14
    # 50 patients: the top 1 % is one patient, too few for a composition test, so none is reported
    assert on_disk["composition_tests"] == {}
    floor = on_disk["noise_floor"]
    assert floor["strongest_attack"]["max_auc"]["excess_lo"] > 0  # planted: the attacks beat their chance level
    assert floor["patients"]["at_risk"]["observed"] > floor["patients"]["at_risk"]["chance_hi"]
    assert on_disk["seeds"]["noise_floor"] == {"patients": 0, "records": 1, "strongest_attack": 2}
    assert set(on_disk["run_planner"]) == {"records", "patients"}


def test_figures_and_report_are_written(audited):
    _, out_dir, _ = audited
    for stem in ("roc", "esf_records", "esf_patients", "esf_by_sex", "utility_privacy_sex", "esf_by_label", "vulnerable_images"):
        assert (out_dir / f"{stem}.png").stat().st_size > 1000, stem
        assert (out_dir / f"{stem}.pdf").read_bytes()[:4] == b"%PDF", stem
    assert not (out_dir / "composition_sex.png").exists()  # no composition test on one top patient: no figure
    html = (out_dir / "report.html").read_text()
    embedded = re.findall(r'<img class="figure" alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) >= 7
    for data in embedded:  # every embedded figure decodes to a real image
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.verify()
    assert "figures loaded" not in html and 'id="verdict"' in html
    assert 'src="http' not in html and "p000" in html  # self-contained; top patients listed
    utility = pd.read_csv(out_dir / "utility_by_subgroup.csv")
    assert (utility["auroc_mean"] > 0.8).all()  # test logits were made informative


def test_report_opens_in_headless_chromium(audited, tmp_path):
    _, out_dir, _ = audited
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]
    url = (out_dir / "report.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    verdict = re.search(r'<p class="verdict" id="verdict">(.*?)</p>', dom.stdout, re.S)
    assert verdict is not None, dom.stderr[-2000:]
    assert "identifiable above chance" in verdict.group(1) and "chance level" in verdict.group(1)
    assert dom.stdout.count('class="figure"') >= 7
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1400", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1400, 1200, 3) and pixels.std() > 10  # not a blank page
    # the verdict box (background #fff8e6) is drawn in the first screen, above the headline cards
    verdict_rows = np.flatnonzero((np.abs(pixels - [255, 248, 230]).sum(axis=2) < 6).sum(axis=1) > 300)
    assert verdict_rows.size > 20 and verdict_rows.min() < 400


@pytest.mark.slow
def test_multilabel_campaign_and_cli(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", task="multilabel", n_runs=8, n_patients=20, seed=1)
    out_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "mem_inf_stats.py"), f"--logdir={logdir}", f"--out_dir={out_dir}", "--eval_size=2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out_dir / 'report.html'}" in result.stdout
    summary = json.loads((out_dir / "attack_summary.json").read_text())
    assert summary["task"] == "multilabel" and summary["n_runs"] == 8
    assert "verdict: " in result.stdout
    for label in LABELS:  # multi-label: one eSF figure per finding
        assert (out_dir / f"esf_by_label_{label}.png").exists()
    assert "Patient risk by label: benign" in (out_dir / "report.html").read_text()


# ---------------------------------------------------------------- bad input


def test_cli_bad_logdir_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "mem_inf_stats.py"), f"--logdir={tmp_path}"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "plan.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_logdir_and_no_runs(tmp_path):
    with pytest.raises(MedleakError, match="plan.json"):
        load_campaign(tmp_path)
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=4, n_patients=6)
    for run in rundir.list_complete_runs(logdir):
        shutil.rmtree(rundir.run_dir(logdir, run))
    with pytest.raises(MedleakError, match="no complete runs"):
        load_campaign(logdir, progress=False)


def test_one_usable_run_and_skipped_runs_are_reported(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=3, n_patients=6)
    (rundir.run_dir(logdir, 1) / rundir.METRICS_FILE).unlink()  # incomplete
    logits = np.load(rundir.run_dir(logdir, 2) / "train_logits.npy")
    logits[3, 0, 1] = np.nan
    np.save(rundir.run_dir(logdir, 2) / "train_logits.npy", logits)
    with pytest.warns(UserWarning, match=r"skipped 2 run\(s\): run_0001 \(missing metrics.json\); run_0002 \(NaN/inf logits\)"):
        with pytest.raises(MedleakError, match="1 usable run"):
            load_campaign(logdir, progress=False)


def test_mismatched_labels_and_shapes(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=3, n_patients=6)
    labels = np.load(rundir.run_dir(logdir, 1) / "train_labels.npy")
    np.save(rundir.run_dir(logdir, 1) / "train_labels.npy", labels[:, ::-1].copy())
    with pytest.raises(MedleakError, match=r"run_0001/train_labels.npy: labels differ"):
        load_campaign(logdir, progress=False)
    np.save(rundir.run_dir(logdir, 1) / "train_labels.npy", labels)
    logits = np.load(rundir.run_dir(logdir, 0) / "train_logits.npy")
    np.save(rundir.run_dir(logdir, 0) / "train_logits.npy", logits[:, :, :2].copy())
    with pytest.raises(MedleakError, match=r"shape .* expected"):
        load_campaign(logdir, progress=False)


def test_record_without_out_model_is_refused(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=8, n_patients=6)
    patient_mask = np.load(logdir / rundir.MASK_FILE)
    patient_mask[:, 0] = True
    np.save(logdir / rundir.MASK_FILE, patient_mask)
    records = pd.read_csv(logdir / rundir.RECORDS_FILE)
    for run in range(8):
        np.save(rundir.run_dir(logdir, run) / "record_mask.npy", (records["patient_id"] == "p000").to_numpy() | np.load(
            rundir.run_dir(logdir, run) / "record_mask.npy"))
    with pytest.raises(MedleakError, match=r"no OUT model .*p000_r0"), pytest.warns(UserWarning, match="only 8 runs"):
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", progress=False))


@pytest.mark.parametrize("options,flag", [
    (dict(top_share=0.0), "--top_share"), (dict(top_share=1.5), "--top_share"), (dict(rmia_trim=0.7), "--rmia_trim"),
    (dict(rmia_gamma=0.0), "--rmia_gamma"), (dict(rmia_population=0), "--rmia_population"),
    (dict(eval_size=-1), "--eval_size"), (dict(eval_size=17), "--eval_size=17 .* at most 16"),
    (dict(data_root="/nonexistent/medleak"), "--data_root"), (dict(fdr=0.0), "--fdr"), (dict(risk_auc=0.4), "--risk_auc"),
    (dict(permutations=5), "--permutations"), (dict(record_permutations=5), "--record_permutations"),
    (dict(target_se=0.0), "--target_se"),
])
def test_bad_audit_options_are_refused_naming_the_flag(planted_campaign, tmp_path, options, flag):
    logdir, _ = planted_campaign
    with pytest.raises(MedleakError, match=flag):
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", progress=False, **options))
    assert not (tmp_path / "out").exists()  # refused before any work


def test_unwritable_out_dir_is_a_one_line_error(planted_campaign, tmp_path):
    logdir, _ = planted_campaign
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MedleakError, match="--out_dir"):
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "file" / "figs", progress=False))


def test_unreadable_plan_json_is_a_one_line_error(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=3, n_patients=6)
    (logdir / rundir.PLAN_FILE).write_text("{not json")
    with pytest.raises(MedleakError, match="plan.json: unreadable"):
        load_campaign(logdir, progress=False)


# ---------------------------------------------------------------- mix-ups and the generated flags


def test_dataset_other_than_plan_json_is_a_one_line_error_naming_both(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=8, n_patients=6)  # plan.json: dataset "synthetic"
    with pytest.raises(MedleakError, match=r"--dataset=fitzpatrick .* is a synthetic campaign") as raised:
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", dataset="fitzpatrick", progress=False))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.warns(UserWarning, match="only 8 runs"):
        summary = run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", progress=False))  # default: plan.json's
    assert summary["dataset"] == "synthetic" and "synthetic" in (tmp_path / "out" / "report.html").read_text()


def test_data_root_of_another_dataset_prints_one_line_and_drops_the_grid(tmp_path, capsys):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=8, n_patients=6)
    other_root = tmp_path / "other_data"
    other_root.mkdir()
    with pytest.warns(UserWarning, match="only 8 runs"):
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", data_root=other_root, progress=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if "--data_root" in line]
    assert len(lines) == 1
    assert f"--data_root={other_root}" in lines[0] and str(other_root / "images" / "p") in lines[0]
    assert "image grid is left out" in lines[0]
    assert not (tmp_path / "out" / "vulnerable_images.png").exists()


def test_audit_returns_the_tables_it_writes(tmp_path):
    from medleak.privacy_utils.audit import audit_campaign

    logdir = write_planted_campaign(tmp_path / "logs", n_runs=8, n_patients=10)
    with pytest.warns(UserWarning, match="only 8 runs"):
        result = audit_campaign(load_campaign(logdir, progress=False), AuditOptions(out_dir=tmp_path / "out", progress=False))
    records = pd.read_csv(logdir / "records.csv", dtype={"record_id": str})
    assert result.record_table["record_id"].tolist() == records["record_id"].tolist()  # records.csv order
    on_disk = pd.read_csv(tmp_path / "out" / "record_risk.csv", dtype={"record_id": str, "patient_id": str})
    by_id = result.record_table.set_index("record_id").loc[on_disk["record_id"]]
    np.testing.assert_allclose(by_id["auc"].to_numpy(), on_disk["auc"].to_numpy(), rtol=1e-12)
    patients = pd.read_csv(tmp_path / "out" / "patient_risk.csv", dtype={"patient_id": str})
    assert result.patient_table["patient_id"].tolist() == patients["patient_id"].tolist()
    assert set(result.attack_scores) == set(result.summary["attacks"]) and result.target_masks.shape == (2, len(records))


def test_audit_flags_are_generated_from_audit_options():
    import dataclasses

    from absl import flags

    from medleak.privacy_utils import cli

    flag_values = flags.FlagValues()
    cli.define_audit_flags(flag_values, module_name="test")
    flag_values(["prog"])
    assert cli.options_from_flags(flag_values) == AuditOptions()
    assert {f.name for f in dataclasses.fields(AuditOptions)} | {"logdir"} == set(flag_values)
    flag_values(["prog", "--eval_size=3", "--rmia_gamma=2", "--noprogress", "--dataset=chexpert"])
    assert cli.options_from_flags(flag_values) == AuditOptions(eval_size=3, rmia_gamma=2.0, progress=False, dataset="chexpert")


# ---------------------------------------------------------------- calibration: null and planted campaigns


def test_too_few_runs_is_a_one_line_error_before_any_work(tmp_path):
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=6, n_patients=6)
    with pytest.raises(MedleakError, match=r"6 usable runs: the audit needs at least 8 .* train 2 more") as raised:
        run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", progress=False))
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("n_runs", [8, 16, 32])
def test_null_campaign_reports_no_leakage(tmp_path, n_runs):
    """No membership signal at all: attacks at chance, at-risk shares at their nominal level, and a
    verdict that says so, whatever the number of runs (patients have 1–3 images)."""
    logdir = write_planted_campaign(tmp_path / "logs", n_runs=n_runs, n_patients=300, planted_effect=0.0,
                                    member_effect=0.0, seed=n_runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "only 8 runs"
        summary = run_audit(logdir, AuditOptions(out_dir=tmp_path / "out", progress=False, permutations=100))
    patients = pd.read_csv(tmp_path / "out" / "patient_risk.csv")
    records = pd.read_csv(tmp_path / "out" / "record_risk.csv")
    assert patients["at_risk"].mean() <= 0.05 and records["at_risk"].mean() <= 0.05
    assert abs(patients["auc"].mean() - 0.5) < 4 * patients["auc"].std() / np.sqrt(len(patients))
    # nothing grows with images per patient: the share above 0.6 is flat across 1, 2, 3 images
    by_images = patients.assign(above=patients["auc"] > 0.6).groupby("n_records")["above"].mean()
    assert by_images.max() - by_images.min() < 0.12
    for name, attack in summary["attacks"].items():
        per_target = np.asarray(attack["auc"]["per_target"])
        assert abs(per_target.mean() - 0.5) < 0.06, name
    floor = summary["noise_floor"]
    assert floor["strongest_attack"]["max_auc"]["excess_lo"] <= 0
    assert floor["patients"]["at_risk"]["excess_lo"] <= 0
    assert summary["verdict"].startswith(f"No leakage detectable above chance with {n_runs} runs")


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_figures_drawn_in_worker_processes_are_the_serial_ones_in_order(tmp_path, start_method):
    from medleak.privacy_utils import figures

    jobs = {f"esf_{i}": (figures.esf_figure, np.random.default_rng(i).uniform(0.4, 1.0, 60), tmp_path / str(i),
                         f"esf_{i}", f"figure {i}", "records") for i in range(3)}
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    parallel = figures.draw_all(jobs, processes=2, start_method=start_method)
    assert list(parallel) == list(jobs)
    assert parallel == {key: tmp_path / str(i) / f"esf_{i}.png" for i, key in enumerate(jobs)}
    drawn = {path: path.read_bytes() for path in parallel.values()}
    assert all(path.with_suffix(".pdf").is_file() for path in parallel.values())
    assert figures.draw_all(jobs, processes=1) == parallel
    assert {path: path.read_bytes() for path in parallel.values()} == drawn  # same pixels either way
    with pytest.raises(TypeError):  # a worker's error reaches the caller
        figures.draw_all({**jobs, "broken": (figures.esf_figure, None, tmp_path, "x", "x", "records")}, processes=2,
                         start_method=start_method)
