"""TorchXRayVision's image pipeline, as its datasets and training script apply it.

`CheX_Dataset.__getitem__` / `MIMIC_Dataset.__getitem__` read the JPEG, scale 8-bit intensities to
[-1024, 1024] (`xrv.utils.normalize(img, 255, reshape=True)`, which keeps the first channel of a
colour image and adds a channel axis), then `train_model.py` applies `XRayCenterCrop()` (square crop
on the long side) and `XRayResizer(224)` (skimage bilinear resize). We call those same functions.
"""

from pathlib import Path

import numpy as np
import torchxrayvision as xrv
from PIL import Image, UnidentifiedImageError

from medleak.errors import MedleakError

INPUT_SIZE = 224  # every densenet121-res224-* model


def read_image(path) -> np.ndarray:
    """The image's pixels as stored: (H, W) for grayscale, (H, W, 3|4) for colour."""
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except FileNotFoundError:
        raise MedleakError(f"{path}: image not found (check --data_root)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MedleakError(f"{path}: cannot be decoded as an image ({e})") from None


def xrv_preprocess(image: np.ndarray, size: int = INPUT_SIZE, source="image") -> np.ndarray:
    """float32 (1, size, size) in [-1024, 1024]: normalise, centre-crop, resize (TorchXRayVision's)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise MedleakError(f"{source}: expected a 2-D image, got an array of shape {image.shape}")
    try:
        scaled = xrv.utils.normalize(image, maxval=255, reshape=True)
    except ValueError:
        raise MedleakError(f"{source}: pixel values go up to {image.max()}; TorchXRayVision's models "
                           "expect 8-bit images (0-255)") from None
    cropped = xrv.datasets.XRayCenterCrop()(scaled)
    return xrv.datasets.XRayResizer(size)(cropped).astype(np.float32)


def load_preprocessed(data_root, relpath, size: int = INPUT_SIZE) -> np.ndarray:
    """Reads `data_root/relpath` and applies `xrv_preprocess`."""
    path = Path(data_root) / relpath
    return xrv_preprocess(read_image(path), size, source=str(path))
