"""Starting from pretrained weights (`--init_from=DIR --finetune=all|head`; docs/TRANSFER.md).

`DIR` is a model saved by medleak (`--eval_only`'s `eval_only/model/` or a run's `model/`). Every
parameter except the classification head (`optim.HEAD`) starts from the saved one. The head keeps
the saved rows of the labels both label sets share (`data_utils.label_maps.shared_labels`: CheXpert's
'Pleural Effusion' is ChestX-ray14's 'Effusion') and gets a fresh initialisation, from the run's
seed, for the others; with no label in common the whole head is fresh. `--finetune=head` trains
the head only (optim.trainable_mask: the body is a constant of the loss and gets no update).

In a campaign every shadow model starts from the same weights; plan.json records their hash
(`model_hash`), since an attacker who knows the public pretrained model knows them too. The saved
model records what it was trained on (`training_record`: dataset name and a hash of its set of
training patients, not the ids); `check_disjoint` refuses to fine-tune on the dataset it was
pretrained on, where patients would be shared between the "public" pretraining and the private
fine-tuning, outside the DP accounting.
"""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medleak.config import TrainConfig
from medleak.data_utils.label_maps import shared_labels
from medleak.errors import MedleakError
from medleak.train_utils.optim import HEAD


def patient_set_hash(patient_ids) -> str:
    """sha256 of the sorted distinct patient ids (the same set gives the same hash, whatever order)."""
    ids = sorted({str(p) for p in np.asarray(patient_ids).reshape(-1)})
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def training_record(dataset: str, patient_ids) -> dict:
    """What a saved model records about its training data (`saved_model.save_model(trained_on=…)`)."""
    return {"dataset": str(dataset), "n_patients": len({str(p) for p in np.asarray(patient_ids).reshape(-1)}),
            "patients_hash": patient_set_hash(patient_ids)}


def model_hash(directory) -> str:
    """sha256 over a saved model's model.json and its variable files (in model.json's order)."""
    from medleak.io_utils import read_json
    from medleak.train_utils.saved_model import MODEL_FILE, VARIABLES_DIR

    directory = Path(directory)
    digest = hashlib.sha256((directory / MODEL_FILE).read_bytes())
    for entry in read_json(directory / MODEL_FILE)["variables"]:
        digest.update(entry["path"].encode())
        digest.update((directory / VARIABLES_DIR / f"{entry['path']}.npy").read_bytes())
    return digest.hexdigest()


def load_pretrained(config: TrainConfig):
    """The SavedModel `--init_from` names, checked against the architecture being trained."""
    from medleak.train_utils.saved_model import load_model

    if not Path(config.init_from, "model.json").is_file():
        raise MedleakError(f"--init_from={config.init_from}: no model.json there; pass a model directory written "
                           "by --eval_only or --save_weights (…/model)")
    saved = load_model(config.init_from)
    for name in ("model", "norm", "activation"):
        if getattr(saved.config, name) != getattr(config, name):
            raise MedleakError(f"--init_from={config.init_from} is a {name}={getattr(saved.config, name)} model; "
                               f"train it with --{name}={getattr(saved.config, name)}")
    return saved


def check_disjoint(saved, dataset: str, train_patient_ids) -> None:
    """Refuses fine-tuning on the dataset (or the very patients) the pretrained model was trained on."""
    trained_on = getattr(saved, "trained_on", None) or {}
    if not trained_on:
        return
    same_patients = trained_on.get("patients_hash") == patient_set_hash(train_patient_ids)
    if same_patients or trained_on.get("dataset") == dataset:
        what = "the same training patients" if same_patients else f"the same dataset ({dataset})"
        raise MedleakError(f"--init_from={saved.directory} was pretrained on {what}: its patients would be shared "
                           f"with the fine-tuning data outside the DP accounting; pretrain on another dataset")


def head_columns(saved_labels, labels, saved_classes: int, n_classes: int) -> list:
    """[(saved column, new column)] of head rows kept: the labels both share (by meaning); without
    label names, all columns when the counts agree."""
    if saved_labels is None or labels is None:
        return [(c, c) for c in range(n_classes)] if saved_classes == n_classes else []
    try:
        return [(i, j) for i, j, _ in shared_labels(saved_labels, labels)]
    except MedleakError:  # no label in common: the whole head is re-initialised
        return []


def pretrained_initializer(config: TrainConfig, model, n_classes: int, label_names=None):
    """`initial_variables(key, sample) -> variables` for the Trainer: the saved variables, with the
    head's kept columns (`head_columns`) copied into a fresh head drawn from `key`."""
    saved = load_pretrained(config)
    saved_classes = int(np.asarray(saved.variables["params"][HEAD]["bias"]).shape[0])
    pairs = head_columns(saved.label_names, None if label_names is None else list(label_names),
                         saved_classes, n_classes)
    pretrained = jax.tree.map(np.asarray, saved.variables)

    def initial_variables(key, sample):
        fresh = model.init(key, sample, train=False)
        body_fresh = {c: v for c, v in fresh.items()}
        body_fresh["params"] = {k: v for k, v in fresh["params"].items() if k != HEAD}
        body_saved = dict(pretrained)
        body_saved["params"] = {k: v for k, v in pretrained["params"].items() if k != HEAD}
        if jax.tree.structure(body_fresh) != jax.tree.structure(body_saved) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(body_fresh), jax.tree.leaves(body_saved))):
            raise MedleakError(f"--init_from={config.init_from}: its weights do not fit this {config.model} model "
                               f"on {sample.shape[-1]}-channel images")
        variables = jax.tree.map(lambda f, s: jnp.asarray(s, f.dtype), body_fresh, body_saved)
        head = dict(fresh["params"][HEAD])
        if pairs:
            saved_cols, new_cols = (np.array(c) for c in zip(*pairs))
            head = {name: value.at[..., new_cols].set(
                jnp.asarray(pretrained["params"][HEAD][name][..., saved_cols], value.dtype))
                for name, value in head.items()}
        variables["params"] = dict(variables["params"], **{HEAD: head})
        return variables

    initial_variables.saved = saved
    initial_variables.kept_columns = pairs
    return initial_variables


def init_from_summary(config: TrainConfig) -> dict | None:
    """plan.json's `init_from` block: the weights' hash and what they were trained on (None without)."""
    if not config.init_from:
        return None
    saved = load_pretrained(config)
    return {"hash": model_hash(config.init_from), "finetune": config.finetune,
            "label_names": saved.label_names, "trained_on": getattr(saved, "trained_on", None)}
