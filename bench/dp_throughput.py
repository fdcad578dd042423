"""Benchmark: DP-SGD training step throughput as a ratio to the ordinary step.

The Trainer's compiled step (gather, augmentation, gradient estimator, optimiser, EMA) is timed
back to back on one device batch of `--batch_size` real images, once with the default masked-mean
estimator and once with the DP estimator (`medleak.dp.estimator.DpTraining`: per-example gradients
with vmap, clipping, noise), record-level, no padding, so both steps process the same images:

- `dp_<model>_images_per_s`, `nondp_<model>_images_per_s`, `dp_<model>_vs_nondp_ratio`
- `dp_<model>_patient_level_images_per_s` (3 records per patient slot) for small_cnn

small_cnn at 32x32x1 batch 64; wrn_28_2 at 32x32x3 batch 16 for a few steps on CPU
(`--wrn_steps`; 64x64x3 batch 64 on accelerators). Calibration is skipped: sigma only scales the
noise and does not change the cost.

    python bench/dp_throughput.py [--skip_wrn] [--wrn_steps 2]
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import report  # noqa: E402


def step_images_per_second(model, shape, batch_size, steps, dp_unit=None):
    """Real images per second of `steps` back-to-back compiled training steps (after a warm-up)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medleak.config import TrainConfig
    from medleak.dp.estimator import DpTraining
    from medleak.train_utils.training import Trainer

    rng = np.random.default_rng(0)
    n = 4 * batch_size
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    patient_ids = np.arange(n) // 3  # three images per patient
    config = TrainConfig(model=model, img_size=shape[:2], epochs=1, batch_size=batch_size,
                         learning_rate=0.01, warmup=0, augment="weak", eval_views=1,
                         epsilon=1.0 if dp_unit else float("inf"), dp_unit=dp_unit or "record")

    def schedule_fn(train_indices, rng):
        slots = dp.shape.batch_slots if dp_unit else batch_size
        indices = rng.choice(train_indices, size=(steps, slots)).astype(np.int32)
        mask = np.ones(indices.shape, dtype=bool)
        if dp_unit == "patient":  # whole patients in their slot rows, as the sampler lays them out
            first = rng.choice(n // 3, size=(steps, slots // 3)) * 3
            indices = (first[..., None] + np.arange(3)).reshape(steps, slots).astype(np.int32)
        batches = {"indices": indices, "mask": mask}
        if dp_unit:
            batches["noise_multiplier"] = np.ones(steps, np.float32)
        return batches

    # The DP slot layout: Poisson headroom above batch_size (all slots real here; the figure is
    # per real image), patient-level 3 record slots per patient.
    dp = DpTraining(config, patient_ids, steps_per_epoch=steps) if dp_unit else None
    estimator = dp.gradient_estimator if dp_unit else None
    trainer = Trainer(config, images, labels, "multiclass", expected_train_size=n,
                      schedule_fn=schedule_fn, gradient_estimator=estimator)
    batches = trainer.schedule(np.arange(n), seed=0)
    real_images = int(batches["mask"].sum())
    program = trainer.compiled_program(batches)
    seed = np.uint32(0)
    window = {k: jnp.asarray(v[:program.chunk_steps]) for k, v in batches.items()}
    state = program.init(seed)
    state = jax.block_until_ready(program.chunk(state, trainer.images, trainer.labels, window, seed))[0]
    calls = max(1, steps // program.chunk_steps)
    started = time.perf_counter()
    for _ in range(calls):
        state, _ = program.chunk(state, trainer.images, trainer.labels, window, seed)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    return calls * program.chunk_steps * real_images / steps / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_wrn", action="store_true")
    parser.add_argument("--wrn_steps", type=int, default=2)
    parser.add_argument("--small_steps", type=int, default=10)
    args = parser.parse_args()

    import jax

    started = time.perf_counter()
    report("backend", jax.default_backend())
    cpu = jax.default_backend() == "cpu"
    cases = [("small_cnn", (32, 32, 1), 64, args.small_steps)]
    if not args.skip_wrn:
        cases.append(("wrn_28_2", (32, 32, 3) if cpu else (64, 64, 3), 16 if cpu else 64,
                      args.wrn_steps if cpu else 20))
    for model, shape, batch_size, steps in cases:
        nondp = step_images_per_second(model, shape, batch_size, steps)
        dp = step_images_per_second(model, shape, batch_size, steps, dp_unit="record")
        report(f"nondp_{model}_images_per_s", nondp, "img/s")
        report(f"dp_{model}_images_per_s", dp, "img/s")
        report(f"dp_{model}_vs_nondp_ratio", dp / nondp)
        if model == "small_cnn":
            patient = step_images_per_second(model, shape, batch_size, steps, dp_unit="patient")
            report(f"dp_{model}_patient_level_images_per_s", patient, "img/s")
    report("bench_wall_s", time.perf_counter() - started, "s")


if __name__ == "__main__":
    main()
