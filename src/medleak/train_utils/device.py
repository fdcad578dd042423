"""Process-level device settings: memory share per worker, compute dtype per backend, compile accounting.

Several training processes share one GPU: small models (WRN-28-2 at 64x64) leave an H100 mostly
idle, and measured on CPU `jax.vmap` over K models was slower than K sequential runs (see
bench/train_throughput.py), so the campaign launches `workers_per_device` worker processes per GPU,
each calling `configure_device_memory(workers_per_device)` before JAX touches the device. XLA then
pre-allocates only that share of the GPU's memory in each process instead of 75 % in the first.
"""

import contextlib
import os

from medleak.config import COMPUTE_DTYPES, check_choice
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


# NVIDIA GPUs compute bfloat16 natively (tensor cores) from compute capability 8.0 (Ampere) on.
BFLOAT16_MIN_COMPUTE_CAPABILITY = 8.0


def resolve_compute_dtype(requested: str) -> str:
    """The compute dtype "auto" stands for on this process's backend; other values unchanged.

    bfloat16 on TPUs and on GPUs that compute it natively (mixed precision, as in the paper),
    float32 on CPU (where bfloat16 is emulated and slower) and on older GPUs. A campaign resolves
    it once, when its plan is made, and records the result; workers follow the plan.
    """
    check_choice("compute_dtype", requested, COMPUTE_DTYPES)
    if requested != "auto":
        return requested
    import jax

    backend = jax.default_backend()
    if backend == "tpu":
        return "bfloat16"
    if backend == "gpu":
        capability = getattr(jax.devices()[0], "compute_capability", None)
        try:
            native = float(capability) >= BFLOAT16_MIN_COMPUTE_CAPABILITY
        except (TypeError, ValueError):  # not reported (e.g. ROCm "gfx90a"): those GPUs have bf16
            native = True
        return "bfloat16" if native else "float32"
    return "float32"


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
