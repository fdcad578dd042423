"""Inference for the audit: logits of every record under V evaluation views.

The images stay on the device (uint8); each call gathers a fixed-size batch of rows, builds the
views (augment.eval_views: view 0 clean, view 1 flipped when the preset flips, then augmentations
from keys fixed per record and view, identical in every run) and returns float32 logits. The last
batch is padded with the last row and trimmed, so one compiled program serves every batch; each
program is compiled for `balanced_batch_size` rows (at most the caller's batch size), so padding
stays under one row per batch, and carries that size (`ViewLogitsProgram`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medleak.train_utils import augment

# The evaluation views' PRNG seed: a constant, so all shadow models see the same views of a record.
VIEW_SEED = 0x5EED


def balanced_batch_size(n_rows: int, max_batch_size: int) -> int:
    """Rows per call that cover `n_rows` in as few calls of at most `max_batch_size` rows as possible,
    with the padding spread over them (541 rows at 256: 3 calls of 181, not 3 of 256 = 227 wasted)."""
    n_calls = max(1, -(-n_rows // max_batch_size))
    return max(1, -(-n_rows // n_calls))


def make_view_logits(model, n_views: int, preset: str):
    """(variables, images uint8 (N,H,W,C), rows (B,)) -> float32 (B, V, C) logits in eval mode."""

    def view_logits_fn(variables, images, rows):
        x = augment.to_unit_float(images[rows])
        keys = augment.record_keys(jax.random.key(VIEW_SEED), rows)
        views = augment.normalize(augment.eval_views(x, keys, n_views, preset))  # (V, B, H, W, C)
        # One view at a time keeps peak activation memory at one batch.
        logits = jax.lax.map(lambda view: model.apply(variables, view, train=False), views)
        return jnp.swapaxes(logits, 0, 1).astype(jnp.float32)

    return view_logits_fn


@dataclasses.dataclass(frozen=True)
class ViewLogitsProgram:
    """A compiled `(variables, images, rows) -> logits` program and the rows it takes per call."""

    call: object
    batch_size: int


def compile_view_logits(model, variables, images, max_batch_size: int, n_views: int, preset: str) -> ViewLogitsProgram:
    """Ahead-of-time compiled `make_view_logits` for these variables' and images' shapes, taking
    `balanced_batch_size(len(images), max_batch_size)` rows per call."""
    batch_size = balanced_batch_size(images.shape[0], max_batch_size)
    rows_spec = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    call = jax.jit(make_view_logits(model, n_views, preset)).lower(variables, images, rows_spec).compile()
    return ViewLogitsProgram(call, batch_size)


def view_logits(program: ViewLogitsProgram, variables, images, progress: bool = False, row_axis: int = 0) -> np.ndarray:
    """float32 (N, V, C) logits of all N rows of `images`, `program.batch_size` rows per call (rows on
    `row_axis`: 1 for K models' stacked (K, N, V, C) logits, train_utils/batched.py)."""
    n_rows, batch_size = images.shape[0], program.batch_size
    outputs, pending = [], None
    for start in tqdm(range(0, n_rows, batch_size), desc="inference", unit="batch", disable=not progress,
                      leave=False):
        rows = np.minimum(np.arange(start, start + batch_size), n_rows - 1).astype(np.int32)
        logits = program.call(variables, images, rows)
        # Copy the previous batch to the host while this one computes.
        if pending is not None:
            outputs.append(np.asarray(pending))
        pending = logits
    outputs.append(np.asarray(pending))
    return np.concatenate(outputs, axis=row_axis)[(slice(None),) * row_axis + (slice(0, n_rows),)]
