"""TorchXRayVision's DenseNet-121 weights: where they live, how they load, which outputs we keep.

TorchXRayVision keeps weights in a cache folder (`~/.torchxrayvision/models_data/` unless told
otherwise) under the file name of the release URL, e.g.
`chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt`. Its own loader downloads a missing
file; ours never does unless asked (`download=True`), so an audit on a machine without network
access fails with a one-line message naming the file.

The released files are whole pickled `DenseNet` modules (TorchXRayVision saves them with
`torch.save(model)` and loads them with `weights_only=False`). We unpickle with `weights_only=True`
and an allow-list of exactly the classes such a file may contain (TorchXRayVision's DenseNet parts
and the torch.nn layers they are made of), so a weights file cannot run code; a plain state dict
loads the same way. A file that needs anything else is refused unless `trust_pickle=True`, which
loads it the way TorchXRayVision itself does.

Calibration off: TorchXRayVision sets `op_threshs` on every pretrained model, which makes `forward`
apply a sigmoid and then a piecewise-linear "operating point" rescaling. We build the network with
`weights=None` (no `op_threshs`, `apply_sigmoid=False`) and load the weights into it, so `forward`
returns the raw pre-sigmoid outputs of the final linear layer.
"""

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchxrayvision as xrv
from absl import logging

from medleak.errors import MedleakError

# Dataset → the TorchXRayVision model trained on it (the audit's targets), and the reference model.
TARGET_MODELS = {"chexpert": "densenet121-res224-chex", "mimic": "densenet121-res224-mimic_ch"}
REFERENCE_MODEL = "densenet121-res224-pc"  # trained on PadChest: saw neither CheXpert nor MIMIC

# TorchXRayVision's pathology name → the CheXpert/MIMIC label column it corresponds to.
LABEL_COLUMNS = {"Effusion": "Pleural Effusion"}

_PICKLE_CLASSES = (
    xrv.models.DenseNet, xrv.models._DenseBlock, xrv.models._DenseLayer, xrv.models._Transition,
    nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, set,
)


def default_weights_dir() -> Path:
    """TorchXRayVision's own cache folder (`xrv.utils.get_cache_dir()`)."""
    return Path(xrv.utils.get_cache_dir())


def model_info(name: str) -> dict:
    """TorchXRayVision's registry entry (weights URL, 18 output names, resolution) for a DenseNet."""
    if name not in xrv.models.model_urls or not name.startswith("densenet"):
        known = sorted(k for k in xrv.models.model_urls if k.startswith("densenet121"))
        raise MedleakError(f"unknown TorchXRayVision model {name!r}; known DenseNets: {known}")
    return xrv.models.model_urls[name]


def weights_filename(name: str) -> str:
    """The file name TorchXRayVision stores a model's weights under (the release URL's basename)."""
    return os.path.basename(model_info(name)["weights_url"])


def weights_path(name: str, weights_dir=None) -> Path:
    """Where TorchXRayVision's cache layout puts a model's weights inside `weights_dir`."""
    folder = default_weights_dir() if weights_dir in (None, "") else Path(weights_dir).expanduser()
    return folder / weights_filename(name)


def ensure_weights(name: str, weights_dir=None, download: bool = False) -> Path:
    """The weights file of `name`; downloads it with TorchXRayVision's downloader only if `download`."""
    path = weights_path(name, weights_dir)
    if path.is_file():
        return path
    url = model_info(name)["weights_url"]
    if not download:
        raise MedleakError(
            f"{path}: TorchXRayVision weights for {name} not found; download {url} into {path.parent} "
            "(or point --weights_dir at the folder that holds it, or pass --download)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        xrv.models.get_weights(name, cache_dir=str(path.parent))
    except Exception as e:  # network errors come in many types; the user needs one line
        raise MedleakError(f"downloading {url} to {path} failed ({type(e).__name__}: {e})") from None
    if not path.is_file():
        raise MedleakError(f"downloading {url} did not create {path}")
    return path


def read_state_dict(path, trust_pickle: bool = False) -> dict:
    """A weights file's state dict, from a state dict or a pickled TorchXRayVision DenseNet."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(_PICKLE_CLASSES)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]
            raise MedleakError(
                f"{path}: the weights file needs objects outside TorchXRayVision's model classes ({reason}); "
                "if it came from TorchXRayVision's release page, pass --trust_pickle to load it as "
                "TorchXRayVision does") from None
        logging.warning("%s: loading with weights_only=False (--trust_pickle)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise MedleakError(f"{path}: not a readable torch weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise MedleakError(f"{path}: holds a {type(obj).__name__}, expected a DenseNet or its state dict")


def load_model(name: str, weights_dir=None, *, download: bool = False, trust_pickle: bool = False,
               device="cpu") -> nn.Module:
    """TorchXRayVision DenseNet `name` in eval mode on `device`, returning raw logits (18 outputs)."""
    info = model_info(name)
    path = ensure_weights(name, weights_dir, download)
    state = read_state_dict(path, trust_pickle)
    # weights=None: no op_threshs, no sigmoid, no automatic resize; 18 outputs like every xrv DenseNet.
    # Built on the meta device (no memory, no random init), then the loaded tensors are assigned.
    with torch.device("meta"):
        model = xrv.models.DenseNet(weights=None, num_classes=len(info["labels"]), apply_sigmoid=False)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise MedleakError(f"{path}: does not match TorchXRayVision's DenseNet-121 (missing "
                           f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.op_threshs = None
    model.targets = list(info["labels"])
    model.weights = name
    return model.eval().to(device)


def shared_labels(model_names, label_names) -> tuple:
    """(xrv output names, dataset label columns) that every model predicts and the dataset labels.

    Ordered as TorchXRayVision's outputs; e.g. chex + mimic_ch + pc on CheXpert/MIMIC gives the 8
    findings Atelectasis, Consolidation, Pneumothorax, Edema, Effusion, Pneumonia, Cardiomegaly,
    Fracture.
    """
    outputs = list(model_info(model_names[0])["labels"])
    common = [n for n in outputs if n and all(n in model_info(m)["labels"] for m in model_names)]
    pairs = [(n, LABEL_COLUMNS.get(n, n)) for n in common if LABEL_COLUMNS.get(n, n) in label_names]
    if not pairs:
        raise MedleakError(f"models {list(model_names)} share no output with the dataset's labels")
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def output_indices(name: str, xrv_names) -> np.ndarray:
    """Positions of `xrv_names` among model `name`'s 18 outputs."""
    labels = list(model_info(name)["labels"])
    return np.array([labels.index(n) for n in xrv_names], dtype=np.int64)

