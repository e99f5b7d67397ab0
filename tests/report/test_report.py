"""The rendered report: valid figures, correct numbers, an outcome that says what happened."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.image
import pytest

from exme.cli import main
from exme.errors import ExmeError
from exme.report import load_results, render, save_results
from exme.report.schema import RankedCheckpoint, RunResults, SplitScores

# The fixture suite's weights (1, 1, 2), normalised by hand.
W = {"arith": 0.25, "choice": 0.25, "code": 0.5}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _section(report: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, flags=re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def _row(report: str, title: str, first_cell: str) -> list[str]:
    """The cells of the first table row in ``title`` whose first cell is ``first_cell``."""
    for line in _section(report, title).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in {title!r}")


def _hand_binomial_se(a: SplitScores, b: SplitScores) -> float:
    return math.sqrt(sum(
        W[t] ** 2 * (a.tasks[t] * (1 - a.tasks[t]) + b.tasks[t] * (1 - b.tasks[t])) / a.n_items[t] for t in W
    ))


def _final(results: RunResults, name: str):
    return next(r for r in results.final if r.name == name)


def test_render_writes_every_plot_as_a_real_image_and_links_them(tmp_path, make):
    report = render(make(joint=True), tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    expected = {"ranking", "alpha_checkpoint-500", "alpha_checkpoint-400", "beta", "joint", "final", "tasks"}
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == expected
    for png in (tmp_path / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 15_000, f"{png.name} is suspiciously small"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
        assert pixels[..., :3].std() > 0.05, f"{png.name} is blank"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"plots/{name}.png" for name in expected)
    assert all((tmp_path / link).is_file() for link in links)


def test_plots_are_drawn_only_for_what_the_results_contain(tmp_path, make):
    results = make()  # no joint search
    render(results, tmp_path)
    assert not (tmp_path / "plots" / "joint.png").exists()
    minimal = RunResults(exme_version="0.1.0", created="now", config={}, suite={},
                         ranking=[RankedCheckpoint(name="c1", path="/c1", step=1,
                                                   dev=SplitScores(overall=0.5, tasks={"t": 0.5}), kept=True)])
    text = render(minimal, tmp_path / "min").read_text()
    assert [p.name for p in (tmp_path / "min" / "plots").glob("*.png")] == ["ranking.png"]
    assert "No ExMe model was evaluated on the test split" in _section(text, "Outcome")


def test_outcome_reports_the_gain_over_the_dev_chosen_sft_with_its_binomial_se(tmp_path, results):
    text = render(results, tmp_path).read_text()
    exme, sft1 = _final(results, "ExMe"), _final(results, "SFT-1")
    gain = (0.25 * 0.43 + 0.25 * 0.655 + 0.5 * 0.385) - (0.25 * 0.40 + 0.25 * 0.64 + 0.5 * 0.36)
    se = _hand_binomial_se(exme.test, sft1.test)
    outcome = _section(text, "Outcome")
    # SFT-1 is the best SFT on dev (SFT-2 is better on test, and must not be the reference).
    # A gain of 0.0237 with SE 0.0296: the approximate 95% interval includes 0, so no win is claimed.
    assert "**ExMe vs the best SFT checkpoint** (SFT-1, best on dev)" in outcome
    assert f"a difference of +{gain:.4f}" in outcome
    assert f"standard error {se:.4f}" in outcome
    assert f"approximate 95% CI {gain - 1.959964 * se:+.4f}".replace("-", "−") in outcome
    assert "600 test items (arith: 200, choice: 200, code: 200)" in outcome
    assert "**no detectable difference**" in outcome and "beat" not in outcome
    row = _row(text, "Outcome", "best SFT (SFT-1)")
    assert row[1:7] == [f"{exme.test.overall:.4f}", f"{sft1.test.overall:.4f}", f"+{gain:.4f}", f"{se:.4f}",
                        f"+{gain / se:.1f}", "no detectable difference"]
    assert "SFT-2 (best SFT on test)" in outcome
    assert "Selection was on the dev split only" in outcome
    assert "*binomial*" in outcome and "not available" in outcome


def test_outcome_says_worse_when_exme_loses_clearly_to_sft_and_baselines(tmp_path, make):
    results = make(exme_test=(0.30, 0.50, 0.25))  # far below SFT-1 (0.40, 0.64, 0.36)
    outcome = _section(render(results, tmp_path).read_text(), "Outcome")
    loss = (0.25 * 0.30 + 0.25 * 0.50 + 0.5 * 0.25) - (0.25 * 0.40 + 0.25 * 0.64 + 0.5 * 0.36)
    assert loss < 0
    assert f"a difference of −{abs(loss):.4f}" in outcome
    assert "**worse**" in outcome and "better" not in outcome.split("\n\n")[0]
    for baseline in ("linear", "ties", "dare_ties"):
        assert _row(f"## Outcome\n{outcome}", "Outcome", f"{baseline} (baseline)")[-1] == "worse"


def test_outcome_uses_the_paired_se_when_per_item_scores_are_recorded(tmp_path, make):
    results = make()
    exme, sft1 = _final(results, "ExMe"), _final(results, "SFT-1")
    # Per-item 0/1 scores matching the accuracies: ExMe right on a superset of SFT-1's items.
    for row in (exme, sft1):
        row.test.per_item = {t: dict(enumerate([1.0] * round(row.test.tasks[t] * 200) + [0.0] * (200 - round(row.test.tasks[t] * 200))))
                             for t in W}
        row.test.per_item = {t: {str(i): v for i, v in items.items()} for t, items in row.test.per_item.items()}
    # Per task the differences are k ones and 200 − k zeros: sample variance k(200 − k) / (200 · 199).
    k = {t: round((exme.test.tasks[t] - sft1.test.tasks[t]) * 200) for t in W}
    se = math.sqrt(sum(W[t] ** 2 * (k[t] * (200 - k[t]) / (200 * 199)) / 200 for t in W))
    outcome = _section(render(results, tmp_path).read_text(), "Outcome")
    assert _row(f"## Outcome\n{outcome}", "Outcome", "best SFT (SFT-1)")[4] == f"{se:.4f}"
    assert "*paired*" in outcome


def test_report_tables_carry_the_results_numbers(tmp_path, results):
    text = render(results, tmp_path).read_text()
    exme = _final(results, "ExMe")
    assert _row(text, "Final table", "**ExMe**")[3:] == [f"{exme.test.tasks[t]:.4f}" for t in W] + [f"{exme.test.overall:.4f}"]
    assert _row(text, "Stage 1 — rank checkpoints on dev", "1")[1:4] == ["checkpoint-500", "500", "0.4125"]
    alpha = _row(text, "Stage 2 — extrapolate (α per kept checkpoint)", "checkpoint-500")
    assert alpha[1] == "0.4" and alpha[4] == f"+{results.alpha_search[0].best_dev - 0.4125:.4f}"
    assert "Chosen **β = 0.6**" in text
    assert _row(text, "Timings", "**total**")[1] == f"{sum(results.timings.values()):.1f} s (6.0 min)"
    suite = _row(text, "What was run", "code")
    assert suite[1:] == ["0.500", "100", "200"]


def test_every_markdown_table_is_well_formed(tmp_path, make):
    text = render(make(joint=True), tmp_path).read_text()
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 8
    for table in tables:
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
        assert len(widths) == 1, table
        assert re.fullmatch(r"\|( (:---|---:) \|)+", table[1]), table[1]
        assert len(table) >= 3


def test_save_then_load_results_round_trips_and_leaves_no_temporary_file(tmp_path, results):
    assert save_results(results, tmp_path / "run") == tmp_path / "run" / "results.json"
    assert load_results(tmp_path / "run") == results
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["results.json"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("{not json", "not valid JSON"),
        ('{"exme_version": "0.1.0"}', "key 'created'"),
    ],
)
def test_load_results_names_the_file_when_missing_corrupt_or_invalid(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    with pytest.raises(ExmeError, match=re.escape(expected)) as err:
        load_results(tmp_path)
    assert str(tmp_path / "results.json") in str(err.value)


def test_cli_report_rerenders_from_results_json(tmp_path, results, capsys):
    (tmp_path / "results.json").write_text(results.model_dump_json())
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    first = (tmp_path / "report.md").read_text()
    assert "0.4637" in first
    # Edit the results and re-render: the report follows the file, and a stale figure goes.
    (tmp_path / "plots" / "joint.png").write_bytes(b"stale")
    results.final[5].test = SplitScores(overall=0.5, tasks={"arith": 0.5, "choice": 0.5, "code": 0.5},
                                        n_items={t: 200 for t in W})
    (tmp_path / "results.json").write_text(results.model_dump_json())
    assert main(["report", str(tmp_path)]) == 0
    second = (tmp_path / "report.md").read_text()
    assert "0.4637" not in second and "ExMe vs the best SFT checkpoint** (SFT-1, best on dev) on the test split: 0.5000" in second
    assert not (tmp_path / "plots" / "joint.png").exists()


@pytest.mark.parametrize("content", [None, "{not json", "[]"])
def test_cli_report_bad_results_is_one_line_and_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exme: error: ") and "results.json" in lines[0]
    assert "Traceback" not in captured.err and not (tmp_path / "report.md").exists()


def test_cli_report_missing_run_folder_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope") in err[0]


def test_render_leaves_no_temporary_files(tmp_path, results):
    render(results, tmp_path)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["plots", "report.md"]


def test_outcome_without_item_counts_says_it_has_no_noise_estimate(tmp_path, results):
    for row in results.final:
        row.test.n_items = {}
    outcome = _section(render(results, tmp_path).read_text(), "Outcome")
    assert "no noise estimate" in outcome and "an unrecorded number of test items" in outcome
    assert _row(f"## Outcome\n{outcome}", "Outcome", "best SFT (SFT-1)")[4:6] == ["–", "–"]


def test_alpha_search_is_matched_to_its_checkpoint_by_field_then_name_then_kept_order(results):
    from exme.report.render import checkpoint_of

    search = results.alpha_search[0].model_copy(update={"checkpoint": None, "name": "alpha/checkpoint-600"})
    assert checkpoint_of(search, results.ranking, 0).name == "checkpoint-600"
    search = search.model_copy(update={"checkpoint": "checkpoint-300"})
    assert checkpoint_of(search, results.ranking, 0).name == "checkpoint-300"
    anonymous = search.model_copy(update={"checkpoint": None, "name": "first"})
    assert [checkpoint_of(anonymous, results.ranking, i).name for i in (0, 1)] == ["checkpoint-500", "checkpoint-400"]
    assert checkpoint_of(anonymous, results.ranking, 2) is None
