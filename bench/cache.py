"""Benchmark: first decode of a JPEG dataset into the image cache vs a warm load of that cache.

Generates the synthetic CheXpert-layout dataset (about 3.5 images per patient, JPEGs of
`--src_size` px), builds the 64x64 uint8 cache once (cold: decode + resize + write + hash), then
loads it again (warm: key check + memmap + reading every byte into RAM). Target: warm ≥ 10x faster.

    python bench/cache.py [--n_patients 1000 --src_size 192 --img_size 64 --num_workers N]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medleak.data_utils import datasets, image_cache, synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_patients", type=int, default=1000)
    parser.add_argument("--src_size", type=int, default=192)
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medleak-bench-cache-") as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        synthetic.write_synthetic_chexpert(root, n_patients=args.n_patients, img_size=args.src_size, seed=0)
        table = datasets.load_dataset("chexpert", root).split("train")

        start = time.perf_counter()
        cold, _ = image_cache.cached_images(table, root, args.img_size, cache_dir=cache,
                                            num_workers=args.num_workers)
        cold_checksum = int(np.asarray(cold, dtype=np.uint64).sum())
        cold_s = time.perf_counter() - start
        del cold

        start = time.perf_counter()
        warm, _ = image_cache.cached_images(table, root, args.img_size, cache_dir=cache)
        loaded = np.array(warm)  # read every byte: what training does when it puts the images on device
        warm_s = time.perf_counter() - start
        assert int(loaded.astype(np.uint64).sum()) == cold_checksum

    print(f"cache_images: {table.n_records} images")
    print(f"cache_cold_decode: {cold_s:.3f} s")
    print(f"cache_cold_rate: {table.n_records / cold_s:.0f} images/s")
    print(f"cache_warm_load: {warm_s:.4f} s")
    print(f"cache_speedup: {cold_s / warm_s:.1f} x")


if __name__ == "__main__":
    main()
