"""Atomic, pickle-free file I/O used by every stage.

Every write goes to a temporary file in the destination directory and is renamed into place, so a
reader (or a crashed writer) never sees a half-written file. Arrays are `.npy` (never pickled),
state is JSON, tables are CSV.

Files and directories take their mode from the process umask like any other program's (0644 and
0755 under umask 0022, 0600 and 0700 under 0077): `mkstemp` creates its file 0600 whatever the umask,
so the temporary file is given `0o666 & ~umask` before it is renamed into place. What a logdir holds
is derived from patient data: keep it private with the umask (docs/RUNDIR.md).
"""

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np


_umask_lock = threading.Lock()
_umask = None


def process_umask() -> int:
    """The process umask, read once (os.umask can only be read by setting it, so under a lock)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o077)
            os.umask(_umask)
        return _umask


def file_mode() -> int:
    """Mode of a newly written file: what open() would give it (0o666 less the umask)."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    """Mode of a newly made directory: what mkdir would give it (0o777 less the umask)."""
    return 0o777 & ~process_umask()


def make_dirs(path) -> Path:
    """`mkdir -p` with the umask's mode (also for directories made by mkdtemp elsewhere)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    return path


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds.

    The file renamed into place has the umask's mode (see the module docstring).
    """
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def save_npy(path, array):
    """Saves an array as .npy atomically (no pickle: object arrays are refused)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to save an object array to {path}")
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def load_npy(path, mmap: bool = False):
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_csv(path, df, **kwargs):
    buf = io.StringIO()
    df.to_csv(buf, index=False, **kwargs)
    write_text(path, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
