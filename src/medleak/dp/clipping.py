"""Per-unit gradient clipping: one clipped gradient per record, or per patient.

A batch of `U * R` flat slots (see `medleak.dp.sampling`) is viewed as U unit slots of R record slots.
Each unit's gradient is the gradient of the sum of its (masked) per-example losses, i.e. the sum
of its records' per-example gradients; it is clipped to L2 norm `clip_norm` and the clipped
gradients are summed. So one unit changes the sum by at most `clip_norm`: with R = 1 that is
record-level DP-SGD, with R > 1 (a patient's images in one slot row) patient-level DP-SGD.

The vmap over units, the clipping and the zeroing of all-padding units are jax-privacy's
`clipped_grad` (which also keeps NaN/inf gradients from breaking the bound). BatchNorm would mix
examples inside a unit's forward pass and is refused upstream (`medleak.dp.estimator`).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax_privacy import clipping


class ClipStats(NamedTuple):
    """Per-step sums (add them over micro-batches); these depend on the data: log, never release."""

    loss_sum: jax.Array  # sum of per-example losses over real records
    real_records: jax.Array
    clipped_units: jax.Array  # real units whose gradient norm exceeded clip_norm
    real_units: jax.Array

    @property
    def loss(self):
        return self.loss_sum / jnp.maximum(self.real_records, 1)

    @property
    def clipped_fraction(self):
        return self.clipped_units / jnp.maximum(self.real_units, 1)


def split_units(tree, records_per_unit: int):
    """Reshapes every leaf (B, ...) to (B // records_per_unit, records_per_unit, ...)."""
    return jax.tree.map(lambda x: x.reshape((-1, records_per_unit) + x.shape[1:]), tree)


def clipped_grad_sum(per_example_loss: Callable, params, inputs, mask, *, clip_norm: float,
                     records_per_unit: int = 1):
    """Sum over units of each unit's clipped gradient; returns `(grad_sum, ClipStats)`.

    `per_example_loss(params, inputs) -> (n,)` loss per example for a batch pytree `inputs` with
    leading axis n (it is called with n = records_per_unit); `inputs` here has leading axis
    B = units * records_per_unit and `mask` (B,) marks the real slots.
    """

    def unit_loss(params, unit_inputs, unit_mask):
        losses = per_example_loss(params, unit_inputs)
        return jnp.sum(jnp.where(unit_mask, losses, 0.0))

    grad_fn = clipping.clipped_grad(
        unit_loss, argnums=0, l2_clip_norm=clip_norm, batch_argnums=(1, 2),
        keep_batch_dim=False, return_values=True, return_grad_norms=True)
    unit_inputs = split_units(inputs, records_per_unit)
    unit_mask = mask.reshape(-1, records_per_unit)
    real_unit = jnp.any(unit_mask, axis=1)
    grad_sum, aux = grad_fn(params, unit_inputs, unit_mask, is_padding_example=~real_unit)
    count = lambda a: jnp.sum(a, dtype=jnp.float32)
    stats = ClipStats(loss_sum=count(aux.values), real_records=count(mask),
                      clipped_units=count((aux.grad_norms > clip_norm) & real_unit),
                      real_units=count(real_unit))
    return grad_sum, stats
