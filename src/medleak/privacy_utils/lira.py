"""LiRA (Carlini et al., 2022): likelihood-ratio attack with per-record Gaussians fitted on shadows.

For every record and view, the shadow models that trained on it (IN) and those that did not (OUT)
give two samples of its score. LiRA fits a Gaussian to each — centre = **median**, spread =
population standard deviation — and scores a target model's observation s by

    online:  mean over views of  log N(s; μ_in, σ_in) − log N(s; μ_out, σ_out)
    offline: mean over views of  log Φ((s − μ_out) / σ_out)      (one-sided: "s is high for an OUT")

Fixed-variance variants replace the per-record σ by one pooled σ (√ of the mean per-record variance
over records and views), which is more stable with few shadows.

Here the shadows are the same for every target (`lira`, `shadow_stats`): right when the shadow and
target models are independent draws. When the targets are held-out runs of an exact-k campaign
(every record IN for exactly k runs) shared shadows carry the targets' membership and bias the
attack below chance; `attacks.attack_targets` scores each target with its own leave-one-out
shadows (`shadows.py`) instead. Shared shadows' per-record statistics are computed once
(`shadow_stats`) and reused for all targets and all variants. The medians are exact: per chunk of
records the scores are staged once as (records, models, views) — the only pass over main memory —
then, in cache, each record's IN (OUT) models are gathered into a compact (records, views, models)
block padded with +inf and sorted along the contiguous model axis; medians and trimmed means are gathers and small matmuls on
the sorted rows, and the moments come from the same staged copy.

Records with no IN (or no OUT) shadow — common with few shadows — borrow the other Gaussian shifted
by the median IN−OUT gap over records, with the pooled σ; records with a single IN (OUT) shadow use
the pooled σ; a warning says how many records needed that.
"""

import warnings

import numpy as np
from scipy import special

from medleak.errors import MedleakError
from medleak.privacy_utils.risk import DEFAULT_CHUNK, check_scores_masks, group_moments, map_chunks, stage


def sorted_groups(staged, in_group, out_group):
    """Staged (R, M, V) scores (`risk.stage`) + (R, M) bool IN / OUT memberships → (in_sorted,
    out_sorted), each (R, V, W).

    Row (r, v) of `in_sorted` holds record r's IN models' values ascending, then +inf padding up to
    W = the chunk's largest IN count; `out_sorted` likewise for OUT. Gathering each group into a
    compact block first (whole 16-view rows) keeps the sorted rows short: with half the models in
    each group, W ≤ 128 sorts twice as fast as the full 190-model rows.
    """
    n_records, n_models, n_views = staged.shape
    padded = np.concatenate([staged, np.full((n_records, 1, n_views), np.inf, staged.dtype)], axis=1)
    record = np.arange(n_records)[:, None]
    groups = []
    for group in (in_group, out_group):
        count = group.sum(axis=1)
        width = max(int(count.max()), 1)
        # a stable argsort lists each record's group members first; the remaining slots point at +inf
        order = np.argsort(~group, axis=1, kind="stable")[:, :width]
        order = np.where(np.arange(width)[None, :] < count[:, None], order, n_models)
        rows = padded[record, order].transpose(0, 2, 1).copy()  # (R, V, W)
        rows.sort(axis=-1)
        groups.append(rows)
    return groups[0], groups[1]


def _medians(rows, count):
    """Median of each row's first `count` values (mean of the two middle values); NaN if count = 0.

    rows: (R, V, M) sorted along M; count: (R,). Two flat gathers (cheaper than take_along_axis).
    """
    n_records, n_views, n_models = rows.shape
    flat = rows.reshape(n_records, n_views * n_models)
    view_start = (np.arange(n_views) * n_models)[None, :]
    record = np.arange(n_records)[:, None]
    lo = np.minimum(np.maximum(count - 1, 0) // 2, n_models - 1)[:, None]
    hi = np.minimum(count // 2, n_models - 1)[:, None]
    med = 0.5 * (flat[record, view_start + lo].astype(np.float64) + flat[record, view_start + hi])
    return np.where(count[:, None] > 0, med, np.nan)


def _trimmed_means(rows, count, trim):
    """Mean of each row's first `count` values after dropping floor(trim·count) at both ends."""
    cut = np.floor(trim * count).astype(np.int64)[:, None]
    position = np.arange(rows.shape[-1])[None, :]
    weights = ((position >= cut) & (position < count[:, None] - cut)).astype(np.float64)[:, :, None]  # (R, M, 1)
    kept = weights.sum(axis=1)  # (R, 1)
    finite = np.minimum(rows, np.finfo(np.float32).max).astype(np.float64)  # +inf padding × 0 weight → 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (finite @ weights)[..., 0] / kept


def shadow_stats(shadow_scores, shadow_masks, *, medians=True, trim=None, transform=None, chunk=DEFAULT_CHUNK, threads=None):
    """Per-record/view IN and OUT statistics over shadow models, computed once for all targets.

    Returns a dict of (n_records, n_views) float64 arrays `median_in, median_out, mean_in,
    mean_out, sd_in, sd_out` (population sd; NaN where a record has no IN/OUT shadow), `n_in,
    n_out` (n_records,), and with `trim` (a fraction in [0, 0.5)) also `trimmed_in, trimmed_out`:
    means after dropping floor(trim·n) values at each end. `medians=False` with no `trim` skips the
    sort (moments only: what RMIA with plain means needs). `transform` (e.g. `rmia_from_lira`) is
    applied to each chunk first, so statistics of derived scores need no second full-size array.
    """
    shadow_scores, shadow_masks = check_scores_masks(shadow_scores, shadow_masks, "shadow_scores")
    return _stats_pass(shadow_scores, shadow_masks, None, medians, trim, transform, chunk, threads)[1]


def campaign_stats(scores, masks, shadow_models, *, medians=True, trim=None, chunk=DEFAULT_CHUNK, threads=None):
    """One pass over a campaign's scores: record-risk moments over all models, and `shadow_stats`
    over the models in `shadow_models` (the rest are held-out targets).

    Returns (moments, stats): `moments` as `risk.in_out_moments(scores, masks)`, `stats` as
    `shadow_stats(scores[shadow_models], masks[shadow_models])` — without staging the array twice.
    """
    scores, masks = check_scores_masks(scores, masks)
    selected = np.zeros(scores.shape[0], dtype=bool)
    selected[shadow_models] = True
    return _stats_pass(scores, masks, selected, medians, trim, None, chunk, threads)


def _stats_pass(scores, masks, selected, medians, trim, transform, chunk, threads):
    """(all-model moments or None, shadow statistics); shadows = `selected` models (None: all)."""
    n_models, n_records, n_views = scores.shape
    shadow_masks = masks if selected is None else masks[selected]
    if shadow_masks.shape[0] < 1:
        raise MedleakError("need at least one shadow model")
    if trim is not None and not 0.0 <= trim < 0.5:
        raise MedleakError(f"trim must lie in [0, 0.5), got {trim}")
    n_in = shadow_masks.sum(axis=0)
    n_out = shadow_masks.shape[0] - n_in
    names = ["mean_in", "mean_out", "sd_in", "sd_out"]
    if medians:
        names += ["median_in", "median_out"]
    if trim is not None:
        names += ["trimmed_in", "trimmed_out"]
    out = {k: np.empty((n_records, n_views)) for k in names}
    moments = None
    if selected is not None:
        moments = {k: np.empty((n_records, n_views)) for k in ("mean_in", "sd_in", "mean_out", "sd_out")}

    def work(a, b):
        staged = stage(scores[:, a:b])
        if transform is not None:
            staged = transform(staged)
        member = masks[:, a:b].T  # (R, M)
        groups = [member, ~member]
        if selected is not None:  # shadows only, then all models (record risk)
            groups = [member & selected, ~member & selected] + groups
        mean, sd = group_moments(staged, np.stack(groups, axis=1))
        out["mean_in"][a:b], out["mean_out"][a:b] = mean[:, 0], mean[:, 1]
        out["sd_in"][a:b], out["sd_out"][a:b] = sd[:, 0], sd[:, 1]
        if moments is not None:
            moments["mean_in"][a:b], moments["mean_out"][a:b] = mean[:, 2], mean[:, 3]
            moments["sd_in"][a:b], moments["sd_out"][a:b] = sd[:, 2], sd[:, 3]
        if not medians and trim is None:
            return
        in_sorted, out_sorted = sorted_groups(staged, groups[0], groups[1])
        c_out, c_in = n_out[a:b], n_in[a:b]
        if medians:
            out["median_in"][a:b] = _medians(in_sorted, c_in)
            out["median_out"][a:b] = _medians(out_sorted, c_out)
        if trim is not None:
            out["trimmed_in"][a:b] = _trimmed_means(in_sorted, c_in, trim)
            out["trimmed_out"][a:b] = _trimmed_means(out_sorted, c_out, trim)

    map_chunks(work, n_records, chunk, threads)
    out["n_in"], out["n_out"] = n_in, n_out
    if moments is not None:
        moments["n_in"] = masks.sum(axis=0)
        moments["n_out"] = n_models - moments["n_in"]
    return moments, out


def _gaussian_fit(stats):
    """(μ_in, σ_in, μ_out, σ_out, pooled σ_in, pooled σ_out) per record/view: the medians, the
    per-record σ with the pooled σ where a group has < 2 shadows or no spread, and a record
    lacking a group given the other one shifted by the median IN−OUT gap (module doc)."""
    n_in, n_out = stats["n_in"], stats["n_out"]
    mu_in, mu_out = stats["median_in"].copy(), stats["median_out"].copy()
    pooled_in = _pooled_sd(stats["sd_in"], n_in)
    pooled_out = _pooled_sd(stats["sd_out"], n_out)
    sd_in = np.where((n_in < 2)[:, None] | ~(stats["sd_in"] > 0), pooled_in, stats["sd_in"])
    # A zero spread (all shadows agree exactly) would make the likelihood infinite.
    sd_out = np.where((n_out < 2)[:, None] | ~(stats["sd_out"] > 0), pooled_out, stats["sd_out"])
    both = (n_in > 0) & (n_out > 0)
    if not both.all():  # the median gap (a sort over records) only when some record lacks a group
        gap = np.nanmedian(mu_in[both] - mu_out[both], axis=0) if both.any() else np.zeros(mu_in.shape[1])
        mu_in[n_in == 0] = mu_out[n_in == 0] + gap
        mu_out[n_out == 0] = mu_in[n_out == 0] - gap
    return mu_in, sd_in, mu_out, sd_out, pooled_in, pooled_out


def _warn_fallbacks(stats, offline, stacklevel):
    n_in, n_out = stats["n_in"], stats["n_out"]
    both = (n_in > 0) & (n_out > 0)
    if not offline and (~both).any():
        warnings.warn(
            f"{int((~both).sum())} record(s) have no IN or no OUT shadow model; their missing Gaussian "
            "is the other one shifted by the median IN−OUT gap (use more shadow models to avoid this)",
            stacklevel=stacklevel + 1,
        )
    if offline and (n_out == 0).any():
        warnings.warn(f"{int((n_out == 0).sum())} record(s) have no OUT shadow model; offline LiRA uses a shifted IN Gaussian",
                      stacklevel=stacklevel + 1)


def _pooled_sd(sd, counts):
    """√(mean per-record variance) over records with ≥ 2 shadows (1.0 if there are none)."""
    usable = counts >= 2
    if not usable.any():
        return 1.0
    pooled = float(np.sqrt(np.mean(np.square(sd[usable]))))
    return pooled if pooled > 0 else 1.0


TARGET_CHUNK = 4096  # records per block when scoring targets: large enough to amortise numpy call overhead


def lira_from_stats(stats, target_scores, *, offline=False, fix_variance=False):
    """LiRA scores (n_targets, n_records) for target observations (n_targets, n_records, n_views)."""
    return lira_variants_from_stats(stats, target_scores, {"lira": dict(offline=offline, fix_variance=fix_variance)})["lira"]


def lira_variants_from_stats(stats, target_scores, variants):
    """{name: LiRA scores (n_targets, n_records)} of several variants, variants = {name: {"offline":
    bool, "fix_variance": bool}}, from one set of statistics: the Gaussians are fitted once and each
    block of records is scored for every variant while in cache (online and offline share z_out)."""
    target_scores = np.asarray(target_scores)
    single = target_scores.ndim == 2
    if single:
        target_scores = target_scores[None]
    if "median_in" not in stats:
        raise MedleakError("LiRA needs shadow_stats(..., medians=True)")
    n_records, n_views = stats["median_in"].shape
    if target_scores.shape[1:] != (n_records, n_views):
        raise MedleakError(f"target_scores {target_scores.shape} must be (n_targets, {n_records}, {n_views}) like the shadow scores")
    mu_in, sd_in, mu_out, sd_out, pooled_in, pooled_out = _gaussian_fit(stats)
    for offline in sorted({bool(options.get("offline")) for options in variants.values()}):
        _warn_fallbacks(stats, offline, stacklevel=3)
    result = {name: np.empty(target_scores.shape[:2]) for name in variants}
    by_spread = {}  # fix_variance → {"online": [names], "offline": [names]}
    for name, options in variants.items():
        kind = "offline" if options.get("offline") else "online"
        by_spread.setdefault(bool(options.get("fix_variance")), {"online": [], "offline": []})[kind].append(name)

    def work(a, b):  # a block of records for every target; numpy releases the GIL, so blocks run in parallel
        for t, observed in enumerate(target_scores[:, a:b]):
            observed = observed.astype(np.float64)
            for fixed, names in by_spread.items():
                s_in, s_out = (pooled_in, pooled_out) if fixed else (sd_in[a:b], sd_out[a:b])
                z_out = (observed - mu_out[a:b]) / s_out
                if names["offline"]:
                    score = special.log_ndtr(z_out).mean(axis=1)
                    for name in names["offline"]:
                        result[name][t, a:b] = score
                if names["online"]:
                    z_in = (observed - mu_in[a:b]) / s_in
                    log_ratio = 0.5 * (z_out * z_out - z_in * z_in) + np.log(s_out / s_in)
                    score = log_ratio.mean(axis=1)
                    for name in names["online"]:
                        result[name][t, a:b] = score

    map_chunks(work, n_records, chunk=TARGET_CHUNK)
    return {name: values[0] if single else values for name, values in result.items()}


def lira(shadow_scores, shadow_masks, target_scores, *, offline=False, fix_variance=False, stats=None):
    """LiRA membership scores of target models' records (higher = more likely a member).

    shadow_scores: (n_shadows, n_records, n_views) LiRA scores (`lira_scores`) of shadow models;
    shadow_masks: (n_shadows, n_records) bool, True where the shadow trained on the record;
    target_scores: (n_targets, n_records, n_views) or (n_records, n_views).
    Returns (n_targets, n_records) (or (n_records,)) float64. Pass `stats=shadow_stats(...)` to
    reuse the shadow statistics across calls. For targets that are runs of the same exact-k
    campaign as the shadows, use `attacks.attack_targets` (unbiased per-target shadows).
    """
    if stats is None:
        stats = shadow_stats(shadow_scores, shadow_masks)
    return lira_from_stats(stats, target_scores, offline=offline, fix_variance=fix_variance)
