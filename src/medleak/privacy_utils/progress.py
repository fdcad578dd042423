"""The audit's progress at scale: one bar per stage after the loading bar (`scoring.score_rows`).

`Stages(enabled)` shows a bar per named stage (a stage that knows its steps, like the noise
floor's permutations, advances it; others complete when they end) and, when it ends, one line
`stage <name>: <seconds> s` on stderr (benchmarks read it). Disabled (`AuditOptions.progress`
false) it shows nothing but still keeps the seconds of each stage.
"""

import contextlib
import sys
import time

from tqdm import tqdm


class Stages:
    def __init__(self, enabled=True):
        self.enabled = bool(enabled)
        self.seconds = {}  # stage name → wall seconds

    @contextlib.contextmanager
    def stage(self, name, total=None, unit="step"):
        """Yields the stage's bar (call `bar.update(n)` when `total` is given)."""
        bar = tqdm(total=total or 1, desc=name, unit=unit, disable=not self.enabled, leave=False)
        started = time.perf_counter()
        try:
            yield bar
        finally:
            self.seconds[name] = time.perf_counter() - started
            bar.close()
            if self.enabled:
                tqdm.write(f"stage {name}: {self.seconds[name]:.1f} s", file=sys.stderr)
