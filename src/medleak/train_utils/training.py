"""Training engine: one `Trainer` per process trains many models that differ only in their rows.

    trainer = Trainer(config, train_images, train_labels, task, test_images, test_labels,
                      expected_train_size=n_expected)
    model = trainer.train(train_indices, seed)          # -> TrainedModel (EMA weights, timings)
    logits = trainer.infer_train_views(model)            # (N, V, C) float32 over ALL N rows
    metrics = trainer.evaluate(model, subgroups)         # test accuracy / AUROC (metrics.py)

Images go to the device once (uint8); each step gathers its batch by index inside the jitted
program, augments it on device, and updates the model. Array shapes never depend on which rows a
run trains on, so a process compiles the training program once and every later run reuses it
(`TrainedModel.timings` separates compile seconds from step seconds).

The step is factored in three replaceable parts so DP-SGD (src/medleak/dp/) plugs in without a new loop:

1. **Batch schedule** — `schedule_fn(train_indices, rng) -> {"indices": (S, B) int32,
   "mask": (S, B) bool, ...}`: S steps of B slots; `mask` is False for padded slots. The default,
   `epoch_schedule`, cuts a stream of epoch permutations into a fixed number of full batches
   (`steps_per_epoch`: the nearest whole number of batches in `expected_train_size` rows, so an
   epoch is one pass over a run's rows to within half a batch, and runs with a few more or fewer
   rows keep the same shapes). A Poisson sampler returns padded batches of a fixed maximum size with the mask set.
   Extra entries with a leading step axis, (S, ...) (e.g. a per-step noise multiplier, or a
   per-slot patient id for patient-level clipping), reach the gradient estimator as that step's
   slice, untouched. All runs of a Trainer must
   produce the same shapes (a new shape compiles a new program).
2. **Per-example loss** — `ModelLoss.example_loss(params, image, label) -> scalar` (one
   normalised, augmented image; GroupNorm models only) so `jax.vmap(jax.grad(example_loss))` gives
   per-example gradients; `ModelLoss.batch_losses(params, model_state, images, labels)` gives the
   (B,) losses and updated BatchNorm statistics.
3. **Gradient estimator** — `estimator(model_loss, params, model_state, images, labels, batch, key)
   -> (grads, new_model_state, {"loss": scalar, ...})`, called inside the jitted step with the
   augmented batch, the schedule's batch dict (`indices`, `mask`, extras) and a fresh PRNG key.
   The default, `mean_gradient(micro_batches)`, returns the gradient of the masked mean loss
   (accumulated over `grad_accum` micro-batches: one optimiser update per batch). A DP estimator
   clips each example's (or each patient's summed) gradient, sums them, adds Gaussian noise drawn
   from `key` and divides by the expected batch size; the optimiser, EMA and loop stay as they are.
   Its "loss" entry is checked for NaN/inf after every chunk of steps (`TrainingDiverged`).

There is no checkpoint selection: a run trains for the configured steps and the final (EMA)
weights are evaluated. Checkpoints (`train(..., checkpoints=RunCheckpoints(dir))`,
src/medleak/train_utils/checkpoint.py) only let a preempted run resume: the schedule is a function of
the seed and each step's PRNG key of (seed, step), so a resumed run equals an uninterrupted one.
"""

import dataclasses
import functools
import math
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from medleak.config import TrainConfig
from medleak.data_utils.records import TASKS
from medleak.errors import MedleakError
from medleak.train_utils import augment, inference, metrics, optim
from medleak.train_utils.checkpoint import run_fingerprint
from medleak.train_utils.device import resolve_compute_dtype
from medleak.train_utils.models import create_model

# Stream ids that separate the PRNG uses derived from one run seed.
_INIT_STREAM, _STEP_STREAM = 0, 1


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


# --- 1. batch schedule ---------------------------------------------------------------------------

def steps_per_epoch(expected_train_size: int, batch_size: int) -> int:
    """Optimiser steps per epoch for a run of `expected_train_size` rows: the nearest whole number
    of full batches, floor(n / B + 0.5), at least 1.

    An epoch then covers the run's rows to within half a batch (rounding up, 270 rows at batch 256
    would train 512 images an epoch); `epoch_schedule` carries the rest of a permutation over to
    the next epoch, so every row is still used equally often to within one over the run.
    """
    return max(1, (2 * expected_train_size + batch_size) // (2 * batch_size))  # integer floor(n/B + 0.5)


def planned_steps_per_epoch(stored: int | None, expected_train_size: int, batch_size: int) -> int:
    """`stored` (a campaign plan's schedule, which may predate today's rule) or else the rule's."""
    if stored is None:
        return steps_per_epoch(expected_train_size, batch_size)
    if int(stored) != stored or stored < 1:
        raise MedleakError(f"steps per epoch must be a positive whole number, got {stored}: check plan.json's schedule")
    return int(stored)


def epoch_schedule(train_indices, rng: np.random.Generator, *, batch_size: int, steps_per_epoch: int,
                   epochs: int) -> dict:
    """Full batches cut from a stream of epoch permutations of `train_indices`.

    Every epoch is `steps_per_epoch` batches whatever the number of rows, so the shapes are the same
    for every run; rows are drawn without replacement until all were seen, then a new permutation
    starts, so each row is used equally often (to within one) over the run.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if train_indices.size == 0:
        raise MedleakError("a run has no training records: check the plan's patient mask")
    n_slots = epochs * steps_per_epoch * batch_size
    n_permutations = math.ceil(n_slots / train_indices.size)
    stream = np.concatenate([rng.permutation(train_indices) for _ in range(n_permutations)])[:n_slots]
    indices = stream.reshape(epochs * steps_per_epoch, batch_size).astype(np.int32)
    return {"indices": indices, "mask": np.ones(indices.shape, dtype=bool)}


# --- 2. losses -----------------------------------------------------------------------------------

def per_example_loss(logits, labels, task: str, pos_weight=None):
    """(B,) softmax cross-entropy (multi-class) or sigmoid BCE averaged over labels (multi-label),
    positives of label c weighted by pos_weight[c] when given (train_utils/class_weights.py)."""
    logits = logits.astype(jnp.float32)
    if task == "multiclass":
        return optax.softmax_cross_entropy(logits, labels)
    if pos_weight is None:
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    weight = jnp.asarray(pos_weight, jnp.float32)
    return (weight * labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(logits)).mean(axis=-1)


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """The model's loss in the two forms a gradient estimator needs."""

    model: object
    task: str
    pos_weight: tuple | None = None  # BCE positive-class weights (--pos_weight)
    # params -> bool tree of the parameters trained (optim.trainable_mask); the others are constants
    # of the loss, so their (per-example, DP-clipped) gradients are zero and take no share of the clip norm.
    trainable: object = None

    def batch_losses(self, params, model_state, images, labels):
        """(B,) losses in training mode and the updated model state (BatchNorm statistics)."""
        if self.trainable is not None:
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, self.trainable(params))
        variables = {"params": params, **model_state}
        if model_state:
            logits, new_state = self.model.apply(variables, images, train=True, mutable=list(model_state))
        else:
            logits, new_state = self.model.apply(variables, images, train=True), model_state
        return per_example_loss(logits, labels, self.task, self.pos_weight), new_state

    def example_loss(self, params, image, label):
        """Loss of one (H, W, C) image: vmap its gradient for per-example (DP) gradients."""
        if getattr(self.model, "norm", "group") == "batch":
            raise MedleakError("per-example gradients need --norm=group: BatchNorm mixes examples in a batch")
        losses, _ = self.batch_losses(params, {}, image[None], label[None])
        return losses[0]


# --- 3. gradient estimators ----------------------------------------------------------------------

def mean_gradient(micro_batches: int = 1):
    """Default estimator: gradient of the masked mean loss, summed over `micro_batches` slices."""

    def estimator(model_loss: ModelLoss, params, model_state, images, labels, batch, key):
        del key  # deterministic
        weights = batch["mask"].astype(jnp.float32)
        n_real = jnp.maximum(weights.sum(), 1.0)

        def summed_loss(p, state, x, y, w):
            losses, new_state = model_loss.batch_losses(p, state, x, y)
            return (losses * w).sum(), new_state

        grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
        if micro_batches == 1:
            (loss_sum, new_state), grads = grad_fn(params, model_state, images, labels, weights)
        else:
            def accumulate(carry, micro):
                grad_sum, loss_sum, state = carry
                (loss, state), grads = grad_fn(params, state, *micro)
                return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, state), None

            def split(a):
                return a.reshape(micro_batches, a.shape[0] // micro_batches, *a.shape[1:])

            init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), model_state)
            (grads, loss_sum, new_state), _ = jax.lax.scan(
                accumulate, init, (split(images), split(labels), split(weights)))
        grads = jax.tree.map(lambda g: g / n_real, grads)
        return grads, new_state, {"loss": loss_sum / n_real}

    return estimator


# --- the training step ---------------------------------------------------------------------------

class TrainState(flax.struct.PyTreeNode):
    step: jnp.ndarray
    params: dict
    model_state: dict  # {"batch_stats": ...} for BatchNorm models, {} otherwise
    opt_state: tuple
    ema_params: dict | None  # None when EMA is disabled (ema_decay = 0)


def make_train_step(model_loss: ModelLoss, optimizer, estimator, preset: str, ema_decay: float):
    """(state, images, labels, batch, seed) -> (state, metrics): gather, augment, estimate, update."""

    def step(state: TrainState, images, labels, batch, seed):
        step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STEP_STREAM), state.step)
        augment_key, estimator_key = jax.random.split(step_key)
        rows = batch["indices"]
        x = augment.to_unit_float(images[rows])
        x = augment.augment_batch(x, jax.random.split(augment_key, rows.shape[0]), preset)
        x = augment.normalize(x)
        grads, model_state, step_metrics = estimator(
            model_loss, state.params, state.model_state, x, labels[rows], batch, estimator_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
            ema_params=None if state.ema_params is None else optim.ema_update(state.ema_params, params, ema_decay))
        return new_state, step_metrics

    return step


def make_train_chunk(step, chunk_steps: int):
    """Runs `chunk_steps` consecutive steps in one device call (lax.scan; a plain step for 1)."""

    def chunk(state, images, labels, batches, seed):
        if chunk_steps == 1:
            state, step_metrics = step(state, images, labels, jax.tree.map(lambda a: a[0], batches), seed)
            return state, jax.tree.map(lambda m: m[None], step_metrics)

        def body(carry, batch):
            return step(carry, images, labels, batch, seed)

        return jax.lax.scan(body, state, batches)

    return chunk


def default_chunk_steps(epoch_steps: int) -> int:
    """Steps per device call: one epoch on accelerators (saves per-step dispatch), one on CPU,
    where XLA runs convolutions inside a while loop ~20x slower than the same step called alone
    (measured: 5 scanned small_cnn steps 695 ms vs 5 x 4.7 ms)."""
    return 1 if jax.default_backend() == "cpu" else epoch_steps


# --- results -------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainedModel:
    """One trained model: final and EMA parameters, model state, per-step losses and timings."""

    params: dict
    ema_params: dict  # the final parameters themselves when EMA is disabled
    model_state: dict
    seed: int
    n_train: int
    losses: np.ndarray  # (n_steps,) training loss of every step
    timings: dict  # JSON-ready: compile/step/total seconds, images per second, steps, batch size

    @property
    def eval_variables(self) -> dict:
        """Variables used for evaluation and the audit: EMA weights (= final weights without EMA)."""
        return {"params": self.ema_params, **self.model_state}


@dataclasses.dataclass
class TrainProgram:
    """Compiled programs for one schedule shape: `init(seed) -> TrainState` and
    `chunk(state, images, labels, batches, seed) -> (state, {"loss": (chunk_steps,)})`."""

    init: object
    chunk: object
    chunk_steps: int
    n_steps: int
    batch_size: int
    epoch_steps: int  # checkpoints are saved at epoch boundaries (multiples of chunk_steps by default)

    def resumes_at(self, step: int) -> bool:
        """Whether a checkpoint of `step` can be resumed by this program (its chunks stop there)."""
        return 0 < step <= self.n_steps and step % self.chunk_steps == 0


def schedule_signature(batches: dict) -> tuple:
    """What a compiled program depends on in a schedule: its entries' shapes and dtypes."""
    return tuple(sorted((name, value.shape, value.dtype.str) for name, value in batches.items()))


def _chunk_steps(n_steps: int, target: int) -> int:
    """Largest divisor of n_steps not above target (one epoch for the default schedule)."""
    return max(d for d in range(1, min(n_steps, max(1, target)) + 1) if n_steps % d == 0)


def _check_finite(losses, first_step: int, seed: int):
    losses = np.asarray(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise TrainingDiverged(
            f"training loss became {losses[bad[0]]} at step {first_step + bad[0]} (seed {seed}): "
            f"lower --learning_rate or check the images/labels")


def run_timings(program: TrainProgram, first_step: int, *, compile_seconds: float, loop_seconds: float,
                checkpoint_seconds: float, total_seconds: float, checkpoints_saved: int) -> dict:
    """A run's JSON-ready timings (TrainedModel.timings); `loop_seconds` excludes checkpoint saves."""
    n_images = (program.n_steps - first_step) * program.batch_size
    return {
        "compile_seconds": compile_seconds,
        "step_seconds": loop_seconds,
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoints_saved": checkpoints_saved,
        "overhead_seconds": total_seconds - compile_seconds - loop_seconds - checkpoint_seconds,
        "total_seconds": total_seconds,
        "images_per_second": n_images / loop_seconds if loop_seconds > 0 else float("nan"),
        "steps": program.n_steps,
        "resumed_from_step": first_step,
        "steps_per_epoch": program.epoch_steps,
        "batch_size": program.batch_size,
    }


def trained_model(state: TrainState, seed: int, train_indices, losses, timings: dict) -> TrainedModel:
    """The TrainedModel of a final TrainState (its EMA weights, or the final ones without EMA)."""
    return TrainedModel(
        params=state.params, model_state=state.model_state,
        ema_params=state.params if state.ema_params is None else state.ema_params,
        seed=int(seed), n_train=int(np.asarray(train_indices).size), losses=losses, timings=timings)


# --- the trainer ---------------------------------------------------------------------------------

def config_model(config: TrainConfig, n_classes: int):
    """The flax model a (resolved) TrainConfig trains; `saved_model.load_model` rebuilds it too."""
    return create_model(config.model, n_classes, norm=config.norm, dtype=jnp.dtype(config.compute_dtype),
                        activation=config.activation)


class Trainer:
    """Trains and evaluates many models of one configuration on one image set, compiling once."""

    def __init__(self, config: TrainConfig, train_images, train_labels, task: str, test_images=None,
                 test_labels=None, *, expected_train_size: int | None = None, schedule_fn=None,
                 gradient_estimator=None, eval_batch_size: int | None = None, steps_per_call: int | None = None,
                 initial_variables=None, steps_per_epoch: int | None = None):
        """
        Args:
          config: the TrainConfig every model of this Trainer uses.
          train_images: uint8 (N, H, W, C) array or memmap; copied to the device once.
          train_labels: float32 (N, C) 0/1 labels (one-hot for multi-class).
          task: "multiclass" (softmax CE) or "multilabel" (sigmoid BCE).
          test_images, test_labels: optional test set for `infer_test` / `evaluate`.
          expected_train_size: rows a run is expected to train on (e.g. subset_ratio * N); fixes
            steps per epoch for every run. Defaults to N.
          steps_per_epoch: overrides `steps_per_epoch(expected_train_size, batch_size)`; a campaign
            passes its plan's stored schedule, so a worker trains the steps the campaign was planned
            with even if the rule changed since.
          schedule_fn: `(train_indices, rng) -> batch dict` replacing `epoch_schedule` (DP sampling).
          gradient_estimator: replaces `mean_gradient(config.grad_accum)` (DP-SGD).
          eval_batch_size: rows per inference call (default: the micro-batch size,
            config.batch_size / config.grad_accum, which is what fits in memory).
          steps_per_call: training steps per device call (default `default_chunk_steps`: one epoch
            on accelerators, one step on CPU); rounded down to a divisor of the run's steps.
        """
        # "auto" becomes this backend's dtype here; a campaign resolves it once, in its plan.
        config = dataclasses.replace(config.validate(),
                                     compute_dtype=resolve_compute_dtype(config.compute_dtype))
        self.config = config
        self.task = task
        if task not in TASKS:
            raise MedleakError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        train_images, train_labels = _check_arrays("training", train_images, train_labels, config)
        if config.dp and gradient_estimator is None:
            # Never train a model that claims a privacy budget without the DP estimator.
            raise MedleakError(f"--epsilon={config.epsilon} asks for DP-SGD: build the Trainer with the DP "
                               f"gradient estimator and sampler from src/medleak/dp")

        self.n_train, self.n_classes = train_labels.shape
        self.images = jax.device_put(train_images)
        self.labels = jax.device_put(train_labels)
        if test_images is not None:
            test_images, test_labels = _check_arrays("test", test_images, test_labels, config)
            if test_labels.shape[1] != self.n_classes:
                raise MedleakError(f"test labels have {test_labels.shape[1]} classes, training labels "
                                   f"{self.n_classes}: build both from the same records table")
            self.test_images = jax.device_put(test_images)
            self.test_labels = test_labels
        else:
            self.test_images = self.test_labels = None

        self.model = config_model(config, self.n_classes)
        # --init_from: `initial_variables(key, sample) -> variables` replaces model.init (finetune.py)
        if config.init_from and initial_variables is None:
            raise MedleakError(f"--init_from={config.init_from}: build the Trainer with initial_variables from "
                               "train_utils.finetune.pretrained_initializer")
        self.initial_variables = initial_variables or functools.partial(self.model.init, train=False)
        from medleak.train_utils.class_weights import pos_weight_values, resolve_pos_weight

        config = self.config = resolve_pos_weight(config, train_labels, task)  # "auto": all N rows' labels
        weights = pos_weight_values(config, self.n_classes)
        self.model_loss = ModelLoss(self.model, task, None if weights is None else tuple(weights.tolist()),
                                    None if config.finetune == "all" else functools.partial(optim.trainable_mask, config))
        self.expected_train_size = int(expected_train_size or self.n_train)
        self.steps_per_epoch = planned_steps_per_epoch(steps_per_epoch, self.expected_train_size, config.batch_size)
        self.schedule_fn = schedule_fn or functools.partial(
            epoch_schedule, batch_size=config.batch_size, steps_per_epoch=self.steps_per_epoch,
            epochs=config.epochs)
        self.gradient_estimator = gradient_estimator or mean_gradient(config.grad_accum)
        self.eval_batch_size = int(eval_batch_size or config.micro_batch_size)
        self.steps_per_call = steps_per_call
        self.compile_seconds = {}  # program name -> seconds spent compiling it in this process
        self._programs = {}
        self._inference = {}

    # -- training --

    def schedule(self, train_indices, seed: int) -> dict:
        """The batch schedule of a run (host numpy arrays), reproducible from the seed."""
        train_indices = np.asarray(train_indices)
        if train_indices.dtype.kind not in "iu":
            raise MedleakError(f"train_indices must be integer row numbers, got {train_indices.dtype} "
                               f"(for a boolean record mask pass np.flatnonzero(mask))")
        if train_indices.ndim != 1 or (train_indices.size and (
                train_indices.min() < 0 or train_indices.max() >= self.n_train)):
            raise MedleakError(f"train_indices must be row numbers in [0, {self.n_train}) of the training images")
        batches = self.schedule_fn(train_indices, np.random.default_rng([_seed32(seed), _STEP_STREAM]))
        return {name: np.asarray(value) for name, value in batches.items()}

    def program_functions(self, batches: dict) -> TrainProgram:
        """The uncompiled init and chunk functions (and shape facts) of this schedule shape; the
        batched trainer (batched.py) vmaps these very functions over a model axis."""
        n_steps, batch_size = batches["indices"].shape
        epoch_steps = max(1, n_steps // self.config.epochs)
        chunk_steps = _chunk_steps(n_steps, self.steps_per_call or default_chunk_steps(epoch_steps))
        optimizer = optim.make_optimizer(self.config, n_steps)
        sample = jnp.zeros((1, *self.images.shape[1:]), jnp.float32)

        def init(seed):
            key = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
            variables = dict(self.initial_variables(key, sample))
            params = variables.pop("params")
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
                              opt_state=optimizer.init(params),
                              ema_params=params if self.config.ema_decay > 0 else None)

        step = make_train_step(self.model_loss, optimizer, self.gradient_estimator, self.config.augment,
                               self.config.ema_decay)
        return TrainProgram(init, make_train_chunk(step, chunk_steps), chunk_steps, n_steps, batch_size, epoch_steps)

    def compiled_program(self, batches: dict) -> TrainProgram:
        """The compiled init and chunk programs for this schedule shape (compiled on first use)."""
        signature = schedule_signature(batches)
        if signature in self._programs:
            return self._programs[signature]
        functions = self.program_functions(batches)
        seed_spec = jax.ShapeDtypeStruct((), jnp.uint32)
        started = time.perf_counter()
        init_compiled = jax.jit(functions.init).lower(seed_spec).compile()
        state_spec = jax.eval_shape(functions.init, seed_spec)
        chunk_spec = {name: jax.ShapeDtypeStruct((functions.chunk_steps, *value.shape[1:]), value.dtype)
                      for name, value in batches.items()}
        chunk_compiled = jax.jit(functions.chunk, donate_argnums=0).lower(
            state_spec, self.images, self.labels, chunk_spec, seed_spec).compile()
        self.compile_seconds["train"] = self.compile_seconds.get("train", 0.0) + time.perf_counter() - started
        program = dataclasses.replace(functions, init=init_compiled, chunk=chunk_compiled)
        self._programs[signature] = program
        return program

    def train(self, train_indices, seed: int, progress: bool = True, *, checkpoints=None,
              after_chunk=None, log_progress=None) -> TrainedModel:
        """Trains one model on rows `train_indices` of the training images; returns its weights.

        `checkpoints` (`checkpoint.RunCheckpoints` of this run): the state is saved there at the first
        epoch boundary after every `checkpoints.every_seconds`, and at the end when that much time
        has passed since the last save (a short run never saves); a run that finds a
        checkpoint of itself (same config and batch schedule) resumes from it, with the checkpoint's
        seed whatever `seed` says (a re-claimed run may be given a fresh one). A checkpoint of anything
        else, or of a run that diverged, is deleted. `after_chunk(steps_done)` is called after each
        device call (progress reports; tests interrupt a run from it).

        Raises TrainingDiverged if the loss becomes NaN/inf.
        """
        started = time.perf_counter()
        batches, seed, resume_step, fingerprint = self.resume_point(train_indices, seed, checkpoints)
        compile_before = self.compile_seconds.get("train", 0.0)
        program = self.compiled_program(batches)
        compile_seconds = self.compile_seconds.get("train", 0.0) - compile_before
        seed32 = np.uint32(_seed32(seed))
        state = program.init(seed32)
        losses = np.full(program.n_steps, np.nan, dtype=np.float32)
        first_step, restore_seconds = 0, 0.0
        if program.resumes_at(resume_step):
            restore_started = time.perf_counter()
            state, saved_losses = checkpoints.restore(resume_step, state, program.n_steps)
            losses[:resume_step] = saved_losses[:resume_step]
            first_step, restore_seconds = resume_step, time.perf_counter() - restore_started
            checkpoints.log(f"resumed from the checkpoint at step {resume_step}/{program.n_steps} (seed {seed})")
        elif resume_step:  # saved at a step this program's chunks do not stop at (another --steps_per_call)
            checkpoints.delete()
        jax.block_until_ready(state)

        saved_before, saves_before = (checkpoints.save_seconds, checkpoints.saves) if checkpoints is not None else (0.0, 0)
        if log_progress is not None:  # progress lines without a terminal (campaign.progress.ProgressLines)
            after_chunk = _also_log_progress(after_chunk, log_progress, program, losses)
        loop_started = time.perf_counter()
        try:
            state = self._train_loop(program, state, batches, seed, losses, first_step, progress,
                                     checkpoints, fingerprint, after_chunk)
        except TrainingDiverged:
            if checkpoints is not None:
                checkpoints.delete()  # the next attempt gets a fresh seed and must not resume this one
            raise
        except BaseException:
            if checkpoints is not None:
                checkpoints.close()
            raise
        jax.block_until_ready(state)
        loop_seconds = time.perf_counter() - loop_started
        checkpoint_seconds = restore_seconds
        if checkpoints is not None:
            loop_seconds -= checkpoints.save_seconds - saved_before
            if checkpoints.due():  # the end too, so a worker lost during inference does not retrain
                checkpoints.save(program.n_steps, state, losses, seed=seed, fingerprint=fingerprint)
            checkpoints.close()
            checkpoint_seconds += checkpoints.save_seconds - saved_before
        total_seconds = time.perf_counter() - started

        timings = run_timings(
            program, first_step, compile_seconds=compile_seconds, loop_seconds=loop_seconds,
            checkpoint_seconds=checkpoint_seconds, total_seconds=total_seconds,
            checkpoints_saved=(checkpoints.saves if checkpoints is not None else 0) - saves_before)
        return trained_model(state, seed, train_indices, losses, timings)

    def resume_point(self, train_indices, seed: int, checkpoints):
        """(batches, seed, step to resume from or 0, fingerprint or None) of a run about to train
        (a checkpoint of another run or config is deleted here)."""
        record = checkpoints.latest_record() if checkpoints is not None else None
        if record is not None:
            batches = self.schedule(train_indices, record["seed"])
            fingerprint = run_fingerprint(self.config.to_dict(), batches)
            if fingerprint == record["fingerprint"]:
                return batches, record["seed"], int(record["step"]), fingerprint
            checkpoints.log(f"{checkpoints.directory}: the checkpoint is of another run or config; starting over")
            checkpoints.delete()
        batches = self.schedule(train_indices, seed)
        fingerprint = run_fingerprint(self.config.to_dict(), batches) if checkpoints is not None else None
        return batches, seed, 0, fingerprint

    def _train_loop(self, program: TrainProgram, state, batches, seed, losses, first_step, progress,
                    checkpoints, fingerprint, after_chunk):
        """Runs the chunks from `first_step` on, filling `losses`; returns the final state."""
        seed32 = np.uint32(_seed32(seed))
        pending = None
        n_chunks = program.n_steps // program.chunk_steps
        with tqdm(total=program.n_steps, initial=first_step, unit="step", desc=f"train seed {seed}",
                  disable=not progress, leave=False) as bar:
            for chunk_index in range(first_step // program.chunk_steps, n_chunks):
                window = slice(chunk_index * program.chunk_steps, (chunk_index + 1) * program.chunk_steps)
                state, chunk_metrics = program.chunk(
                    state, self.images, self.labels, {k: v[window] for k, v in batches.items()}, seed32)
                # Check the previous chunk while this one runs, so the device never waits on the host.
                if pending is not None:
                    self._finish_chunk(pending, seed, bar, losses)
                pending = (window.start, chunk_metrics["loss"])
                if (checkpoints is not None and window.stop % program.epoch_steps == 0
                        and window.stop < program.n_steps and checkpoints.due()):
                    self._finish_chunk(pending, seed, bar, losses)  # never save a diverged state
                    pending = None
                    checkpoints.save(window.stop, state, losses, seed=seed, fingerprint=fingerprint)
                if after_chunk is not None:
                    after_chunk(window.stop)
            if pending is not None:
                self._finish_chunk(pending, seed, bar, losses)
        return state

    @staticmethod
    def _finish_chunk(pending, seed: int, bar, losses) -> None:
        first_step, chunk_losses = pending
        chunk_losses = np.asarray(chunk_losses)
        _check_finite(chunk_losses, first_step, seed)
        losses[first_step:first_step + chunk_losses.size] = chunk_losses
        bar.update(chunk_losses.size)
        bar.set_postfix(loss=f"{chunk_losses.mean():.4f}")

    # -- inference --

    def _view_logits(self, name: str, variables, images, n_views: int, progress: bool = False) -> np.ndarray:
        """(N, V, C) logits of `images`, by a program compiled once per name, in balanced batches."""
        if name not in self._inference:
            started = time.perf_counter()
            self._inference[name] = inference.compile_view_logits(
                self.model, variables, images, self.eval_batch_size, n_views, self.config.augment)
            self.compile_seconds[name] = time.perf_counter() - started
        return inference.view_logits(self._inference[name], variables, images, progress=progress)

    def infer_train_views(self, model: TrainedModel, progress: bool = False) -> np.ndarray:
        """float32 (N, V, C) logits of every training row under the config's `eval_views` views."""
        return self._view_logits("infer_train", model.eval_variables, self.images, self.config.eval_views, progress)

    def infer_test(self, model: TrainedModel) -> np.ndarray:
        """float32 (n_test, C) logits of the clean test images."""
        if self.test_images is None:
            raise MedleakError("this Trainer was built without test images: pass test_images/test_labels")
        return self._view_logits("infer_test", model.eval_variables, self.test_images, 1)[:, 0]

    def evaluate(self, model: TrainedModel, subgroups: dict | None = None) -> dict:
        """Test accuracy, macro AUROC and AUROC per label, overall and per subgroup value."""
        return metrics.classification_metrics(self.infer_test(model), self.test_labels, self.task, subgroups)


def _also_log_progress(after_chunk, log_progress, program, losses):
    """`after_chunk` that also calls `log_progress(steps_done, n_steps, steps_per_epoch, losses)`;
    `losses` is filled up to the chunk before the last (the last one is still running)."""
    def hook(steps_done):
        if after_chunk is not None:
            after_chunk(steps_done)
        log_progress(steps_done, program.n_steps, program.epoch_steps, losses)
    return hook


def _seed32(seed: int) -> int:
    """Run seeds map into uint32 (the PRNG seed width without x64)."""
    return int(seed) % (1 << 32)


def _check_arrays(split: str, images, labels, config: TrainConfig):
    """Validates and returns (uint8 (N, H, W, C) images, float32 (N, C) labels) as numpy arrays."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise MedleakError(f"{split} images must be a uint8 (N, H, W, C) array (the image cache), "
                           f"got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != tuple(config.img_size):
        raise MedleakError(f"{split} images are {images.shape[1]}x{images.shape[2]} but --img_size is "
                           f"{config.img_size[0]}x{config.img_size[1]}: rebuild the image cache")
    if images.shape[0] == 0:
        raise MedleakError(f"there are no {split} images: check the records table's {split} split")
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise MedleakError(f"{split} labels {labels.shape} must be (N, C) with N = {images.shape[0]} images")
    if not np.isfinite(labels).all():
        raise MedleakError(f"{split} labels contain NaN/inf: fill missing labels in the records table")
    return images, labels
