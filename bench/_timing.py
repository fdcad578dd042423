"""Small timing helpers shared by benchmarks: one figure per line as `name: value unit`."""

import time


def report(name: str, value, unit: str = ""):
    """Prints one benchmark figure in the `name: value unit` format bench/RESULTS.md collects."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name}: {text} {unit}".rstrip(), flush=True)


def seconds_per_call(fn, *args, repeats: int = 3, warmup: int = 1):
    """Wall seconds per call of `fn(*args)`, waiting for JAX results (`block_until_ready`)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - started) / repeats
