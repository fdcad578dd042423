"""Decode + resize a split's images once into a uint8 `.npy` (memmap-able) with a JSON sidecar.

The cache file is keyed by dataset, split, image size, channels and the records table's content
hash, so a changed table or size builds a new one. Building happens under a file lock and ends
with atomic renames (array first, sidecar last): the sidecar is the commit marker, so a reader
never trusts a half-built array, and concurrent processes asking for the same cache wait for one
builder instead of corrupting each other. The sidecar records the array's sha256
(`verify_cache` re-checks it; normal loads only check the header so they stay memmap-fast).

Decoders: .jpg/.jpeg/.png/... (PIL), .npz (the array named `table.image_key`), .npy. Integer
images deeper than 8 bits and float images are rescaled to 0–255 per image.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
from pathlib import Path

import filelock
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from medleak import io_utils
from medleak.errors import MedleakError

CACHE_VERSION = 1
ENV_CACHE_DIR = "MEDLEAK_CACHE_DIR"
N_LISTED = 5  # how many unreadable paths an error message names
BLOCK = 64  # images per worker task


def default_cache_dir() -> Path:
    """`$MEDLEAK_CACHE_DIR`, else `~/.cache/medleak`."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "medleak")


def cached_images(table, data_root, img_size, *, cache_dir=None, num_workers=None, skip_unreadable=False):
    """Returns `(images, table)`: `images` is a uint8 `(n, H, W, channels)` memmap in row order.

    `img_size` is `(H, W)` or an int. Missing or undecodable images raise one `MedleakError`
    naming how many and the first few paths; with `skip_unreadable` they are left out (listed in
    the sidecar and the log) and the returned table lacks those rows.
    """
    size = _size(img_size)
    table_hash = table.content_hash()
    npy_path = cache_path(table, size, cache_dir, table_hash=table_hash)
    meta = _read_valid(npy_path, table, table_hash, size, skip_unreadable)
    if meta is None:
        try:
            npy_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MedleakError(f"--cache_dir: cannot create {npy_path.parent} ({e.strerror or e}); "
                               f"set --cache_dir or ${ENV_CACHE_DIR} to a writable folder") from None
        with filelock.FileLock(str(npy_path) + ".lock"):
            meta = _read_valid(npy_path, table, table_hash, size, skip_unreadable)  # built meanwhile?
            if meta is None:
                meta = _build(table, data_root, size, npy_path, table_hash, num_workers, skip_unreadable)
    images = io_utils.load_npy(npy_path, mmap=True)
    unreadable = meta["unreadable"]
    if unreadable:
        logging.warning("%s: left out %d unreadable image(s), e.g. %s", table.name, len(unreadable),
                        [u["path"] for u in unreadable[:N_LISTED]])
        keep = np.ones(table.n_records, dtype=bool)
        keep[[u["row"] for u in unreadable]] = False
        table = dataclasses.replace(table, df=table.df[keep].reset_index(drop=True))
    return images, table


def cache_path(table, img_size, cache_dir=None, *, table_hash=None) -> Path:
    """`<cache_dir>/<dataset>/<split>-<H>x<W>-c<channels>-<key>.npy` for this table and size."""
    height, width = _size(img_size)
    table_hash = table_hash or table.content_hash()
    splits = sorted(set(table.df["split"]))
    split = splits[0] if len(splits) == 1 else "all"
    key = hashlib.sha256(f"v{CACHE_VERSION}|{table_hash}|{height}x{width}|{table.channels}".encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / table.name / f"{split}-{height}x{width}-c{table.channels}-{key[:16]}.npy"


def verify_cache(npy_path) -> bool:
    """True if the array file still has the sha256 its sidecar recorded."""
    npy_path = Path(npy_path)
    try:
        meta = io_utils.read_json(npy_path.with_suffix(".json"))
        return io_utils.sha256_file(npy_path) == meta["images_sha256"]
    except (OSError, ValueError, KeyError):
        return False


def decode_image(path, img_size, channels, image_key=None) -> np.ndarray:
    """Decodes one image file and resizes it (bilinear, antialiased) → uint8 `(H, W, channels)`."""
    height, width = _size(img_size)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if image_key not in archive.files:
                raise ValueError(f"no array {image_key!r} in the .npz (has {archive.files[:6]})")
            image = _array_to_pil(archive[image_key])
    elif suffix == ".npy":
        image = _array_to_pil(np.load(path, allow_pickle=False))
    else:
        with Image.open(path) as opened:
            # JPEG only: let the decoder downscale by a power of two first (much faster for big images).
            opened.draft("L" if channels == 1 else "RGB", (width, height))
            opened.load()
            image = _array_to_pil(np.asarray(opened)) if opened.mode in ("I", "I;16", "I;16B", "F") else opened.copy()
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def _array_to_pil(array) -> Image.Image:
    """An image array of any dtype/layout → 8-bit PIL image (HW, HW1, HW3 or 1HW/3HW)."""
    array = np.squeeze(np.asarray(array))
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"array of shape {array.shape} is not an image")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError("image array holds NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low >= 0 and high <= 1:
            array = array * 255.0
        elif low < 0 or high > 255:
            array = (array - low) / max(high - low, 1e-12) * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _size(img_size):
    """`img_size` as a checked (height, width) tuple of positive ints."""
    try:
        if isinstance(img_size, (int, np.integer)):
            height = width = int(img_size)
        else:
            height, width = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise MedleakError(f"img_size must be an int or (height, width), got {img_size!r}") from None
    if height <= 0 or width <= 0:
        raise MedleakError(f"img_size must be positive, got {img_size!r}")
    return height, width


def _read_valid(npy_path, table, table_hash, size, skip_unreadable):
    """The sidecar if the cache at `npy_path` is complete and matches this request, else None."""
    sidecar = npy_path.with_suffix(".json")
    try:
        meta = io_utils.read_json(sidecar)
        images = io_utils.load_npy(npy_path, mmap=True)
    except (OSError, ValueError):
        return None
    n_cached = table.n_records - len(meta.get("unreadable", []))
    if (meta.get("version") != CACHE_VERSION or meta.get("table_hash") != table_hash
            or tuple(meta.get("img_size", ())) != size or meta.get("channels") != table.channels
            or images.dtype != np.uint8 or images.shape != (n_cached, *size, table.channels)):
        return None
    if meta["unreadable"] and not skip_unreadable:
        return None  # rebuild: the user may have fixed the files since
    return meta


def _build(table, data_root, size, npy_path, table_hash, num_workers, skip_unreadable):
    n, channels = table.n_records, table.channels
    root = Path(data_root)
    paths = table.df["path"].astype(str).tolist()
    workers = int(num_workers or min(32, os.cpu_count() or 1))
    failures = {}
    with io_utils.atomic_path(npy_path, suffix=".npy") as tmp:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *size, channels))

        def decode_block(start):
            failed = {}
            for i in range(start, min(start + BLOCK, n)):
                try:
                    images[i] = decode_image(root / paths[i], size, channels, table.image_key)
                except FileNotFoundError:
                    failed[i] = "file not found"
                except Exception as e:  # noqa: BLE001 — any decoder failure is reported per file
                    failed[i] = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            return min(start + BLOCK, n) - start, failed

        with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
                tqdm(total=n, desc=f"caching {table.name} images {size[0]}x{size[1]}", unit="img") as bar:
            for done, failed in pool.map(decode_block, range(0, n, BLOCK)):
                failures.update(failed)
                bar.update(done)
        unreadable = [{"row": i, "path": paths[i], "reason": failures[i]} for i in sorted(failures)]
        if unreadable and not skip_unreadable:
            del images
            raise _unreadable_error(table, data_root, unreadable)
        if unreadable:
            images = _drop_rows(images, tmp, sorted(failures))
        images.flush()
        del images
        _fsync(tmp)
    meta = {
        "version": CACHE_VERSION, "dataset": table.name, "split": npy_path.name.split("-")[0],
        "img_size": list(size), "channels": channels, "n_records": n, "table_hash": table_hash,
        "images_sha256": io_utils.sha256_file(npy_path), "unreadable": unreadable,
        "data_root": str(data_root), "builder_pid": os.getpid(),
    }
    io_utils.write_json(npy_path.with_suffix(".json"), meta)
    return meta


def _drop_rows(images, tmp, rows):
    """Rewrites the temp array without `rows` (only when unreadable images are skipped)."""
    keep = np.setdiff1d(np.arange(len(images)), rows)
    compact_path = Path(str(tmp) + ".compact.npy")
    compact = np.lib.format.open_memmap(compact_path, mode="w+", dtype=np.uint8, shape=(len(keep), *images.shape[1:]))
    for start in range(0, len(keep), 4096):
        compact[start:start + 4096] = images[keep[start:start + 4096]]
    compact.flush()
    del images, compact
    os.replace(compact_path, tmp)
    return np.load(tmp, mmap_mode="r+", allow_pickle=False)


def _fsync(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _unreadable_error(table, data_root, unreadable) -> MedleakError:
    listed = "; ".join(f"{u['path']} ({u['reason']})" for u in unreadable[:N_LISTED])
    more = f" and {len(unreadable) - N_LISTED} more" if len(unreadable) > N_LISTED else ""
    return MedleakError(
        f"{table.name}: {len(unreadable)} of {table.n_records} image(s) could not be read under "
        f"--data_root={data_root}: {listed}{more}; fix or remove them, or pass --skip_unreadable to leave them out"
    )
