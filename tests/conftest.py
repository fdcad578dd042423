"""Shared test fixtures."""

import os

# Tests run on CPU in CI; keep XLA from grabbing every core's worth of threads per process when
# several worker processes run at once.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
