"""The report's figures, drawn with matplotlib's object API onto the Agg canvas.

``matplotlib.figure.Figure`` is used directly (never ``pyplot``), so rendering a report neither
changes a user's interactive backend nor keeps figures alive in pyplot's global registry. Each
function draws one figure from :mod:`schema` objects and writes one PNG; the caller decides which
figures a run has data for.
"""

from __future__ import annotations

import math
import re
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
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # legends placed outside the axes stay whole
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
        twin.set_ylabel("share at max_new_tokens", color="tab:gray")
        if collapse_margin is not None:
            bad = [(x, s.overall) for x, s, h in zip(xs, scores, hit) if h is not None and h - ref_hit > collapse_margin]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="X", ms=9, color="tab:red", label="collapsed", zorder=5)
    handles, labels = ax.get_legend_handles_labels()
    if any(h is not None for h in hit):
        handles.append(Line2D([], [], ls=":", marker="s", color="tab:gray"))
        labels.append("share at token limit (right)")
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
    right = 1.2 if any(h is not None for h in hit) else 1.01  # clear of the right axis label (1.13 overlapped it)
    ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(right, 0.5))
    return _save(fig, path)


def _searched_values(search: SearchResult) -> dict[str, tuple[str, list[tuple[float, float, int]]]]:
    """Per searched parameter: (axis label, [(value, dev overall, trial number)]) of unpruned trials.

    Merge weights ``w_i`` are shown normalised (w_i / Σw), the form the final table and the merged
    model use; TPE samples them raw in [0, 1], and a raw value alone says little.
    """
    names = sorted({p for t in search.trials for p in t.params}, key=_param_order)
    weights = [n for n in names if re.fullmatch(r"w_\d+", n)]
    out: dict[str, tuple[str, list[tuple[float, float, int]]]] = {}
    for name in names:
        points = []
        for number, trial in enumerate(search.trials):
            if trial.pruned or name not in trial.params:
                continue
            value = float(trial.params[name])
            if name in weights and all(w in trial.params for w in weights):
                total = sum(float(trial.params[w]) for w in weights)
                value = value / total if total > 0 else float("nan")
            points.append((value, trial.dev.overall, number))
        label = _PARAM_LABELS.get(name.split("_")[0], name)
        suffix = name.split("_", 1)[1] if "_" in name else ""
        axis = label + suffix.translate(_SUBSCRIPTS) + (" (normalised)" if name in weights else "")
        out[name] = (axis, points)
    return out


_PARAM_LABELS = {"alpha": "α", "w": "w", "beta": "β", "lambda": "λ", "density": "density", "t": "t"}
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _param_order(name: str) -> tuple[int, str, int]:
    """α₁, α₂, …, then w₁, w₂, …, then anything else (so a row of the grid reads as one kind)."""
    kind, _, index = name.partition("_")
    rank = {"alpha": 0, "w": 1, "beta": 2}.get(kind, 3)
    return (rank, kind, int(index) if index.isdigit() else 0)


def plot_joint_search(search: SearchResult, path: Path, *, columns: int = 3) -> Path:
    """One panel per searched parameter (every one: α₁…α_k and w₁…w_k): dev overall of each trial
    against the parameter's value, coloured by trial order, the best trial as a red star.

    Panels sit in a grid ``columns`` wide so the figure reads at page width whatever k is (a row of
    six pair plots did not). Pair plots were dropped: with k = 3 there are 15 pairs, each too small.
    """
    values = _searched_values(search)
    names = list(values) or ["(none)"]
    rows = math.ceil(len(names) / columns)
    cols = min(columns, len(names))
    fig = _new_figure(width=max(6.0, 3.1 * cols + 1.2), height=max(3.6, 2.6 * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    n_trials = max(len(search.trials), 1)
    best_number = None
    if search.trials:
        finished = [(t.dev.overall, i) for i, t in enumerate(search.trials) if not t.pruned]
        best_number = max(finished)[1] if finished else None
    mappable = None
    for ax, name in zip(axes.flat, names):
        axis, points = values.get(name, (name, []))
        mappable = ax.scatter(
            [p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points], cmap="viridis",
            vmin=0, vmax=n_trials - 1, s=28, alpha=0.9,
        )
        best = [p for p in points if p[2] == best_number]
        if best:
            ax.scatter([best[0][0]], [best[0][1]], marker="*", s=220, color="tab:red", edgecolors="white", zorder=5)
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev overall")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes.flat), label="trial number", shrink=0.9)
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
    ax.set_xlabel("checkpoint (in training order)")
    ax.set_title("Checkpoint ranking on dev (kept checkpoints in blue)")
    rotate = len(names) > 5
    ax.set_xticks(range(len(names)), names, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.margins(y=0.12)
    # Outside the axes, right of them: inside, it covered a bar whatever corner it took.
    ax.legend(
        [Line2D([], [], color=_KEPT_COLOR, lw=8), Line2D([], [], color=_OTHER_COLOR, lw=8)],
        ["kept", "not kept"], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
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


def plot_task_scores(rows: Sequence[FinalRow], path: Path, *, colors: dict[str, str]) -> Path:
    """Test score per task for every model of the final table: one group of bars per model, one
    colour per task (the colours of the α and β curves), ExMe's name in bold.

    The overall score can hide a model that gains on one task and loses on another; this shows it.
    """
    tasks = sorted({t for r in rows for t in r.test.tasks})
    fig = _new_figure(width=max(6.5, 0.35 * len(rows) * max(len(tasks), 1) + 2.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(tasks), 1)
    xs = list(range(len(rows)))
    for j, task in enumerate(tasks):
        offset = (j - (len(tasks) - 1) / 2) * width
        values = [r.test.tasks.get(task, float("nan")) for r in rows]
        ax.bar([x + offset for x in xs], values, width, color=colors.get(task, f"C{j}"), label=task)
    rotate = len(rows) > 5
    ax.set_xticks(xs, [r.name for r in rows], rotation=30 if rotate else 0, ha="right" if rotate else "center")
    for label, row in zip(ax.get_xticklabels(), rows):
        if row.kind == "exme":
            label.set_fontweight("bold")
    ax.set_xlabel("model")
    ax.set_ylabel("test score")
    ax.set_title("Final models: test score per task")
    ax.margins(y=0.08)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="task", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_group_alphas(search: SearchResult, path: Path) -> Path:
    """The chosen α per group of tensors (bars, one colour per kept checkpoint) against the global α
    each group started from (dashed lines): where the finer search moved away from one α per checkpoint."""
    groups = list(search.space.get("groups", []))
    start = search.space.get("start", {})
    k = max((int(name.split("/")[0].removeprefix("alpha_")) for name in search.best_params), default=0)
    fig = _new_figure(width=max(5.0, 1.1 * len(groups) * max(k, 1) + 2.0))
    ax = fig.subplots()
    width = 0.8 / max(k, 1)
    for i in range(1, k + 1):
        xs = [j + (i - 1 - (k - 1) / 2) * width for j in range(len(groups))]
        chosen = [search.best_params.get(f"alpha_{i}/{g}", math.nan) for g in groups]
        bars = ax.bar(xs, chosen, width=width * 0.9, label=f"α{i} per group")
        glob = start.get(f"alpha_{i}/{groups[0]}") if groups else None
        if glob is not None:
            ax.axhline(glob, linestyle="--", color=bars.patches[0].get_facecolor(), alpha=0.8, label=f"global α{i} = {glob:.3g}")
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylabel("α (extrapolation)")
    ax.set_title(f"α per group ({search.name.removeprefix('module:')}), chosen on the search part of dev")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
