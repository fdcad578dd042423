"""Per-run training checkpoints (orbax-checkpoint), so a preempted run resumes where it stopped.

A checkpoint holds the run's `TrainState` (step, parameters, optimiser state, EMA parameters,
BatchNorm statistics), the losses of the steps done so far, and a JSON record: the run's seed and a
fingerprint of what it trains (its TrainConfig and the hash of its batch schedule). Nothing else is
state: the schedule (epoch permutations, or DP-SGD's Poisson batches and noise multiplier) is
regenerated from the seed, every step's augmentation and DP-noise keys are `fold_in(seed, step)`,
and the DP accounting is a function of the run's plan (sigma, q, steps), not of its progress. So a
run resumed at step s repeats exactly what the uninterrupted run did from step s on.

Saves happen at epoch boundaries, at the first one after `every_seconds` have passed since the
last save (or since the RunCheckpoints was made), and at the end of training under the same rule (so a worker
lost during inference does not retrain, and a run shorter than `every_seconds` never saves: the
overhead is at most one save per `every_seconds`). Orbax
writes each checkpoint into a temporary directory and renames it when complete, so only complete
checkpoints are ever restored; the older one is deleted after the newer one is in place.

    checkpoints = RunCheckpoints(rundir.checkpoint_dir(logdir, run), every_seconds=600)
    model = trainer.train(indices, seed, checkpoints=checkpoints)   # resumes if it can
    ...                                                             # publish the run, then:
    checkpoints.delete()
"""

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import numpy as np

# Written into every checkpoint's record; a checkpoint of another format is not restored.
FORMAT_VERSION = 1


class _OrbaxInfoFilter(logging.Filter):
    """Drops orbax's INFO lines (a dozen per save) from absl's logger; its warnings still show."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_OrbaxInfoFilter())


def run_fingerprint(config_dict: dict, batches: dict) -> str:
    """sha256 of what a run trains: its config and its whole batch schedule (rows, masks, sigma…)."""
    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name in sorted(batches):
        array = np.ascontiguousarray(batches[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class RunCheckpoints:
    """The checkpoints of one run in `directory` (created on the first save)."""

    def __init__(self, directory, *, every_seconds: float = 600.0, log=None):
        """`every_seconds`: least time between two saves (0: at every epoch boundary)."""
        if not every_seconds >= 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds}")
        self.directory = Path(directory).absolute()
        self.every_seconds = float(every_seconds)
        self.log = log or (lambda message: None)
        self.save_seconds = 0.0  # time spent saving, for the run's timings
        self.saves = 0
        self._last_save = time.monotonic()
        self._manager = None

    # -- reading --

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None (read from the directory, which another
        process may have written since this object last looked)."""
        if not self.directory.is_dir():
            return None
        manager = self._checkpoint_manager()
        manager.reload()
        return manager.latest_step()

    def latest_record(self) -> dict | None:
        """The JSON record ({"seed", "fingerprint", "step", …}) of the newest complete checkpoint."""
        import orbax.checkpoint as ocp

        step = self.latest_step()
        if step is None:
            return None
        try:
            record = self._checkpoint_manager().restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception as e:  # an unreadable checkpoint only costs the steps it saved
            self.log(f"{self.directory}: checkpoint {step} unreadable ({type(e).__name__}); starting over")
            return None
        if record.get("format") != FORMAT_VERSION:
            return None
        return dict(record, step=step)

    def restore(self, step: int, state, n_steps: int):
        """(state, losses (n_steps,) float32) saved at `step`; `state` gives the tree and shapes."""
        import orbax.checkpoint as ocp

        target = {"state": jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                  "losses": jax.ShapeDtypeStruct((n_steps,), np.float32)}
        restored = self._checkpoint_manager().restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target)))["arrays"]
        return restored["state"], np.asarray(restored["losses"])

    # -- writing --

    def due(self) -> bool:
        """True when `every_seconds` have passed since the last save (or since this object was made)."""
        return time.monotonic() - self._last_save >= self.every_seconds

    def save(self, step: int, state, losses, *, seed: int, fingerprint: str) -> None:
        """Saves `state` after `step` steps with the run's losses so far (waits until it is written)."""
        import orbax.checkpoint as ocp

        started = time.monotonic()
        manager = self._checkpoint_manager()
        if manager.latest_step() == step:  # e.g. the final save of a run resumed at its last step
            return
        record = {"format": FORMAT_VERSION, "seed": int(seed), "fingerprint": fingerprint}
        arrays = {"state": state, "losses": np.asarray(losses, dtype=np.float32)}
        manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                   record=ocp.args.JsonSave(record)))
        manager.wait_until_finished()
        self.saves += 1
        self._last_save = time.monotonic()
        self.save_seconds += self._last_save - started

    def delete(self) -> None:
        """Removes every checkpoint of the run (after it is published, or when it cannot be resumed)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp

        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager
