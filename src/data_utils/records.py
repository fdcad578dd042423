"""The records table: the one description of a dataset that every later stage reads.

One row per image. Required columns:

- `record_id`  unique string per image (stable across releases where the dataset has an id)
- `patient_id` string; all of a patient's images share it, and a patient is never in both splits
- `path`       image path relative to the dataset's `data_root` (must stay inside it)
- `split`      "train" or "test"
- one float column per label in `label_names` (0/1; multi-class tables are one-hot)
- one column per subgroup in `subgroups` (strings; "unknown" where the dataset has no value)

`task` is "multiclass" (softmax, exactly one label per row) or "multilabel" (sigmoid, any number).
"""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd

from src.errors import MedleakError
from src.io_utils import sha256_bytes

TASKS = ("multiclass", "multilabel")
SPLITS = ("train", "test")
BASE_COLUMNS = ("record_id", "patient_id", "path", "split")
UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class RecordsTable:
    name: str
    df: pd.DataFrame
    label_names: tuple
    task: str
    subgroups: tuple
    channels: int = 1  # 1 = grayscale, 3 = RGB: how images are decoded into the cache
    # Optional per-image key for container formats (e.g. the array name inside a FairVision .npz).
    image_key: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "subgroups", tuple(self.subgroups))

    @property
    def n_records(self) -> int:
        return len(self.df)

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def split(self, split: str) -> "RecordsTable":
        """The rows of one split, re-indexed 0..n-1 (row i is logit row i in later stages)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        return dataclasses.replace(self, df=self.df[self.df["split"] == split].reset_index(drop=True))

    def labels(self) -> np.ndarray:
        """(n_records, n_classes) float32 label matrix."""
        return self.df[list(self.label_names)].to_numpy(dtype=np.float32)

    def label_index(self) -> np.ndarray:
        """(n_records,) int class index; only for multi-class tables."""
        if self.task != "multiclass":
            raise ValueError("label_index() is only defined for multi-class tables")
        return self.labels().argmax(axis=1).astype(np.int32)

    def patient_ids(self) -> np.ndarray:
        """Unique patient ids in order of first appearance."""
        return pd.unique(self.df["patient_id"])

    def columns(self) -> list:
        return list(BASE_COLUMNS) + list(self.label_names) + list(self.subgroups)

    def content_hash(self) -> str:
        """sha256 of the table's canonical CSV plus its metadata: keys caches and campaign plans."""
        buf = io.StringIO()
        self.df[self.columns()].to_csv(buf, index=False, float_format="%.6g")
        meta = f"{self.name}|{self.task}|{self.label_names}|{self.subgroups}|{self.channels}|{self.image_key}"
        return sha256_bytes((meta + "\n" + buf.getvalue()).encode("utf-8"))


def validate(table: RecordsTable, data_root=None) -> RecordsTable:
    """Checks the contract above; raises `MedleakError` naming the first problem found."""
    name, df = table.name, table.df
    if table.task not in TASKS:
        raise MedleakError(f"{name}: task must be one of {TASKS}, got {table.task!r}")
    if len(df) == 0:
        raise MedleakError(f"{name}: the records table is empty; check --data_root and the CSV files")
    missing = [c for c in table.columns() if c not in df.columns]
    if missing:
        raise MedleakError(f"{name}: records table lacks column(s) {missing}")
    clash = set(table.label_names) & (set(table.subgroups) | set(BASE_COLUMNS))
    if clash:
        raise MedleakError(f"{name}: label names {sorted(clash)} clash with other columns")
    if df["record_id"].duplicated().any():
        dup = df.loc[df["record_id"].duplicated(), "record_id"].iloc[0]
        raise MedleakError(f"{name}: record_id {dup!r} appears more than once")
    if df["patient_id"].isna().any() or (df["patient_id"].astype(str) == "").any():
        raise MedleakError(f"{name}: {int(df['patient_id'].isna().sum())} record(s) have no patient_id")
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        raise MedleakError(f"{name}: split must be 'train' or 'test', found {df.loc[bad_split, 'split'].iloc[0]!r}")
    both = set(df.loc[df["split"] == "train", "patient_id"]) & set(df.loc[df["split"] == "test", "patient_id"])
    if both:
        example = sorted(map(str, both))[:3]
        raise MedleakError(
            f"{name}: {len(both)} patient(s) appear in both train and test (e.g. {example}); "
            "a patient's images must all be in one split"
        )
    labels = df[list(table.label_names)].to_numpy(dtype=np.float64)
    if not np.isfinite(labels).all() or not np.isin(labels, (0.0, 1.0)).all():
        raise MedleakError(f"{name}: label columns must hold only 0/1 values")
    if table.task == "multiclass" and not (labels.sum(axis=1) == 1).all():
        raise MedleakError(f"{name}: a multi-class record must have exactly one label set")
    if data_root is not None:
        check_paths_inside(df["path"], data_root, name)
    return table


def check_paths_inside(paths, data_root, name="dataset"):
    """Refuses image paths that escape `data_root` (absolute paths, `..`)."""
    root = Path(data_root).resolve()
    for p in paths:
        resolved = (root / str(p)).resolve()
        if resolved != root and root not in resolved.parents:
            raise MedleakError(f"{name}: image path {p!r} escapes --data_root={data_root}; paths must be relative to it")


def subgroup_values(series: pd.Series) -> pd.Series:
    """Normalises a subgroup column to strings with missing values as 'unknown'."""
    out = series.astype("string").str.strip()
    return out.fillna(UNKNOWN).replace({"": UNKNOWN, "nan": UNKNOWN, "None": UNKNOWN}).astype(str)


def age_group(age: pd.Series, edges=(0, 20, 40, 60, 80, 200)) -> pd.Series:
    """Bins ages (years) into '0-19', '20-39', ..., '80+' ; missing → 'unknown'."""
    age = pd.to_numeric(age, errors="coerce")
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}+"]
    binned = pd.cut(age, bins=list(edges), labels=labels, right=False)
    return binned.astype("string").fillna(UNKNOWN).astype(str)


def require_columns(df: pd.DataFrame, columns, source) -> None:
    """One-line error naming the file and the missing column(s), and the flag to override names."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MedleakError(
            f"{source}: missing column(s) {missing}; found {list(df.columns)[:12]}"
            " (column names can be overridden by flags, see --help)"
        )


def read_csv(path, source_flag=None, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with one-line errors for a missing, unreadable or empty file."""
    path = Path(path)
    hint = f" (set {source_flag})" if source_flag else ""
    if not path.is_file():
        raise MedleakError(f"{path}: file not found{hint}")
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise MedleakError(f"{path}: the CSV file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise MedleakError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    if len(df) == 0:
        raise MedleakError(f"{path}: the CSV file has a header but no rows")
    return df
