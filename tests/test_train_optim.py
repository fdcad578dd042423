"""Optimiser, EMA, losses and the default gradient estimator against hand-written loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medleak.config import TrainConfig
from medleak.errors import MedleakError
from medleak.train_utils import optim, training
from medleak.train_utils.models import create_model


def test_learning_rate_warms_up_linearly_over_a_fraction_of_all_steps_then_decays_by_cosine_to_zero():
    config = TrainConfig(learning_rate=0.4, warmup=1 / 3)
    total = 30
    schedule = optim.learning_rate_schedule(config, total)
    warmup = 10
    for step in range(total + 1):
        if step < warmup:
            expected = 0.4 * step / warmup
        else:
            expected = 0.4 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6), step
    # The fraction is of all steps, whatever the epochs: 5 % of 200 steps is 10 steps.
    assert optim.warmup_steps(TrainConfig(warmup=0.05, epochs=4), 200) == 10
    assert optim.warmup_steps(TrainConfig(warmup=0.0), 200) == 0
    # Rounding never swallows the whole run: a 3-step run with warm-up 0.9 still decays at its end.
    short = optim.learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup=0.9), 3)
    assert optim.warmup_steps(TrainConfig(warmup=0.9), 3) == 2
    assert float(short(2)) == pytest.approx(1.0) and float(short(3)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_with_decoupled_weight_decay_matches_a_hand_loop(nesterov):
    config = TrainConfig(learning_rate=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01, warmup=0)
    total = 4
    optimizer = optim.make_optimizer(config, total_steps=total)
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    grads = [{"kernel": jnp.array([[0.3, 0.1]]) * (i + 1), "bias": jnp.array([-0.2]) * (i + 1)} for i in range(3)]
    state = optimizer.init(params)
    expected = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in expected.items()}
    for step, g in enumerate(grads):
        updates, state = optimizer.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        lr = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
        for name in expected:
            grad = np.asarray(g[name], dtype=np.float64)
            trace[name] = grad + 0.9 * trace[name]
            direction = grad + 0.9 * trace[name] if nesterov else trace[name]
            decay = 0.01 * expected[name] if name == "kernel" else 0.0  # kernels only, outside momentum
            expected[name] = expected[name] - lr * (direction + decay)
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-5)


def test_ema_update():
    ema = {"w": jnp.array([1.0, 2.0])}
    params = {"w": jnp.array([3.0, 0.0])}
    np.testing.assert_allclose(optim.ema_update(ema, params, 0.75)["w"], [1.5, 1.5])
    assert optim.ema_update(ema, params, 0.0) is params


def test_losses_softmax_cross_entropy_and_mean_binary_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    one_hot = jnp.array([[0.0, 1.0, 0.0]])
    softmax_ce = -math.log(math.exp(0.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
    assert float(training.per_example_loss(logits, one_hot, "multiclass")[0]) == pytest.approx(softmax_ce, rel=1e-5)
    multi = jnp.array([[1.0, 1.0, 0.0]])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    bce = -(math.log(sigmoid(2.0)) + math.log(sigmoid(0.0)) + math.log(1 - sigmoid(-1.0))) / 3
    assert float(training.per_example_loss(logits, multi, "multilabel")[0]) == pytest.approx(bce, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_problem():
    model = create_model("small_cnn", 3, norm="group")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 1)), jnp.float32)
    labels = jax.nn.one_hot(jnp.array([0, 1, 2, 0, 1, 2, 0, 1]), 3)
    # Arbitrary parameter values of the right shapes (skips compiling the PRNG-heavy init).
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), images[:1])["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)
    return training.ModelLoss(model, "multiclass"), params, images, labels


def test_mean_gradient_masks_padded_slots_accumulates_and_equals_per_example_mean(tiny_problem):
    model_loss, params, images, labels = tiny_problem
    mask = jnp.array([True] * 6 + [False] * 2)

    @jax.jit
    def estimates(params, images, labels):
        batch = {"indices": jnp.arange(8), "mask": mask}
        whole = training.mean_gradient(1)(model_loss, params, {}, images, labels, batch, None)
        accumulated = training.mean_gradient(2)(model_loss, params, {}, images, labels, batch, None)
        # The DP-style path: per-example gradients of the real examples, averaged.
        per_example = jax.vmap(jax.grad(model_loss.example_loss), in_axes=(None, 0, 0))(params, images[:6], labels[:6])
        return whole, accumulated, jax.tree.map(lambda g: g.mean(axis=0), per_example)

    (grads, _, info), (grads_acc, _, info_acc), per_example_mean = estimates(params, images, labels)
    for a, b, c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_acc), jax.tree.leaves(per_example_mean)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-6)
    assert float(info["loss"]) == pytest.approx(float(info_acc["loss"]), rel=1e-5)
    # Garbage in the padded slots changes nothing.
    garbage = images.at[6:].set(1e3)
    garbage_grads = estimates(params, garbage, labels)[0][0]
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(garbage_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_per_example_loss_refuses_batch_norm():
    model_loss = training.ModelLoss(create_model("small_cnn", 2, norm="batch"), "multiclass")
    with pytest.raises(MedleakError, match="--norm=group"):
        model_loss.example_loss({}, jnp.zeros((8, 8, 1)), jnp.zeros(2))


def test_epoch_schedule_has_fixed_shape_and_uses_rows_evenly():
    rng = np.random.default_rng(0)
    for n_rows in (45, 50, 56):  # runs of one campaign differ slightly in size
        rows = rng.choice(200, n_rows, replace=False)
        batches = training.epoch_schedule(rows, np.random.default_rng(1), batch_size=8, steps_per_epoch=7, epochs=3)
        assert batches["indices"].shape == (21, 8) and batches["indices"].dtype == np.int32
        assert batches["mask"].all()
        assert set(batches["indices"].ravel()) <= set(rows)
        counts = np.bincount(batches["indices"].ravel(), minlength=200)[rows]
        assert counts.max() - counts.min() <= 1  # every row used equally often, to within one
        # Within each pass over the data no row repeats before all were seen.
        stream = batches["indices"].ravel()
        assert len(set(stream[:n_rows])) == n_rows
    with pytest.raises(MedleakError, match="no training records"):
        training.epoch_schedule(np.array([], dtype=int), rng, batch_size=8, steps_per_epoch=2, epochs=1)


@pytest.mark.parametrize("n_rows,batch_size,steps", [
    (270, 256, 1),  # issue 14's CPU setting: 270 images an epoch, not 512
    (400, 256, 2), (100, 256, 1), (3700, 256, 14), (384, 256, 2), (383, 256, 1), (100, 32, 3), (512, 256, 2)])
def test_an_epoch_is_the_nearest_whole_number_of_full_batches(n_rows, batch_size, steps):
    assert training.steps_per_epoch(n_rows, batch_size) == steps
    assert abs(steps * batch_size - n_rows) <= batch_size / 2 or n_rows < batch_size / 2


def test_over_a_run_every_row_is_used_equally_often_to_within_one():
    rows = np.random.default_rng(0).choice(1000, 270, replace=False)
    for epochs in (1, 2, 7):
        per_epoch = training.steps_per_epoch(rows.size, 64)  # 4 batches: 256 of 270 rows an epoch
        batches = training.epoch_schedule(rows, np.random.default_rng(epochs), batch_size=64,
                                          steps_per_epoch=per_epoch, epochs=epochs)
        assert batches["indices"].shape == (epochs * per_epoch, 64)
        counts = np.bincount(batches["indices"].ravel(), minlength=1000)[rows]
        assert counts.max() - counts.min() <= 1 and counts.sum() == epochs * per_epoch * 64


def test_a_stored_steps_per_epoch_overrides_the_rule():
    assert training.planned_steps_per_epoch(None, 270, 256) == 1
    assert training.planned_steps_per_epoch(2, 270, 256) == 2  # a plan made under ceil(n / B)
    for bad in (0, -1, 1.5):
        with pytest.raises(MedleakError, match="plan.json"):
            training.planned_steps_per_epoch(bad, 270, 256)


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_adam_and_nadam_with_decoupled_weight_decay_match_a_hand_loop(name):
    config = TrainConfig(optimizer=name, learning_rate=0.01, weight_decay=0.1, warmup=0)
    total, b1, b2, eps = 4, 0.9, 0.999, 1e-8
    optimizer = optim.make_optimizer(config, total_steps=total)
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    grads = [{"kernel": jnp.array([[0.3, -0.1]]) * (i + 1), "bias": jnp.array([-0.2]) / (i + 1)} for i in range(3)]
    state = optimizer.init(params)
    expected = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in expected.items()}
    nu = {k: np.zeros_like(v) for k, v in expected.items()}
    for step, g in enumerate(grads):
        updates, state = optimizer.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        lr = 0.01 * 0.5 * (1 + math.cos(math.pi * step / total))
        t = step + 1
        for k in expected:
            grad = np.asarray(g[k], dtype=np.float64)
            mu[k] = b1 * mu[k] + (1 - b1) * grad
            nu[k] = b2 * nu[k] + (1 - b2) * grad ** 2
            if name == "nadam":  # Dozat 2016: the next step's momentum plus this gradient's share
                mu_hat = b1 * mu[k] / (1 - b1 ** (t + 1)) + (1 - b1) * grad / (1 - b1 ** t)
            else:
                mu_hat = mu[k] / (1 - b1 ** t)
            direction = mu_hat / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
            decay = 0.1 * expected[k] if k == "kernel" else 0.0
            expected[k] = expected[k] - lr * (direction + decay)
    for k in expected:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-5)


def test_head_only_finetuning_updates_the_head_and_nothing_else():
    config = TrainConfig(optimizer="sgd", learning_rate=0.1, weight_decay=0.1, warmup=0, init_from="x", finetune="head")
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))}, optim.HEAD: {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    assert optim.trainable_mask(config, params) == {"Conv_0": {"kernel": False},
                                                     optim.HEAD: {"kernel": True, "bias": True}}
    optimizer = optim.make_optimizer(config, 3)
    state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["Conv_0"]["kernel"], 1.0)  # no gradient step, no weight decay
    assert float(jnp.abs(params[optim.HEAD]["kernel"] - 1.0).min()) > 0


def test_optimizer_flags_are_checked_naming_the_flag():
    with pytest.raises(MedleakError, match="--optimizer"):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(MedleakError, match="--nesterov"):
        TrainConfig(optimizer="adam", nesterov=True).validate()
    with pytest.raises(MedleakError, match="--finetune=head needs --init_from"):
        TrainConfig(finetune="head").validate()
    for bad in ("auto,1", "0,1", "x", "nan"):
        with pytest.raises(MedleakError, match="--pos_weight"):
            TrainConfig(pos_weight=bad).validate()
    assert TrainConfig(pos_weight="2,0.5").validate().pos_weight == "2,0.5"
