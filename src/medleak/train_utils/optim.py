"""Optimiser: optax SGD with momentum (optionally Nesterov), decoupled weight decay, linear warm-up
then cosine decay to zero, and an exponential moving average (EMA) of the parameters.

Weight decay is decoupled, as Keras' SGD applies it (params -= lr * weight_decay * params each step,
outside the momentum trace, as in SGDW/AdamW), and applies only to kernels (parameters with more
than one dimension), not to biases or normalisation scales. The warm-up is a fraction of all steps
(`TrainConfig.warmup`), as in the paper's scripts. Gradient accumulation lives with the gradient
estimator (`training.mean_gradient(micro_batches)`): one optimiser update per logical batch.
"""

import jax
import optax

from medleak.config import TrainConfig


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """Linear warm-up steps: the fraction `config.warmup` of all steps, rounded, leaving at least one
    step of cosine decay (warmup < 1, but rounding could reach the last step of a short run)."""
    return int(min(round(config.warmup * total_steps), total_steps - 1))


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 at `total_steps`."""
    warmup = warmup_steps(config, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=0.0,
    )


def decay_mask(params):
    """True for kernels (ndim > 1): weight decay skips biases and normalisation scales/offsets."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD(momentum, nesterov) + decoupled weight decay + warm-up/cosine learning rate."""
    return optax.chain(
        optax.trace(decay=config.momentum, nesterov=config.nesterov),
        optax.masked(optax.add_decayed_weights(config.weight_decay), decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)),
    )


def ema_update(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params; decay 0 makes the EMA equal the parameters."""
    if decay == 0.0:
        return params
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)

