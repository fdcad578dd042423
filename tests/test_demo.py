"""The demo end to end (scripts/demo.sh): real training of 32 shadow models on the synthetic CheXpert
layout, the audit, and its report opened in headless Chromium. Every planted patient must be flagged
at risk after FDR control, and the report must open with a verdict that states chance and excess."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_flags_the_planted_patients_and_the_report_states_the_verdict(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(out)], capture_output=True, text=True,
                            cwd=ROOT, timeout=1200, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    planted = json.loads((out / "data" / "planted_patients.json").read_text())["patient_ids"]
    patients = pd.read_csv(out / "figs" / "patient_risk.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert (patients.loc[planted, "at_risk"] == 1).all(), patients.loc[planted, ["auc", "p_value", "q_value"]]
    n_at_risk = int(patients["at_risk"].sum())
    assert f"planted patients at risk (FDR-controlled): {len(planted)} of {len(planted)}" in result.stdout
    summary = json.loads((out / "figs" / "attack_summary.json").read_text())
    assert summary["verdict"].startswith(f"{n_at_risk} of {len(patients)} patients")

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); the demo itself passed")
    url = (out / "figs" / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    verdict = re.search(r'<p class="verdict" id="verdict">(.*?)</p>', dom, re.S)
    assert verdict is not None
    assert "identifiable above chance" in verdict.group(1)
    assert "chance level" in verdict.group(1) and "excess" in verdict.group(1)
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the verdict box (background #fff8e6) is on the first screen
    verdict_rows = np.flatnonzero((np.abs(pixels - [255, 248, 230]).sum(axis=2) < 6).sum(axis=1) > 300)
    assert verdict_rows.size > 20 and verdict_rows.min() < 400
