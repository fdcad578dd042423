"""TorchXRayVision's image pipeline: [-1024, 1024] scaling, centre crop of the long side, 224 × 224."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install -r requirements-xrv.txt)")

from medleak.errors import MedleakError  # noqa: E402
from medleak.xrv.preprocess import load_preprocessed, xrv_preprocess  # noqa: E402


def test_intensities_map_to_plus_minus_1024_and_size_is_224():
    image = np.zeros((40, 40), dtype=np.uint8)
    image[:, 20:] = 255
    out = xrv_preprocess(image)
    assert out.shape == (1, 224, 224) and out.dtype == np.float32
    assert out.min() == pytest.approx(-1024.0) and out.max() == pytest.approx(1024.0)
    inner = out[0, 8:-8]  # skimage's resize (mode="constant") blends the outermost pixels with 0
    assert inner[:, 8:100].max() == pytest.approx(-1024.0) and inner[:, 124:-8].min() == pytest.approx(1024.0)


def test_centre_crop_drops_the_long_side_margins():
    wide = np.full((30, 50), 128, dtype=np.uint8)
    wide[:, :10] = 0  # outside the central 30 × 30 square
    wide[:, 40:] = 255
    out = xrv_preprocess(wide)
    expected = (2 * 128 / 255 - 1) * 1024
    np.testing.assert_allclose(out[0, 8:-8, 8:-8], expected, atol=1e-3)
    tall = wide.T.copy()
    np.testing.assert_allclose(xrv_preprocess(tall)[0, 8:-8, 8:-8], expected, atol=1e-3)


def test_colour_images_use_the_first_channel(tmp_path):
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1:] = 10
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    out = load_preprocessed(tmp_path, "colour.png")
    np.testing.assert_allclose(out[0, 8:-8, 8:-8], (2 * 200 / 255 - 1) * 1024, atol=1e-3)


def test_bad_images_are_one_line_errors(tmp_path):
    with pytest.raises(MedleakError, match="8-bit"):
        xrv_preprocess(np.full((10, 10), 4000, dtype=np.uint16), source="scan.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(MedleakError, match="broken.jpg"):
        load_preprocessed(tmp_path, "broken.jpg")
    with pytest.raises(MedleakError, match="not found"):
        load_preprocessed(tmp_path, "missing.jpg")
    with pytest.raises(MedleakError, match="2-D"):
        xrv_preprocess(np.zeros(5, dtype=np.uint8))
