"""Audit figures (matplotlib, Agg backend), each saved as PNG and PDF; functions return the PNG path."""

import concurrent.futures
import multiprocessing
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from medleak.io_utils import atomic_path  # noqa: E402
from medleak.privacy_utils.risk import esf, n_threads  # noqa: E402

ESF_GRID = np.linspace(0.5, 1.0, 201)
DPI = 120
# Titles placed at the top of the axes (where matplotlib's automatic placement puts them when nothing
# is drawn above an axes): the automatic placement lays out the tick labels again at every draw.
TITLE_Y = 1.0


def _draw(job):
    function, *args = job
    return function(*args)


def draw_all(jobs: dict, processes=None, start_method=None) -> dict:
    """{key: (figure function, *arguments)} → {key: the PNG path it returned}, in the same order.

    Drawing holds the GIL (threads would take turns), so with several cores and jobs the figures
    are drawn in `processes` worker processes (default `risk.n_threads()`); their files are written
    atomically like any other figure, and an error in one is raised here. Workers are forked (no
    start-up cost) unless JAX is loaded in this process — forking its threads is unsafe — or fork
    does not exist; then they are spawned (`start_method` overrides).
    """
    processes = min(n_threads() if processes is None else int(processes), len(jobs))
    if processes <= 1:
        return {key: _draw(job) for key, job in jobs.items()}
    if start_method is None:
        forkable = "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules
        start_method = "fork" if forkable else "spawn"
    context = multiprocessing.get_context(start_method)
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        paths = pool.map(_draw, jobs.values())
        return dict(zip(jobs, paths))


def log_scale(ax, axis="y"):
    """A log axis with plain tick labels (0.001, 0.01, …, 1): matplotlib's default 10^k labels go
    through mathtext, whose parsing was ~15 % of the figures' time."""
    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    target.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def save(fig, out_dir, name) -> Path:
    """Writes `name.png` and `name.pdf` atomically; closes the figure.

    The tight bounding box is laid out once for both files: `bbox_inches="tight"` would draw each
    figure twice per format (four draws; ~0.1 s each, mostly tick-label layout, for ~40 figures).
    """
    out_dir = Path(out_dir)
    fig.draw_without_rendering()
    bbox = fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    for ext in ("png", "pdf"):
        with atomic_path(out_dir / f"{name}.{ext}", suffix=f".{ext}") as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches=bbox, format=ext)
    plt.close(fig)
    return out_dir / f"{name}.png"


def roc_figure(attacks, grid, out_dir, name="roc"):
    """attacks: {label: (tpr_curves (n_targets, len(grid)), summary)}; linear and log-log panels."""
    fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(11, 4.8))
    for label, (curves, summary) in attacks.items():
        mean, sd = curves.mean(axis=0), curves.std(axis=0)
        text = f"{label} (AUC {summary['auc']['mean']:.3f} ± {summary['auc']['sd']:.3f})"
        for ax in (ax_lin, ax_log):
            line, = ax.plot(grid, mean, label=text, lw=1.5)
            # floor at 1e-5: on the log-log panel a band reaching 0 would fill the whole axis
            ax.fill_between(grid, np.clip(mean - sd, 1e-5, 1), np.clip(mean + sd, 1e-5, 1), color=line.get_color(), alpha=0.2)
    for ax in (ax_lin, ax_log):
        ax.plot([1e-5, 1], [1e-5, 1], ls="--", color="grey", lw=1, label="chance")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
    ax_lin.set_xlim(0, 1)
    ax_lin.set_ylim(0, 1)
    ax_lin.set_title("ROC (linear): mean ± sd over target models", y=TITLE_Y)
    log_scale(ax_log, "x")
    log_scale(ax_log, "y")
    ax_log.set_xlim(1e-4, 1)
    ax_log.set_ylim(1e-4, 1)
    ax_log.set_title("ROC (log-log): the low-FPR regime", y=TITLE_Y)
    ax_lin.legend(fontsize=7, loc="lower right")
    return save(fig, out_dir, name)


def _esf_axes(ax, values, label, color=None):
    share, lower, upper = esf(values, ESF_GRID)
    floor = 0.5 / max(len(values), 1)  # log axis: show zeros at half a count
    line, = ax.step(ESF_GRID, np.maximum(share, floor), where="post", label=label, color=color, lw=1.5)
    ax.fill_between(ESF_GRID, np.maximum(lower, floor), np.maximum(upper, floor), step="post", color=line.get_color(), alpha=0.2)


def esf_figure(values, out_dir, name, title, unit, chance=None, grid=None):
    """Empirical survival function share(AUC > x) with 95 % Clopper–Pearson band on a log y-axis.

    chance: optional `noise_floor.compare_to_chance` dict of the same share on `grid` (the
    campaign's permutation null): drawn as a grey dashed line with its interval.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _esf_axes(ax, values, f"{len(values)} {unit}")
    if chance is not None:
        floor = 0.5 / max(len(values), 1)
        ax.step(grid, np.maximum(chance["chance_mean"], floor), where="post", color="grey", ls="--", lw=1.2,
                label="chance (permuted IN/OUT)")
        ax.fill_between(grid, np.maximum(chance["chance_lo"], floor), np.maximum(chance["chance_hi"], floor),
                        step="post", color="grey", alpha=0.15)
    for t in (0.6, 0.7, 0.8, 0.9):
        ax.axvline(t, color="grey", lw=0.5, ls=":")
    log_scale(ax)
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("attack AUC x")
    ax.set_ylabel(f"share of {unit} with AUC > x")
    ax.set_title(title, y=TITLE_Y)
    ax.legend()
    return save(fig, out_dir, name)


def subgroup_esf_figure(groups, out_dir, name, attribute):
    """One eSF curve (with band) per category of an attribute; groups = {category: patient AUCs}."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for category, values in groups.items():
        _esf_axes(ax, values, f"{category} (n={len(values)})")
    log_scale(ax)
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("patient attack AUC x")
    ax.set_ylabel("share of patients with AUC > x")
    ax.set_title(f"Patient risk by {attribute}", y=TITLE_Y)
    ax.legend(fontsize=7)
    return save(fig, out_dir, name)


def composition_figure(table, test, out_dir, name, attribute):
    """Population vs top-1 % shares per category, bars annotated with Pearson residuals."""
    categories = table["category"].astype(str).tolist()
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(categories) + 2), 4.5))
    ax.bar(x - 0.2, table["share_population"], 0.4, label="all patients")
    bars = ax.bar(x + 0.2, table["share_top"], 0.4, label=f"top {test['n_top']} most vulnerable")
    for bar, residual in zip(bars, table["pearson_residual"]):
        ax.annotate(f"{residual:+.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylabel("share of patients")
    ax.set_title(f"{attribute}: χ² = {test['chi2']:.1f}, dof = {test['dof']}, p = {test['p_value']:.2g}\n(numbers: Pearson residuals)", fontsize=10, y=TITLE_Y)
    ax.legend(fontsize=8)
    return save(fig, out_dir, name)


def utility_privacy_figure(utility, privacy, out_dir, name, attribute):
    """Side by side per category: test AUROC (mean ± sd over runs) and share of patients at risk."""
    categories = privacy["category"].astype(str).tolist()
    fig, (ax_u, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    util = utility.set_index(utility["category"].astype(str)).reindex(categories)
    x = np.arange(len(categories))
    ax_u.bar(x, util["auroc_mean"], yerr=util["auroc_sd"], capsize=3, color="tab:green")
    ax_u.set_xticks(x, categories, rotation=30, ha="right")
    ax_u.set_ylim(0.0, 1.0)
    ax_u.set_ylabel("test AUROC (mean ± sd over models)")
    ax_u.set_title(f"Utility by {attribute}", y=TITLE_Y)
    ax_p.bar(x, privacy["at_risk_share"], color="tab:red")
    ax_p.set_xticks(x, categories, rotation=30, ha="right")
    ax_p.set_ylabel("share of patients at risk (FDR-controlled)")
    ax_p.set_title(f"Privacy risk by {attribute}", y=TITLE_Y)
    return save(fig, out_dir, name)


def vulnerable_grid(images, captions, out_dir, name="vulnerable_images"):
    """A grid of the most vulnerable images (arrays) with captions."""
    n = len(images)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=8, y=TITLE_Y)
    fig.suptitle("Most vulnerable images (highest record AUC)")
    return save(fig, out_dir, name)


# --- across privacy budgets (src/medleak/privacy_utils/budgets.py)


def budget_esf_figure(curves, out_dir, name, title, unit):
    """eSF per privacy budget on one log-y axis; curves = [(label, AUCs, bound or None, bound label)].

    Each bound is a dashed vertical line in its curve's colour: the largest AUC that budget allows.
    """
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for index, (label, values, bound, bound_label) in enumerate(curves):
        color = f"C{index}"
        _esf_axes(ax, np.asarray(values), f"{label}, n={len(values)}", color=color)
        if bound is not None and bound < 1.0:
            ax.axvline(bound, color=color, ls="--", lw=1.2, label=f"{bound_label} {bound:.3f}")
        elif bound is not None:  # a guarantee that bounds nothing (e.g. group privacy of many images)
            ax.plot([], [], color=color, ls="--", lw=1.2, label=f"{bound_label}: 1 (no bound)")
    log_scale(ax)
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("attack AUC x")
    ax.set_ylabel(f"share of {unit} with AUC > x")
    ax.set_title(title, y=TITLE_Y)
    ax.legend(fontsize=7)
    return save(fig, out_dir, name)


def epsilon_axis(epsilons):
    """x positions for ε on a log axis: ∞ sits one decade right of the largest finite ε."""
    epsilons = np.asarray(epsilons, dtype=np.float64)
    finite = epsilons[np.isfinite(epsilons)]
    infinity = 10.0 * finite.max() if finite.size else 1.0
    return np.where(np.isfinite(epsilons), epsilons, infinity)


def epsilon_text(epsilon) -> str:
    """ε as shown in legends, ticks and pages: `8`, `0.5`, `∞`."""
    return "∞" if not np.isfinite(epsilon) else f"{epsilon:g}"


def _epsilon_ticks(ax, epsilons, positions):
    ax.set_xscale("log")
    ax.set_xticks(positions, [epsilon_text(e) for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("privacy budget ε (∞ = no DP)")


def utility_vs_epsilon_figure(table, out_dir, name):
    """Test macro AUROC and accuracy (mean ± sd over runs) against ε; table: budgets.csv rows."""
    order = np.argsort(epsilon_axis(table["target_epsilon"]), kind="stable")
    epsilons = table["target_epsilon"].to_numpy(float)[order]
    x = epsilon_axis(epsilons)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for column, label in (("test_auroc", "test macro AUROC"), ("test_accuracy", "test accuracy")):
        ax.errorbar(x, table[f"{column}_mean"].to_numpy(float)[order], yerr=table[f"{column}_sd"].to_numpy(float)[order],
                    marker="o", capsize=3, label=label)
    _epsilon_ticks(ax, epsilons, x)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("utility (mean ± sd over models)")
    ax.set_title("Utility against the privacy budget", y=TITLE_Y)
    ax.legend(fontsize=8)
    return save(fig, out_dir, name)


def subgroup_utility_vs_epsilon_figure(table, out_dir, name, attribute):
    """Test macro AUROC per category of `attribute` against ε; table rows: target_epsilon, category, auroc_mean/sd."""
    all_epsilons = np.unique(table["target_epsilon"].to_numpy(float))
    all_x = epsilon_axis(all_epsilons)
    position = dict(zip(all_epsilons.tolist(), all_x.tolist()))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for category, rows in table.groupby("category", sort=True):
        rows = rows.sort_values("target_epsilon")
        x = [position[e] for e in rows["target_epsilon"].to_numpy(float)]
        ax.errorbar(x, rows["auroc_mean"], yerr=rows["auroc_sd"], marker="o", capsize=3, label=str(category))
    _epsilon_ticks(ax, all_epsilons, all_x)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test macro AUROC (mean ± sd over models)")
    ax.set_title(f"Utility by {attribute} against ε", y=TITLE_Y)
    ax.legend(fontsize=7)
    return save(fig, out_dir, name)
