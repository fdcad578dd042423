"""Training progress as log lines, for consoles that are not terminals (SLURM logs, worker logs).

With a terminal the Trainer draws a progress bar; without one a bar is either nothing or a wall of
carriage returns, so each run logs a line at the end of an epoch instead, at most one a minute
(the first epoch's line always, to show the run is moving, and the last):

    run_0003: epoch 4/30 · step 120/900 · loss 0.6931 · 1843 images/s · ETA 2m 06s
"""

import math
import time

import numpy as np

DEFAULT_MIN_SECONDS = 60.0


class ProgressLines:
    """The Trainer's `log_progress` hook: `(steps_done, n_steps, steps_per_epoch, losses)`."""

    def __init__(self, log, name: str, images_per_step: int, min_seconds: float = DEFAULT_MIN_SECONDS,
                 clock=time.monotonic):
        self.log, self.name, self.images_per_step = log, name, int(images_per_step)
        self.min_seconds, self.clock = float(min_seconds), clock
        self.started = self.first_step = self.last_line = None
        self.lines = 0

    def __call__(self, steps_done: int, n_steps: int, steps_per_epoch: int, losses) -> None:
        now = self.clock()
        if self.started is None:  # the first chunk: measure speed from here (after compilation)
            self.started, self.first_step = now, steps_done
            self.last_line = now
        at_epoch_end = steps_done % steps_per_epoch == 0 or steps_done == n_steps
        first_epoch = self.lines == 0
        due = now - self.last_line >= self.min_seconds
        if not at_epoch_end or not (first_epoch or due or steps_done == n_steps):
            return
        self.last_line = now
        self.lines += 1
        self.log(self.line(steps_done, n_steps, steps_per_epoch, losses, now))

    def line(self, steps_done, n_steps, steps_per_epoch, losses, now) -> str:
        elapsed = now - self.started
        measured = steps_done - self.first_step
        rate = measured / elapsed if elapsed > 0 and measured > 0 else None
        known = np.asarray(losses)[:steps_done]
        known = known[np.isfinite(known)][-steps_per_epoch:]  # the latest epoch's finished steps
        loss = f"{known.mean():.4f}" if known.size else "n/a"
        speed = f"{rate * self.images_per_step:.0f} images/s" if rate else "images/s n/a"
        eta = format_seconds((n_steps - steps_done) / rate) if rate else "n/a"
        epoch = math.ceil(steps_done / steps_per_epoch)
        return (f"{self.name}: epoch {epoch}/{math.ceil(n_steps / steps_per_epoch)} · step {steps_done}/{n_steps} · "
                f"loss {loss} · {speed} · ETA {eta}")


def format_seconds(seconds: float) -> str:
    """'45s', '2m 06s', '1h 03m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
