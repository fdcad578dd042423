"""Gaussian noise for DP-SGD: sum of clipped gradients + N(0, (sigma * clip_norm)^2), averaged.

The noise is jax-privacy's `gaussian_privatizer` (i.i.d. Gaussian, one fresh key per step). The
noisy sum is divided by the *expected* number of units per step, not the realised one: the realised
batch size depends on who was sampled and would leak it, the expected size is public.
"""

import jax
from jax_privacy import noise_addition


def noisy_mean(grad_sum, key, *, noise_multiplier: float, clip_norm: float,
               expected_units: float):
    """`(grad_sum + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_units`, keyed by `key`."""
    # sigma = 0 with clipping off (clip_norm = inf) means no noise, not NaN. `noise_multiplier`
    # may be a traced per-run value (the Trainer compiles once for all runs).
    no_noise = isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0
    stddev = 0.0 if no_noise else noise_multiplier * clip_norm
    privatizer = noise_addition.gaussian_privatizer(stddev=stddev, prng_key=key)
    noisy_sum, _ = privatizer.update(grad_sum, privatizer.init(grad_sum))
    return jax.tree.map(lambda g: g / expected_units, noisy_sum)
