"""Models: parameter counts (eval_shape only), shapes for any input, norms, dtypes, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medleak.errors import MedleakError
from medleak.train_utils.models import create_model


def n_params(model, shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def wrn_param_formula(depth, width, in_channels, num_classes):
    """Hand count of a pre-activation WRN with GroupNorm (scale + bias per channel)."""
    blocks = (depth - 4) // 6
    total = 3 * 3 * in_channels * 16  # stem conv, no bias
    channels = 16
    for base in (16, 32, 64):
        out = base * width
        for block in range(blocks):
            total += 2 * channels  # norm before the first conv
            total += 3 * 3 * channels * out + 2 * out + 3 * 3 * out * out  # conv, norm, conv
            if channels != out:
                total += channels * out  # 1x1 shortcut conv
            channels = out
    total += 2 * channels  # final norm
    total += channels * num_classes + num_classes  # dense
    return total


def test_wrn_28_2_parameter_count_matches_hand_count_and_paper():
    count = n_params(create_model("wrn_28_2", 10), (1, 32, 32, 3))
    assert count == wrn_param_formula(28, 2, 3, 10)
    assert 1.4e6 < count < 1.55e6  # the paper's "~1.5M"
    # Grayscale 64x64 input: only the stem changes.
    assert n_params(create_model("wrn_28_2", 14), (1, 64, 64, 1)) == wrn_param_formula(28, 2, 1, 14)
    assert n_params(create_model("wrn_16_4", 3), (1, 32, 32, 3)) == wrn_param_formula(16, 4, 3, 3)


@pytest.mark.parametrize("shape", [(2, 64, 48, 1), (2, 33, 31, 3)])
def test_wrn_output_shape_for_any_input_size(shape):
    model = create_model("wrn_28_2", 5)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32


def filled_variables(model, x):
    """Variables of the right shapes with arbitrary values (skips compiling the PRNG-heavy init):
    normal parameters, BatchNorm means 0 and variances 1."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return jnp.ones(s.shape) if "var" in name else jnp.zeros(s.shape)
        return jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def init_and_apply(model, x, train=False):
    """Initialises on x and returns (variables, logits); jitted so each is one compilation."""
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    return variables, jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_small_cnn_is_small_runs_on_any_input_and_computes_in_bfloat16():
    assert 80_000 < n_params(create_model("small_cnn", 2), (1, 16, 16, 1)) < 120_000
    model = create_model("small_cnn", 4, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12, 20, 3)), jnp.float32)
    variables, logits = init_and_apply(model, x)
    assert logits.shape == (3, 4) and np.isfinite(np.asarray(logits)).all()
    # bf16 compute, fp32 parameters and logits.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert logits.dtype == jnp.float32
    conv_dtypes = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True)[1], variables, jnp.ones((1, 8, 8, 3)))
    assert jnp.dtype(jnp.bfloat16) in {leaf.dtype for leaf in jax.tree.leaves(conv_dtypes)}


def test_group_norm_examples_are_independent_batch_norm_tracks_statistics():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 1)) * 3 + 1, jnp.float32)
    # Same shape, only the other examples differ: example 0's logits may change only through
    # batch statistics.
    x_others_changed = x.at[1:].multiply(5.0)

    group = create_model("small_cnn", 3, norm="group")
    variables = filled_variables(group, x)
    assert set(variables) == {"params"}
    group_train = jax.jit(lambda v, x: group.apply(v, x, train=True))
    np.testing.assert_allclose(group_train(variables, x)[0], group_train(variables, x_others_changed)[0],
                               rtol=1e-5, atol=1e-5)

    batch = create_model("small_cnn", 3, norm="batch")
    variables = filled_variables(batch, x)
    assert "batch_stats" in variables
    batch_train = jax.jit(lambda v, x: batch.apply(v, x, train=True, mutable=["batch_stats"]))
    batch_eval = jax.jit(lambda v, x: batch.apply(v, x, train=False))
    logits, updated = batch_train(variables, x)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updated["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # In training mode the batch statistics couple examples; in eval mode they do not.
    assert not np.allclose(logits[0], batch_train(variables, x_others_changed)[0][0], atol=1e-3)
    np.testing.assert_allclose(batch_eval(updated | {"params": variables["params"]}, x)[0],
                               batch_eval(updated | {"params": variables["params"]}, x_others_changed)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "wrn_27_2", "wrn_28_0", "wrn_4_2", "small"])
def test_unknown_or_invalid_model_names_raise_user_errors(name):
    with pytest.raises(MedleakError, match="--model"):
        create_model(name, 2)


def test_invalid_norm_raises():
    with pytest.raises(MedleakError, match="--norm"):
        create_model("small_cnn", 2, norm="layer")
