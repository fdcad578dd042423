"""Benchmark: training throughput of the Trainer vs its bare jitted step, per-run overhead, compile
time, and K models per device (jax.vmap) vs K sequential models.

For small_cnn 32x32x1 and wrn_28_2 32x32x3 at batch 128 (synthetic uint8 images, `weak` augmentation):
- `<model>_loop_images_per_s`: runs after the first in a process (`Trainer.train`: schedule + loop
  + checks), best of two
- `<model>_bare_step_images_per_s`: the same compiled step called back to back on one device batch,
  best of two windows
- `<model>_loop_vs_bare_ratio` (target >= 0.9) and `<model>_run_overhead_share` (share of a later
  run's wall time spent outside training steps: schedule, state init, last fetch; target <= 0.10)
- `<model>_compile_s`: compile seconds of the first run (training programs)
small_cnn also gets a textbook flax step (value_and_grad + SGD on a ready float batch, no gather,
augmentation or EMA) for reference, and K=4 models trained with jax.vmap vs one after another.
On a GPU it adds wrn_28_2 64x64x3 at batch 256 in bfloat16 (the paper's Fitzpatrick setting).

    python bench/train_throughput.py [--wrn_steps 2] [--skip_wrn] [--workers N [--worker_model M]]
    python bench/train_throughput.py --models_per_program 1,2,4,8   # models/hour, K models per program
    python bench/train_throughput.py --shadow_model [--eval_batch_size B]  # seconds per WRN-28-2 shadow model

`--shadow_model` times issue 14's CPU setting: a WRN-28-2 shadow model at 32x32x3 with Fitzpatrick's
training defaults (batch 256, `weak` augmentation) but 2 epochs, on a random half of 541 records,
then 2-view inference of all 541: seconds per model (a run after the first, compiling one), its
training and inference seconds and the inference share (target <= 0.15), and the first run's.

`--workers N` runs one model's measurement (`--worker_model`, default wrn_28_2, `--wrn_steps` steps per
run) in N processes at once that share the device (each calls configure_device_memory(N) before JAX
starts) and prints their summed images/s: compare with the single-process figure.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import report, seconds_per_call  # noqa: E402


def synthetic(n, shape, n_classes, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.eye(n_classes, dtype=np.float32)[rng.integers(0, n_classes, n)]
    return images, labels


def measure_trainer(name, model, shape, batch_size, steps_per_run, bare_steps, compute_dtype="float32", rounds=2):
    """A first run (compiles), then `rounds` x (a run on other rows, a bare-step window): best of each.

    The bare step is the very same compiled program called back to back on one device batch, so the
    ratio isolates what the loop adds (schedule, index transfer, loss checks, progress).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medleak.config import TrainConfig
    from medleak.train_utils.training import Trainer

    expected = steps_per_run * batch_size  # one epoch of steps_per_run steps
    images, labels = synthetic(2 * expected, shape, 10)
    config = TrainConfig(model=model, img_size=shape[:2], epochs=1, batch_size=batch_size, learning_rate=0.01,
                         warmup=0, augment="weak", eval_views=2, compute_dtype=compute_dtype)
    trainer = Trainer(config, images, labels, "multiclass", expected_train_size=expected)
    rng = np.random.default_rng(1)
    first = trainer.train(np.sort(rng.choice(2 * expected, expected, replace=False)), seed=0, progress=False)

    batches = trainer.schedule(np.arange(expected), seed=2)
    program = trainer.compiled_program(batches)
    chunk = {k: jnp.asarray(v[:program.chunk_steps]) for k, v in batches.items()}
    seed = np.uint32(2)
    bare_calls = max(2, bare_steps // program.chunk_steps)

    def bare(state):
        return program.chunk(state, trainer.images, trainer.labels, chunk, seed)[0]

    loop_ips, bare_ips, overhead = [], [], []
    for run in range(rounds):
        rows = np.sort(rng.choice(2 * expected, expected - 3 * run, replace=False))  # other rows, other sizes
        timings = trainer.train(rows, seed=1 + run, progress=False).timings
        loop_ips.append(timings["images_per_second"])
        overhead.append((timings["total_seconds"] - timings["step_seconds"]) / timings["total_seconds"])
        state = program.init(seed)
        jax.block_until_ready(state := bare(state))
        started = time.perf_counter()
        for _ in range(bare_calls):
            state = bare(state)
        jax.block_until_ready(state)
        bare_ips.append(bare_calls * program.chunk_steps * batch_size / (time.perf_counter() - started))

    report(f"{name}_loop_images_per_s", max(loop_ips), "img/s")
    report(f"{name}_bare_step_images_per_s", max(bare_ips), "img/s")
    report(f"{name}_loop_vs_bare_ratio", max(loop_ips) / max(bare_ips))
    report(f"{name}_run_overhead_share", max(overhead))
    report(f"{name}_compile_s", first.timings["compile_seconds"], "s")
    report(f"{name}_step_s", batch_size / max(loop_ips), "s")
    return max(loop_ips)


def textbook_step(shape, batch_size, n_models, calls):
    """images/s of a minimal flax step; with n_models > 1: vmapped over models vs one after another."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from medleak.train_utils.models import create_model

    model = create_model("small_cnn", 10)
    optimizer = optax.sgd(0.01, momentum=0.9)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch_size, *shape)).astype(np.float32))
    y = jax.nn.one_hot(jnp.arange(batch_size) % 10, 10)

    def step(params, opt_state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy(model.apply({"params": p}, x, train=True), y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    init = jax.jit(jax.vmap(lambda key: model.init(key, x[:1], train=False)["params"]))
    params = init(jax.random.split(jax.random.key(0), n_models))
    opt_state = jax.vmap(optimizer.init)(params)
    single = jax.jit(step)
    first = (jax.tree.map(lambda a: a[0], params), jax.tree.map(lambda a: a[0], opt_state))
    single_s = seconds_per_call(lambda p, o: single(p, o, x, y), *first, repeats=calls)
    if n_models == 1:
        return batch_size / single_s, None
    xs, ys = jnp.stack([x] * n_models), jnp.stack([y] * n_models)
    vmapped = jax.jit(jax.vmap(step))
    vmapped_s = seconds_per_call(lambda p, o: vmapped(p, o, xs, ys), params, opt_state, repeats=calls)
    return batch_size / single_s, n_models * batch_size / vmapped_s


BENCH_SHAPES = {"small_cnn": (32, 32, 1), "wrn_28_2": (32, 32, 3)}


def run_workers(n_workers, args):
    """Runs one model's measurement in n_workers processes sharing the device; sums images/s."""
    command = [sys.executable, __file__, "--child", "--wrn_steps", str(args.wrn_steps), "--workers", str(n_workers),
               "--worker_model", args.worker_model]
    started = time.perf_counter()
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(n_workers)]
    total = 0.0
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"worker failed with exit code {child.returncode}")
        total += json.loads(out.strip().splitlines()[-1])["images_per_second"]
    report(f"{args.worker_model}_{n_workers}_workers_total_images_per_s", total, "img/s")
    report("bench_wall_s", time.perf_counter() - started, "s")


def models_per_program_table(ks, args):
    """Shadow models per hour with K models per program (bench/gpu_campaign.py's measurement) for
    small_cnn 32x32 at batch 64, extrapolated to 1,000 images x 30 epochs + 2 views (demo-sized)."""
    from bench.gpu_campaign import measure

    settings = argparse.Namespace(model="small_cnn", img_size=32, batch_size=64, steps=4, steps_per_call=None,
                                  n_images=1000, epochs=30, views=2, infer_rows=512, eval_batch_size=256)
    for k in ks:
        figures = measure(settings, k, "float32")
        report(f"small_cnn_k{k}_models_per_hour", 3600.0 / figures["seconds_per_model"], "models/h")


SHADOW_RECORDS = 541  # issue 14's CPU setting


def shadow_model(args):
    """Seconds per shadow model (train + multi-view inference), issue 14's CPU setting."""
    import dataclasses

    import numpy as np

    from medleak.config import dataset_train_config
    from medleak.train_utils.training import Trainer

    images, labels = synthetic(SHADOW_RECORDS, (32, 32, 3), 3)
    config = dataclasses.replace(dataset_train_config("fitzpatrick"), model="wrn_28_2", img_size=(32, 32), epochs=2,
                                 eval_views=2)
    trainer = Trainer(config, images, labels, "multiclass", expected_train_size=SHADOW_RECORDS // 2,
                      eval_batch_size=args.eval_batch_size)
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(args.shadow_runs):
        rows = np.sort(rng.choice(SHADOW_RECORDS, SHADOW_RECORDS // 2, replace=False))
        started = time.perf_counter()
        model = trainer.train(rows, seed=seed, progress=False)
        trained = time.perf_counter()
        trainer.infer_train_views(model)
        runs.append((trained - started, time.perf_counter() - trained))
    report("shadow_eval_batch_size", trainer.eval_batch_size)
    report("shadow_first_run_s", sum(runs[0]), "s")
    train_s, infer_s = min(runs[1:], key=sum)
    report("shadow_train_s", train_s, "s")
    report("shadow_infer_s", infer_s, "s")
    report("shadow_seconds_per_model", train_s + infer_s, "s")
    report("shadow_inference_share", infer_s / (train_s + infer_s))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models_per_program", default="",
                        help="only the K-models-per-program table, e.g. 1,2,4,8 (models/hour)")
    parser.add_argument("--shadow_model", action="store_true",
                        help="only seconds per WRN-28-2 shadow model in issue 14's CPU setting")
    parser.add_argument("--shadow_runs", type=int, default=3, help="runs of --shadow_model (the first compiles)")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="--shadow_model's rows per inference call (default: the Trainer's)")
    parser.add_argument("--wrn_steps", type=int, default=2, help="training steps per wrn_28_2 run")
    parser.add_argument("--skip_wrn", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker_model", default="wrn_28_2", choices=sorted(BENCH_SHAPES),
                        help="model measured by each --workers process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.models_per_program:
        return models_per_program_table([int(k) for k in args.models_per_program.split(",")], args)
    if args.shadow_model:
        return shadow_model(args)

    if args.child:  # one of --workers processes: configure memory before JAX starts
        from medleak.train_utils.device import configure_device_memory

        configure_device_memory(args.workers)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            ips = measure_trainer(args.worker_model, args.worker_model, BENCH_SHAPES[args.worker_model], 128,
                                  args.wrn_steps, args.wrn_steps)
        print(json.dumps({"images_per_second": ips}))
        return
    if args.workers > 1:
        run_workers(args.workers, args)
        return

    import jax

    started = time.perf_counter()
    report("backend", jax.default_backend())
    measure_trainer("small_cnn", "small_cnn", (32, 32, 1), 128, steps_per_run=8, bare_steps=8)
    single_ips, _ = textbook_step((32, 32, 1), 128, 1, calls=6)
    report("small_cnn_textbook_step_images_per_s", single_ips, "img/s")

    n_models = 4
    sequential_ips, vmapped_ips = textbook_step((32, 32, 1), 128, n_models, calls=3)
    report(f"small_cnn_{n_models}_models_sequential_images_per_s", sequential_ips, "img/s")
    report(f"small_cnn_{n_models}_models_vmap_images_per_s", vmapped_ips, "img/s")
    report("vmap_vs_sequential_ratio", vmapped_ips / sequential_ips)

    if not args.skip_wrn:
        measure_trainer("wrn_28_2", "wrn_28_2", (32, 32, 3), 128, steps_per_run=args.wrn_steps,
                        bare_steps=args.wrn_steps)
        if jax.default_backend() != "cpu":
            measure_trainer("wrn_28_2_64px_bf16", "wrn_28_2", (64, 64, 3), 256, steps_per_run=50, bare_steps=50,
                            compute_dtype="bfloat16")
    report("bench_wall_s", time.perf_counter() - started, "s")


if __name__ == "__main__":
    main()
