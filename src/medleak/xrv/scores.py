"""`xrv_scores.py`'s work: TorchXRayVision's models on known members and non-members.

For each dataset (CheXpert, MIMIC-CXR):

1. load it with medleak's loader (patient ids and subgroups come along);
2. rebuild TorchXRayVision's partition (`split.py`) and draw `n_per` members and `n_per`
   non-members (records of the held-out test patients);
3. run the dataset's target model and the reference model (PadChest) on TorchXRayVision's
   preprocessing of each image;
4. write one logdir per dataset in the run-directory format (`logdir.py`, docs/XRV.md): one run
   per model, raw logits on the outputs both models share, the target's member mask as its
   `record_mask`.
"""

import dataclasses
import importlib.metadata
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch
from absl import logging

from medleak.data_utils.datasets import load_dataset
from medleak.errors import MedleakError
from medleak.io_utils import sha256_file
from medleak.train_utils import metrics
from medleak.xrv import inference, models, split
from medleak.xrv import logdir as logdir_format
from medleak.xrv.preprocess import INPUT_SIZE


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """What xrv_scores.py runs (flags of the entry point)."""

    datasets: tuple = split.DATASETS
    n_per: int = 25_000  # the paper's N_per
    seed: int = 0  # draws the n_per records; TorchXRayVision's split seed is split.SPLIT_SEED
    views: tuple = split.DEFAULT_VIEWS
    reference: str = models.REFERENCE_MODEL
    weights_dir: str | None = None
    download: bool = False
    trust_pickle: bool = False
    batch_size: int = 32
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False


def audit_records(table, config: ScoreConfig):
    """(records table of the audited sample in original row order, member mask, split summary)."""
    roles = split.xrv_roles(table, config.views)
    members, nonmembers = split.sample_members_and_nonmembers(roles, config.n_per, config.seed)
    chosen = np.sort(np.concatenate([members, nonmembers]))
    sample = dataclasses.replace(table, df=table.df.iloc[chosen].reset_index(drop=True))
    member_mask = roles[chosen] == split.MEMBER
    patients = split.xrv_patient_ids(table).to_numpy()
    summary = {role: {"records": int((roles == role).sum()),
                      "patients": int(len(np.unique(patients[roles == role])))} for role in split.ROLES}
    if len(members) < config.n_per or len(nonmembers) < config.n_per:
        logging.warning("%s: only %d members / %d non-members available for --n_per=%d",
                        table.name, len(members), len(nonmembers), config.n_per)
    return sample, member_mask, summary


def models_for(dataset: str, config: ScoreConfig) -> list:
    """[(model name, role)] run on `dataset`, in run order: its target, then the reference."""
    return [(models.TARGET_MODELS[dataset], logdir_format.ROLE_TARGET),
            (config.reference, logdir_format.ROLE_REFERENCE)]


def macro_auroc(logits, labels) -> float:
    """Mean AUROC over labels with both classes present (None if none): a sanity check of the model."""
    value = metrics.macro_auroc(logits, np.asarray(labels) > 0)
    return value if np.isfinite(value) else None


def run_dataset(dataset: str, data_root, loader_options: dict, logdir, config: ScoreConfig) -> Path:
    """Loads one dataset, runs the models on its audited sample and writes its logdir."""
    logdir = Path(logdir)
    if logdir.exists() and not config.overwrite:
        raise MedleakError(f"{logdir} already exists; pass --overwrite to replace it or choose another --logdir")
    table = load_dataset(dataset, data_root, **loader_options)
    sample, member_mask, summary = audit_records(table, config)
    logging.info("%s: auditing %d members and %d non-members (split: %s)", dataset, member_mask.sum(),
                 (~member_mask).sum(), summary)
    chosen = models_for(dataset, config)
    xrv_names, label_columns = models.shared_labels([name for name, _ in chosen], sample.label_names)
    sample = dataclasses.replace(sample, df=sample.df[sample_columns(sample, label_columns)],
                                 label_names=label_columns)
    device = inference.resolve_device(config.device)
    loaded, entries = {}, []
    for name, role in chosen:
        path = models.ensure_weights(name, config.weights_dir, config.download)
        entries.append({"name": name, "role": role, "weights_file": path.name, "weights_sha256": sha256_file(path)})
        loaded[name] = (models.load_model(name, config.weights_dir, trust_pickle=config.trust_pickle,
                                          device=device), models.output_indices(name, xrv_names))
    start = time.time()
    logits = inference.model_logits(loaded, data_root, sample.df["path"], batch_size=config.batch_size,
                                    num_workers=config.num_workers, device=device, desc=f"{dataset} images")
    seconds = time.time() - start
    labels = sample.labels()
    environment = _environment(device)
    run_metrics = {entry["name"]: {**entry, "macro_auroc": macro_auroc(logits[entry["name"]], labels),
                                   "n_records": int(len(labels)), "inference_seconds_all_models": seconds,
                                   **environment} for entry in entries}
    document = logdir_format.plan_document(dataset, table, sample, member_mask, entries, xrv_names, {
        "xrv_split": {"procedure": "GroupShuffleSplit(train_size=0.8, test_size=0.2) by patientid, twice",
                      "seed": split.SPLIT_SEED, "views": list(config.views), "roles": summary},
        "sample": {"n_per": int(config.n_per), "seed": int(config.seed), "input_size": INPUT_SIZE},
    })
    return logdir_format.write_logdir(logdir, document, sample, member_mask, logits, run_metrics,
                                      overwrite=config.overwrite)


def sample_columns(table, label_columns) -> list:
    """The records-table columns kept in the audit sample: all but the labels not shared by the models."""
    return [c for c in table.df.columns if c not in table.label_names or c in label_columns]


def run(data_roots: dict, loader_options: dict, logroot, config: ScoreConfig) -> dict:
    """Runs every dataset in `config.datasets`; returns {dataset: logdir}."""
    unknown = [d for d in config.datasets if d not in split.DATASETS]
    if unknown or not config.datasets:
        raise MedleakError(f"--datasets must name some of {list(split.DATASETS)}, got {list(config.datasets)}")
    models.model_info(config.reference)
    if config.reference in models.TARGET_MODELS.values():
        raise MedleakError(f"--reference={config.reference} is one of the target models; the reference must be "
                           "a model trained on neither dataset (e.g. densenet121-res224-pc)")
    for dataset in config.datasets:  # fail on a missing file or a taken logdir before hours of work
        root = data_roots.get(dataset)
        if root in (None, "") or not Path(root).expanduser().is_dir():
            raise MedleakError(f"--{dataset}_root={root} is not a directory; point it at the downloaded {dataset} "
                               "dataset (official layout)")
        for name, _ in models_for(dataset, config):
            models.ensure_weights(name, config.weights_dir, config.download)
        if (Path(logroot) / dataset).exists() and not config.overwrite:
            raise MedleakError(f"{Path(logroot) / dataset} already exists; pass --overwrite to replace it or "
                               "choose another --logdir")
    out = {}
    for dataset in config.datasets:
        out[dataset] = run_dataset(dataset, data_roots.get(dataset), loader_options.get(dataset, {}),
                                   Path(logroot) / dataset, config)
    return out


def _environment(device) -> dict:
    versions = {}
    for package in ("torch", "torchvision", "torchxrayvision", "numpy", "scikit-image"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    name = str(device)
    if device.type == "cuda":
        name += f":{torch.cuda.get_device_name(device)}"
    return {"host": socket.gethostname(), "python": platform.python_version(), "device": name,
            "versions": versions}
