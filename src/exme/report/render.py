"""``report.md`` and its figures, made from a run's :class:`RunResults`; and reading ``results.json`` back.

The report is written for a reader who will decide whether to ship the merged model: the outcome on
the held-out test split comes first, stated plainly whatever it is ("did not beat" when ExMe lost),
with its noise; then what was run and the evidence of each stage. Every number comes from
``results.json``, so ``exme report RUN_DIR`` re-renders the same report at any later time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from exme.errors import ExmeError
from exme.report import plots
from exme.report.schema import FinalRow, RankedCheckpoint, RunResults, SearchResult, SplitScores
from exme.report.stats import (
    BETTER,
    BINOMIAL,
    NO_DIFFERENCE,
    PAIRED,
    WORSE,
    Z_975,
    Difference,
    binomial_se,
    difference,
    paired_comparison,
    task_weights,
)
from exme.report.stats import verdict as verdict_words
from exme.report.verdict import OVERALL, find, no_disagreement, p_text
from exme.report.verdict import best_sft_row as best_verdict_sft

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
_OWN_PLOT = re.compile(r"^(alpha_.+|beta|joint|ranking|final|tasks)\.png$")  # alpha_groups.png included


# --------------------------------------------------------------------------- reading results.json


def load_results(run_dir: Path | str) -> RunResults:
    """Read and validate ``RUN_DIR/results.json``; any problem is one :class:`ExmeError` naming the file."""
    path = Path(run_dir) / RESULTS_FILE
    if not Path(run_dir).is_dir():
        raise ExmeError(f"{run_dir}: run folder not found; pass the folder a pipeline run wrote (it holds {RESULTS_FILE})")
    if not path.is_file():
        raise ExmeError(f"{path}: file not found; this folder holds no pipeline results (run `exme run` first or check the path)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ExmeError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExmeError(f"{path}: not valid JSON ({err}); the run may have been interrupted while writing it, re-run the pipeline") from None
    try:
        return RunResults.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = " ".join(str(first["msg"]).split())
        more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
        raise ExmeError(
            f"{path}: key '{where}': {msg}{more}; the file does not match this exme version's results schema"
        ) from None


def save_results(results: RunResults, run_dir: Path | str) -> Path:
    """Write ``RUN_DIR/results.json`` atomically (a reader never sees half a file); return its path.

    The pipeline calls this after each stage, so an interrupted run still leaves valid results.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULTS_FILE
    _write_atomic(path, results.model_dump_json(indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- number formatting


def fmt_score(x: float | None) -> str:
    """Scores everywhere in the report: four decimals (one item of 10 000 still shows)."""
    return "–" if x is None else f"{x:.4f}"


def fmt_delta(x: float) -> str:
    """A signed score difference, with a real minus sign for losses."""
    return f"{x:+.4f}".replace("-", "−")


def fmt_param(x: Any) -> str:
    """A hyper-parameter value (α, β, density): up to four significant digits."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.4g}"


def fmt_seconds(s: float) -> str:
    """Stage times: seconds with one decimal, and minutes beside them once they are long."""
    return f"{s:,.1f} s" if s < 120 else f"{s:,.1f} s ({s / 60:.1f} min)"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt_param(v)}" for k, v in params.items()) or "–"


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` has one of ``l``/``r`` per column (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading the results


def _task_names(results: RunResults) -> list[str]:
    names: dict[str, None] = {}
    for row in results.final:
        names.update(dict.fromkeys(row.test.tasks))
    for ckpt in results.ranking:
        names.update(dict.fromkeys(ckpt.dev.tasks))
    return list(names)


def _search_param(search: SearchResult, prefer: str) -> str | None:
    keys = list(search.best_params) or sorted({k for t in search.trials for k in t.params})
    if not keys:
        return None
    if len(keys) == 1:
        return keys[0]
    return next((k for k in keys if k.lower().startswith(prefer)), keys[0])


def ranked(ranking: Sequence[RankedCheckpoint]) -> list[RankedCheckpoint]:
    """Best dev overall first; ties go to the later step (the pipeline's keep rule); raced-out checkpoints
    (scored on fewer items) after every finisher."""
    return sorted(ranking, key=lambda c: (c.stopped_early, -c.dev.overall, -(c.step if c.step is not None else -1)))


def checkpoint_of(search: SearchResult, ranking: Sequence[RankedCheckpoint], index: int) -> RankedCheckpoint | None:
    """The ranked checkpoint an α search extrapolates: its ``checkpoint`` field, else its name, else the
    ``index``-th kept checkpoint in rank order."""
    by_name = {c.name: c for c in ranking}
    if search.checkpoint is not None and search.checkpoint in by_name:
        return by_name[search.checkpoint]
    if search.name in by_name:
        return by_name[search.name]
    suffix = [c for c in ranking if re.search(rf"(^|[^A-Za-z0-9]){re.escape(c.name)}$", search.name)]
    if suffix:
        return max(suffix, key=lambda c: len(c.name))
    kept = [c for c in ranked(ranking) if c.kept]
    return kept[index] if index < len(kept) else None


def best_sft(rows: Sequence[FinalRow], ranking: Sequence[RankedCheckpoint]) -> FinalRow | None:
    """The SFT checkpoint to beat, chosen on **dev** (choosing it on test would flatter the baseline
    with test noise): the SFT row with the best dev overall, else the one named like the top of the
    ranking, else the first SFT row."""
    sfts = [r for r in rows if r.kind == "sft"]
    if not sfts:
        return None
    if all(r.dev is not None for r in sfts):
        return max(sfts, key=lambda r: r.dev.overall)  # type: ignore[union-attr]
    top = ranked(ranking)[0].name if ranking else None
    return next((r for r in sfts if top is not None and top in (r.name, r.params.get("checkpoint"))), sfts[0])


def _n_items(scores: Iterable[SplitScores]) -> dict[str, int]:
    for s in scores:
        if s.n_items:
            return dict(s.n_items)
    return {}


# --------------------------------------------------------------------------- plots


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "search"


def draw_plots(results: RunResults, plots_dir: Path, weights: dict[str, float]) -> dict[str, Path]:
    """Every figure the results have data for; returns ``{key: png path}`` (keys: ``ranking``,
    ``alpha:<search name>``, ``beta``, ``joint``, ``final``)."""
    if plots_dir.is_dir():  # a figure from an earlier render that this one would not redraw is stale
        for old in plots_dir.glob("*.png"):
            if _OWN_PLOT.match(old.name):
                old.unlink()
    colors = plots.task_colors(_task_names(results))
    out: dict[str, Path] = {}
    if results.ranking:
        out["ranking"] = plots.plot_ranking(results.ranking, plots_dir / "ranking.png")
    for i, search in enumerate(results.alpha_search):
        param = _search_param(search, "alpha")
        if param is None or not search.trials:
            continue
        ckpt = checkpoint_of(search, results.ranking, i)
        label = ckpt.name if ckpt is not None else search.name
        out[f"alpha:{search.name}"] = plots.plot_parameter_curve(
            search, param, plots_dir / f"alpha_{_slug(label)}.png",
            title=f"Extrapolation of {label}: dev score vs α", xlabel="α (extrapolation)",
            colors=colors, reference=ckpt.dev if ckpt is not None else None, reference_label=f"{label} (SFT)",
            collapse_margin=results.collapse.get("margin"),
        )
    beta = results.beta_search
    if beta is not None and beta.trials and (param := _search_param(beta, "beta")) is not None:
        sft = best_sft(results.final, results.ranking)
        top = ranked(results.ranking)[0] if results.ranking else None
        ref, ref_label = None, ""
        if sft is not None and sft.dev is not None:
            ref, ref_label = sft.dev, f"{sft.name} (best SFT)"
        elif top is not None:
            ref, ref_label = top.dev, f"{top.name} (best SFT)"
        out["beta"] = plots.plot_parameter_curve(
            beta, param, plots_dir / "beta.png",
            title="Merge of the two extrapolated checkpoints: dev score vs β",
            xlabel="β (weight of θ′₁; θ′₂ gets 1 − β)", colors=colors, reference=ref, reference_label=ref_label,
        )
    joint = results.joint_search
    if joint is not None and joint.trials and any(t.params for t in joint.trials):
        out["joint"] = plots.plot_joint_search(joint, plots_dir / "joint.png")
    module = results.module_search
    if module is not None and module.trials:
        out["alpha_groups"] = plots.plot_group_alphas(module, plots_dir / "alpha_groups.png")
    if results.final:
        errors = [binomial_se(r.test, weights) for r in results.final]
        out["final"] = plots.plot_final(results.final, errors, plots_dir / "final.png")
        if len(_task_names(results)) > 1:
            out["tasks"] = plots.plot_task_scores(results.final, plots_dir / "tasks.png", colors=colors)
    return out


# --------------------------------------------------------------------------- report sections


def _ci_words(d: Difference) -> str:
    """The verdict of a difference with only a standard error: the words of diff ± 1.96·SE."""
    if d.se is None:
        return "no noise estimate"
    return verdict_words(d.diff - Z_975 * d.se, d.diff + Z_975 * d.se)


def _noise_phrase(d: Difference) -> str:
    if d.se is None:
        return "no noise estimate: item counts or per-item scores are missing"
    return (f"standard error {fmt_score(d.se)}, approximate 95% CI {fmt_delta(d.diff - Z_975 * d.se)} to "
            f"{fmt_delta(d.diff + Z_975 * d.se)}")


def comparisons(results: RunResults, weights: dict[str, float]) -> list[tuple[str, FinalRow, Difference]]:
    """ExMe's test difference against each reference: the best SFT (chosen on dev) first, then the SFT
    best on test when it is another one, each EXPO model, each baseline. Empty without an ExMe row."""
    exme = next((r for r in results.final if r.kind == "exme"), None)
    if exme is None:
        return []
    refs: list[tuple[str, FinalRow]] = []
    sft = best_sft(results.final, results.ranking)
    if sft is not None:
        refs.append((f"best SFT ({sft.name})", sft))
        # Not a fair reference (picked with test), but a reader should see it when it differs.
        on_test = max((r for r in results.final if r.kind == "sft"), key=lambda r: r.test.overall)
        if on_test is not sft and on_test.test.overall > sft.test.overall:
            refs.append((f"{on_test.name} (best SFT on test)", on_test))
    refs += [(f"{r.name} (extrapolated only)", r) for r in results.final if r.kind == "expo"]
    refs += [(f"{r.name} (baseline)", r) for r in results.final if r.kind == "baseline"]
    return [(label, row, difference(exme.test, row.test, weights)) for label, row in refs]


def _noise_note(methods: set[str | None]) -> str:
    notes = []
    if PAIRED in methods:
        notes.append(
            "*paired*: from per-item test scores of both models on the same items, "
            "SE = √(Σₜ wₜ² · var(dₜ) / nₜ) with dₜ the per-item differences on task t (sample variance)"
        )
    if BINOMIAL in methods:
        notes.append(
            "*binomial*: SE = √(Σₜ wₜ² · (pₜ(1 − pₜ) + qₜ(1 − qₜ)) / nₜ) from the two models' task accuracies "
            "pₜ, qₜ, treating their errors as independent (an over-estimate when both fail on the same items)"
        )
    if None in methods:
        notes.append("no estimate where item counts are missing or scores are not accuracies in [0, 1]")
    return (
        "Noise: SE is the standard error of the overall-score difference (wₜ the normalised task weights); "
        + "; ".join(notes)
        + ". The verdict is read from the approximate 95% interval (difference ± 1.96 SE): "
        "\"better\" or \"worse\" only when the interval excludes 0. Paired confidence intervals need "
        "per-item scores, which this run's evaluator did not give (not available)."
    )


def _label(row: FinalRow, sft: FinalRow | None) -> str:
    if sft is not None and row.name == sft.name:
        return f"best SFT ({row.name})"
    return f"{row.name} (extrapolated only)" if row.kind == "expo" else (
        f"{row.name} (baseline)" if row.kind == "baseline" else row.name)


def _items_text(n_items: dict[str, int], split: str) -> str:
    if not n_items:
        return f"an unrecorded number of {split} items"
    return f"{sum(n_items.values())} {split} items ({', '.join(f'{t}: {n}' for t, n in n_items.items())})"


def _headline(sft: FinalRow, words: str, a: float, b: float, diff: float, interval: str, items: str) -> str:
    return (f"**ExMe vs the best SFT checkpoint** ({sft.name}, best on dev) on the test split: "
            f"{fmt_score(a)} vs {fmt_score(b)}, a difference of {fmt_delta(diff)} ({interval}) over {items}: "
            f"**{words}**.")


def _paired_outcome(results: RunResults, exme: FinalRow) -> list[str]:
    sft = best_verdict_sft(results.final)
    test = [c for c in results.comparisons if c.split == "test"]
    items = _items_text(exme.test.n_items, "test")
    parts: list[str] = []
    head = find(test, sft.name) if sft is not None else None
    if sft is not None and head is not None:
        parts.append(_headline(sft, head.verdict, exme.test.overall, sft.test.overall, head.diff,
                               f"paired 95% CI {fmt_delta(head.ci_low)} to {fmt_delta(head.ci_high)}, {p_text(head)}",
                               items))
        if no_disagreement(head):
            parts.append(f"The two models gave the same score on every one of the {head.n} test items, so nothing "
                         "could be told apart: the smallest difference this test set could detect is undefined "
                         "(there is no disagreement to size it from).")
        elif head.verdict == NO_DIFFERENCE and head.ci_low <= 0 <= head.ci_high:
            parts.append("The interval includes 0: this test set cannot tell the two models apart, whatever the "
                         "sign of the difference.")
        elif head.verdict == NO_DIFFERENCE:
            parts.append(f"The interval excludes 0, but not after adjusting for the {head.family} comparisons made "
                         "at once (Holm): the difference is not one this report can call detected.")
        if head.mdd is not None and not no_disagreement(head):
            parts.append(f"With these items and the observed disagreement between the two models, the smallest "
                         f"difference this test set detects with 80% power is about {fmt_score(head.mdd)}.")
    baselines = [(r, find(test, r.name)) for r in results.final if r.kind == "baseline"]
    groups: dict[str, list[str]] = {}
    for row, c in baselines:
        if c is not None:
            groups.setdefault(c.verdict, []).append(f"{row.name} ({fmt_delta(c.diff)})")
    if groups:
        said = {BETTER: "better than", WORSE: "worse than", NO_DIFFERENCE: "not detectably different from"}
        parts.append("Against the baselines on test, ExMe is " + "; ".join(
            f"{said[k]} {', '.join(v)}" for k, v in groups.items()) + ".")
    text = [" ".join(parts)]
    rows = []
    for ref in [r for r in results.final if r.kind in ("sft", "expo", "baseline")]:
        c = find(test, ref.name)
        if c is None:
            continue
        rows.append([_label(ref, sft), fmt_score(exme.test.overall), fmt_score(ref.test.overall), fmt_delta(c.diff),
                     f"{fmt_delta(c.ci_low)} to {fmt_delta(c.ci_high)}", f"{c.p_value:.3g}", _holm_cell(c),
                     _mdd_cell(c), c.verdict])
    if rows:
        text.append(md_table(["ExMe vs", "ExMe test", "Other test", "Difference", "95% CI", "p", "Holm p",
                              "Detectable (80%)", "Verdict"], rows, align="lrrrrrrrl"))
    if sft is not None:
        per_task = [c for c in test if c.b == sft.name and c.task != OVERALL]
        if per_task:
            text.append(f"Per task, ExMe vs {sft.name} on test:\n\n" + md_table(
                ["Task", "Items", "Difference", "95% CI", "p", "Holm p", "Test", "Verdict"],
                [[c.task, c.n, fmt_delta(c.diff), f"{fmt_delta(c.ci_low)} to {fmt_delta(c.ci_high)}",
                  f"{c.p_value:.3g}", _holm_cell(c), c.test, c.verdict] for c in per_task],
                align="lrrrrrll"))
    n_boot = results.config.get("stats", {}).get("bootstrap", "–")
    text.append(
        "Statistics are paired over the items both models scored: the difference is Σₜ wₜ·mean(dₜ) with dₜ "
        "the per-item differences of task t and wₜ the overall score's weights; the 95% interval is a "
        f"seeded paired bootstrap over items ({n_boot} resamples, stratified by task); p is the exact McNemar "
        "test for one task of 0/1 scores, else a sign-flip permutation test. ExMe is compared with "
        f"{_family_text(test)} at once, so each p is also Holm-adjusted over the comparisons of the same "
        "split and task (\"Holm p\": the smallest p multiplied by their number m, the next by m − 1, ..., "
        "kept non-decreasing), which holds the chance of any false verdict among them at 5%. \"Better\" or "
        "\"worse\" only when the interval excludes 0 and the Holm-adjusted p is below 0.05; the verdicts "
        "read the adjusted p, not the raw one. \"Detectable (80%)\" is the smallest true difference these "
        "items detect with 80% power at the 5% level, from the observed disagreement of the two models "
        "(undefined when no item differs)."
    )
    return text


def _holm_cell(c: Any) -> str:
    return "–" if c.p_holm is None else f"{c.p_holm:.3g}"


def _mdd_cell(c: Any) -> str:
    if no_disagreement(c):
        return "undefined (no item differs)"
    return "–" if c.mdd is None else fmt_score(c.mdd)


def _family_text(test: Sequence[Any]) -> str:
    sizes = {c.family for c in test if c.task == OVERALL and c.family}
    return f"{max(sizes)} models" if sizes else "several models"


def _legacy_outcome(results: RunResults, exme: FinalRow, weights: dict[str, float]) -> list[str]:
    diffs = comparisons(results, weights)
    items = _items_text(exme.test.n_items, "test")
    parts: list[str] = []
    sft_rows = [(row, d) for _, row, d in diffs if row.kind == "sft"]
    if sft_rows:
        (sft, d), others = sft_rows[0], sft_rows[1:]
        parts.append(_headline(sft, _ci_words(d), d.a, d.b, d.diff, _noise_phrase(d), items))
        for row, d2 in others:
            parts.append(
                f"On test, {row.name} scored higher than the dev-chosen checkpoint "
                f"({fmt_score(d2.b)} vs {fmt_score(d.b)}); ExMe − {row.name} = {fmt_delta(d2.diff)} ({_ci_words(d2)})."
            )
    else:
        parts.append(
            f"ExMe scored {fmt_score(exme.test.overall)} on the test split over {items}; "
            "no SFT checkpoint was evaluated on test to compare with."
        )
    baselines = [(row, d) for _, row, d in diffs if row.kind == "baseline"]
    if baselines:
        parts.append("Against the baselines on test, ExMe − baseline: " + ", ".join(
            f"{row.name} {fmt_delta(d.diff)} ({_ci_words(d)})" for row, d in baselines) + ".")
    text = [" ".join(parts)]
    if diffs:
        text.append(md_table(
            ["ExMe vs", "ExMe test", "Other test", "Difference", "SE", "Difference / SE", "Verdict"],
            [
                [label, fmt_score(d.a), fmt_score(d.b), fmt_delta(d.diff), fmt_score(d.se),
                 "–" if d.z is None else f"{d.z:+.1f}".replace("-", "−"), _ci_words(d)]
                for label, _, d in diffs
            ],
            align="lrrrrrl",
        ))
        text.append(_noise_note({d.method for _, _, d in diffs}))
    return text


def _confirm_section(results: RunResults) -> str | None:
    """Search (dev) vs confirm scores of the chosen models: how much the selection flattered them."""
    rows = [r for r in results.final if r.confirm is not None and r.dev is not None]
    if not rows:
        return None
    table = md_table(
        ["Model", "Search (dev) overall", "Confirm overall", "Search − confirm"],
        [[r.name, fmt_score(r.dev.overall), fmt_score(r.confirm.overall),  # type: ignore[union-attr]
          fmt_delta(r.dev.overall - r.confirm.overall)] for r in rows],  # type: ignore[union-attr]
    )
    split = results.dev_split
    n_conf = sum(len(v) for v in split.get("confirm", {}).values())
    n_search = sum(len(v) for v in split.get("search", {}).values())
    return (
        f"Dev was divided by a seeded rule (seed {split.get('seed')}, confirm fraction {split.get('confirm_fraction')}) into "
        f"{n_search} search items, which every choice read, and {n_conf} confirm items, scored once per chosen "
        "model after all choices were made. A model picked as the best of many candidates on the search items "
        "scores lower on fresh items (the winner's curse); the last column shows by how much.\n\n" + table
    )


def _recommendation_text(results: RunResults) -> str:
    rec = results.recommended
    if rec is None:
        return "No recommendation: no chosen model had scores to compare."
    where = f" Its weights are at `{rec.path}`." if rec.path else (
        " This run did not write its weights; `exme merge` (or `exme extrapolate`) with the settings in the "
        "final table writes them.")
    text = f"**Recommended: {rec.name}** — {rec.reason}{where}"
    if rec.name != "ExMe" and results.final_model:
        text += f" The ExMe model in `{results.final_model}` is not the recommended one."
    return text


def outcome_section(results: RunResults, weights: dict[str, float]) -> str:
    """The honest verdict: ExMe vs the best SFT checkpoint (chosen on dev) and vs every baseline, on test."""
    exme = next((r for r in results.final if r.kind == "exme"), None)
    if exme is None:
        return "No ExMe model was evaluated on the test split in this run, so there is no outcome to state."
    if any(c.split == "test" for c in results.comparisons):
        text = _paired_outcome(results, exme)
    else:
        text = _legacy_outcome(results, exme, weights)
    flagged = [r.name for r in results.final if r.collapsed]
    if flagged:
        text.append(f"Collapsed (generations hit the token limit far more often than the best SFT's): "
                    f"{', '.join(flagged)}.")
    confirm = _confirm_section(results)
    if confirm:
        text.append(confirm)
    text.append(_recommendation_text(results))
    text.append(
        "Selection was on the dev split only"
        + (" (its search part)" if results.dev_split.get("confirm") else "")
        + ": the kept checkpoints, α, β and every baseline's settings were "
        "chosen by dev score; the test split was used once, to score the chosen models."
    )
    return "\n\n".join(text)


class _PlainDumper(yaml.SafeDumper):
    """Safe YAML without anchors: a repeated list is written out again, as the user wrote it."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _inputs_section(results: RunResults) -> str:
    cfg = results.config
    lines = []
    for key, label in (("base", "Base model"), ("checkpoints", "Checkpoints"), ("suite", "Suite"), ("output", "Output")):
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = ", ".join(f"`{v}`" for v in value)
        else:
            value = f"`{value}`"
        lines.append(f"- {label}: {value}")
    if results.final_model:
        lines.append(f"- Final model written to: `{results.final_model}`")
    lines.append(f"- exme {results.exme_version}, run created {results.created}")
    search_cfg = cfg.get("search") if isinstance(cfg, dict) else None
    if isinstance(search_cfg, dict) and search_cfg.get("mode") == "tpe":  # β is searched jointly: its grid is not read
        cfg = {k: v for k, v in cfg.items() if k != "beta"}
    config = yaml.dump(cfg, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, default_flow_style=None).strip() if cfg else "{}"
    return "\n".join(lines) + "\n\nConfiguration:\n\n```yaml\n" + config + "\n```"


def _suite_section(results: RunResults, weights: dict[str, float]) -> str:
    suite = results.suite
    dev_n = _n_items(c.dev for c in results.ranking)
    test_n = _n_items(r.test for r in results.final)
    tasks = _task_names(results)
    head = f"Suite: **{suite.get('name', 'unnamed')}**" + (f" (`{suite['path']}`)" if "path" in suite else "")
    table = md_table(
        ["Task", "Weight", "Dev items", "Test items"],
        [[t, f"{weights.get(t, 0.0):.3f}", dev_n.get(t, "–"), test_n.get(t, "–")] for t in tasks]
        + [["**total**", f"{sum(weights.values()):.3f}", sum(dev_n.values()) if dev_n else "–", sum(test_n.values()) if test_n else "–"]],
    )
    rule = suite.get("split_rule", suite.get("split"))
    lines = [head, "", table, "", f"Split rule: {rule if rule is not None else 'not recorded'}"
             + (f" (seed {suite['seed']})" if "seed" in suite else "") + "."]
    lines.append("Overall score = weighted mean of the task scores with the weights above.")
    return "\n".join(lines)


def _ranking_section(results: RunResults) -> str:
    tasks = _task_names(results)
    rows = [
        [i, c.name, "–" if c.step is None else c.step, fmt_score(c.dev.overall),
         *[fmt_score(c.dev.tasks.get(t)) for t in tasks],
         "yes" if c.kept else (f"stopped early ({sum(c.dev.n_items.values())} items)" if c.stopped_early else "")]
        for i, c in enumerate(ranked(results.ranking), start=1)
    ]
    return md_table(["Rank", "Checkpoint", "Step", "Dev overall", *tasks, "Kept"], rows, align="rlrr" + "r" * len(tasks) + "l")


def _alpha_section(results: RunResults, images: dict[str, str]) -> str:
    rows, figs = [], []
    for i, search in enumerate(results.alpha_search):
        param = _search_param(search, "alpha")
        ckpt = checkpoint_of(search, results.ranking, i)
        label = ckpt.name if ckpt is not None else search.name
        sft = ckpt.dev.overall if ckpt is not None else None
        n_pruned = sum(t.pruned for t in search.trials)
        rows.append([
            label, fmt_param(search.best_params.get(param)) if param else "–", fmt_score(search.best_dev),
            fmt_score(sft), fmt_delta(search.best_dev - sft) if sft is not None else "–",
            f"{len(search.trials)}" + (f" ({n_pruned} pruned)" if n_pruned else ""),
        ])
        if f"alpha:{search.name}" in images:
            figs.append(f"![α curve of {label}]({images[f'alpha:{search.name}']})")
    table = md_table(["Checkpoint", "Chosen α", "Dev overall at α", "SFT dev overall", "Dev gain", "Trials"], rows)
    return "\n\n".join([
        "θ′ = θ_b + (1 + α)·Δ for each kept checkpoint; α chosen by dev overall. In the plots the dashed lines "
        "are the SFT checkpoint's own dev scores (α = 0) and the dotted line is the chosen α.",
        table, *figs,
    ])


def _merge_section(results: RunResults, images: dict[str, str]) -> str:
    out = []
    beta = results.beta_search
    if beta is not None:
        param = _search_param(beta, "beta")
        value = beta.best_params.get(param) if param else None
        out.append(
            f"θ* = β·θ′₁ + (1 − β)·θ′₂ = θ_b + β(1 + α₁)Δ₁ + (1 − β)(1 + α₂)Δ₂. Chosen **β = {fmt_param(value)}** "
            f"(dev overall {fmt_score(beta.best_dev)}, {len(beta.trials)} trials)."
        )
        if "beta" in images:
            out.append(f"![β curve]({images['beta']})")
    joint = results.joint_search
    if joint is not None:
        shown = _normalised_weights(joint.best_params)
        out.append(
            f"Joint TPE search over {', '.join(joint.space.get('params', sorted(joint.best_params)))}: best "
            f"{_params(shown)} (dev overall {fmt_score(joint.best_dev)}, {len(joint.trials)} trials)."
            + (" The weights wᵢ are shown normalised to sum 1, as the merge uses them (the search draws them "
               "independently in [0, 1])." if shown != joint.best_params else "")
        )
        dims = len(joint.space.get("params", joint.best_params))
        if dims and len(joint.trials) < 10 * dims:
            out.append(f"Warning: {len(joint.trials)} trials for {dims} searched dimensions is few (TPE needs "
                       f"about 10 per dimension, {10 * dims} here); the choice may be far from the best setting.")
        if "joint" in images:
            out.append(f"![joint search]({images['joint']})")
    return "\n\n".join(out)


def _normalised_weights(params: dict[str, Any]) -> dict[str, Any]:
    """A joint search's raw ``w_i`` replaced by wᵢ / Σ w (what the merge uses); other keys as they are."""
    keys = [k for k in params if re.fullmatch(r"w_\d+", k)]
    total = sum(float(params[k]) for k in keys)
    if not keys or total <= 0:
        return dict(params)
    return {k: (float(v) / total if k in keys else v) for k, v in params.items()}


def _same_model_note(results: RunResults) -> str | None:
    """For two kept checkpoints, linear with w₁ = 0.5 and task arithmetic with λ = 0.5 are one model,
    θ_b + ½Δ₁ + ½Δ₂; say so when both searched that setting."""
    if len(results.alpha_search) != 2:
        return None
    by = {s.name: s for s in results.baseline_search}
    lin, ta = by.get("linear"), by.get("task_arithmetic")
    if lin is None or ta is None:
        return None
    lin_has = any(abs(t.params.get("weight_1", -1) - 0.5) < 1e-12 for t in lin.trials)
    ta_has = any(abs(t.params.get("lambda", -1) - 0.5) < 1e-12 for t in ta.trials)
    if not (lin_has and ta_has):
        return None
    both = (abs(lin.best_params.get("weight_1", -1) - 0.5) < 1e-12 and abs(ta.best_params.get("lambda", -1) - 0.5) < 1e-12)
    return ("With two checkpoints, linear at w₁ = 0.5 and task_arithmetic at λ = 0.5 are the same model "
            "(θ_b + ½Δ₁ + ½Δ₂)" + ("; both searches chose it, so these two rows are one model, not two baselines."
                                   if both else "; the two searches share that point."))


def _baselines_section(results: RunResults) -> str:
    rows = [
        [s.name, _params(s.best_params), fmt_score(s.best_dev), len(s.trials)] for s in results.baseline_search
    ]
    text = "Each baseline had its own small search on dev, so the comparison is fair.\n\n" + md_table(
        ["Baseline", "Chosen settings", "Best dev overall", "Trials"], rows, align="llrr"
    )
    note = _same_model_note(results)
    return text + (f"\n\n{note}" if note else "")


def _final_section(results: RunResults, images: dict[str, str]) -> str:
    tasks = _task_names(results)
    exme_rows = {id(r) for r in results.final if r.kind == "exme"}

    def name(row: FinalRow) -> str:
        return f"**{row.name}**" if id(row) in exme_rows else row.name

    def table(split: str) -> str:
        rows = []
        for r in results.final:
            s: SplitScores | None = r.test if split == "test" else (r.dev if split == "dev" else r.confirm)
            rows.append([name(r) + (" (collapsed)" if r.collapsed and split == "test" else ""), r.kind, _params(r.params),
                         *[fmt_score(s.tasks.get(t) if s else None) for t in tasks], fmt_score(s.overall if s else None)])
        return md_table(["Model", "Kind", "Settings", *tasks, "Overall"], rows, align="lll" + "r" * (len(tasks) + 1))

    out = ["**Test** (held out; never used for a choice):", table("test")]
    gen = _generation_table(results)
    if gen:
        out += ["Generation on test, per generative task: mean new tokens, share of items that hit max_new_tokens, "
                "share that ended without EOS or a stop string. A model whose hit-the-limit share exceeds the best "
                f"SFT's by more than {results.collapse.get('margin', '–')} is flagged collapsed "
                "(a model extrapolated too far stops ending its answers).", gen]
    if any(r.confirm is not None for r in results.final):
        out += ["**Confirm** (held-out part of dev; scored once, after every choice):", table("confirm")]
    out += ["**Dev** (its search part; used for every choice):" if results.dev_split.get("confirm") else
            "**Dev** (used for every choice):", table("dev")]
    if "final" in images:
        out.append(f"![final table]({images['final']})")
    if "tasks" in images:
        out.append(f"![test score per task]({images['tasks']})")
    return "\n\n".join(out)


def _generation_table(results: RunResults) -> str | None:
    tasks = sorted({t for r in results.final for t in r.test.generation})
    if not tasks:
        return None
    rows = []
    for r in results.final:
        g = r.test.generation
        cells = []
        for t in tasks:
            s = g.get(t)
            cells.append("–" if s is None else
                         f"{s.get('mean_new_tokens', float('nan')):.1f} / {100 * s.get('hit_limit', 0.0):.0f}% / "
                         f"{100 * s.get('no_stop', 0.0):.0f}%")
        rows.append([r.name, *cells, "yes" if r.collapsed else ""])
    return md_table(["Model", *[f"{t} (tokens / hit limit / no stop)" for t in tasks], "Collapsed"], rows,
                    align="l" + "r" * len(tasks) + "l")


def _timings_section(results: RunResults) -> str:
    total = sum(results.timings.values())
    rows = [[stage, fmt_seconds(s), f"{100 * s / total:.1f} %" if total > 0 else "–"] for stage, s in results.timings.items()]
    rows.append(["**total**", fmt_seconds(total), "100.0 %" if total > 0 else "–"])
    text = md_table(["Stage", "Time", "Share"], rows)
    ev = results.evaluations
    if ev:
        items = ev.get("items", {})
        text += (f"\n\n{ev.get('evaluations', 0)} evaluations scored {sum(items.values())} items "
                 f"({', '.join(f'{v} {k}' for k, v in items.items())}); {ev.get('shared', 0)} more candidates were "
                 "a model already scored and read its score back.")
    return text


def _module_section(results: RunResults, images: dict[str, str], weights: dict[str, float]) -> str:
    """Per-module ExMe against global ExMe, paired on confirm and test: the finer α were chosen on the search
    part of dev, so only the held-out splits say whether the extra freedom generalized or only fit those items."""
    search = results.module_search
    assert search is not None
    module = next((r for r in results.final if r.kind == "exme_module"), None)
    glob = next((r for r in results.final if r.kind == "exme"), None)
    n = len(search.trials)
    from exme.search.sampled import sampled_strategies

    sampler = sampled_strategies().get(search.space.get("mode", "tpe"))
    lines = [
        f"Granularity `{search.name.removeprefix('module:')}`: groups {', '.join(f'`{g}`' for g in search.space.get('groups', []))}; "
        f"{n} {sampler.title if sampler else search.space.get('mode')} trials on the search part of dev, α in {search.space.get('alpha')}, the merge weights of the global "
        f"stage kept, the first trial the global optimum. Best dev (search) {fmt_score(search.best_dev)}.",
    ]
    if module is not None and glob is not None:
        table = []
        for split in ("dev", "confirm", "test"):
            a = getattr(module, split) if split != "dev" else module.dev
            b = getattr(glob, split) if split != "dev" else glob.dev
            if a is None or b is None:
                continue
            stats = None if split == "dev" else paired_comparison(
                a, b, weights, n_resamples=int(results.config.get("stats", {}).get("bootstrap", 2000)),
                seed=int(results.config.get("seed", 0)))
            ci = f"{fmt_delta(stats.ci_low)} to {fmt_delta(stats.ci_high)}" if stats else "–"
            words = stats.verdict if stats else ("chosen on these items" if split == "dev" else "no per-item scores")
            table.append([split if split != "dev" else "dev (search)", fmt_score(a.overall), fmt_score(b.overall),
                          fmt_delta(a.overall - b.overall), ci, words])
        lines += ["", md_table(["split", module.name, glob.name, "difference", "paired 95% CI", "verdict"], table)]
        lines += ["", "The finer α generalized only where the confirm and test differences are above 0; a gain on "
                  "dev (search) alone is what the extra parameters fit."]
    alphas = [[g] + [fmt_param(search.best_params.get(f"alpha_{i}/{g}")) for i in range(1, 1 + sum(
        1 for k in search.best_params if k.endswith('/' + g)))] for g in search.space.get("groups", [])]
    if alphas:
        k = len(alphas[0]) - 1
        lines += ["", md_table(["group", *[f"α{i}" for i in range(1, k + 1)]], alphas)]
    if "alpha_groups" in images:
        lines += ["", f"![α per group]({images['alpha_groups']})"]
    return "\n".join(lines)


def _rescore_section(rescore: dict[str, Any]) -> str:
    """How many of the chosen model's test items changed score when re-scored in another batch composition."""
    sampled, changed = rescore.get("sampled", {}), rescore.get("changed", {})
    table = md_table(["Task", "Items re-scored", "Changed"], [[t, sampled[t], changed.get(t, 0)] for t in sampled])
    total, n = sum(changed.values()), sum(sampled.values())
    kernels = " with batch-invariant kernels" if rescore.get("batch_invariant") else ""
    return (
        f"A seeded sample of {rescore.get('model')}'s {rescore.get('split', 'test')} items was scored again on its own "
        f"(backend {rescore.get('backend')}{kernels}), so every batch held other neighbours than in the full pass: "
        f"{total} of {n} items changed score. Batched kernels may sum in another order when a batch changes, "
        "which can flip a near-tie; this is the noise floor under the paired intervals above.\n\n" + table
    )


def report_markdown(results: RunResults, images: dict[str, str]) -> str:
    """The whole ``report.md`` text; ``images`` maps plot keys to links relative to the report."""
    weights = task_weights(results.suite, _task_names(results))
    sections: list[tuple[str, str]] = [("Outcome", outcome_section(results, weights))]
    sections.append(("What was run", _inputs_section(results) + "\n\n" + _suite_section(results, weights)))
    if results.ranking:
        fig = f"\n\n![checkpoint ranking]({images['ranking']})" if "ranking" in images else ""
        sections.append(("Stage 1 — rank checkpoints on dev", _ranking_section(results) + fig))
    if results.alpha_search:
        sections.append(("Stage 2 — extrapolate (α per kept checkpoint)", _alpha_section(results, images)))
    if results.beta_search is not None or results.joint_search is not None:
        title = "Stage 3 — merge (joint TPE search)" if results.joint_search is not None else "Stage 3 — merge (β)"
        sections.append((title, _merge_section(results, images)))
    if results.module_search is not None:
        sections.append(("Per-module ExMe (α per group of tensors)", _module_section(results, images, weights)))
    if results.baseline_search:
        sections.append(("Baselines", _baselines_section(results)))
    if results.final:
        sections.append(("Final table", _final_section(results, images)))
    if results.rescore:
        sections.append(("Re-scoring noise", _rescore_section(results.rescore)))
    if results.timings:
        sections.append(("Timings", _timings_section(results)))
    if results.notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in results.notes)))
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections)
    return f"# ExMe run report\n\n{body}\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target then rename, so a reader never sees half a report."""
    from exme.io.writer import temp_file_name

    tmp = path.with_name(temp_file_name(path.name))
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render(results: RunResults, run_dir: Path | str) -> Path:
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` from ``results``; return the report's path.

    Only figures the results have data for are drawn; images are linked relative to the report so the
    run folder can be moved or published as it is.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = task_weights(results.suite, _task_names(results))
    pngs = draw_plots(results, run_dir / PLOTS_DIR, weights)
    images = {key: p.relative_to(run_dir).as_posix() for key, p in pngs.items()}
    path = run_dir / REPORT_FILE
    _write_atomic(path, report_markdown(results, images))
    return path
