"""EMBED DICOM → PNG preparation."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from medleak.data_utils import datasets, embed, embed_prepare, image_cache
from medleak.errors import MedleakError
from tests import layouts

HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None


def test_to_uint8_image_scales_inverts_and_keeps_aspect():
    ramp = np.arange(4000, 4000 + 40 * 20, dtype=np.uint16).reshape(40, 20)
    image = embed_prepare.to_uint8_image(ramp, "MONOCHROME2", max_size=0)
    assert image.dtype == np.uint8 and image.shape == (40, 20)
    assert image[0, 0] == 0 and image[-1, -1] == 255 and np.all(np.diff(image.ravel().astype(int)) >= 0)
    inverted = embed_prepare.to_uint8_image(ramp, "MONOCHROME1", max_size=0)
    np.testing.assert_array_equal(inverted.astype(int), 255 - image.astype(int))
    small = embed_prepare.to_uint8_image(ramp, "MONOCHROME2", max_size=10)
    assert small.shape == (10, 5)
    assert embed_prepare.to_uint8_image(np.full((3, 3), 7), max_size=0).max() == 0
    with pytest.raises(ValueError):
        embed_prepare.to_uint8_image(np.zeros(5))


def _write_dicom(path, pixels, photometric):
    """A real, uncompressed DICOM file written with pydicom."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "MG", photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_prepare_converts_the_dicom_tree_for_the_loader(tmp_path):
    root = layouts.write_embed(tmp_path / "embed", n_patients=2)
    for png in (root / "png").rglob("*.png"):
        png.unlink()  # the layout ships PNGs; here they must come from DICOMs
    dicom_root = tmp_path / "dicoms"
    if not HAVE_PYDICOM:
        # pydicom is an optional dependency: without it the command says how to get it
        with pytest.raises(MedleakError, match="pip install pydicom"):
            embed_prepare.prepare(root, dicom_root)
        return
    meta = pd.read_csv(root / "tables/EMBED_OpenData_metadata.csv")
    rng = np.random.default_rng(0)
    for i, path in enumerate(meta["anon_dicom_path"]):
        pixels = rng.integers(0, 4096, (60, 40))
        _write_dicom(dicom_root / embed.dicom_relpath(path, embed.OPTIONS["dicom_prefix"][0]), pixels,
                     "MONOCHROME1" if i % 2 else "MONOCHROME2")
    first = embed_prepare.prepare(root, dicom_root, max_size=30, num_workers=2)
    n_views = int(meta["ViewPosition"].isin(["MLO", "CC"]).sum())
    assert (first["converted"], first["present"], first["failed"]) == (n_views, 0, 0)
    again = embed_prepare.prepare(root, dicom_root, max_size=30)
    assert (again["converted"], again["present"]) == (0, n_views)  # resumable
    table = datasets.load_dataset("embed", root, test_fraction="0.5")
    images, _ = image_cache.cached_images(table, root, (30, 20), cache_dir=tmp_path / "c")
    assert images.shape == (table.n_records, 30, 20, 1) and images.std() > 10


def test_prepare_bad_input(tmp_path):
    root = layouts.write_embed(tmp_path / "embed", n_patients=2)
    if HAVE_PYDICOM:
        with pytest.raises(MedleakError, match="--dicom_root"):
            embed_prepare.prepare(root, tmp_path / "nowhere")
    else:
        with pytest.raises(MedleakError, match="pydicom"):
            embed_prepare.prepare(root, tmp_path / "nowhere")
