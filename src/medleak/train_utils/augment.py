"""On-device image augmentation and the evaluation views used by the audit.

Images arrive as uint8 (B, H, W, C); `to_unit_float` maps them to [0, 1], the augmentations work in
that range, and `normalize` maps to [-1, 1] for the model. Every random choice comes from an explicit
per-example PRNG key, so an augmented batch is a pure function of (images, keys, preset).

Presets (`medleak.config.AUGMENT_PRESETS`: name -> operations, applied in this order):
- `none`     identity
- `trivial`  random horizontal flip
- `weak`     + random shift by up to 1/8 of the image side (reflect-pad and crop, whole pixels)
- `medium`   + random rotation about the centre (up to +-15 degrees, bilinear, mirrored borders)
- `strong`   + random brightness (+-0.2) and contrast (x0.8-1.2 about the image mean)
- `rotate_contrast_brightness`  rotation, then brightness and contrast, no flip or shift (EMBED
  mammograms, as in the paper)

Evaluation views (`eval_views`): view 0 is the clean image, view 1 its horizontal flip when the preset
flips, the remaining views random augmentations of the preset drawn from keys that depend only on
the record (never on the run), so every shadow model sees the same views of a record.
"""

import jax
import jax.numpy as jnp

from medleak.config import AUGMENT_PRESETS, check_choice
from medleak.errors import MedleakError

PRESETS = tuple(AUGMENT_PRESETS)
MAX_ROTATION_DEGREES = 15.0
MAX_BRIGHTNESS_DELTA = 0.2
CONTRAST_RANGE = (0.8, 1.2)


def preset_operations(preset: str) -> tuple:
    """The preset's operations in order, or MedleakError naming --augment and the valid presets."""
    check_choice("augment", preset, PRESETS)
    return AUGMENT_PRESETS[preset]


def preset_flips(preset: str) -> bool:
    """Whether the preset includes horizontal flips (then eval view 1 is the flipped image)."""
    return "flip" in preset_operations(preset)


def shift_pad(height: int, width: int) -> int:
    """Largest shift in pixels: 1/8 of the shorter side (4 px at 32x32, as in the LiRA code)."""
    return max(1, round(min(height, width) / 8))


def to_unit_float(images):
    """uint8 images -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def normalize(images01):
    """[0, 1] -> [-1, 1]: a fixed map, so no statistics of any record leak into preprocessing."""
    return images01 * 2.0 - 1.0


def hflip(images):
    """Horizontal flip of (..., H, W, C) images."""
    return jnp.flip(images, axis=-2)


def _shift(image, key):
    """Shifts one (H, W, C) image by whole pixels, filling the border by reflection."""
    height, width, _ = image.shape
    pad = shift_pad(height, width)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape)


def rotate(image, angle_radians):
    """Rotates one (H, W, C) image about its centre (bilinear, mirrored borders)."""
    height, width, _ = image.shape
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    cos, sin = jnp.cos(angle_radians), jnp.sin(angle_radians)
    # Inverse map: output pixel (r, c) samples the input at the point rotated back by the angle.
    source_row = centre_row + cos * (rows - centre_row) - sin * (cols - centre_col)
    source_col = centre_col + sin * (rows - centre_row) + cos * (cols - centre_col)

    def one_channel(channel):
        return jax.scipy.ndimage.map_coordinates(channel, [source_row, source_col], order=1, mode="mirror")

    return jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image)


def _color(image, key):
    brightness_key, contrast_key = jax.random.split(key)
    delta = jax.random.uniform(brightness_key, (), minval=-MAX_BRIGHTNESS_DELTA, maxval=MAX_BRIGHTNESS_DELTA)
    factor = jax.random.uniform(contrast_key, (), minval=CONTRAST_RANGE[0], maxval=CONTRAST_RANGE[1])
    mean = image.mean()
    return jnp.clip((image - mean) * factor + mean + delta, 0.0, 1.0)


def _flip(image, key):
    return jnp.where(jax.random.bernoulli(key), hflip(image), image)


def _random_rotation(image, key):
    max_angle = jnp.deg2rad(MAX_ROTATION_DEGREES)
    return rotate(image, jax.random.uniform(key, (), minval=-max_angle, maxval=max_angle))


# Operation -> (one image, key) -> image. Each operation has its own key stream (its position here),
# so adding an operation to a preset leaves the random choices of the others unchanged.
_OPERATIONS = {"flip": _flip, "shift": _shift, "rotate": _random_rotation, "brightness_contrast": _color}


def augment_image(image, key, preset: str):
    """Augments one (H, W, C) float image in [0, 1] with one PRNG key; returns the same shape."""
    operations = preset_operations(preset)
    keys = dict(zip(_OPERATIONS, jax.random.split(key, len(_OPERATIONS))))
    for name in operations:
        image = _OPERATIONS[name](image, keys[name])
    return image


def augment_batch(images01, keys, preset: str):
    """Augments (B, H, W, C) float images in [0, 1], one key per image (keys: (B,) key array)."""
    if not preset_operations(preset):
        return images01
    return jax.vmap(lambda image, key: augment_image(image, key, preset))(images01, keys)


def record_keys(base_key, record_indices):
    """One key per record, a function of the record's row only (not of batch composition)."""
    return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(record_indices)


def eval_views(images01, keys, n_views: int, preset: str):
    """(V, B, H, W, C) views of (B, H, W, C) images in [0, 1]; `keys` (B,) are per-record keys.

    View 0 is the clean image, view 1 its horizontal flip when the preset flips, and the rest random
    augmentations of the preset: view v of a record uses key fold_in(record key, v).
    """
    if n_views < 1:
        raise MedleakError(f"--eval_views must be at least 1, got {n_views}")
    views = [images01]
    if n_views > 1 and preset_flips(preset):
        views.append(hflip(images01))
    for view in range(len(views), n_views):
        view_keys = jax.vmap(lambda k: jax.random.fold_in(k, view))(keys)
        views.append(augment_batch(images01, view_keys, preset))
    return jnp.stack(views)
