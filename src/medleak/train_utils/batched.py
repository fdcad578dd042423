"""K models per device program: the Trainer's own step, vmapped over a model axis and sharded over devices.

    batched = BatchedTrainer(trainer, models_per_program=4)      # trainer: a training.Trainer
    outcomes = batched.train([ModelJob(indices_0, seed_0, checkpoints_0), ...])
    # -> one TrainedModel, or the TrainingDiverged of that model, per job
    views = batched.infer_train_views([m for m in outcomes if isinstance(m, TrainedModel)])

Each model has its own rows (its batch schedule), seed (init, augmentation, dropout and DP-noise keys
all come from it, as in `Trainer.train`) and, with DP-SGD, its own noise multiplier (a per-step
schedule entry): the program is `jax.vmap` of the single-model init and chunk functions
(`Trainer.program_functions`), so model i of a batch computes exactly what `Trainer.train` computes
for it alone (to float tolerance: XLA may order reductions differently in a batched program). The
schedule contract already gives every run of a Trainer the same shapes (steps per epoch from
`expected_train_size`, DP batches padded to a fixed maximum with a mask), so no further padding of
rows is needed; a program always holds `models_per_program` models, and a short batch (the end of a
campaign) is filled with copies of its first model whose results are dropped, so one compiled
program serves every batch. jax.vmap of a convolution over both images and kernels lowers to one
grouped convolution (feature_group_count = K): that is the "explicit batched layout", so the two are
one program here.

The model axis is sharded over the process's devices (a one-axis `jax.sharding.Mesh` named
"model", `NamedSharding(mesh, P("model"))` for states, schedules and seeds; images and labels
replicated), so one worker drives every local GPU. K is rounded up to a multiple of the devices used.

A model whose loss turns NaN/inf is reported (its outcome is TrainingDiverged, its checkpoints are
deleted) and its results are ignored while the others go on. Checkpoints stay per run: each model's
slice of the stacked state is saved to, and resumed from, its own `RunCheckpoints`; models whose
checkpoints stop at different steps are trained in separate program calls (one group per resume step).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medleak.errors import MedleakError
from medleak.train_utils import inference
from medleak.train_utils.training import (TrainedModel, Trainer, TrainingDiverged, _check_finite, _seed32,
                                          run_timings, schedule_signature, trained_model)

MODEL_AXIS = "model"


@dataclasses.dataclass
class ModelJob:
    """One model to train in a batch: its rows, seed and (optional) `RunCheckpoints`."""

    train_indices: np.ndarray
    seed: int
    checkpoints: object = None


def model_mesh(models_per_program: int, devices=None) -> Mesh:
    """A one-axis mesh over as many of `devices` (default: this process's) as divide K evenly."""
    devices = list(devices if devices is not None else jax.local_devices())
    n_used = max(d for d in range(1, min(len(devices), models_per_program) + 1) if models_per_program % d == 0)
    return Mesh(np.array(devices[:n_used]), (MODEL_AXIS,))


def stack_trees(trees):
    """One tree with a leading model axis from K trees of the same structure."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_tree(tree, index: int):
    """Model `index`'s slice of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


class BatchedTrainer:
    """Trains and infers `models_per_program` models of one Trainer per device program."""

    def __init__(self, trainer: Trainer, models_per_program: int, devices=None):
        if models_per_program < 1:
            raise MedleakError(f"--models_per_program must be at least 1, got {models_per_program}")
        self.trainer = trainer
        self.models_per_program = int(models_per_program)
        self.mesh = model_mesh(self.models_per_program, devices)
        self.by_model = NamedSharding(self.mesh, PartitionSpec(MODEL_AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.images = jax.device_put(trainer.images, self.replicated)
        self.labels = jax.device_put(trainer.labels, self.replicated)
        self.test_images = (None if trainer.test_images is None
                            else jax.device_put(trainer.test_images, self.replicated))
        self.compile_seconds = {}
        self._programs = {}
        self._inference = {}

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    # -- training --

    def compiled_program(self, batches: dict):
        """The vmapped init and chunk programs (compiled once per schedule shape)."""
        signature = schedule_signature(batches)
        if signature in self._programs:
            return self._programs[signature]
        functions = self.trainer.program_functions(batches)
        k = self.models_per_program
        seeds_spec = jax.ShapeDtypeStruct((k,), jnp.uint32, sharding=self.by_model)
        started = time.perf_counter()
        init = jax.jit(jax.vmap(functions.init), out_shardings=self.by_model).lower(seeds_spec).compile()
        state_spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.by_model),
                                  jax.eval_shape(jax.vmap(functions.init), seeds_spec))
        chunk_spec = {name: jax.ShapeDtypeStruct((k, functions.chunk_steps, *value.shape[1:]), value.dtype,
                                                 sharding=self.by_model)
                      for name, value in batches.items()}
        chunk = jax.jit(jax.vmap(functions.chunk, in_axes=(0, None, None, 0, 0)), donate_argnums=0,
                        out_shardings=self.by_model).lower(
            state_spec, self.images, self.labels, chunk_spec, seeds_spec).compile()
        self.compile_seconds["train"] = self.compile_seconds.get("train", 0.0) + time.perf_counter() - started
        program = dataclasses.replace(functions, init=init, chunk=chunk)
        self._programs[signature] = program
        return program

    def train(self, jobs, log_progress=None) -> list:
        """Trains every job, `models_per_program` at a time; one TrainedModel or TrainingDiverged per job.

        `log_progress(steps_done, n_steps, steps_per_epoch, losses)` as in `Trainer.train` (the
        losses of the first model of each program call).
        """
        points = [self.trainer.resume_point(job.train_indices, job.seed, job.checkpoints) for job in jobs]
        signatures = {schedule_signature(batches) for batches, *_ in points}
        if len(signatures) > 1:
            raise MedleakError("the runs of one batch have batch schedules of different shapes; "
                               "train them with --models_per_program=1")
        compile_before = self.compile_seconds.get("train", 0.0)
        program = self.compiled_program(points[0][0])
        compile_seconds = self.compile_seconds.get("train", 0.0) - compile_before
        groups = {}  # resume step -> job positions; a checkpoint this program cannot resume is deleted
        for position, (job, (_, _, resume_step, _)) in enumerate(zip(jobs, points)):
            if resume_step and not program.resumes_at(resume_step):
                job.checkpoints.delete()
                resume_step = 0
            groups.setdefault(resume_step if resume_step else 0, []).append(position)
        outcomes = [None] * len(jobs)
        for first_step, positions in sorted(groups.items()):
            for at in range(0, len(positions), self.models_per_program):
                members = positions[at:at + self.models_per_program]
                group_started = time.perf_counter()
                results = self._train_group(program, [jobs[i] for i in members], [points[i] for i in members],
                                            first_step, log_progress)
                for i, result in zip(members, results):
                    if isinstance(result, TrainedModel):
                        result.timings.update(compile_seconds=compile_seconds,
                                              models_in_program=len(members),
                                              total_seconds=time.perf_counter() - group_started + compile_seconds)
                    outcomes[i] = result
                compile_seconds = 0.0  # counted once, in the first group
        return outcomes

    def _train_group(self, program, jobs, points, first_step: int, log_progress) -> list:
        """Trains up to K jobs that resume from the same step in lockstep (padded with copies)."""
        k, n_real = self.models_per_program, len(jobs)
        padded = list(range(n_real)) + [0] * (k - n_real)
        seeds = [points[i][1] for i in range(n_real)]
        seeds32 = jax.device_put(np.array([_seed32(seeds[i]) for i in padded], np.uint32), self.by_model)
        batches = {name: np.stack([points[i][0][name] for i in padded]) for name in points[0][0]}
        losses = np.full((n_real, program.n_steps), np.nan, dtype=np.float32)
        state = program.init(seeds32)
        restore_seconds = 0.0
        if first_step:
            restore_started = time.perf_counter()
            restored = []
            for i in range(n_real):
                member_state, saved_losses = jobs[i].checkpoints.restore(first_step, unstack_tree(state, i),
                                                                          program.n_steps)
                restored.append(member_state)
                losses[i, :first_step] = saved_losses[:first_step]
                jobs[i].checkpoints.log(f"resumed from the checkpoint at step {first_step}/{program.n_steps} "
                                        f"(seed {seeds[i]})")
            state = jax.device_put(stack_trees([restored[i] for i in padded]), self.by_model)
            restore_seconds = time.perf_counter() - restore_started
        jax.block_until_ready(state)

        alive = [True] * n_real
        errors = [None] * n_real
        saved_before = [job.checkpoints.save_seconds if job.checkpoints is not None else 0.0 for job in jobs]
        saves_before = [job.checkpoints.saves if job.checkpoints is not None else 0 for job in jobs]

        def finish(pending):
            window_start, chunk_losses = pending
            chunk_losses = np.asarray(chunk_losses)  # (K, chunk_steps)
            for i in range(n_real):
                if not alive[i]:
                    continue
                losses[i, window_start:window_start + chunk_losses.shape[1]] = chunk_losses[i]
                try:
                    _check_finite(chunk_losses[i], window_start, seeds[i])
                except TrainingDiverged as diverged:  # masked out: the others go on
                    alive[i], errors[i] = False, diverged
                    if jobs[i].checkpoints is not None:
                        jobs[i].checkpoints.delete()  # the next attempt gets a fresh seed

        def save_members(step, state, final):
            for i, job in enumerate(jobs):
                if alive[i] and job.checkpoints is not None and job.checkpoints.due():
                    job.checkpoints.save(step, unstack_tree(state, i), losses[i], seed=seeds[i],
                                         fingerprint=points[i][3])
                    if final:
                        job.checkpoints.close()

        loop_started = time.perf_counter()
        pending = None
        try:
            for start in range(first_step, program.n_steps, program.chunk_steps):
                window = slice(start, start + program.chunk_steps)
                chunk_batches = jax.device_put({name: value[:, window] for name, value in batches.items()},
                                               self.by_model)
                state, chunk_metrics = program.chunk(state, self.images, self.labels, chunk_batches, seeds32)
                if pending is not None:  # check the previous chunk while this one runs
                    finish(pending)
                pending = (start, chunk_metrics["loss"])
                if not any(alive):
                    break
                if (window.stop % program.epoch_steps == 0 and window.stop < program.n_steps
                        and any(job.checkpoints is not None and job.checkpoints.due() for job in jobs)):
                    finish(pending)  # never save a diverged state
                    pending = None
                    save_members(window.stop, state, final=False)
                if log_progress is not None:
                    log_progress(window.stop, program.n_steps, program.epoch_steps, losses[0])
            if pending is not None:
                finish(pending)
        except BaseException:
            for job in jobs:
                if job.checkpoints is not None:
                    job.checkpoints.close()
            raise
        jax.block_until_ready(state)
        loop_seconds = time.perf_counter() - loop_started
        save_members(program.n_steps, state, final=True)  # the end too, as Trainer.train
        results = []
        for i, job in enumerate(jobs):
            if job.checkpoints is not None:
                job.checkpoints.close()
            if not alive[i]:
                results.append(errors[i])
                continue
            saved = (job.checkpoints.save_seconds - saved_before[i]) if job.checkpoints is not None else 0.0
            timings = run_timings(
                program, first_step, compile_seconds=0.0, loop_seconds=loop_seconds - saved,
                checkpoint_seconds=saved + restore_seconds / n_real, total_seconds=loop_seconds + restore_seconds,
                checkpoints_saved=(job.checkpoints.saves - saves_before[i]) if job.checkpoints is not None else 0)
            timings["program_images_per_second"] = n_real * timings["images_per_second"]
            results.append(trained_model(unstack_tree(state, i), seeds[i], job.train_indices, losses[i], timings))
        return results

    # -- inference --

    def _logits_program(self, name: str, variables, images, n_views: int):
        if name not in self._inference:
            started = time.perf_counter()
            view_logits_fn = inference.make_view_logits(self.trainer.model, n_views, self.trainer.config.augment)
            variables_spec = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.by_model), variables)
            batch_size = inference.balanced_batch_size(images.shape[0], self.trainer.eval_batch_size)
            rows_spec = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.replicated)
            call = jax.jit(jax.vmap(view_logits_fn, in_axes=(0, None, None)), out_shardings=self.by_model).lower(
                variables_spec, images, rows_spec).compile()
            self._inference[name] = inference.ViewLogitsProgram(call, batch_size)
            self.compile_seconds[name] = time.perf_counter() - started
        return self._inference[name]

    def _view_logits(self, models, name: str, images, n_views: int) -> list:
        outputs = []
        for at in range(0, len(models), self.models_per_program):
            members = models[at:at + self.models_per_program]
            padded = members + [members[0]] * (self.models_per_program - len(members))
            variables = jax.device_put(stack_trees([m.eval_variables for m in padded]), self.by_model)
            program = self._logits_program(name, variables, images, n_views)
            logits = inference.view_logits(program, variables, images, row_axis=1)
            outputs.extend(logits[i] for i in range(len(members)))
        return outputs

    def infer_train_views(self, models) -> list:
        """float32 (N, V, C) logits of every training row, per model (K models per program call)."""
        return self._view_logits(list(models), "infer_train", self.images, self.trainer.config.eval_views)

    def infer_test(self, models) -> list:
        """float32 (n_test, C) logits of the clean test images, per model."""
        if self.test_images is None:
            raise MedleakError("this Trainer was built without test images: pass test_images/test_labels")
        return [logits[:, 0] for logits in self._view_logits(list(models), "infer_test", self.test_images, 1)]
