"""Registry of dataset loaders: one name → one module with `OPTIONS` and `load(data_root, **options)`."""

from pathlib import Path

from medleak.data_utils import chestxray14, chexpert, embed, fairvision, fitzpatrick, mimic
from medleak.errors import MedleakError

DATASETS = {module.NAME: module for module in (chexpert, mimic, fitzpatrick, embed, fairvision, chestxray14)}


def _module(name):
    if name not in DATASETS:
        raise MedleakError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_options(name) -> dict:
    """`{option: (default, help)}` of a dataset's loader; each becomes a string flag `--<option>`."""
    return dict(_module(name).OPTIONS)


def load_dataset(name, data_root, **options):
    """Loads dataset `name` from its official layout under `data_root` as a validated RecordsTable.

    Options not given (or given as None) take the loader's defaults; unknown options are refused.
    """
    module = _module(name)
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        raise MedleakError(f"{name}: unknown option(s) {unknown}; known: {sorted(module.OPTIONS)}")
    if data_root is None or str(data_root).strip() == "":
        raise MedleakError(f"{name}: --data_root is not set; point it at the downloaded dataset")
    root = Path(str(data_root)).expanduser()
    if not root.is_dir():
        raise MedleakError(f"--data_root={data_root} is not a directory; point it at the downloaded {name} dataset")
    given = {k: v for k, v in options.items() if v is not None}
    return module.load(root, **given)
