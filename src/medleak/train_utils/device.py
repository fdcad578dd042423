"""Process-level device settings and compile accounting.

Several training processes share one GPU: small models (WRN-28-2 at 64x64) leave an H100 mostly
idle, and measured on CPU `jax.vmap` over K models was slower than K sequential runs (see
bench/train_throughput.py), so the campaign launches `workers_per_device` worker processes per GPU,
each calling `configure_device_memory(workers_per_device)` before JAX touches the device. XLA then
pre-allocates only that share of the GPU's memory in each process instead of 75 % in the first.
"""

import contextlib
import os

from medleak.errors import MedleakError

# Leave some memory for the CUDA context and cuDNN/cuBLAS workspaces of each process.
USABLE_MEMORY_SHARE = 0.9
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def configure_device_memory(workers_per_device: int) -> float:
    """Sets XLA_PYTHON_CLIENT_MEM_FRACTION so `workers_per_device` processes fit on one GPU.

    Must run before JAX initialises its backend (before the first array is created); returns the
    fraction set. With one worker it leaves XLA's defaults alone and returns 0.0.
    """
    if workers_per_device < 1:
        raise MedleakError(f"--workers_per_device must be at least 1, got {workers_per_device}")
    if workers_per_device == 1:
        return 0.0
    if _backend_initialised():
        raise MedleakError(
            "configure_device_memory() was called after JAX started using the device: call it first "
            "thing in the worker process, before any JAX array is created"
        )
    fraction = round(USABLE_MEMORY_SHARE / workers_per_device, 3)
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
    return fraction


def _backend_initialised() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # the only place JAX exposes this

    return xla_bridge.backends_are_initialized()


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) while active, in this process.

    Eager operations compile too (once per shape), so a zero count over a block proves the whole
    block, not just the training step, ran from compiled caches.
    """

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration_secs: float, **_):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration_secs


@contextlib.contextmanager
def count_compilations():
    """`with count_compilations() as counter: ...` then read `counter.count`, `counter.seconds`."""
    import jax

    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter._listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter._listener)
