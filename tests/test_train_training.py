"""The Trainer end to end on tiny 16x16 data: learning, overfitting, no recompilation between runs,
reproducibility, audit views, evaluation, bf16 + BatchNorm + multi-label, divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medleak.config import TrainConfig
from medleak.errors import MedleakError
from medleak.train_utils import augment, metrics
from medleak.train_utils.device import count_compilations
from medleak.train_utils.training import Trainer, TrainingDiverged

SIZE, N_TRAIN, N_TEST, N_CLASSES = 16, 96, 32, 3


def patch_dataset(n, rng, multilabel=False):
    """Noise images with 5x5 texture patches: solid, horizontal or vertical stripes; texture k present
    <=> label k (exactly one texture per image when multi-class). Detecting a texture needs no
    position information and survives flips and shifts."""
    images = rng.integers(0, 80, (n, SIZE, SIZE, 1)).astype(np.uint8)
    if multilabel:
        labels = (rng.random((n, N_CLASSES)) < 0.5).astype(np.float32)
    else:
        labels = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, n)]
    stripes = np.tile([250, 0], 3)[:5]
    textures = [np.full((5, 5), 250), np.repeat(stripes[:, None], 5, 1), np.repeat(stripes[None, :], 5, 0)]
    corners = [(2, 2), (2, 9), (9, 5)]
    for k, (texture, (row, col)) in enumerate(zip(textures, corners)):
        images[labels[:, k] > 0, row:row + 5, col:col + 5, 0] = texture
    return images, labels


def config(**overrides):
    base = dict(model="small_cnn", img_size=(SIZE, SIZE), epochs=8, batch_size=16, learning_rate=0.02,
                warmup=0, weight_decay=5e-4, augment="weak", eval_views=4)
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = patch_dataset(N_TRAIN, rng)
    test = patch_dataset(N_TEST, rng)
    return train, test


@pytest.fixture(scope="module")
def trained(data):
    """One compiled fp32 GroupNorm Trainer and a first run on rows 0..47 (compiles everything)."""
    (train_images, train_labels), (test_images, test_labels) = data
    trainer = Trainer(config(), train_images, train_labels, "multiclass", test_images, test_labels,
                      expected_train_size=48)
    with count_compilations() as first_compiles:
        model = trainer.train(np.arange(48), seed=0, progress=False)
        views = trainer.infer_train_views(model)
        test_metrics = trainer.evaluate(model, {"parity": np.arange(N_TEST) % 2})
    return trainer, model, views, test_metrics, first_compiles


def test_training_learns_the_task(trained, data):
    trainer, model, views, test_metrics, _ = trained
    (_, train_labels), (_, test_labels) = data
    assert model.losses.shape == (24,)  # 8 epochs x 48 / 16 steps
    assert model.losses[-3:].mean() < 0.5 * model.losses[:3].mean()
    assert metrics.accuracy(views[:48, 0], train_labels[:48], "multiclass") == 1.0
    assert test_metrics["accuracy"] > 0.8 and test_metrics["macro_auroc"] > 0.9
    assert set(test_metrics["subgroups"]["parity"]) == {"0", "1"}
    np.testing.assert_allclose(test_metrics["accuracy"],
                               metrics.accuracy(trainer.infer_test(model), test_labels, "multiclass"))


def test_second_run_with_other_rows_compiles_nothing(trained):
    trainer, _, _, _, first_compiles = trained
    assert first_compiles.count >= 3  # init, train chunk, inference programs
    with count_compilations() as compiles:
        model = trainer.train(np.arange(40, 93), seed=1, progress=False)  # another size too
        views = trainer.infer_train_views(model)
        trainer.evaluate(model)
    assert compiles.count == 0
    assert views.shape == (N_TRAIN, 4, N_CLASSES)
    assert model.timings["compile_seconds"] == 0.0
    assert model.timings["steps"] == 24 and model.n_train == 53


def test_runs_are_reproducible_from_the_seed_and_differ_across_seeds(trained):
    trainer, model, _, _, _ = trained
    again = trainer.train(np.arange(48), seed=0, progress=False)
    np.testing.assert_array_equal(again.losses, model.losses)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    other = trainer.train(np.arange(48), seed=5, progress=False)
    assert not np.array_equal(other.losses, model.losses)


def test_overfits_a_tiny_batch(trained):
    trainer, _, _, _, _ = trained
    rows = np.arange(60, 76)  # 16 rows, one batch, seen 24 times
    model = trainer.train(rows, seed=2, progress=False)
    logits = trainer.infer_train_views(model)[:, 0]
    labels = np.asarray(trainer.labels)
    in_loss = -np.log(jax.nn.softmax(logits[rows])[np.arange(16), labels[rows].argmax(1)])
    assert model.losses[-3:].mean() < 0.25 * model.losses[0]
    assert float(in_loss.mean()) < 0.25
    assert metrics.accuracy(logits[rows], labels[rows], "multiclass") == 1.0


def test_views_are_the_clean_image_its_flip_then_fixed_augmentations(trained, data):
    trainer, model, views, _, _ = trained
    (train_images, _), _ = data
    apply = jax.jit(lambda v, x: trainer.model.apply(v, x, train=False))
    clean = augment.normalize(augment.to_unit_float(jnp.asarray(train_images[:16])))
    np.testing.assert_allclose(views[:16, 0], apply(model.eval_variables, clean), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(views[:16, 1], apply(model.eval_variables, clean[:, :, ::-1]), rtol=1e-4, atol=1e-4)
    assert views.dtype == np.float32
    assert not np.allclose(views[:, 2], views[:, 3])
    np.testing.assert_array_equal(trainer.infer_train_views(model), views)  # fixed view keys


@pytest.mark.slow
def test_several_steps_per_device_call_train_the_same_model(trained, data):
    """The accelerator path (lax.scan over an epoch per call) matches one step per call."""
    trainer, model, _, _, _ = trained
    (train_images, train_labels), _ = data
    scanned = Trainer(config(), train_images, train_labels, "multiclass", expected_train_size=48, steps_per_call=3)
    again = scanned.train(np.arange(48), seed=0, progress=False)
    assert scanned.compiled_program(scanned.schedule(np.arange(48), 0)).chunk_steps == 3
    np.testing.assert_allclose(again.losses, model.losses, rtol=1e-3, atol=1e-4)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_timings_separate_compile_and_step_time(trained):
    _, model, _, _, _ = trained
    timings = model.timings
    assert timings["compile_seconds"] > 0 and timings["step_seconds"] > 0
    assert timings["images_per_second"] == pytest.approx(24 * 16 / timings["step_seconds"])
    assert timings["total_seconds"] >= timings["compile_seconds"] + timings["step_seconds"]


@pytest.mark.slow
def test_bfloat16_batch_norm_multilabel_with_accumulation_trains():
    rng = np.random.default_rng(1)
    images, labels = patch_dataset(64, rng, multilabel=True)
    trainer = Trainer(config(compute_dtype="bfloat16", norm="batch", augment="medium", grad_accum=2,
                             nesterov=True, ema_decay=0.9, eval_views=3),
                      images, labels, "multilabel", expected_train_size=32)
    model = trainer.train(np.arange(32), seed=0, progress=False)
    assert np.isfinite(model.losses).all()
    assert model.losses[-3:].mean() < 0.7 * model.losses[:3].mean()
    assert jax.tree.leaves(model.params)[0].dtype == jnp.float32
    means = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(model.model_state)
             if "mean" in jax.tree_util.keystr(path)]
    assert means and any(np.abs(np.asarray(m)).max() > 0 for m in means)  # running stats were updated
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(model.params), jax.tree.leaves(model.ema_params)))
    views = trainer.infer_train_views(model)
    assert views.shape == (64, 3, N_CLASSES) and views.dtype == np.float32 and np.isfinite(views).all()
    assert metrics.classification_metrics(views[:32, 0], labels[:32], "multilabel")["accuracy"] > 0.6


def test_divergence_raises(data):
    (train_images, train_labels), _ = data
    trainer = Trainer(config(learning_rate=1e30, warmup=0, epochs=2), train_images[:32], train_labels[:32],
                      "multiclass")
    with pytest.raises(TrainingDiverged, match="loss became"):
        trainer.train(np.arange(32), seed=0, progress=False)


def test_bad_inputs_raise_user_errors(data):
    (train_images, train_labels), _ = data
    with pytest.raises(MedleakError, match="img_size"):
        Trainer(config(img_size=(32, 32)), train_images, train_labels, "multiclass")
    with pytest.raises(MedleakError, match="uint8"):
        Trainer(config(), train_images.astype(np.float32), train_labels, "multiclass")
    with pytest.raises(MedleakError, match="grad_accum"):
        Trainer(config(grad_accum=3), train_images, train_labels, "multiclass")
    with pytest.raises(MedleakError, match="no test images"):
        Trainer(config(), train_images, train_labels, "multiclass", train_images[:0], train_labels[:0])
    with pytest.raises(MedleakError, match="NaN"):
        Trainer(config(), train_images, np.full_like(train_labels, np.nan), "multiclass")
    trainer = Trainer(config(), train_images, train_labels, "multiclass")
    with pytest.raises(MedleakError, match="train_indices"):
        trainer.schedule(np.array([0, N_TRAIN]), seed=0)
    with pytest.raises(MedleakError, match="flatnonzero"):
        trainer.schedule(np.ones(N_TRAIN, dtype=bool), seed=0)
    with pytest.raises(MedleakError, match="without test images"):
        trainer.infer_test(None)


def test_dp_config_without_a_dp_estimator_is_refused(data):
    (train_images, train_labels), _ = data
    with pytest.raises(MedleakError, match="DP-SGD"):
        Trainer(config(epsilon=8.0), train_images, train_labels, "multiclass")
    with pytest.raises(MedleakError, match="--ema_decay"):
        Trainer(config(ema_decay=1.0), train_images, train_labels, "multiclass")


def test_balanced_batch_size_uses_fewest_calls_and_least_padding():
    from medleak.train_utils.inference import balanced_batch_size

    for n_rows in (1, 7, 181, 256, 257, 541, 1000):
        for max_batch in (1, 16, 256):
            batch = balanced_batch_size(n_rows, max_batch)
            calls = -(-n_rows // batch)
            assert batch <= max_batch and calls == -(-n_rows // max_batch)  # no extra call
            assert calls * batch - n_rows < calls  # under one padded row per call
    assert balanced_batch_size(541, 256) == 181
