"""Shadow statistics that do not depend on the evaluated target's membership (leave-one-out design).

The campaign plan puts every record IN for exactly k of the n runs. If some runs are held out as
targets and the rest are the shadows, a record's IN count among the shadows is k minus the number
of targets it is IN for: the shadow statistics then carry the target's membership bit (on null
data LiRA online scores AUC 0.47 at 16 runs, 0.75 with 4 runs and one target).

Design: every target t is scored with its own shadows, the other n − 1 runs. For each record one
more model is dropped, at random (seeded by `drop_seed` and t), from the group the target's bit
would otherwise enlarge: if t trained on the record, one of its OUT shadows; if not, one of its IN
shadows. Every record then has n_in − 1 IN and n_out − 1 OUT shadows (k − 1 and n − k − 1 with the
exact-k plan) whatever the target says, and — the runs being exchangeable — the shadow scores are
distributed alike for members and non-members. This holds when each record's IN count over the
models passed is fixed by the plan (the exact-k plan over *all* runs); pass all runs, not a subset.

Efficiency: in the model space of all runs, target t's IN group for a record is the record's IN
group with one element removed (t itself or the dropped shadow), and likewise OUT. So the rows are
sorted once (`fit_shadows`) and, per target, each statistic of a group minus one known value v is
O(1): with x the group's sorted row (n values) and the reduced row of m = n − 1 values,

    reduced[i]  = x[i] if x[i] < v else x[i + 1]              (order statistics → medians)
    trimmed sum = Σ x[c .. m − c] − clip(v, x[c], x[m − c]),   c = floor(trim · m)
    mean, M2    : Welford downdate of the group's mean and sum of squared deviations.

`fit_shadows` keeps only those order statistics and moments per record and view, not the sorted
rows. With a `transform` (monotone non-decreasing, e.g. `rmia_from_lira`) the rank comparisons are
made on the stored scores, so they are exact whatever rounding the transform does.
"""

import dataclasses
import typing

import numpy as np

from medleak.errors import MedleakError
from medleak.privacy_utils.lira import sorted_groups
from medleak.privacy_utils.risk import DEFAULT_CHUNK, check_scores_masks, group_moments, map_chunks, stage

GROUPS = ("in", "out")
TARGET_BLOCK = 8192  # records per block when computing one target's statistics


@dataclasses.dataclass
class ShadowFit:
    """Target-independent per-record statistics over all models (`fit_shadows`).

    `scores`/`masks` are the caller's arrays (not copied): a target's own observations and the
    dropped shadows' values are read from them. `member_order` (n_models, n_records) lists each
    record's IN models (ascending) then its OUT models. `groups[g][name]` holds (n_records, n_views)
    arrays for g in ("in", "out"): `mean`, `sd` (population), `m2` (float64), `lo, lo_next, hi, hi_next` (sorted-row
    values at the reduced median's positions), `trim_sum, trim_lo, trim_hi` (with `trim`), and
    `raw_lo, raw_hi, raw_trim_lo, raw_trim_hi` (the untransformed values used for rank comparisons;
    the same arrays when there is no transform).
    """

    scores: np.ndarray
    masks: np.ndarray
    transform: typing.Callable | None
    medians: bool
    trim: float | None
    n_in: np.ndarray
    n_out: np.ndarray
    member_order: np.ndarray
    groups: dict

    @property
    def n_models(self):
        return self.masks.shape[0]

    def observed(self, model):
        """Model `model`'s (n_records, n_views) scores, transformed like the fitted statistics."""
        values = self.scores[model]
        return values if self.transform is None else self.transform(values)


def fit_arrays(fit: ShadowFit) -> dict:
    """The arrays of a `ShadowFit` as a flat {name: array} dict (for the audit cache): n_in, n_out,
    member_order and "<group>-<statistic>" (aliased raw_* arrays stored once)."""
    arrays = {"n_in": fit.n_in, "n_out": fit.n_out, "member_order": fit.member_order}
    for g in GROUPS:
        for name, array in fit.groups[g].items():
            if not (name.startswith("raw_") and array is fit.groups[g][name[4:]]):
                arrays[f"{g}-{name}"] = array
    return arrays


def fit_from_arrays(scores, masks, arrays, *, medians=True, trim=None, transform=None) -> ShadowFit:
    """The `ShadowFit` of `fit_arrays(fit_shadows(scores, masks, medians=…, trim=…, transform=…))`."""
    scores, masks = check_scores_masks(scores, masks)
    groups = {g: {} for g in GROUPS}
    for key, array in arrays.items():
        g, _, name = key.partition("-")
        if g in groups:
            groups[g][name] = array
    for stats in groups.values():  # without a transform the raw_* arrays are the values themselves
        for name in ("lo", "hi", "trim_lo", "trim_hi"):
            if name in stats and "raw_" + name not in stats:
                stats["raw_" + name] = stats[name]
    return ShadowFit(scores, masks, transform, medians, trim, np.asarray(arrays["n_in"]), np.asarray(arrays["n_out"]),
                     arrays["member_order"], groups)


def reduced_positions(count):
    """Per record: (lo, hi) positions of the median of the group minus one element (m = count − 1)."""
    m = np.maximum(count - 1, 1)
    return (m - 1) // 2, m // 2


def trim_cut(count, trim):
    """Values dropped at each end of the reduced group (m = count − 1) by a trimmed mean."""
    return np.floor(trim * np.maximum(count - 1, 0)).astype(np.int64)


def trim_window(count, trim):
    """(first, last) sorted position a trimmed mean keeps when every record of a chunk has the same
    group size (the exact-k plan), else None (per-record positions: the prefix-sum path)."""
    if trim is None or count.size == 0 or not np.all(count == count[0]):
        return None
    cut = int(trim_cut(count[:1], trim)[0])
    return cut, max(int(count[0]) - 1 - cut, 0)


def store_trimmed_window(stats, a, b, rows, first, last, transform):
    """Trimmed-mean statistics of records a..b from their sorted rows (R, V, W) when all keep the
    positions first..last: one slice, transformed and summed (no prefix sums over whole rows)."""
    window = rows[..., first:last + 1]
    values = window if transform is None else transform(window)
    stats["trim_sum"][a:b] = values.sum(axis=2, dtype=np.float64)
    stats["trim_lo"][a:b], stats["trim_hi"][a:b] = values[..., 0], values[..., -1]
    if transform is not None:
        stats["raw_trim_lo"][a:b], stats["raw_trim_hi"][a:b] = window[..., 0], window[..., -1]


def fit_shadows(scores, masks, *, medians=True, trim=None, transform=None, chunk=DEFAULT_CHUNK, threads=None):
    """Sorts every record's IN and OUT values over all models once; returns a `ShadowFit`.

    scores: (n_models, n_records, n_views) (2-D = one view); masks: (n_models, n_records) bool over
    *all* the campaign's models (targets included: `target_stats` leaves each target out).
    `medians` keeps what LiRA needs, `trim` (in [0, 0.5)) what trimmed means need (RMIA);
    moments are always kept. `transform` maps stored scores chunk-wise (must be monotone
    non-decreasing, e.g. `rmia_from_lira` to get probabilities from LiRA scores).
    """
    scores, masks = check_scores_masks(scores, masks)
    n_models, n_records, n_views = scores.shape
    if n_models < 2:
        raise MedleakError(f"leave-one-out shadows need at least 2 models (a target and a shadow), got {n_models}")
    if trim is not None and not 0.0 <= trim < 0.5:
        raise MedleakError(f"trim must lie in [0, 0.5), got {trim}")
    n_in = masks.sum(axis=0)
    n_out = n_models - n_in
    index_type = np.int16 if n_models < 2**15 else np.int32
    member_order = np.argsort(~masks, axis=0, kind="stable").astype(index_type)
    names = ["mean", "m2", "sd"]
    if medians:
        names += ["lo", "lo_next", "hi", "hi_next", "raw_lo", "raw_hi"]
    if trim is not None:
        names += ["trim_sum", "trim_lo", "trim_hi", "raw_trim_lo", "raw_trim_hi"]
    value_type = scores.dtype if transform is None else np.float64
    groups = {g: {name: np.empty((n_records, n_views), np.float64 if name in ("mean", "m2", "sd", "trim_sum") else value_type)
                  for name in names} for g in GROUPS}
    if transform is None:  # comparisons and values are the same numbers: one array each
        for g in GROUPS:
            for name in ("lo", "hi", "trim_lo", "trim_hi"):
                if name in groups[g]:
                    groups[g]["raw_" + name] = groups[g][name]

    def work(a, b):
        raw = stage(scores[:, a:b])
        values = raw if transform is None else transform(raw)
        member = masks[:, a:b].T
        mean, sd = group_moments(values, np.stack([member, ~member], axis=1))
        counts = (n_in[a:b], n_out[a:b])
        for j, g in enumerate(GROUPS):
            groups[g]["mean"][a:b], groups[g]["sd"][a:b] = mean[:, j], sd[:, j]
            groups[g]["m2"][a:b] = counts[j][:, None] * np.square(sd[:, j])
        if not medians and trim is None:
            return
        raw_sorted = sorted_groups(raw, member, ~member)  # (R, V, W) each, +inf padded
        for j, g in enumerate(GROUPS):
            rows = raw_sorted[j]
            count = counts[j]
            stats = groups[g]
            window = None if medians else trim_window(count, trim)  # RMIA on the exact-k plan
            if window is not None:
                store_trimmed_window(stats, a, b, rows, *window, transform)
                continue
            sorted_values = rows if transform is None else transform(rows)

            def at(position, source=sorted_values):
                position = np.minimum(position, source.shape[-1] - 1)
                return np.take_along_axis(source, np.broadcast_to(position[:, None, None], (len(count), n_views, 1)), axis=2)[..., 0]

            if medians:
                lo, hi = reduced_positions(count)
                stats["lo"][a:b], stats["lo_next"][a:b] = at(lo), at(lo + 1)
                stats["hi"][a:b], stats["hi_next"][a:b] = at(hi), at(hi + 1)
                if transform is not None:
                    stats["raw_lo"][a:b], stats["raw_hi"][a:b] = at(lo, rows), at(hi, rows)
            if trim is not None:
                cut = trim_cut(count, trim)
                top = np.maximum(count - 1 - cut, 0)  # last kept position of the full row: m − c
                finite = np.where(np.isfinite(rows), sorted_values, 0.0).astype(np.float64)
                prefix = np.concatenate([np.zeros(finite.shape[:2] + (1,)), np.cumsum(finite, axis=2)], axis=2)
                stats["trim_sum"][a:b] = at(top + 1, prefix) - at(cut, prefix)
                stats["trim_lo"][a:b], stats["trim_hi"][a:b] = at(cut), at(top)
                if transform is not None:
                    stats["raw_trim_lo"][a:b], stats["raw_trim_hi"][a:b] = at(cut, rows), at(top, rows)

    map_chunks(work, n_records, chunk, threads)
    return ShadowFit(scores, masks, transform, medians, trim, n_in, n_out, member_order, groups)


def dropped_models(fit_or_masks, target_index, drop_seed=0):
    """(drop_in, drop_out), each int (n_records,): the model removed from each record's IN and OUT
    group for target `target_index` (−1 where the group is empty).

    The target is removed from the group it belongs to; the other group loses one of its models
    drawn uniformly with numpy's default_rng([drop_seed, target_index]), so the draws of one target
    do not depend on which other targets are evaluated.
    """
    if isinstance(fit_or_masks, ShadowFit):
        masks, member_order, n_in = fit_or_masks.masks, fit_or_masks.member_order, fit_or_masks.n_in
    else:
        masks = np.asarray(fit_or_masks, dtype=bool)
        member_order, n_in = np.argsort(~masks, axis=0, kind="stable"), masks.sum(axis=0)
    n_models, n_records = masks.shape
    if not 0 <= target_index < n_models:
        raise MedleakError(f"target index {target_index} is outside the {n_models} models")
    n_out = n_models - n_in
    member = masks[target_index]
    other_count = np.where(member, n_out, n_in)  # size of the group the target is not in
    draw = np.floor(np.random.default_rng([int(drop_seed), int(target_index)]).random(n_records) * other_count).astype(np.int64)
    position = np.where(member, n_in + draw, draw)
    other = np.where(other_count > 0, member_order[np.minimum(position, n_models - 1), np.arange(n_records)], -1).astype(np.int64)
    drop_in = np.where(member, target_index, other)
    drop_out = np.where(member, other, target_index)
    return drop_in, drop_out


def target_stats(fit, target_index, drop_seed=0, *, dtype=np.float64, names=None):
    """Shadow statistics of target `target_index` with one model dropped per group (module doc).

    Returns the dict `lira.shadow_stats` returns — (n_records, n_views) float64 `mean_in,
    mean_out, sd_in, sd_out` (population sd), with medians `median_in, median_out`, with trim
    `trimmed_in, trimmed_out`, and int (n_records,) `n_in, n_out` — so `lira.lira_from_stats`
    and `rmia.reference_probability` take it unchanged. Entries of an empty group are NaN.
    `dtype`: of the returned arrays (computed in float64 either way; the attacks store float32:
    half the memory traffic, AUCs unchanged to 1e-6); `names`: only these of mean, sd, median,
    trimmed (default all the fit has).
    """
    drops = dropped_models(fit, target_index, drop_seed)
    n_records, n_views = fit.groups["in"]["mean"].shape
    counts = (fit.n_in, fit.n_out)
    out = {"n_in": np.maximum(fit.n_in - 1, 0), "n_out": np.maximum(fit.n_out - 1, 0)}
    available = ["mean", "sd"] + (["median"] if fit.medians else []) + (["trimmed"] if fit.trim is not None else [])
    names = available if names is None else [name for name in available if name in names]
    for g in GROUPS:
        for name in names:
            out[f"{name}_{g}"] = np.empty((n_records, n_views), dtype)

    def work(a, b):
        record = np.arange(a, b)
        for j, g in enumerate(GROUPS):
            drop, stats, n = drops[j][a:b], fit.groups[g], counts[j][a:b]
            raw_dropped = fit.scores[np.maximum(drop, 0), record]  # (R, V): the removed model's value
            dropped = (raw_dropped if fit.transform is None else fit.transform(raw_dropped)).astype(np.float64)
            m = (n - 1).astype(np.float64)[:, None]
            empty = (n <= 1)[:, None]  # nothing left after the drop
            any_empty = bool(empty.any())  # usually not: then no pass to blank nothing

            def blank(x, empty=empty, any_empty=any_empty):
                return np.where(empty, np.nan, x) if any_empty else x
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = stats["mean"][a:b]
                new_mean = (n[:, None] * mean - dropped) / m
                if "mean" in names:
                    out[f"mean_{g}"][a:b] = blank(new_mean)
                if "sd" in names:
                    m2 = np.maximum(stats["m2"][a:b] - (dropped - mean) * (dropped - new_mean), 0.0)
                    out[f"sd_{g}"][a:b] = blank(np.sqrt(m2 / m))
                if "median" in names:
                    lo = np.where(stats["raw_lo"][a:b] < raw_dropped, stats["lo"][a:b], stats["lo_next"][a:b])
                    hi = np.where(stats["raw_hi"][a:b] < raw_dropped, stats["hi"][a:b], stats["hi_next"][a:b])
                    out[f"median_{g}"][a:b] = blank(0.5 * (lo.astype(np.float64) + hi))
                if "trimmed" in names:
                    removed = np.where(raw_dropped < stats["raw_trim_lo"][a:b], stats["trim_lo"][a:b],
                                       np.where(raw_dropped > stats["raw_trim_hi"][a:b], stats["trim_hi"][a:b], dropped))
                    kept = m - 2 * trim_cut(n, fit.trim)[:, None]
                    out[f"trimmed_{g}"][a:b] = blank((stats["trim_sum"][a:b] - removed) / kept)

    map_chunks(work, n_records, chunk=TARGET_BLOCK)
    return out
