"""The uint8 image cache: content, keys, reuse, crash safety and concurrent builders."""

import dataclasses
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from medleak import io_utils
from medleak.data_utils import datasets, image_cache
from medleak.errors import MedleakError
from tests import layouts


def _reference_decode(path, size, mode):
    """The obviously-correct slow path: PIL open → convert → bilinear resize."""
    with Image.open(path) as img:
        return np.asarray(img.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def test_png_cache_matches_reference_decode_in_row_order(tmp_path):
    root = layouts.write_embed(tmp_path / "e", n_patients=4, size=(40, 32))
    table = datasets.load_dataset("embed", root, test_fraction="0.25")
    images, same = image_cache.cached_images(table, root, (20, 12), cache_dir=tmp_path / "c", num_workers=2)
    assert same is table
    assert isinstance(images, np.memmap) and images.dtype == np.uint8
    assert images.shape == (table.n_records, 20, 12, 1)
    for i, path in enumerate(table.df["path"]):
        np.testing.assert_array_equal(images[i, :, :, 0], _reference_decode(root / path, (20, 12), "L"))


def test_rgb_jpegs_and_label_signal_survive_resizing(tmp_path):
    root = layouts.write_fitzpatrick(tmp_path / "f", n_patients=9, size=(48, 48))
    table = datasets.load_dataset("fitzpatrick", root)
    images, _ = image_cache.cached_images(table, root, 16, cache_dir=tmp_path / "c")
    assert images.shape == (9, 16, 16, 3)
    for i, path in enumerate(table.df["path"]):
        reference = _reference_decode(root / path, (16, 16), "RGB").astype(int)
        assert np.abs(images[i].astype(int) - reference).mean() < 6  # JPEG draft mode decodes slightly differently
    # layouts draw class k as a bright square in grid cell k (2x2 grid for 3 classes)
    for image, label in zip(images, table.label_index()):
        row, col = divmod(int(label), 2)
        cell = image[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].mean()
        assert cell > image.mean() + 30


def test_npz_npy_and_deep_images_decode(tmp_path):
    root = layouts.write_fairvision(tmp_path / "v", n_patients=4, size=(20, 20))
    table = datasets.load_dataset("fairvision", root)
    images, _ = image_cache.cached_images(table, root, (10, 10), cache_dir=tmp_path / "c")
    with np.load(root / table.df["path"][0]) as scan:
        expected = np.asarray(Image.fromarray(scan["slo_fundus"]).resize((10, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images[0, :, :, 0], expected)

    ramp16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    np.save(tmp_path / "float.npy", np.linspace(-3, 5, 64).reshape(8, 8))
    np.save(tmp_path / "chw.npy", np.zeros((3, 8, 8), np.uint8) + np.array([10, 20, 30], np.uint8)[:, None, None])
    deep = image_cache.decode_image(tmp_path / "deep.png", (8, 8), 1)
    flt = image_cache.decode_image(tmp_path / "float.npy", (8, 8), 1)
    chw = image_cache.decode_image(tmp_path / "chw.npy", (8, 8), 3)
    assert deep.shape == flt.shape == (8, 8, 1) and chw.shape == (8, 8, 3)
    assert deep.min() == 0 and deep.max() == 255 and np.all(np.diff(deep[..., 0].ravel().astype(int)) >= 0)
    assert flt.min() == 0 and flt.max() == 255
    assert list(chw[0, 0]) == [10, 20, 30]


def test_warm_load_reuses_the_cache_and_changes_rebuild(tmp_path):
    root = layouts.write_chexpert(tmp_path / "x", n_patients=6)
    table = datasets.load_dataset("chexpert", root).split("train")
    cache = tmp_path / "c"
    first, _ = image_cache.cached_images(table, root, 16, cache_dir=cache)
    npy = image_cache.cache_path(table, 16, cache)
    meta = io_utils.read_json(npy.with_suffix(".json"))
    assert npy.name.startswith("train-16x16-c1-") and npy.parent.name == "chexpert"
    assert meta["table_hash"] == table.content_hash() and meta["n_records"] == table.n_records
    assert image_cache.verify_cache(npy)
    stamp = npy.stat().st_mtime_ns

    second, _ = image_cache.cached_images(table, root, 16, cache_dir=cache)
    assert npy.stat().st_mtime_ns == stamp  # not rebuilt
    np.testing.assert_array_equal(first, second)

    other_size = image_cache.cache_path(table, (16, 8), cache)
    changed = dataclasses.replace(table, df=table.df.iloc[1:].reset_index(drop=True))
    assert other_size != npy and image_cache.cache_path(changed, 16, cache) != npy
    smaller, _ = image_cache.cached_images(changed, root, 16, cache_dir=cache)
    np.testing.assert_array_equal(smaller, first[1:])
    assert len(list(cache.rglob("*.npy"))) == 2


def test_half_built_or_corrupt_cache_is_rebuilt(tmp_path):
    root = layouts.write_chexpert(tmp_path / "x", n_patients=4)
    table = datasets.load_dataset("chexpert", root)
    cache = tmp_path / "c"
    good, _ = image_cache.cached_images(table, root, 12, cache_dir=cache)
    good = np.array(good)
    npy = image_cache.cache_path(table, 12, cache)

    npy.with_suffix(".json").unlink()  # crash between the array rename and the sidecar
    rebuilt, _ = image_cache.cached_images(table, root, 12, cache_dir=cache)
    np.testing.assert_array_equal(rebuilt, good)

    io_utils.save_npy(npy, np.zeros((2, 12, 12, 1), np.uint8))  # wrong shape for the sidecar
    rebuilt, _ = image_cache.cached_images(table, root, 12, cache_dir=cache)
    np.testing.assert_array_equal(rebuilt, good)

    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    assert not image_cache.verify_cache(npy)


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(image_cache.ENV_CACHE_DIR, str(tmp_path / "envcache"))
    root = layouts.write_fitzpatrick(tmp_path / "f", n_patients=3)
    table = datasets.load_dataset("fitzpatrick", root)
    image_cache.cached_images(table, root, 8)
    assert len(list((tmp_path / "envcache" / "fitzpatrick").glob("all-8x8-c3-*.npy"))) == 1


def _build_in_process(root, cache, queue):
    from medleak.data_utils import datasets as ds, image_cache as ic  # fresh imports in the child
    table = ds.load_dataset("chexpert", root)
    images, _ = ic.cached_images(table, root, 24, cache_dir=cache, num_workers=1)
    queue.put((os.getpid(), io_utils.sha256_bytes(np.ascontiguousarray(images).tobytes())))


def test_concurrent_builders_do_not_corrupt_the_cache(tmp_path):
    root = layouts.write_chexpert(tmp_path / "x", n_patients=24, size=(64, 64))
    cache = tmp_path / "c"
    # spawn, not fork: the test process may already run JAX threads, and forking those can deadlock
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_build_in_process, args=(root, cache, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    pids, digests = zip(*results)
    assert len(set(digests)) == 1
    table = datasets.load_dataset("chexpert", root)
    npy = image_cache.cache_path(table, 24, cache)
    meta = io_utils.read_json(npy.with_suffix(".json"))
    assert meta["builder_pid"] in pids  # exactly one process built it; the others loaded it
    assert image_cache.verify_cache(npy)
    assert sorted(p.name for p in npy.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        [npy.name, npy.with_suffix(".json").name])  # no temp files left
    images, _ = image_cache.cached_images(table, root, 24, cache_dir=cache)
    assert io_utils.sha256_bytes(np.ascontiguousarray(images).tobytes()) == digests[0]


@pytest.mark.parametrize("size", [0, (4, -1)])
def test_bad_size_is_refused(tmp_path, size):
    root = layouts.write_fitzpatrick(tmp_path / "f", n_patients=3)
    table = datasets.load_dataset("fitzpatrick", root)
    with pytest.raises(MedleakError, match="img_size"):
        image_cache.cached_images(table, root, size, cache_dir=tmp_path / "c")


def test_a_cache_dir_that_cannot_be_created_is_a_one_line_error(tmp_path):
    # A MedleakError (bad input) stops the worker; a plain OSError would be retried as a failed
    # attempt of every run in turn until all their attempts are used up.
    root = layouts.write_fitzpatrick(tmp_path / "f", n_patients=3)
    table = datasets.load_dataset("fitzpatrick", root)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(MedleakError, match="--cache_dir"):
        image_cache.cached_images(table, root, 8, cache_dir=tmp_path / "file" / "cache")
