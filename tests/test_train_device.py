"""Per-process GPU memory share for several workers per device, and the compile counter."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from medleak.errors import MedleakError
from medleak.train_utils.device import configure_device_memory, count_compilations

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_memory_fraction_is_set_before_jax_starts_and_refused_after():
    done = run_python(
        "import os\n"
        "from medleak.train_utils.device import configure_device_memory\n"
        "print(configure_device_memory(3), os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n"
        "import jax.numpy as jnp; jnp.zeros(1)\n"
        "try:\n"
        "    configure_device_memory(2)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == "0.3 0.300"
    assert second.startswith("MedleakError") and "before any JAX array" in second


def test_one_worker_leaves_defaults_and_zero_workers_is_an_error():
    assert configure_device_memory(1) == 0.0
    with pytest.raises(MedleakError, match="--workers_per_device"):
        configure_device_memory(0)


def test_compile_counter_counts_new_programs_only():
    double = jax.jit(lambda x: x * 2 + 1)
    x = jnp.arange(7.0)
    with count_compilations() as first:
        double(x).block_until_ready()
    with count_compilations() as again:
        double(x).block_until_ready()
    assert first.count == 1 and first.seconds > 0
    assert again.count == 0


def test_auto_compute_dtype_is_float32_on_cpu_and_explicit_dtypes_pass_through():
    from medleak.train_utils.device import resolve_compute_dtype

    if jax.default_backend() == "cpu":
        assert resolve_compute_dtype("auto") == "float32"
    assert resolve_compute_dtype("bfloat16") == "bfloat16" and resolve_compute_dtype("float32") == "float32"
    with pytest.raises(MedleakError, match="--compute_dtype"):
        resolve_compute_dtype("float16")


@pytest.mark.parametrize("backend,capability,expected", [
    ("tpu", None, "bfloat16"), ("gpu", "9.0", "bfloat16"), ("gpu", "8.0", "bfloat16"),
    ("gpu", "7.0", "float32"), ("gpu", "gfx90a", "bfloat16"),
])
def test_auto_compute_dtype_per_accelerator(monkeypatch, backend, capability, expected):
    # No accelerator here: stand in for jax's view of one (the device check runs the real thing).
    from medleak.train_utils.device import resolve_compute_dtype

    class Device:
        compute_capability = capability

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    assert resolve_compute_dtype("auto") == expected
