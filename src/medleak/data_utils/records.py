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
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.io_utils import sha256_bytes

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
    """Refuses image paths that escape `data_root` (absolute paths, `..`).

    The check is on the path text only: a symlink inside data_root (a dataset folder kept on other
    storage) is the user's choice, and resolving every path would cost a stat per component.
    """
    for p in paths:
        text = str(p)
        normal = os.path.normpath(text)
        if os.path.isabs(text) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
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


# ---------------------------------------------------------------------------------------------
# Shared helpers for the loaders (src/medleak/data_utils/<dataset>.py).
# ---------------------------------------------------------------------------------------------

RACE_GROUPS = ("White", "Black", "Asian", "Hispanic/Latino", "Other", UNKNOWN)


def resolve_file(data_root, relpath, flag) -> Path:
    """`relpath` (absolute, or relative to `data_root`) as an existing file; errors name `flag`."""
    if relpath is None or str(relpath).strip() == "":
        raise MedleakError(f"{flag} is empty; give a file path")
    path = Path(str(relpath)).expanduser()
    if not path.is_absolute():
        path = Path(data_root) / path
    if not path.is_file():
        raise MedleakError(f"{path}: file not found (check --data_root={data_root} and {flag})")
    return path


def optional_file(data_root, relpath, flag, fallbacks=()):
    """Like `resolve_file` for an optional input: an explicit `relpath` must exist; with none
    given, the first existing file among `fallbacks` (relative to `data_root`) or None."""
    if relpath not in (None, ""):
        return resolve_file(data_root, relpath, flag)
    for name in fallbacks:
        path = Path(data_root) / name
        if path.is_file():
            return path
    return None


def id_strings(values: pd.Series) -> pd.Series:
    """Ids as strings without a float's '.0' (pandas reads integer id columns with blanks as float)."""
    numeric = pd.to_numeric(values, errors="coerce")
    present = values.notna()  # blanks stay missing; only the ids that are there are compared
    if present.any() and numeric[present].notna().all() and (numeric[present] == numeric[present].round()).all():
        out = pd.Series(np.nan, index=values.index, dtype=object)
        out[present] = numeric[present].astype("int64").astype(str)
        return out
    return values.astype(str).str.strip()


def parse_float(value, flag, low=None, high=None) -> float:
    """A float option given as a string (absl string flags), with a one-line error naming the flag."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MedleakError(f"{flag} must be a number, got {value!r}") from None
    if (low is not None and out < low) or (high is not None and out > high) or not np.isfinite(out):
        raise MedleakError(f"{flag} must be between {low} and {high}, got {value!r}")
    return out


def parse_list(value) -> list:
    """Comma-separated option → list of stripped, non-empty strings."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def race_group(series: pd.Series) -> pd.Series:
    """Maps free-text race/ethnicity descriptions (they differ between datasets and releases) onto
    the coarse groups in `RACE_GROUPS`; refused/unknown/missing → 'unknown'."""
    text = subgroup_values(series).str.lower()
    out = pd.Series("Other", index=series.index, dtype=object)
    rules = [  # later rules win; unknown last so 'Unknown, Unavailable' never counts as a group
        (r"^(?!.*\bno[nt][- ]hispanic).*(?:hispanic|latino)", "Hispanic/Latino"),  # not "non-Hispanic"
        (r"white|caucasian", "White"),
        (r"\basian", "Asian"),
        (r"black|african", "Black"),
        (r"^unknown$|unknown|unavailable|unable|declin|refus|not recorded|not reported|unreported", UNKNOWN),
    ]
    for pattern, group in rules:
        out[text.str.contains(pattern, regex=True)] = group
    return out.astype(str)


def patient_split(patient_ids, test_fraction: float, seed: int) -> pd.Series:
    """Seeded patient-grouped split for datasets without an official one: a `test_fraction` share
    of the unique patients (at least one) → 'test'. Returns the split per element of `patient_ids`.
    Patients are sorted before shuffling so the split does not depend on row order."""
    patient_ids = pd.Series(patient_ids).astype(str)
    unique = np.array(sorted(patient_ids.unique()))
    n_test = int(round(test_fraction * len(unique)))
    n_test = min(max(n_test, 1), len(unique) - 1) if len(unique) > 1 else 0
    rng = np.random.default_rng(seed)
    test_patients = set(unique[rng.permutation(len(unique))[:n_test]])
    return patient_ids.map(lambda p: "test" if p in test_patients else "train")


def one_hot(class_index, n_classes: int) -> np.ndarray:
    """(n,) int class index → (n, n_classes) float32 one-hot matrix."""
    class_index = np.asarray(class_index, dtype=np.int64)
    out = np.zeros((len(class_index), n_classes), dtype=np.float32)
    out[np.arange(len(class_index)), class_index] = 1.0
    return out


def build_table(name, base: pd.DataFrame, labels, label_names, task, subgroups: dict, data_root,
                channels=1, image_key=None) -> RecordsTable:
    """Assembles and validates a RecordsTable from the loader's pieces.

    `base` holds record_id, patient_id, path, split (any index); `labels` is an (n, C) array;
    `subgroups` maps subgroup column → Series/array aligned with `base`.
    """
    base = base.reset_index(drop=True)
    df = pd.DataFrame({
        "record_id": base["record_id"].astype(str),
        "patient_id": base["patient_id"].astype(str),
        "path": base["path"].astype(str),
        "split": base["split"].astype(str),
    })
    labels = np.asarray(labels, dtype=np.float32)
    for j, label in enumerate(label_names):
        df[label] = labels[:, j]
    for column, values in subgroups.items():
        values = values.reset_index(drop=True) if isinstance(values, pd.Series) else pd.Series(values)
        df[column] = subgroup_values(values).to_numpy()
    table = RecordsTable(name=name, df=df, label_names=tuple(label_names), task=task,
                         subgroups=tuple(subgroups), channels=channels, image_key=image_key)
    return validate(table, data_root)
