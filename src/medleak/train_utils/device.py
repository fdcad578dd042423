"""Process-level device settings: memory share per worker, compute dtype per backend, compile accounting.

Small models (WRN-28-2 at 64x64) leave an H100 mostly idle. One worker fills it by training K
models per device program (--models_per_program, train_utils/batched.py; `resolve_models_per_program`
gives each backend's default), sharded over every local device. The older way also remains: several
worker processes per GPU (`workers_per_device`), each calling
`configure_device_memory(workers_per_device)` before JAX touches the device, so XLA pre-allocates
only that share of the GPU's memory in each process instead of 75 % in the first.
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


# Models per device in one training program (train_utils/batched.py) when --models_per_program=0.
# cpu: measured, bench/train_throughput.py (K models vmapped run slower than one after another on
# XLA:CPU, bench/RESULTS.md). gpu/tpu: UNMEASURED guesses until bench/gpu_campaign.py has run on
# such a device (no GPU was available when they were set); WRN-28-2 at 64x64 uses a small share
# of an H100/H200 per model, so several models per program should fill it.
MODELS_PER_DEVICE = {"cpu": 1, "gpu": 8, "tpu": 8}


def resolve_models_per_program(requested: int) -> int:
    """--models_per_program: `requested` when >= 1; 0 picks this backend's default for all of this
    process's devices (`MODELS_PER_DEVICE` x local devices; 1 on CPU)."""
    if requested < 0:
        raise MedleakError(f"--models_per_program must be 0 (this backend's default) or at least 1, "
                           f"got {requested}")
    if requested:
        return int(requested)
    import jax

    backend = jax.default_backend()
    per_device = MODELS_PER_DEVICE.get(backend, 1)
    return 1 if per_device == 1 else per_device * jax.local_device_count()


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
