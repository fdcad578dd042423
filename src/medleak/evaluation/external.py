"""A model's predictions on another dataset's records, over the labels the two share.

`EvalSet` is one split of a dataset ready for a model: its records, labels with ChestX-ray14's
derived 'No Finding' (`labels.transfer_labels`), the columns it shares with the model
(`labels.shared_labels`; a one-line error naming both label sets when none is) and its images from
the cache at the model's image size. `ExternalTests` is what `--external_test=NAME:ROOT[,…]` gives a
campaign worker: the test splits of other datasets, loaded once, scored by every run.
"""

import dataclasses

import numpy as np

from medleak.errors import MedleakError
from medleak.data_utils.label_maps import shared_labels, transfer_labels


@dataclasses.dataclass
class EvalSet:
    """One split of a dataset, restricted to the labels it shares with a model."""

    dataset: str
    table: object  # RecordsTable of the split (rows in image order)
    images: np.ndarray  # uint8 (n, H, W, C)
    labels: np.ndarray  # float32 (n, L) of the shared labels, in the model's order
    label_names: list  # canonical names of the shared labels
    model_columns: np.ndarray  # (L,) the model's logit column of each shared label

    @property
    def subgroups(self) -> dict:
        return {name: self.table.df[name].astype(str).to_numpy() for name in self.table.subgroups}

    @property
    def patient_ids(self) -> np.ndarray:
        return self.table.df["patient_id"].astype(str).to_numpy()

    def scores(self, logits) -> np.ndarray:
        """The shared labels' columns of a model's (n, C) multi-label logits."""
        return np.asarray(logits, dtype=np.float32)[:, self.model_columns]


def eval_set(dataset: str, table, data_root, model_labels, img_size, channels: int, *, cache_dir=None,
             only=None) -> EvalSet:
    """`table` (one split of `dataset`) as an EvalSet for a model with `model_labels` on `channels`-channel
    `img_size` images; `only` restricts the labels (e.g. PRIVACYDOMAIN_LABELS)."""
    from medleak.data_utils.image_cache import cached_images

    labels, names = transfer_labels(dataset, table.labels(), table.label_names)
    pairs = shared_labels(model_labels, names, only=only)  # first: no shared label is the error to see
    if table.task != "multilabel":
        raise MedleakError(f"{dataset}: evaluation across datasets scores multi-label chest X-ray models; "
                           f"this dataset is {table.task}")
    if int(table.channels) != int(channels):
        raise MedleakError(f"{dataset} has {table.channels}-channel images but the model takes {channels}")
    images, cached = cached_images(table, data_root, tuple(img_size), cache_dir=cache_dir)
    if cached.n_records != table.n_records:
        raise MedleakError(f"{dataset}: the image cache left out unreadable images under {data_root}; fix them")
    return EvalSet(dataset=dataset, table=table, images=np.asarray(images), labels=labels[:, [j for _, j, _ in pairs]],
                   label_names=[name for _, _, name in pairs], model_columns=np.array([i for i, _, _ in pairs]))


def parse_external_tests(text) -> list:
    """'mimic:/data/mimic,chestxray14:/data/nih' -> [("mimic", "/data/mimic"), …]; '' -> []."""
    from medleak.data_utils.datasets import DATASETS

    specs = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        name, sep, root = part.partition(":")
        if not sep or not root or name not in DATASETS:
            raise MedleakError(f"--external_test={text!r}: give NAME:ROOT[,NAME:ROOT…] with NAME one of "
                               f"{', '.join(sorted(DATASETS))}")
        specs.append((name, root))
    return specs


class ExternalTests:
    """The test splits of `--external_test` datasets for a model's labels; `metrics(model, variables)`
    gives each one's AUROC over the shared labels, overall and per subgroup (train_utils.metrics)."""

    def __init__(self, specs, model_labels, img_size, channels: int, *, cache_dir=None, batch_size: int = 256):
        from medleak.data_utils.datasets import load_dataset

        self.sets = {}
        for name, root in specs:
            table = load_dataset(name, root).split("test")
            if table.n_records == 0:
                raise MedleakError(f"--external_test: the {name} test split under {root} is empty")
            self.sets[name] = eval_set(name, table, root, model_labels, img_size, channels, cache_dir=cache_dir)
        self.batch_size = int(batch_size)
        self._programs = {}

    def logits(self, name: str, model, variables, preset: str) -> np.ndarray:
        import jax

        from medleak.train_utils import inference

        images = jax.device_put(self.sets[name].images)
        if name not in self._programs:  # one compile per dataset and worker (every run has the same shapes)
            self._programs[name] = inference.compile_view_logits(model, variables, images, self.batch_size, 1, preset)
        return inference.view_logits(self._programs[name], variables, images)[:, 0]

    def metrics(self, model, variables, preset: str) -> dict:
        from medleak.train_utils.metrics import classification_metrics

        out = {}
        for name, target in self.sets.items():
            scores = target.scores(self.logits(name, model, variables, preset))
            out[name] = dict(classification_metrics(scores, target.labels, "multilabel", target.subgroups),
                             labels=target.label_names, n_records=int(target.table.n_records))
        return out
