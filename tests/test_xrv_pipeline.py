"""xrv_scores.py → xrv_attack.py on generated CheXpert / MIMIC-CXR folders, with DenseNets the test
itself initialises at random and stores under TorchXRayVision's own weights file names.

CheXpert's target is saved the way TorchXRayVision's release files are (a whole pickled DenseNet),
the other two as state dicts. The classifier layers are scaled down so that the random logits are
O(1) and the attack scores are not all saturated.
"""

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -r requirements-xrv.txt)")
xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install -r requirements-xrv.txt)")

from medleak import rundir  # noqa: E402
from medleak.data_utils.datasets import load_dataset  # noqa: E402
from medleak.errors import MedleakError  # noqa: E402
from medleak.io_utils import load_npy, read_json  # noqa: E402
from medleak.xrv import attack, models, split  # noqa: E402
from medleak.xrv.preprocess import load_preprocessed  # noqa: E402
from tests.layouts import write_chexpert, write_mimic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_PER = 1
SHARED = ("Atelectasis", "Consolidation", "Pneumothorax", "Edema", "Pleural Effusion", "Pneumonia",
          "Cardiomegaly", "Fracture")
PICKLED = "densenet121-res224-chex"  # saved like TorchXRayVision's releases: torch.save(model)
pytestmark = pytest.mark.slow  # three DenseNets on CPU, through the scripts in subprocesses


def random_densenet(seed):
    torch.manual_seed(seed)
    model = xrv.models.DenseNet(weights=None)
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)
    return model.eval()


def save_weights(weights_dir, name, seed):
    model = random_densenet(seed)
    path = weights_dir / models.weights_filename(name)
    torch.save(model if name == PICKLED else model.state_dict(), path)
    return path


def run_script(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xrv")
    roots = {"chexpert": write_chexpert(tmp / "chexpert", n_patients=24, seed=2, size=(20, 28)),
             "mimic": write_mimic(tmp / "mimic", n_patients=16, seed=2, size=(28, 20))}
    weights_dir = tmp / "models_data"
    weights_dir.mkdir()
    for seed, name in enumerate(["densenet121-res224-chex", "densenet121-res224-mimic_ch", "densenet121-res224-pc"]):
        save_weights(weights_dir, name, seed)
    logroot, figs = tmp / "logs", tmp / "figs"
    scores = run_script("xrv_scores.py", f"--chexpert_root={roots['chexpert']}", f"--mimic_root={roots['mimic']}",
                        f"--weights_dir={weights_dir}", f"--logdir={logroot}", f"--n_per={N_PER}",
                        "--batch_size=4", "--num_workers=0", "--device=cpu")
    assert scores.returncode == 0, scores.stderr[-3000:]
    # xrv_attack.py's command line runs in test_xrv_no_torch.py (without torch); here its library call.
    summary = attack.run(logroot, ["chexpert", "mimic"], figs)
    return dict(roots=roots, weights_dir=weights_dir, logroot=logroot, figs=figs, summary=summary)


@pytest.mark.parametrize("dataset", ["chexpert", "mimic"])
def test_logdir_holds_logits_and_member_mask_per_model(audit, dataset):
    logdir = audit["logroot"] / dataset
    plan = rundir.read_plan(logdir)
    assert plan["label_names"] == list(SHARED)
    assert [m["role"] for m in plan["models"]] == ["target", "reference"]
    assert plan["models"][0]["name"] == models.TARGET_MODELS[dataset]
    records = pd.read_csv(logdir / rundir.RECORDS_FILE, dtype=str)
    n = len(records)
    assert n == 2 * N_PER

    # membership = TorchXRayVision's split rebuilt from the full table
    table = load_dataset(dataset, audit["roots"][dataset])
    roles = pd.Series(split.xrv_roles(table), index=table.df["record_id"])
    sampled_roles = roles.loc[records["record_id"]].to_numpy()
    assert set(sampled_roles) == {"member", "test"}

    labels = table.df.set_index("record_id").loc[records["record_id"], list(SHARED)].to_numpy(np.float32)
    for run, model in enumerate(plan["models"]):
        run_dir = rundir.run_dir(logdir, run)
        logits = load_npy(run_dir / "train_logits.npy")
        assert logits.shape == (n, 1, len(SHARED)) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        assert np.array_equal(load_npy(run_dir / "train_labels.npy"), labels)
        mask = load_npy(run_dir / "record_mask.npy")
        expected = sampled_roles == "member" if model["role"] == "target" else np.zeros(n, dtype=bool)
        assert np.array_equal(mask, expected)
        metrics = read_json(run_dir / rundir.METRICS_FILE)
        assert metrics["name"] == model["name"] and metrics["weights_file"] == models.weights_filename(model["name"])


def test_saved_logits_are_raw_and_match_torchxrayvision_own_model(audit):
    """Ours + TorchXRayVision's sigmoid and operating-point calibration = TorchXRayVision's own output,
    with its own loader reading our weights folder."""
    logdir = audit["logroot"] / "chexpert"
    records = pd.read_csv(logdir / rundir.RECORDS_FILE, dtype=str)
    logits = load_npy(rundir.run_dir(logdir, 0) / "train_logits.npy")[:, 0, :]
    own = xrv.models.DenseNet(weights=PICKLED, cache_dir=str(audit["weights_dir"])).eval()
    assert own.op_threshs is not None  # TorchXRayVision calibrates its outputs by default
    images = torch.from_numpy(np.stack([load_preprocessed(audit["roots"]["chexpert"], p) for p in records["path"]]))
    with torch.no_grad():
        calibrated = own(images).numpy()
    outputs = list(models.model_info(PICKLED)["labels"])
    keep = [outputs.index(n) for n in ["Effusion" if s == "Pleural Effusion" else s for s in SHARED]]
    ours = xrv.models.op_norm(torch.sigmoid(torch.from_numpy(logits)), own.op_threshs[keep]).numpy()
    np.testing.assert_allclose(ours, calibrated[:, keep], rtol=1e-4, atol=1e-5)
    assert (logits < 0).any() or (logits > 1).any()  # raw logits, not probabilities


def test_attack_writes_figures_and_tables(audit):
    figs = audit["figs"]
    for name in ("roc.png", "roc.pdf", "attack_summary.csv", "summary.json", "report.html"):
        assert (figs / name).is_file(), name
    summary = json.loads((figs / "summary.json").read_text())
    for dataset in ("chexpert", "mimic"):
        result = summary[dataset]
        assert result["n_members"] == result["n_nonmembers"] == N_PER
        assert 0.0 <= result["rmia"]["auc"]["mean"] <= 1.0 and 0.0 <= result["lira"]["auc"]["mean"] <= 1.0
        assert 0.0 <= result["rmia_a"] <= 1.0
        other = "mimic" if dataset == "chexpert" else "chexpert"
        assert models.TARGET_MODELS[other] in result["rmia_a_chosen"]  # never tuned on the attacked model
        record_risk = pd.read_csv(figs / f"{dataset}_record_risk.csv")
        assert len(record_risk) == 2 * N_PER and record_risk["member"].sum() == N_PER
        assert record_risk["rmia_score"].is_monotonic_decreasing
        assert record_risk["rmia_score"].between(0, 1).all()
        assert record_risk["rmia_detection_fpr"].between(0, 1).all()
        patient_risk = pd.read_csv(figs / f"{dataset}_patient_risk.csv")
        assert set(patient_risk["patient_id"].astype(str)) == set(record_risk["patient_id"].astype(str))
        subgroup = pd.read_csv(figs / f"{dataset}_subgroup_attack.csv")
        assert {"sex", "race", "view"} <= set(subgroup["attribute"])
        assert subgroup.loc[subgroup["attribute"] == "all", "rmia_auc"].iloc[0] == pytest.approx(result["rmia"]["auc"]["mean"])
        composition = pd.read_csv(figs / f"{dataset}_top_composition.csv")
        assert {"sex", "race"} <= set(composition["attribute"])
        assert result["rmia"]["auc"] == audit["summary"][dataset]["rmia"]["auc"]


def test_missing_weights_is_one_line_naming_the_file(tmp_path):
    from medleak.xrv import scores

    config = scores.ScoreConfig(weights_dir=str(tmp_path), n_per=1)
    with pytest.raises(MedleakError) as error:
        scores.run({"chexpert": tmp_path, "mimic": tmp_path}, {}, tmp_path / "logs", config)
    message = str(error.value)
    assert "\n" not in message and "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in message
    assert str(tmp_path) in message and "--download" in message
    assert not (tmp_path / "logs").exists()


class NotAStateDict(collections.OrderedDict):
    """A pickled class outside TorchXRayVision's: refused unless --trust_pickle."""


def test_weights_needing_other_pickled_objects_are_refused_unless_trusted(tmp_path):
    name = "densenet121-res224-pc"
    path = tmp_path / models.weights_filename(name)
    torch.save(NotAStateDict(random_densenet(5).state_dict()), path)
    with pytest.raises(MedleakError, match="--trust_pickle"):
        models.load_model(name, tmp_path)
    model = models.load_model(name, tmp_path, trust_pickle=True)
    assert model.op_threshs is None and not model.apply_sigmoid
    assert torch.equal(model.classifier.weight, random_densenet(5).classifier.weight)


def test_existing_logdir_is_not_overwritten_silently(audit):
    from medleak.xrv import scores

    logdir = audit["logroot"] / "chexpert"
    before = load_npy(rundir.run_dir(logdir, 0) / "train_logits.npy")
    config = scores.ScoreConfig(datasets=("chexpert",), weights_dir=str(audit["weights_dir"]), n_per=1)
    with pytest.raises(MedleakError, match="--overwrite"):
        scores.run({"chexpert": audit["roots"]["chexpert"]}, {}, audit["logroot"], config)
    assert np.array_equal(load_npy(rundir.run_dir(logdir, 0) / "train_logits.npy"), before)
