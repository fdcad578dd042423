"""Benchmark: xrv_scores.py's per-image cost — TorchXRayVision preprocessing and DenseNet-121 inference.

Generates CheXpert-size JPEGs (320 x 390 px, like CheXpert-v1.0-small), times TorchXRayVision's
preprocessing (decode, [-1024, 1024] scaling, centre crop, resize to 224) per image, then raw-logit
inference of two randomly initialised DenseNet-121 models (target + reference, as xrv_scores.py runs
them) through `inference.model_logits`, on the CPU unless a GPU is visible. Needs requirements-xrv.txt.

    python bench/xrv_inference.py [--n_images 32 --batch_size 16 --num_workers 0 --device auto]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchxrayvision as xrv  # noqa: E402

from bench._timing import report  # noqa: E402
from medleak.xrv import inference  # noqa: E402
from medleak.xrv.preprocess import load_preprocessed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_images", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = inference.resolve_device(args.device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="medleak-bench-xrv-") as tmp:
        paths = []
        for i in range(args.n_images):
            image = rng.normal(120, 40, (390, 320)).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(Path(tmp) / f"{i}.jpg", quality=90)
            paths.append(f"{i}.jpg")

        start = time.perf_counter()
        for path in paths:
            load_preprocessed(tmp, path)
        preprocess_s = (time.perf_counter() - start) / len(paths)

        models = {}
        for name in ("target", "reference"):
            model = xrv.models.DenseNet(weights=None).eval().to(device)
            models[name] = (model, np.arange(8))
        inference.model_logits(models, tmp, paths[: args.batch_size], batch_size=args.batch_size, device=device,
                               desc="warm-up")
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        inference.model_logits(models, tmp, paths, batch_size=args.batch_size, num_workers=args.num_workers,
                               device=device, desc="bench")
        if device.type == "cuda":
            torch.cuda.synchronize()
        total_s = time.perf_counter() - start

    report("xrv_device", str(device))
    report("xrv_preprocess_per_image", preprocess_s * 1e3, "ms")
    report("xrv_two_models_per_image", total_s / args.n_images * 1e3, "ms")
    report("xrv_two_models_rate", args.n_images / total_s, "images/s")
    report("xrv_hours_for_default_audit", 2 * 2 * 25_000 * total_s / args.n_images / 3600, "h")


if __name__ == "__main__":
    main()
