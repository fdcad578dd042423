"""On-device augmentation: shapes, determinism per key, exact flips/shifts/rotations, eval views."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medleak.errors import MedleakError
from medleak.train_utils import augment

B, H, W, C = 6, 16, 12, 3


@pytest.fixture(scope="module")
def images01():
    return jnp.asarray(np.random.default_rng(0).random((B, H, W, C), dtype=np.float32))


@functools.lru_cache(maxsize=None)
def jitted_augment(preset):
    return jax.jit(lambda x, keys: augment.augment_batch(x, keys, preset))


def keys_for(seed, n=B):
    return jax.random.split(jax.random.key(seed), n)


@pytest.mark.parametrize("preset", augment.PRESETS)
def test_presets_keep_shape_range_and_are_deterministic_per_key(images01, preset):
    out = np.asarray(jitted_augment(preset)(images01, keys_for(1)))
    assert out.shape == images01.shape and out.dtype == np.float32
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    np.testing.assert_array_equal(out, np.asarray(jitted_augment(preset)(images01, keys_for(1))))
    other = np.asarray(jitted_augment(preset)(images01, keys_for(2)))
    if preset == "none":
        np.testing.assert_array_equal(out, np.asarray(images01))
    else:
        assert not np.array_equal(out, other)


def test_trivial_is_exactly_the_image_or_its_flip(images01):
    out = np.asarray(jitted_augment("trivial")(images01, keys_for(3, B)))
    x = np.asarray(images01)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    unchanged = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or u for f, u in zip(flipped, unchanged))
    assert any(flipped) and any(unchanged)


def test_weak_is_a_whole_pixel_shift_of_the_reflect_padded_image(images01):
    out = np.asarray(jitted_augment("weak")(images01, keys_for(4)))
    pad = augment.shift_pad(H, W)
    assert pad == 2
    shifted_somewhere = 0
    for o, image in zip(out, np.asarray(images01)):
        candidates = []
        for variant in (image, image[:, ::-1]):
            padded = np.pad(variant, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
            candidates += [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                           if np.array_equal(padded[dy:dy + H, dx:dx + W], o)]
        assert candidates, "output is not a crop of the padded (possibly flipped) image"
        shifted_somewhere += (pad, pad) not in candidates
    assert shifted_somewhere > 0


def test_rotation_about_the_centre():
    square = np.random.default_rng(1).random((9, 9, 2), dtype=np.float32)
    rotate = jax.jit(augment.rotate)
    np.testing.assert_allclose(rotate(square, 0.0), square, atol=1e-6)
    # A quarter turn about the centre maps pixels exactly onto pixels (numpy's clockwise rot90).
    np.testing.assert_allclose(rotate(square, np.pi / 2), np.rot90(square, k=-1, axes=(0, 1)), atol=1e-5)
    # The centre pixel never moves.
    np.testing.assert_allclose(rotate(square, 0.3)[4, 4], square[4, 4], atol=1e-6)


def test_strong_changes_brightness_of_a_flat_image_uniformly():
    flat = jnp.full((B, H, W, C), 0.5)  # same shape as above: reuses the compiled preset
    out = np.asarray(jitted_augment("strong")(flat, keys_for(5)))
    for image in out:
        np.testing.assert_allclose(image, image.flat[0], atol=1e-5)  # still flat: geometry cannot show
        assert abs(image.flat[0] - 0.5) <= augment.MAX_BRIGHTNESS_DELTA + 1e-6
    assert len({round(float(image.flat[0]), 5) for image in out}) > 1


def test_rotate_contrast_brightness_is_a_rotation_then_colour_change_without_flip_or_shift(images01):
    # EMBED's preset: the same per-operation key streams as the nested presets, rotation first.
    keys = keys_for(6)
    out = np.asarray(jitted_augment("rotate_contrast_brightness")(images01, keys))
    max_angle = np.deg2rad(augment.MAX_ROTATION_DEGREES)
    for o, image, key in zip(out, np.asarray(images01), keys):
        _, _, rotate_key, colour_key = jax.random.split(key, 4)
        angle = jax.random.uniform(rotate_key, (), minval=-max_angle, maxval=max_angle)
        expected = augment._color(augment.rotate(jnp.asarray(image), angle), colour_key)
        np.testing.assert_allclose(o, np.asarray(expected), atol=1e-5)
        assert abs(float(angle)) > 0 and not np.allclose(o, image, atol=1e-3)
    flat = np.asarray(jitted_augment("rotate_contrast_brightness")(jnp.full((B, H, W, C), 0.5), keys))
    assert all(np.allclose(image, image.flat[0], atol=1e-5) for image in flat)  # no shift or flip shows
    assert not augment.preset_flips("rotate_contrast_brightness")


@pytest.mark.parametrize("preset", ["none", "weak"])
def test_eval_views_clean_flip_then_fixed_per_record_augmentations(images01, preset):
    views_fn = jax.jit(lambda x, rows: augment.eval_views(
        x, augment.record_keys(jax.random.key(7), rows), 5, preset))
    rows = jnp.arange(B, dtype=jnp.int32) + 10
    views = np.asarray(views_fn(images01, rows))
    x = np.asarray(images01)
    assert views.shape == (5, B, H, W, C)
    np.testing.assert_array_equal(views[0], x)
    if preset == "none":
        assert all(np.array_equal(v, x) for v in views)
        return
    np.testing.assert_array_equal(views[1], x[:, :, ::-1])
    assert not np.array_equal(views[2], views[3])
    # A record's views depend on its row only, not on the batch it is evaluated in.
    reordered = np.asarray(views_fn(images01[::-1], rows[::-1]))
    np.testing.assert_array_equal(reordered[:, ::-1], views)


def test_unknown_preset_and_bad_view_count_raise_user_errors(images01):
    with pytest.raises(MedleakError, match="--augment"):
        augment.preset_operations("heavy")
    with pytest.raises(MedleakError, match="--eval_views"):
        augment.eval_views(images01, keys_for(0), 0, "weak")
    assert augment.preset_flips("trivial") and not augment.preset_flips("none")


def test_normalisation_maps_uint8_to_unit_and_symmetric_range():
    raw = jnp.asarray(np.array([0, 128, 255], dtype=np.uint8))
    np.testing.assert_allclose(augment.normalize(augment.to_unit_float(raw)), [-1.0, 1 / 255, 1.0], atol=1e-6)
