"""Starting from pretrained weights (train_utils/finetune.py), BCE positive-class weights
(class_weights.py), and the transfer pipeline on generated layouts: pretrain on CheXpert, DP
fine-tune on MIMIC-CXR, evaluate on ChestX-ray14 (evaluate.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medleak
from medleak import rundir
from medleak.campaign.main import CacheOptions, run_campaign, run_eval_only
from medleak.config import CampaignConfig, TrainConfig
from medleak.errors import MedleakError
from medleak.train_utils import class_weights, finetune, optim, training
from medleak.train_utils.saved_model import save_model
from tests.layouts import write_chestxray14, write_chexpert, write_fitzpatrick, write_mimic

SMALL = TrainConfig(model="small_cnn", img_size=(16, 16), epochs=2, batch_size=8, learning_rate=0.05, eval_views=2,
                    compute_dtype="float32")


def _saved(tmp_path, labels, seed=1):
    model = training.config_model(SMALL, len(labels))
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 1)), train=False)
    save_model(tmp_path / "model", variables, config=SMALL, n_classes=len(labels), task="multilabel", channels=1,
               label_names=labels, trained_on=finetune.training_record("chexpert", ["p1", "p2"]))
    return tmp_path / "model", variables


def test_shared_labels_keep_their_head_rows_new_ones_are_fresh_and_the_body_is_the_saved_one(tmp_path):
    directory, saved = _saved(tmp_path, ["Cardiomegaly", "Pleural Effusion", "Fracture"])
    new_labels = ["Effusion", "Hernia", "Cardiomegaly", "Mass"]  # ChestX-ray14's spelling
    config = dataclasses.replace(SMALL, init_from=str(directory))
    model = training.config_model(config, len(new_labels))
    init = finetune.pretrained_initializer(config, model, len(new_labels), new_labels)
    key = jax.random.key(7)
    variables = init(key, jnp.zeros((1, 16, 16, 1)))
    fresh = model.init(key, jnp.zeros((1, 16, 16, 1)), train=False)
    head, saved_head, fresh_head = (v["params"][optim.HEAD] for v in (variables, saved, fresh))
    for name in ("kernel", "bias"):
        for new, old in ((0, 1), (2, 0)):  # Effusion <- Pleural Effusion, Cardiomegaly <- Cardiomegaly
            np.testing.assert_array_equal(head[name][..., new], saved_head[name][..., old])
        for new in (1, 3):  # no counterpart: the fresh initialisation from the run's key
            np.testing.assert_array_equal(head[name][..., new], fresh_head[name][..., new])
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        if optim.HEAD not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(leaf, _at(saved["params"], path))
    # No label in common: the whole head is fresh (the body still the saved one).
    other = finetune.pretrained_initializer(config, model, 4, ["Mass", "Nodule", "Hernia", "Emphysema"])
    np.testing.assert_array_equal(other(key, jnp.zeros((1, 16, 16, 1)))["params"][optim.HEAD]["kernel"],
                                  fresh_head["kernel"])


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_init_from_refuses_another_architecture_and_the_same_dataset(tmp_path):
    directory, _ = _saved(tmp_path, ["Cardiomegaly"])
    with pytest.raises(MedleakError, match="model=small_cnn model; train it with --model=small_cnn"):
        finetune.load_pretrained(dataclasses.replace(SMALL, model="wrn_16_1", init_from=str(directory)))
    with pytest.raises(MedleakError, match="no model.json"):
        finetune.load_pretrained(dataclasses.replace(SMALL, init_from=str(tmp_path)))
    saved = finetune.load_pretrained(dataclasses.replace(SMALL, init_from=str(directory)))
    with pytest.raises(MedleakError, match=r"same dataset \(chexpert\)") as error:
        finetune.check_disjoint(saved, "chexpert", ["p9"])
    assert "\n" not in str(error.value)
    with pytest.raises(MedleakError, match="same training patients"):
        finetune.check_disjoint(saved, "mimic", ["p2", "p1", "p1"])
    finetune.check_disjoint(saved, "mimic", ["p1", "p3"])  # another dataset: allowed
    with pytest.raises(MedleakError, match="initial_variables"):
        training.Trainer(dataclasses.replace(SMALL, init_from=str(directory)), np.zeros((4, 16, 16, 1), np.uint8),
                         np.zeros((4, 1), np.float32), "multilabel")


@pytest.mark.parametrize("dp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_head_only_finetuning_trains_the_head_and_leaves_the_body_as_saved(tmp_path, dp):
    labels = ["Cardiomegaly", "Edema"]
    directory, saved = _saved(tmp_path, labels)
    config = dataclasses.replace(SMALL, init_from=str(directory), finetune="head", epochs=1, batch_size=4,
                                 augment="none", **({"epsilon": 8.0, "delta": 1e-3} if dp else {}))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 16, 16, 1), dtype=np.uint8)
    targets = rng.integers(0, 2, (16, 2)).astype(np.float32)
    model = training.config_model(config, 2)
    kwargs = {"initial_variables": finetune.pretrained_initializer(config, model, 2, labels)}
    if dp:
        from medleak.dp.estimator import DpTraining

        dp_training = DpTraining(config, np.array([f"p{i}" for i in range(16)]), training.steps_per_epoch(16, 4))
        kwargs.update(schedule_fn=dp_training.schedule_fn, gradient_estimator=dp_training.gradient_estimator)
    trained = training.Trainer(config, images, targets, "multilabel", **kwargs).train(np.arange(16), seed=3,
                                                                                     progress=False)
    for name, subtree in trained.params.items():
        moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(subtree),
                                                             jax.tree.leaves(saved["params"][name]))]
        assert (max(moved) > 0) == (name == optim.HEAD), name


def test_positive_class_weights_match_a_hand_computation():
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1]], np.float32)
    slow = []
    for c in range(3):
        positives = sum(1 for row in labels if row[c] == 1)
        slow.append((len(labels) - positives) / positives if 0 < positives < len(labels) else 1.0)
    np.testing.assert_allclose(class_weights.auto_pos_weight(labels), slow)  # [1, 1 (absent), 1/3]
    logits = np.array([[0.3, -1.2, 2.0], [-0.5, 0.1, 0.0]], np.float32)
    y = labels[:2]
    weights = (2.0, 0.5, 3.0)
    loss = np.asarray(training.per_example_loss(jnp.asarray(logits), jnp.asarray(y), "multilabel", weights))
    for i in range(2):
        terms = []
        for c in range(3):
            p = 1 / (1 + np.exp(-float(logits[i, c])))
            terms.append(-(weights[c] * y[i, c] * np.log(p) + (1 - y[i, c]) * np.log(1 - p)))
        assert loss[i] == pytest.approx(np.mean(terms), rel=1e-5)
    resolved = class_weights.resolve_pos_weight(TrainConfig(pos_weight="auto"), labels, "multilabel")
    assert resolved.pos_weight == "1,1,0.333333"
    with pytest.raises(MedleakError, match="multi-label"):
        class_weights.resolve_pos_weight(TrainConfig(pos_weight="auto"), labels, "multiclass")
    with pytest.raises(MedleakError, match="2 weights for the dataset's 3 labels"):
        class_weights.resolve_pos_weight(TrainConfig(pos_weight="1,2"), labels, "multilabel")


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    """Pretrain on a CheXpert layout (--eval_only), DP fine-tune a 2-run campaign on MIMIC-CXR from it
    with ChestX-ray14 as external test set."""
    base = tmp_path_factory.mktemp("transfer")
    roots = {"chexpert": write_chexpert(base / "a", n_patients=8), "mimic": write_mimic(base / "b", n_patients=16),
             "chestxray14": write_chestxray14(base / "c", n_patients=8),
             "fitzpatrick": write_fitzpatrick(base / "d", n_patients=12)}
    cache = CacheOptions(cache_dir=str(base / "cache"))
    quiet = lambda message: None  # noqa: E731
    run_eval_only("chexpert", data_root=roots["chexpert"], logdir=base / "pre", train_config=SMALL,
                  campaign_config=CampaignConfig(checkpoint_minutes=0), cache=cache, log=quiet)
    pretrained = base / "pre" / "eval_only" / rundir.MODEL_DIR
    config = dataclasses.replace(SMALL, init_from=str(pretrained), batch_size=4, epsilon=8.0, optimizer="nadam",
                                 learning_rate=2e-3, weight_decay=0.0, pos_weight="auto")
    run_campaign("mimic", data_root=roots["mimic"], logdir=base / "ft", train_config=config,
                 campaign_config=CampaignConfig(n_runs=2, seed=1, checkpoint_minutes=0, save_weights=True),
                 cache=cache, log=quiet, external_test=f"chestxray14:{roots['chestxray14']}")
    return base, roots, cache, pretrained


@pytest.mark.slow
def test_pretrain_on_chexpert_finetune_on_mimic_evaluate_on_chestxray14(transfer):
    from medleak.evaluation.cli import evaluate_model, result_rows, write_result

    base, roots, cache, pretrained = transfer
    plan = json.loads((base / "ft" / "plan.json").read_text())
    assert plan["init_from"]["hash"] == finetune.model_hash(pretrained)
    assert plan["init_from"]["trained_on"]["dataset"] == "chexpert"
    from medleak.campaign.main import load_splits

    train, _ = load_splits("mimic", roots["mimic"], {})
    assert plan["train_config"]["pos_weight"] == class_weights.format_weights(
        class_weights.auto_pos_weight(train.labels()))  # the whole table's, not a run's
    run = base / "ft" / "runs" / "run_0000"
    metrics = json.loads((run / "metrics.json").read_text())
    external = metrics["external_test"]["chestxray14"]
    assert "Pleural Effusion" in external["labels"] and "Fracture" not in external["labels"]
    fine_tuned = medleak.load_model(run / rundir.MODEL_DIR)
    assert fine_tuned.config.init_from == str(pretrained) and fine_tuned.trained_on["dataset"] == "mimic"
    # The run's out-of-domain AUROCs are those of its saved model's logits on the shared columns.
    from medleak.data_utils.datasets import load_dataset
    from medleak.evaluation.external import eval_set
    from medleak.train_utils.metrics import per_label_auroc

    target = eval_set("chestxray14", load_dataset("chestxray14", roots["chestxray14"]).split("test"),
                      roots["chestxray14"], fine_tuned.label_names, SMALL.img_size, 1, cache_dir=cache.cache_dir)
    expected = per_label_auroc(target.scores(fine_tuned.logits(target.images)), target.labels, "multilabel")
    np.testing.assert_allclose(np.array(external["auroc_per_label"], dtype=float), expected, rtol=1e-4)

    result = evaluate_model(run / rundir.MODEL_DIR, "chestxray14", roots["chestxray14"], compare_dir=pretrained,
                            n_resamples=50, cache_dir=cache.cache_dir)
    assert result["labels"] == external["labels"] and result["n_test"] == external["n_records"]
    assert result["resampled"] == "patients" and 0 < result["paired_test"]["macro"]["p_value"] <= 1
    assert set(result["statistical_parity"]) == {"sex", "age_group"}
    # The threshold comes from the validation patients of the TRAIN split, none of them a test patient.
    assert result["n_validation"] > 0 and not result["validation_from_training_data"]
    json_path, csv_path = write_result(result, base / "eval")
    rows = result_rows(json.loads(json_path.read_text()))
    assert csv_path.read_text().splitlines()[0].startswith("group,value,label,n,auroc")
    assert len(rows) == (1 + sum(len(v) for v in result["subgroups"].values())) * (len(result["labels"]) + 1)


@pytest.mark.slow
def test_evaluating_on_a_dataset_with_no_shared_label_is_one_line_naming_both_sets(transfer):
    from medleak.evaluation.cli import evaluate_model

    base, roots, cache, pretrained = transfer
    with pytest.raises(MedleakError) as error:
        evaluate_model(pretrained, "fitzpatrick", roots["fitzpatrick"], n_resamples=10, cache_dir=cache.cache_dir)
    message = str(error.value)
    assert "\n" not in message and "Cardiomegaly" in message and "share none" in message
    # Fine-tuning on the dataset the model was pretrained on is refused before anything trains.
    with pytest.raises(MedleakError, match="pretrained on the same training patients"):
        run_eval_only("chexpert", data_root=roots["chexpert"], logdir=base / "again",
                      train_config=dataclasses.replace(SMALL, init_from=str(pretrained)),
                      campaign_config=CampaignConfig(), cache=cache, log=lambda message: None)
