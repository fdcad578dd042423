"""Per-unit clipping, Gaussian noise and the DP gradient estimator (src/medleak/dp/)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medleak.config import TrainConfig
from medleak.dp import clipping, estimator, noise
from medleak.errors import MedleakError

N_CLASSES = 3


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(N_CLASSES)(x)


MODEL = TinyNet()


def per_example_loss(params, inputs):
    images, labels = inputs
    logits = MODEL.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_batch(seed, n):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=n).astype(np.int32)
    # Some examples get large inputs so that their gradients exceed the clip norm.
    images[::3] *= 20.0
    return jnp.asarray(images), jnp.asarray(labels)


PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
CLIP = 0.5


@jax.jit
def patient_sum(params, inputs, mask):
    return clipping.clipped_grad_sum(per_example_loss, params, inputs, mask, clip_norm=CLIP,
                                     records_per_unit=3)


@jax.jit
def record_sum(params, inputs, mask):
    return clipping.clipped_grad_sum(per_example_loss, params, inputs, mask, clip_norm=CLIP,
                                     records_per_unit=1)


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def loop_reference(params, inputs, mask, records_per_unit, clip_norm):
    """Obviously-correct version: one jax.grad per real example, summed per unit, clipped."""
    images, labels = inputs
    single_grad = jax.jit(jax.grad(lambda p, x, y: per_example_loss(p, (x[None], y[None]))[0]))
    total = 0.0
    for unit_start in range(0, len(mask), records_per_unit):
        unit_grad = 0.0
        for b in range(unit_start, unit_start + records_per_unit):
            if mask[b]:
                unit_grad = unit_grad + flat(single_grad(params, images[b], labels[b]))
        norm = np.linalg.norm(unit_grad)
        if norm > 0:
            total = total + unit_grad * min(1.0, clip_norm / norm)
    return total


@pytest.mark.parametrize("records_per_unit", [1, 3])
def test_clipped_sum_matches_loop_and_each_unit_adds_at_most_clip_norm(records_per_unit):
    inputs = make_batch(1, 12)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    summed = patient_sum if records_per_unit == 3 else record_sum
    grad_sum, stats = summed(PARAMS, inputs, jnp.asarray(mask))
    expected = loop_reference(PARAMS, inputs, mask, records_per_unit, CLIP)
    np.testing.assert_allclose(flat(grad_sum), expected, rtol=2e-4, atol=1e-6)
    n_units = 12 // records_per_unit
    unit_mask = mask.reshape(n_units, records_per_unit)
    assert int(stats.real_units) == int(unit_mask.any(axis=1).sum())
    assert 0 < float(stats.clipped_fraction) <= 1
    # Each unit's contribution: the sum with it minus the sum without it.
    contributions = []
    for unit in range(n_units):
        without = unit_mask.copy()
        without[unit] = False
        grad_without, _ = summed(PARAMS, inputs, jnp.asarray(without.ravel()))
        contributions.append(np.linalg.norm(flat(grad_sum) - flat(grad_without)))
    contributions = np.array(contributions)
    assert np.all(contributions <= CLIP * (1 + 1e-5))
    # Units whose gradient exceeded the bound contribute exactly clip_norm; empty units nothing.
    assert np.any(np.isclose(contributions, CLIP, rtol=1e-4))
    assert np.all(contributions[~unit_mask.any(axis=1)] == 0)


def test_no_clipping_and_no_noise_equals_ordinary_sgd():
    inputs = make_batch(2, 8)
    mask = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], dtype=bool)
    n_real = int(mask.sum())
    dp = estimator.DpGradientEstimator(clip_norm=1e9, noise_multiplier=0.0,
                                       expected_units=float(n_real))

    @jax.jit
    def both(params, key):
        dp_grad, stats = dp(per_example_loss, params, inputs, mask, key)
        masked_mean = lambda p: jnp.sum(jnp.where(mask, per_example_loss(p, inputs), 0)) / n_real
        loss, sgd_grad = jax.value_and_grad(masked_mean)(params)
        return dp_grad, sgd_grad, stats, loss

    dp_grad, sgd_grad, stats, loss = both(PARAMS, jax.random.key(5))
    np.testing.assert_allclose(flat(dp_grad), flat(sgd_grad), rtol=1e-5, atol=1e-7)
    assert float(stats.loss) == pytest.approx(float(loss), rel=1e-5)
    assert float(stats.clipped_fraction) == 0
    # The same SGD step from both gradients lands on the same parameters.
    opt = optax.sgd(0.1, momentum=0.9)
    state = opt.init(PARAMS)
    step = lambda g: optax.apply_updates(PARAMS, opt.update(g, state, PARAMS)[0])
    np.testing.assert_allclose(flat(step(dp_grad)), flat(step(sgd_grad)), rtol=1e-6, atol=1e-7)


def test_noise_has_the_calibrated_standard_deviation():
    sigma, clip_norm, expected_units = 1.3, 0.7, 16.0
    target_std = sigma * clip_norm / expected_units
    grad_sum = {"w": jnp.full((300, 400), 2.0), "b": jnp.zeros((1000,))}
    add = jax.jit(lambda g, k: noise.noisy_mean(g, k, noise_multiplier=sigma, clip_norm=clip_norm,
                                                expected_units=expected_units))
    noisy = add(grad_sum, jax.random.key(11))
    noise_values = np.concatenate([np.ravel(noisy["w"]) - 2.0 / expected_units,
                                   np.ravel(noisy["b"])]).astype(np.float64)
    d = noise_values.size
    # Sample sd of d Gaussians has relative standard error 1/sqrt(2(d-1)); the mean sd/sqrt(d).
    assert abs(noise_values.std(ddof=1) / target_std - 1) < 5 / np.sqrt(2 * (d - 1))
    assert abs(noise_values.mean()) < 5 * target_std / np.sqrt(d)
    # Gaussian shape: kurtosis 3 (standard error sqrt(24/d)).
    z = noise_values / target_std
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / d)
    # A fresh key gives fresh, uncorrelated noise.
    other = np.ravel(add(grad_sum, jax.random.key(12))["w"]) - 2.0 / expected_units
    assert abs(np.corrcoef(noise_values[: other.size], other)[0, 1]) < 5 / np.sqrt(other.size)


def test_estimator_splits_into_sum_then_noise_for_gradient_accumulation():
    inputs = make_batch(3, 12)
    mask = jnp.ones(12, dtype=bool)
    dp = estimator.DpGradientEstimator(clip_norm=CLIP, noise_multiplier=0.8, expected_units=4.0,
                                       records_per_unit=3)
    key = jax.random.key(7)

    @jax.jit
    def whole_and_accumulated(params):
        whole, _ = dp(per_example_loss, params, inputs, mask, key)
        # Two micro-batches of two patients each, summed, then noised once: the same gradient.
        halves = [jax.tree.map(lambda x: x[s], inputs) for s in (slice(0, 6), slice(6, 12))]
        sums = [dp.clipped_sum(per_example_loss, params, h, mask[:6])[0] for h in halves]
        return whole, dp.privatize(jax.tree.map(jnp.add, *sums), key)

    whole, accumulated = whole_and_accumulated(PARAMS)
    np.testing.assert_allclose(flat(accumulated), flat(whole), rtol=1e-4, atol=1e-6)


def test_batch_norm_with_dp_is_refused():
    config = TrainConfig(norm="batch", epsilon=1.0)
    with pytest.raises(MedleakError) as error:
        estimator.validate_dp_config(config)
    assert "\n" not in str(error.value) and "--norm=group" in str(error.value)
    estimator.validate_dp_config(dataclasses.replace(config, epsilon=float("inf")))
    estimator.validate_dp_config(dataclasses.replace(config, norm="group"))
    with pytest.raises(MedleakError, match="BatchNorm"):
        estimator.refuse_batch_stats({"params": {}, "batch_stats": {"bn": {"mean": 0}}})
    estimator.refuse_batch_stats({"params": {}})
    for bad in (dict(dp_unit="image"), dict(clip_norm=0.0), dict(delta=1.5), dict(epsilon=-1.0)):
        with pytest.raises(MedleakError):
            estimator.validate_dp_config(TrainConfig(**{"epsilon": 1.0, **bad}))
