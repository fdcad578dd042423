"""Saved models: a trained model's evaluation weights and config in a pickle-free directory.

`--eval_only` writes one into `<logdir>/eval_only/model/`, and `--save_weights` into every run
directory (`runs/run_NNNN/model/`). The format (docs/RUNDIR.md "Saved models"):

    model/model.json              {"format": "medleak-model", "version": 1, "train_config": {…},
                                   "n_classes", "task", "channels", "label_names",
                                   "variables": [{"path": "params/Conv_0/kernel", "shape", "dtype"}, …]}
    model/variables/<path>.npy    one array per leaf of the flax variables ({"params": EMA weights,
                                   "batch_stats": … for BatchNorm models}), plain .npy (no pickle)

Any numpy reader can use the arrays; `load_model(directory)` rebuilds the flax model from the config
and returns a `SavedModel` whose `logits(images)` are the test logits the run recorded.

    model = medleak.load_model("logs/chexpert/eval_only/model")
    logits = model.logits(uint8_images)             # (n, C) float32, same preprocessing as training
"""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medleak.config import TrainConfig
from medleak.errors import MedleakError
from medleak.io_utils import load_npy, make_dirs, read_json, save_npy, write_json

FORMAT = "medleak-model"
VERSION = 1
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # flax module and variable names: safe as file names


def save_model(directory, variables: dict, *, config: TrainConfig, n_classes: int, task: str, channels: int,
               label_names=None, trained_on=None) -> Path:
    """Writes `variables` (e.g. `TrainedModel.eval_variables`) and the (resolved) `config` of a model
    with `n_classes` outputs on `channels`-channel images into `directory`; `trained_on`
    (`finetune.training_record`: dataset name and a hash of its training patients) lets --init_from
    refuse fine-tuning on the same patients."""
    directory = make_dirs(directory)
    entries = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = [str(getattr(key, "key", key)) for key in key_path]
        if not all(_NAME.match(name) and name not in (".", "..") for name in names):
            raise ValueError(f"variable path {names} cannot be written as file names")
        array = np.asarray(leaf)
        dtype = array.dtype.name
        if array.dtype.kind not in "biuf":  # bfloat16 (ml_dtypes) has no .npy type: stored as float32
            array = array.astype(np.float32)
        path = "/".join(names)
        save_npy(directory / VARIABLES_DIR / f"{path}.npy", array)
        entries.append({"path": path, "shape": list(array.shape), "dtype": dtype})
    write_json(directory / MODEL_FILE, {
        "format": FORMAT, "version": VERSION, "train_config": config.to_dict(), "n_classes": int(n_classes),
        "task": task, "channels": int(channels),
        "label_names": None if label_names is None else [str(name) for name in label_names],
        "variables": entries, "trained_on": trained_on,
    })
    return directory


@dataclasses.dataclass
class SavedModel:
    """A model loaded by `load_model`: the flax module, its variables and how it was trained."""

    model: object  # flax.linen.Module built by training.config_model
    variables: dict
    config: TrainConfig
    task: str
    channels: int
    label_names: list | None
    trained_on: dict | None = None  # {"dataset", "n_patients", "patients_hash"} (finetune.training_record)
    directory: Path | None = None

    def view_logits(self, images, n_views: int | None = None, batch_size: int | None = None) -> np.ndarray:
        """float32 (n, V, C) logits under the audit's evaluation views (default: the config's V)."""
        from medleak.train_utils import inference

        images = np.asarray(images)
        height, width = self.config.img_size
        if images.dtype != np.uint8 or images.shape[1:] != (height, width, self.channels):
            raise MedleakError(f"images must be uint8 (n, {height}, {width}, {self.channels}) as in the image "
                               f"cache, got {images.dtype} {images.shape}")
        batch_size = int(batch_size or self.config.micro_batch_size)
        on_device = jax.device_put(images)
        program = inference.compile_view_logits(self.model, self.variables, on_device, batch_size,
                                                int(n_views or self.config.eval_views), self.config.augment)
        return inference.view_logits(program, self.variables, on_device)

    def logits(self, images, batch_size: int | None = None) -> np.ndarray:
        """float32 (n, C) logits of the clean images (what the run's test_logits.npy holds)."""
        return self.view_logits(images, 1, batch_size)[:, 0]


def load_model(directory) -> SavedModel:
    """Rebuilds a model written by `save_model` (a run's or eval_only's `model/` directory)."""
    from medleak.train_utils.training import config_model

    directory = Path(directory)
    document_path = directory / MODEL_FILE
    if not document_path.is_file():
        raise MedleakError(f"{document_path}: missing; pass a model directory written by --eval_only "
                           "or --save_weights (…/model)")
    document = read_json(document_path)
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise MedleakError(f"{document_path}: not a {FORMAT} version {VERSION} file")
    config = TrainConfig.from_dict(document["train_config"])
    model = config_model(config, int(document["n_classes"]))
    sample = jnp.zeros((1, *config.img_size, int(document["channels"])), jnp.float32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
    variables = {}
    for entry in document["variables"]:
        names = entry["path"].split("/")
        if not all(_NAME.match(name) and name not in (".", "..") for name in names):
            raise MedleakError(f"{document_path}: bad variable path {entry['path']!r}")
        array = load_npy(directory / VARIABLES_DIR / f"{entry['path']}.npy")
        node = variables
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = jnp.asarray(array, dtype=jnp.dtype(entry["dtype"]))
    if _leaf_shapes(variables) != _leaf_shapes(expected):
        raise MedleakError(f"{directory}: the saved variables do not fit the {config.model} model its "
                           f"model.json describes; the directory was changed after it was written")
    return SavedModel(model=model, variables=variables, config=config, task=document["task"],
                      channels=int(document["channels"]), label_names=document["label_names"],
                      trained_on=document.get("trained_on"), directory=directory)


def _leaf_shapes(tree) -> list:
    return [(jax.tree_util.keystr(path), tuple(leaf.shape), jnp.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
