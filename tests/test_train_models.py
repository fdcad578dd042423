"""Models: parameter counts (eval_shape only), shapes for any input, norms, dtypes, registry errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medleak.config import TrainConfig
from medleak.errors import MedleakError
from medleak.train_utils.models import create_model, mish


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


def test_wrn_10_1_the_demos_cpu_model_matches_hand_count_and_takes_16px_grayscale():
    model = create_model("wrn_10_1", 14)
    count = n_params(model, (1, 16, 16, 1))
    assert count == wrn_param_formula(10, 1, 1, 14) and 70_000 < count < 90_000
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)), train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 16, 16, 1)), train=False), variables)
    assert logits.shape == (2, 14) and logits.dtype == jnp.float32


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


def resnet9_param_formula(in_channels, num_classes):
    """Hand count of torchvision's ResNet(BasicBlock, [1, 1, 1, 1]) with GroupNorm (scale + bias per
    channel) in place of BatchNorm; convolutions have no bias."""
    total = 7 * 7 * in_channels * 64 + 2 * 64  # stem conv + norm
    channels = 64
    for width in (64, 128, 256, 512):
        total += 3 * 3 * channels * width + 2 * width + 3 * 3 * width * width + 2 * width
        if channels != width:
            total += channels * width + 2 * width  # 1x1 projection + its norm
        channels = width
    return total + channels * num_classes + num_classes


def test_resnet9_parameter_count_matches_hand_count():
    count = n_params(create_model("resnet9", 14), (1, 64, 64, 1))
    assert count == resnet9_param_formula(1, 14) == 4_906_702  # torchvision's count for this layout
    # Only the stem and the head depend on the input channels and the labels; any size >= 64 works.
    assert n_params(create_model("resnet9", 5), (1, 96, 80, 3)) == resnet9_param_formula(3, 5)


def modules_called(model, x):
    """Every flax module that runs in model.init(x), in call order (module objects)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            seen.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return seen


def test_resnet9_layout_every_norm_is_groupnorm_32_and_four_single_block_stages():
    modules = modules_called(create_model("resnet9", 14), jnp.zeros((1, 64, 64, 1)))
    norms = [m for m in modules if isinstance(m, (nn.GroupNorm, nn.BatchNorm, nn.LayerNorm))]
    # stem + 2 per block + 3 projections (stages 2-4 change shape)
    assert len(norms) == 1 + 4 * 2 + 3
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in norms)
    blocks = [m for m in modules if type(m).__name__ == "BasicBlock"]
    assert [(b.width, b.stride) for b in blocks] == [(64, 1), (128, 2), (256, 2), (512, 2)]
    convs = [m for m in modules if isinstance(m, nn.Conv)]
    assert convs[0].kernel_size == (7, 7) and convs[0].strides == 2 and convs[0].features == 64
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3


def test_resnet9_refuses_small_images_naming_img_size():
    with pytest.raises(MedleakError, match="--img_size=32,64.*at least 64,64") as info:
        create_model("resnet9", 2).init(jax.random.key(0), jnp.zeros((1, 32, 64, 1)))
    assert "\n" not in str(info.value)
    with pytest.raises(MedleakError, match="--img_size=48,48"):
        TrainConfig(model="resnet9", img_size=(48, 48)).validate()
    TrainConfig(model="resnet9", img_size=(64, 64), activation="mish").validate()
    with pytest.raises(MedleakError, match="--norm=batch"):
        TrainConfig(model="resnet9", norm="batch").validate()
    with pytest.raises(MedleakError, match="--activation=mish applies to --model=resnet9"):
        TrainConfig(model="small_cnn", activation="mish").validate()
    with pytest.raises(MedleakError, match="--activation"):
        create_model("resnet9", 2, activation="gelu")


@pytest.mark.slow
def test_mish_is_x_tanh_softplus_and_changes_resnet9_outputs():
    x = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(np.asarray(mish(jnp.asarray(x))), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-6,
                               atol=1e-7)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 1)), jnp.float32)
    relu_model, mish_model = create_model("resnet9", 3), create_model("resnet9", 3, activation="mish")
    variables, relu_logits = init_and_apply(relu_model, images)
    mish_logits = jax.jit(lambda v, x: mish_model.apply(v, x, train=False))(variables, images)
    assert relu_logits.shape == mish_logits.shape == (2, 3)
    assert not np.allclose(relu_logits, mish_logits)


@pytest.mark.slow  # ~70 s on two CPU cores (compiling resnet9's per-example gradients)
def test_resnet9_dp_sgd_steps_at_64x64():
    """DP-SGD (per-example clipping + noise, dp/estimator.py) through the real Trainer with resnet9."""
    from medleak.dp import estimator
    from medleak.train_utils import training

    rng = np.random.default_rng(0)
    n = 12
    images = rng.integers(0, 255, size=(n, 64, 64, 1)).astype(np.uint8)
    labels = rng.integers(0, 2, size=(n, 3)).astype(np.float32)
    patient_ids = np.array([f"p{i}" for i in range(n)])
    config = TrainConfig(model="resnet9", activation="mish", img_size=(64, 64), epochs=1, batch_size=4,
                         learning_rate=0.05, augment="none", eval_views=1, epsilon=1.0, clip_norm=1.5,
                         compute_dtype="float32", weight_decay=0.0).validate()
    steps = training.steps_per_epoch(n, config.batch_size)
    dp = estimator.DpTraining(config, patient_ids, steps)
    trainer = training.Trainer(config, images, labels, "multilabel", schedule_fn=dp.schedule_fn,
                               gradient_estimator=dp.gradient_estimator)
    rows = np.arange(n)
    model = trainer.train(rows, seed=0, progress=False)
    assert len(model.losses) == dp.summary(rows)["steps"] and np.all(np.isfinite(model.losses))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(model.params))
    assert trainer.infer_train_views(model).shape == (n, 1, 3)
