"""Benchmark: shadow-model throughput with K models per device program (train_utils/batched.py).

For each K in --ks and compute dtype in --dtypes: a BatchedTrainer of K models (sharded over this
process's devices) trains one timed run of --steps steps after a first, compiling one, then infers
--infer_rows rows under --views views. From those it extrapolates a Fitzpatrick-sized shadow model
(--n_images images x --epochs epochs of training + --views-view inference of every image):

    <model>_<dtype>_k<K>_train_images_per_s      training images/s of the whole program (K models)
    <model>_<dtype>_k<K>_seconds_per_model       (training + inference of K models) / K, extrapolated
    <model>_<dtype>_k<K>_inference_share         inference's share of those seconds
    <model>_<dtype>_k<K>_compile_s               compile seconds (training + inference programs)

One figure per line. Defaults: WRN-28-2 at 64x64, batch 256, the paper's Fitzpatrick setting, sized
to take about 8 minutes on one H200. On a CPU, run it with tiny settings, e.g.

    python bench/gpu_campaign.py --model small_cnn --img_size 16 --batch_size 32 --steps 3 \\
        --ks 1,2,4 --dtypes float32 --infer_rows 256 --views 2
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import report  # noqa: E402


def measure(args, k: int, dtype: str) -> dict:
    """Prints (and returns) the figures of K models per program in `dtype`."""
    import jax
    import numpy as np

    from medleak.config import TrainConfig
    from medleak.train_utils.batched import BatchedTrainer, ModelJob
    from medleak.train_utils.training import Trainer

    rng = np.random.default_rng(0)
    run_size = args.steps * args.batch_size
    n_rows = max(2 * run_size, args.infer_rows)
    images = rng.integers(0, 256, (n_rows, args.img_size, args.img_size, 3), dtype=np.uint8)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n_rows)]
    config = TrainConfig(model=args.model, img_size=(args.img_size, args.img_size), epochs=1,
                         batch_size=args.batch_size, learning_rate=0.01, warmup=0, augment="weak",
                         eval_views=args.views, compute_dtype=dtype)
    trainer = Trainer(config, images, labels, "multiclass", expected_train_size=run_size,
                      eval_batch_size=args.eval_batch_size, steps_per_call=args.steps_per_call)
    batched = BatchedTrainer(trainer, k)
    jobs = [ModelJob(rng.choice(n_rows, run_size, replace=False), seed) for seed in range(k)]
    batched.train(jobs)  # compiles
    started = time.perf_counter()
    models = batched.train([ModelJob(job.train_indices, job.seed + 100) for job in jobs])
    jax.block_until_ready([m.ema_params for m in models])
    train_seconds = time.perf_counter() - started
    infer_images = images[:args.infer_rows]
    batched.images = jax.device_put(infer_images, batched.replicated)  # the inference rows only
    batched.infer_train_views(models)  # compiles
    started = time.perf_counter()
    batched.infer_train_views(models)
    infer_seconds = time.perf_counter() - started

    program_images_per_s = k * run_size / train_seconds
    # K models train (and infer) at once, so a model costs 1/K of the program's time
    per_model_train = args.n_images * args.epochs / program_images_per_s
    per_model_infer = args.n_images / args.infer_rows * infer_seconds / k
    name = f"{args.model}_{dtype}_k{k}"
    report(f"{name}_train_images_per_s", program_images_per_s, "img/s")
    report(f"{name}_seconds_per_model", per_model_train + per_model_infer, "s")
    report(f"{name}_inference_share", per_model_infer / (per_model_train + per_model_infer), "")
    report(f"{name}_compile_s", sum(batched.compile_seconds.values()), "s")
    return {"train_images_per_s": program_images_per_s, "seconds_per_model": per_model_train + per_model_infer}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn_28_2")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--steps_per_call", type=int, default=None, help="steps per device call (default: the Trainer's)")
    parser.add_argument("--ks", default="1,2,4,8,16,32", help="models per program, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--n_images", type=int, default=7400, help="training images of the extrapolated model")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the extrapolated model")
    parser.add_argument("--views", type=int, default=16, help="inference views per image")
    parser.add_argument("--infer_rows", type=int, default=2048, help="rows timed for inference")
    parser.add_argument("--eval_batch_size", type=int, default=512)
    args = parser.parse_args()

    import jax

    started = time.perf_counter()
    devices = jax.local_devices()
    print(f"device: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})", flush=True)
    for dtype in args.dtypes.split(","):
        for k in (int(v) for v in args.ks.split(",")):
            try:
                measure(args, k, dtype)
            except Exception as e:  # e.g. out of memory at large K: report it and go on
                print(f"{args.model}_{dtype}_k{k}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
    report("bench_wall_s", time.perf_counter() - started, "s")


if __name__ == "__main__":
    main()
