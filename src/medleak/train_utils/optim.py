"""Optimiser: optax SGD with momentum (optionally Nesterov), Adam or NAdam (`--optimizer`), decoupled
weight decay, linear warm-up then cosine decay to zero, and an exponential moving average (EMA) of
the parameters. With `--finetune=head` only the classification head is updated (`trainable_mask`).

Adam and NAdam are optax's (b1 0.9, b2 0.999, eps 1e-8; NAdam as in Dozat 2016, torch's NAdam
without its momentum decay); `--momentum` and `--nesterov` are SGD's. DP_CXR fine-tunes with NAdam at
lr 2e-4 and no weight decay (`--optimizer=nadam --learning_rate=2e-4 --weight_decay=0`); a non-zero
`--weight_decay` is decoupled for every optimiser (AdamW-style), not torch Adam's L2 term.

Weight decay is decoupled, as Keras' SGD applies it (params -= lr * weight_decay * params each step,
outside the momentum trace, as in SGDW/AdamW), and applies only to kernels (parameters with more
than one dimension), not to biases or normalisation scales. The warm-up is a fraction of all steps
(`TrainConfig.warmup`), as in the paper's scripts. Gradient accumulation lives with the gradient
estimator (`training.mean_gradient(micro_batches)`): one optimiser update per logical batch.
"""

import jax
import optax

from medleak.config import TrainConfig
from medleak.errors import MedleakError


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


# The classification head: every model's last (and only) Dense layer (train_utils/models.py).
HEAD = "Dense_0"


def trainable_mask(config: TrainConfig, params):
    """True for the parameters training updates: all of them, or only the head with --finetune=head."""
    if config.finetune == "all":
        return jax.tree.map(lambda p: True, params)
    if HEAD not in params:
        raise MedleakError(f"--finetune=head: the {config.model} model has no {HEAD} head layer")
    return {name: jax.tree.map(lambda p, head=name == HEAD: head, subtree) for name, subtree in params.items()}


def _direction(config: TrainConfig) -> optax.GradientTransformation:
    """The update direction before weight decay and the learning rate."""
    if config.optimizer == "sgd":
        return optax.trace(decay=config.momentum, nesterov=config.nesterov)
    return optax.scale_by_adam(nesterov=config.optimizer == "nadam")


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD(momentum, nesterov) / Adam / NAdam + decoupled weight decay + warm-up/cosine learning rate;
    frozen parameters (`trainable_mask`) get no update at all (no decay either)."""
    optimizer = optax.chain(
        _direction(config),
        optax.masked(optax.add_decayed_weights(config.weight_decay), decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)),
    )
    if config.finetune == "all":
        return optimizer
    return optax.multi_transform(
        {"train": optimizer, "freeze": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(config, params)))


def ema_update(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params; decay 0 makes the EMA equal the parameters."""
    if decay == 0.0:
        return params
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)

