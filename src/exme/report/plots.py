"""The report's figures, drawn with matplotlib's object API onto the Agg canvas.

``matplotlib.figure.Figure`` is used directly (never ``pyplot``), so rendering a report neither
changes a user's interactive backend nor keeps figures alive in pyplot's global registry. Each
function draws one figure from :mod:`schema` objects and writes one PNG; the caller decides which
figures a run has data for.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from exme.report.schema import FinalRow, RankedCheckpoint, SearchResult, SplitScores, Trial

DPI = 120
_OVERALL_COLOR = "black"
_KEPT_COLOR = "tab:blue"
_OTHER_COLOR = "#c8c8c8"


def task_colors(task_names: Sequence[str]) -> dict[str, str]:
    """One stable colour per task (sorted names), so a task looks the same in every figure."""
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(task_names))}


def _new_figure(width: float = 7.0, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _curve(trials: Sequence[Trial], param: str) -> tuple[list[float], list[SplitScores]]:
    """Unpruned trials sorted by ``param`` (a pruned trial was scored on a subset: not comparable)."""
    points = sorted(
        ((t.params[param], t.dev) for t in trials if not t.pruned and param in t.params),
        key=lambda p: p[0],
    )
    return [x for x, _ in points], [s for _, s in points]


def plot_parameter_curve(
    search: SearchResult,
    param: str,
    path: Path,
    *,
    title: str,
    xlabel: str,
    colors: dict[str, str],
    reference: SplitScores | None,
    reference_label: str,
    collapse_margin: float | None = None,
) -> Path:
    """Dev score vs one parameter: overall (thick black) and one line per task.

    ``reference`` (the SFT checkpoint's dev scores, as in the paper's figures) is drawn as dashed
    horizontal lines in the same colours; the chosen value is a dotted vertical line.
    """
    xs, scores = _curve(search.trials, param)
    fig = _new_figure()
    ax = fig.add_subplot()
    tasks = sorted({t for s in scores for t in s.tasks})
    for task in tasks:
        pts = [(x, s.tasks[task]) for x, s in zip(xs, scores) if task in s.tasks]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.3, color=colors[task], label=task)
    ax.plot(xs, [s.overall for s in scores], marker="o", ms=4, lw=2.4, color=_OVERALL_COLOR, label="overall")
    hit = [max((g.get("hit_limit", 0.0) for g in s.generation.values()), default=None) for s in scores]
    if any(h is not None for h in hit):  # collapse: share of generations that hit max_new_tokens (right axis)
        ref_hit = max((g.get("hit_limit", 0.0) for g in (reference.generation if reference else {}).values()), default=0.0)
        twin = ax.twinx()
        twin.plot(xs, [h or 0.0 for h in hit], ls=":", marker="s", ms=3, lw=1.2, color="tab:gray", label="hit token limit (share)")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("share hitting max_new_tokens", color="tab:gray")
        if collapse_margin is not None:
            bad = [(x, s.overall) for x, s, h in zip(xs, scores, hit) if h is not None and h - ref_hit > collapse_margin]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="X", ms=9, color="tab:red", label="collapsed", zorder=5)
    handles, labels = ax.get_legend_handles_labels()
    if any(h is not None for h in hit):
        handles.append(Line2D([], [], ls=":", marker="s", color="tab:gray"))
        labels.append("hit token limit (share, right axis)")
    if reference is not None:
        for task in tasks:
            if task in reference.tasks:
                ax.axhline(reference.tasks[task], ls="--", lw=1.0, color=colors[task], alpha=0.8)
        ax.axhline(reference.overall, ls="--", lw=1.6, color=_OVERALL_COLOR, alpha=0.8)
        handles.append(Line2D([], [], ls="--", color="grey"))
        labels.append(reference_label)
    best = search.best_params.get(param)
    if best is not None:
        ax.axvline(best, ls=":", lw=1.4, color="tab:red")
        handles.append(Line2D([], [], ls=":", color="tab:red"))
        labels.append(f"chosen {xlabel.split()[0]} = {best:.4g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev score")
    ax.grid(alpha=0.3)
    right = 1.13 if any(h is not None for h in hit) else 1.01  # clear of the right axis' label
    ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(right, 0.5))
    return _save(fig, path)


def plot_joint_search(search: SearchResult, path: Path) -> Path:
    """Each pair of searched parameters as a scatter coloured by dev overall; the best is a star.

    Points are drawn worst first, so where several trials project onto one point the best shows.
    """
    params = sorted({p for t in search.trials for p in t.params})[:4]
    pairs = list(itertools.combinations(params, 2)) or [(params[0], params[0])]
    trials = sorted((t for t in search.trials if not t.pruned), key=lambda t: t.dev.overall)
    fig = _new_figure(width=4.2 * len(pairs) + 1.0, height=4.0)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    lo = min((t.dev.overall for t in trials), default=0.0)
    hi = max((t.dev.overall for t in trials), default=1.0)
    mappable = None
    for ax, (px, py) in zip(axes, pairs):
        pts = [t for t in trials if px in t.params and py in t.params]
        mappable = ax.scatter(
            [t.params[px] for t in pts],
            [t.params[py] for t in pts],
            c=[t.dev.overall for t in pts],
            cmap="viridis",
            vmin=lo,
            vmax=hi,
            s=70,
            marker="s",
        )
        if px in search.best_params and py in search.best_params:
            ax.scatter(
                [search.best_params[px]], [search.best_params[py]], marker="*", s=260,
                color="tab:red", edgecolors="white",
            )
        ax.set_xlabel(px)
        ax.set_ylabel(py)
        ax.grid(alpha=0.3)
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), label="dev overall")
    fig.suptitle(f"Joint search {search.name}: dev overall per trial (red star: best, {search.best_dev:.4f})")
    return _save(fig, path)


def plot_ranking(ranking: Sequence[RankedCheckpoint], path: Path) -> Path:
    """Overall dev score per checkpoint in training order (by step); the kept ones in colour."""
    ordered = sorted(ranking, key=lambda c: (c.step is None, c.step if c.step is not None else 0))
    fig = _new_figure(width=max(6.0, 0.7 * len(ordered) + 2.0))
    ax = fig.add_subplot()
    names = [c.name for c in ordered]
    values = [c.dev.overall for c in ordered]
    bars = ax.bar(names, values, color=[_KEPT_COLOR if c.kept else _OTHER_COLOR for c in ordered])
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=7, padding=2)
    ax.set_ylabel("dev overall")
    ax.set_title("Checkpoint ranking on dev (kept checkpoints in blue)")
    rotate = len(names) > 5
    ax.set_xticks(range(len(names)), names, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.margins(y=0.12)
    ax.legend(
        [Line2D([], [], color=_KEPT_COLOR, lw=8), Line2D([], [], color=_OTHER_COLOR, lw=8)],
        ["kept", "not kept"], fontsize=8, loc="lower right",
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_final(rows: Sequence[FinalRow], test_errors: Sequence[float | None], path: Path) -> Path:
    """Grouped bars: dev and test overall per model; test bars carry ±1 standard error when known."""
    fig = _new_figure(width=max(6.5, 0.9 * len(rows) + 2.0))
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    width = 0.38
    dev = [r.dev.overall if r.dev is not None else float("nan") for r in rows]
    test = [r.test.overall for r in rows]
    ax.bar([x - width / 2 for x in xs], dev, width, color="#9ecae1", label="dev")
    errs = [e if e is not None else 0.0 for e in test_errors]
    bars = ax.bar(
        [x + width / 2 for x in xs], test, width, color="#08519c", label="test (±1 SE)",
        yerr=errs if any(e is not None for e in test_errors) else None, capsize=3, ecolor="black",
    )
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in test], fontsize=7, padding=2)
    ax.set_xticks(xs, [r.name for r in rows], rotation=30 if len(rows) > 5 else 0, ha="right" if len(rows) > 5 else "center")
    for label, row in zip(ax.get_xticklabels(), rows):
        if row.kind == "exme":
            label.set_fontweight("bold")
    ax.set_ylabel("overall score")
    ax.set_title("Final models: dev and test overall")
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
