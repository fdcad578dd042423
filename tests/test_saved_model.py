"""Saved models (src/medleak/train_utils/saved_model.py): --eval_only writes its EMA weights and
config in plain .npy + JSON, `medleak.load_model` rebuilds the flax model from them and gives the
logits the run recorded; --save_weights does the same inside every shadow run's directory."""

import json

import numpy as np
import pytest

import medleak
from medleak import rundir
from medleak.campaign.main import CacheOptions, load_splits, run_campaign, run_eval_only
from medleak.config import CampaignConfig, TrainConfig
from medleak.data_utils.image_cache import cached_images
from medleak.errors import MedleakError
from medleak.privacy_utils.load import read_campaign_files, validate_runs
from tests.layouts import write_chexpert

CONFIG = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=2, batch_size=8, learning_rate=0.05,
                     ema_decay=0.9, augment="weak", eval_views=2)


@pytest.fixture(scope="module")
def eval_only(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_only")
    data_root = write_chexpert(base / "data", n_patients=8)
    cache = CacheOptions(cache_dir=str(base / "cache"))
    run_eval_only("chexpert", data_root=data_root, logdir=base / "logs", train_config=CONFIG,
                  campaign_config=CampaignConfig(checkpoint_minutes=1e-6),  # saves, then deletes them
                  cache=cache, log=lambda message: None)
    train, test = load_splits("chexpert", data_root, {})
    images = {name: cached_images(table, data_root, CONFIG.img_size, cache_dir=cache.cache_dir)[0]
              for name, table in (("train", train), ("test", test))}
    return base / "logs", images


def test_eval_only_model_loads_back_with_its_recorded_logits(eval_only):
    logdir, images = eval_only
    out = logdir / "eval_only"
    model = medleak.load_model(out / rundir.MODEL_DIR)
    np.testing.assert_allclose(model.logits(images["test"]), np.load(out / "test_logits.npy"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.view_logits(images["train"]), np.load(out / "train_logits.npy"),
                               rtol=1e-5, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert model.config.to_dict() == TrainConfig.from_dict(metrics["config"]).to_dict()
    assert model.task == "multilabel" and model.channels == 1 and len(model.label_names) == model.logits(
        images["test"][:2]).shape[1]
    # The checkpoints of the finished training are gone.
    assert not (logdir / rundir.CHECKPOINTS_DIR / "eval_only").exists()


def test_the_format_is_plain_npy_and_json(eval_only):
    logdir, _ = eval_only
    directory = logdir / "eval_only" / rundir.MODEL_DIR
    document = json.loads((directory / "model.json").read_text())
    assert document["format"] == "medleak-model" and document["train_config"]["model"] == "small_cnn"
    files = sorted(p.relative_to(directory / "variables").as_posix() for p in (directory / "variables").rglob("*.npy"))
    assert files == sorted(f"{entry['path']}.npy" for entry in document["variables"])
    for entry in document["variables"]:
        array = np.load(directory / "variables" / f"{entry['path']}.npy", allow_pickle=False)
        assert list(array.shape) == entry["shape"] and entry["path"].startswith("params/")


def test_a_changed_model_directory_is_a_one_line_error(eval_only, tmp_path):
    logdir, _ = eval_only
    with pytest.raises(MedleakError, match="model.json: missing"):
        medleak.load_model(tmp_path)
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(logdir / "eval_only" / rundir.MODEL_DIR, copy)
    first = json.loads((copy / "model.json").read_text())["variables"][0]["path"]
    np.save(copy / "variables" / f"{first}.npy", np.zeros(3, np.float32))
    with pytest.raises(MedleakError) as error:
        medleak.load_model(copy)
    assert "\n" not in str(error.value) and "do not fit" in str(error.value)


@pytest.mark.slow
def test_save_weights_keeps_every_runs_model_and_publishing_deletes_its_checkpoints(tmp_path):
    data_root = write_chexpert(tmp_path / "data", n_patients=16)
    logdir = tmp_path / "logs"
    summary = run_campaign("chexpert", data_root=data_root, logdir=logdir, train_config=CONFIG,
                           campaign_config=CampaignConfig(n_runs=2, save_weights=True),
                           cache=CacheOptions(cache_dir=str(tmp_path / "cache")), log=lambda message: None)
    assert sorted(summary.completed) == [0, 1]
    _, test = load_splits("chexpert", data_root, {})
    test_images, _ = cached_images(test, data_root, CONFIG.img_size, cache_dir=str(tmp_path / "cache"))
    for run in (0, 1):
        model = medleak.load_model(rundir.run_dir(logdir, run) / rundir.MODEL_DIR)
        np.testing.assert_allclose(model.logits(test_images), rundir.read_run(logdir, run)["test_logits"],
                                   rtol=1e-5, atol=1e-5)
        assert not rundir.checkpoint_dir(logdir, run).exists()
    checked, skipped = validate_runs(read_campaign_files(logdir), progress=False)
    assert len(checked) == 2 and not skipped  # the audit's reader ignores the extra model/ directory
