"""Figures a reader can use: every searched parameter drawn, legends off the data, labelled axes."""

from __future__ import annotations

import matplotlib.image
import pytest

from exme.report import plots
from exme.report.schema import FinalRow, RankedCheckpoint, SearchResult, SplitScores, Trial


def _tpe_search(k: int = 3, n: int = 12) -> SearchResult:
    trials = []
    for i in range(n):
        params = {f"alpha_{j}": 0.1 * ((i + j) % 5) for j in range(1, k + 1)}
        params |= {f"w_{j}": 0.2 + 0.05 * ((i * j) % 7) for j in range(1, k + 1)}
        trials.append(Trial(params=params, dev=SplitScores(overall=0.3 + 0.01 * i, tasks={"t": 0.3 + 0.01 * i})))
    return SearchResult(name="joint-tpe", space={}, trials=trials, best_params=trials[-1].params, best_dev=trials[-1].dev.overall)


def test_joint_plot_has_one_panel_per_searched_parameter_and_reads_at_page_width(tmp_path, monkeypatch):
    search = _tpe_search(k=3)
    captured = {}
    real_save = plots._save

    def keep(fig, path):
        captured["fig"] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    png = plots.plot_joint_search(search, tmp_path / "joint.png")
    visible = [ax for ax in captured["fig"].axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    labels = sorted(ax.get_xlabel() for ax in visible)
    assert labels == sorted(["α₁", "α₂", "α₃", "w₁ (normalised)", "w₂ (normalised)", "w₃ (normalised)"])
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width <= 1300 and width / height < 2.5  # a grid, not a 3144×480 strip


def test_joint_plot_shows_weights_normalised_as_the_final_table_does():
    search = _tpe_search(k=2, n=3)
    values = plots._searched_values(search)
    for number, trial in enumerate(search.trials):
        total = trial.params["w_1"] + trial.params["w_2"]
        assert values["w_1"][1][number][0] == pytest.approx(trial.params["w_1"] / total)
        assert values["alpha_2"][1][number][0] == pytest.approx(trial.params["alpha_2"])


def _ranking(n: int = 4) -> list[RankedCheckpoint]:
    return [
        RankedCheckpoint(name=f"checkpoint-{100 * (i + 1)}", path=f"/c{i}", step=100 * (i + 1),
                         dev=SplitScores(overall=0.4 + 0.05 * i, tasks={"t": 0.4 + 0.05 * i}), kept=i >= n - 2)
        for i in range(n)
    ]


def test_ranking_legend_sits_outside_the_bars_and_the_x_axis_is_labelled(tmp_path, monkeypatch):
    captured = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (captured.setdefault("fig", fig), real_save(fig, path))[1])
    plots.plot_ranking(_ranking(), tmp_path / "ranking.png")
    fig = captured["fig"]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend_box = ax.get_legend().get_window_extent(renderer)
    for bar in ax.patches:
        assert not legend_box.overlaps(bar.get_window_extent(renderer))
    assert ax.get_xlabel()


def test_task_chart_draws_each_models_test_score_per_task(tmp_path, monkeypatch):
    rows = [
        FinalRow(name="base", kind="base", test=SplitScores(overall=0.2, tasks={"a": 0.1, "b": 0.3})),
        FinalRow(name="ExMe", kind="exme", test=SplitScores(overall=0.5, tasks={"a": 0.6, "b": 0.4})),
    ]
    captured = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (captured.setdefault("fig", fig), real_save(fig, path))[1])
    png = plots.plot_task_scores(rows, tmp_path / "tasks.png", colors=plots.task_colors(["a", "b"]))
    assert png.is_file()
    ax = captured["fig"].axes[0]
    heights = sorted(round(bar.get_height(), 6) for bar in ax.patches)
    assert heights == [0.1, 0.3, 0.4, 0.6]
    assert ax.get_xlabel() == "model" and ax.get_ylabel() == "test score"
