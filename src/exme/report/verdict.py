"""The verdict of a run: paired comparisons of ExMe with every reference, collapse flags, and the recommendation.

Pure functions over the final table (:class:`~exme.report.schema.FinalRow`), used by the pipeline to
fill ``results.json`` and by the report and the console to state them. Nothing here reads a file or
a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exme.report.schema import Comparison, FinalRow, Recommendation, SplitScores
from exme.report.stats import holm, paired_comparison, verdict

OVERALL = "overall"
TIE = 1e-12  # scores this close are equal (one weighted mean of the same item scores, summed in another order)


def best_sft_row(rows: Sequence[FinalRow]) -> FinalRow | None:
    """The SFT row with the best dev (search) score: the checkpoint to beat, chosen without test or confirm."""
    sfts = [r for r in rows if r.kind == "sft"]
    if not sfts:
        return None
    if all(r.dev is not None for r in sfts):
        return max(sfts, key=lambda r: r.dev.overall)  # type: ignore[union-attr]  # ties: the first (rank order)
    return sfts[0]


def references(rows: Sequence[FinalRow]) -> list[FinalRow]:
    """What ExMe is compared with: the best SFT, each EXPO, each baseline (in table order)."""
    sft = best_sft_row(rows)
    return ([sft] if sft is not None else []) + [r for r in rows if r.kind in ("expo", "baseline")]


def _scores(row: FinalRow, split: str) -> SplitScores | None:
    return row.test if split == "test" else row.confirm


def compare(rows: Sequence[FinalRow], weights: Mapping[str, float], *, split: str, n_resamples: int,
            seed: int) -> list[Comparison]:
    """ExMe − each reference on ``split``, overall (stratified, the overall score's weights) and per task.

    A pair without per-item scores on both sides is left out: the report then says "not available".
    The comparisons of one task (or of the overall score) on this split form one family, ExMe against
    every reference at once: each gets its Holm-adjusted p over that family beside the raw one, and
    its verdict needs the adjusted p below 5% as well as a CI that excludes 0.
    """
    exme = next((r for r in rows if r.kind == "exme"), None)
    if exme is None or _scores(exme, split) is None:
        return []
    a = _scores(exme, split)
    out: list[Comparison] = []
    for ref in references(rows):
        b = _scores(ref, split)
        if b is None or ref.failed or exme.failed:
            continue
        for task in [OVERALL, *a.tasks]:
            stats = paired_comparison(a, b, weights, task=None if task == OVERALL else task,
                                      n_resamples=n_resamples, seed=seed)
            if stats is None:
                continue
            out.append(Comparison(
                a=exme.name, b=ref.name, split=split, task=task, n=stats.n, diff=stats.diff, se=stats.se,
                ci_low=stats.ci_low, ci_high=stats.ci_high, p_value=stats.p_value, test=stats.test,
                mdd=stats.mdd, verdict=stats.verdict, n_disagree=stats.n_disagree,
            ))
    return _with_holm(out)


def _with_holm(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm over each (split, task) family; the verdict words re-read from the adjusted p."""
    families: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(comparisons):
        families.setdefault((c.split, c.task), []).append(i)
    out = list(comparisons)
    for members in families.values():
        adjusted = holm([comparisons[i].p_value for i in members])
        for i, p in zip(members, adjusted):
            c = comparisons[i]
            out[i] = c.model_copy(update={"p_holm": p, "family": len(members),
                                          "verdict": verdict(c.ci_low, c.ci_high, p)})
    return out


def find(comparisons: Sequence[Comparison], b: str, *, split: str = "test", task: str = OVERALL) -> Comparison | None:
    return next((c for c in comparisons if c.b == b and c.split == split and c.task == task), None)


def recommend(rows: Sequence[FinalRow], comparisons: Sequence[Comparison], paths: Mapping[str, str | None]) -> Recommendation | None:
    """The model to use: the best **confirm** score among the scored models, where ExMe qualifies only
    if its paired confirm difference over the best SFT is positive. Ties go to the SFT checkpoint:
    the best SFT (chosen on dev) first, then the other SFT rows, then the table's order (EXPO, ExMe,
    baselines) with the untrained base last, since a tie is no evidence for anything but what the
    user trained. When every candidate ties, the reason says that nothing could be told apart.

    Without a confirm split the search scores are used and the reason says how optimistic they are.
    ``paths`` maps row names to where the model is on disk (``None``: not written by the run).
    """
    usable = [r for r in rows if not r.failed and not r.collapsed]
    with_confirm = [r for r in usable if r.confirm is not None]
    split = "confirm" if with_confirm else "dev"
    pool = with_confirm or [r for r in usable if r.dev is not None]
    if not pool:
        return None

    def score(r: FinalRow) -> float:
        s = r.confirm if split == "confirm" else r.dev
        return s.overall  # type: ignore[union-attr]

    sft = best_sft_row(rows)

    def tie_order(row: FinalRow) -> int:
        if row is sft:
            return 0
        return {"sft": 1, "base": 3}.get(row.kind, 2)

    ranked = sorted(range(len(pool)), key=lambda i: (-score(pool[i]), tie_order(pool[i]), i))
    all_tied = len(pool) > 1 and max(map(score, pool)) - min(map(score, pool)) <= TIE
    note = ""
    for i in ranked:
        row = pool[i]
        # ExMe (global or per-module) is recommended only with a positive confirm difference over the best SFT.
        if row.kind in ("exme", "exme_module") and sft is not None and split == "confirm":
            c = find(comparisons, sft.name, split="confirm") if row.kind == "exme" else None
            diff = c.diff if c is not None else score(row) - score(sft)
            if diff <= 0:
                note += (f" {row.name} had the best confirm score but its paired confirm difference over the best "
                         f"SFT ({sft.name}) is {diff:+.4f}, not positive, so it is not recommended.")
                continue
        top = score(row)
        tied = [r.name for r in pool if r is not row and abs(score(r) - top) <= TIE]
        if all_tied:
            where = "confirm" if split == "confirm" else "dev"
            return Recommendation(name=row.name, path=paths.get(row.name), reason=(
                f"every chosen model scored {top:.4f} on {where}: nothing could be told apart, so by the tie rule "
                f"(ties go to the SFT checkpoint) {row.name} is recommended; this run gives no evidence for "
                "any model over another." + note))
        if split == "confirm":
            n = sum(row.confirm.n_items.values()) if row.confirm is not None else 0
            reason = f"best confirm score ({top:.4f} over {n} confirm items) among the chosen models"
            versus = sft.name if row.kind == "exme" and sft is not None else row.name
            c = find(comparisons, versus, split="confirm")
            if c is not None:
                reason += (f"; ExMe − {versus} on confirm {c.diff:+.4f} "
                           f"(95% CI {c.ci_low:+.4f} to {c.ci_high:+.4f}: {c.verdict})")
        else:
            reason = (f"best dev score ({top:.4f}); no confirm split was held out, so this score is the one the "
                      "searches maximised and flatters the searched models")
        if tied:
            rule = ("ties go to the SFT checkpoint" if row.kind == "sft" else
                    "ties go to the SFT checkpoint, else to the earlier row of the table, the base last")
            reason += f"; tied with {', '.join(tied)} ({rule})"
        return Recommendation(name=row.name, path=paths.get(row.name), reason=reason + "." + note)
    return None


def collapse_flags(rows: Sequence[FinalRow], margin: float, split: str = "test") -> dict[str, list[str]]:
    """Rows whose share of generations that hit the token limit exceeds the best SFT's by more than
    ``margin`` on some generative task: ``{row name: [tasks]}``."""
    sft = best_sft_row(rows)
    if sft is None:
        return {}
    ref = sft.test if split == "test" else sft.dev
    if ref is None:
        return {}
    out: dict[str, list[str]] = {}
    for row in rows:
        s = row.test if split == "test" else row.dev
        if s is None or row is sft or row.kind == "base":  # the base never learnt to answer: not a candidate
            continue
        tasks = [t for t, g in s.generation.items()
                 if t in ref.generation and g.get("hit_limit", 0.0) - ref.generation[t].get("hit_limit", 0.0) > margin]
        if tasks:
            out[row.name] = tasks
    return out


def is_collapsed(generation: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]],
                 margin: float) -> bool:
    """Whether some task's hit-the-limit share exceeds the reference's by more than ``margin``."""
    return any(
        g.get("hit_limit", 0.0) - reference.get(t, {}).get("hit_limit", 0.0) > margin
        for t, g in generation.items() if t in reference
    )


def no_disagreement(c: Comparison) -> bool:
    """Whether no item differs between the two models (older results: a detectable difference of 0)."""
    return c.n_disagree == 0 if c.n_disagree is not None else c.mdd == 0.0


def p_text(c: Comparison) -> str:
    """``p = raw, Holm p = adjusted (m comparisons)``; the raw p alone in results older than Holm."""
    if c.p_holm is None:
        return f"p = {c.p_value:.3g}"
    return f"p = {c.p_value:.3g}, Holm-adjusted p = {c.p_holm:.3g} over {c.family} comparisons"


def summary_lines(results: Any) -> list[str]:
    """The outcome in a few plain lines (console and the report's first paragraph):
    ExMe vs the best SFT and each baseline on test with the CI's words, then the recommendation."""
    rows = results.final
    exme = next((r for r in rows if r.kind == "exme"), None)
    lines: list[str] = []
    if exme is None:
        return ["No ExMe model was scored on test."]
    for ref in references(rows):
        c = find(results.comparisons, ref.name, split="test")
        label = f"best SFT ({ref.name})" if ref.kind == "sft" else ref.name
        if c is None:
            diff = exme.test.overall - ref.test.overall
            lines.append(f"ExMe vs {label} on test: {exme.test.overall:.4f} vs {ref.test.overall:.4f}, "
                         f"{diff:+.4f} (paired statistics not available: no per-item scores)")
        elif no_disagreement(c):
            lines.append(f"ExMe vs {label} on test: {exme.test.overall:.4f} vs {ref.test.overall:.4f}: the same score "
                         f"on every one of the {c.n} items, so nothing could tell them apart")
        else:
            lines.append(f"ExMe vs {label} on test: {exme.test.overall:.4f} vs {ref.test.overall:.4f}, "
                         f"{c.diff:+.4f} (95% CI {c.ci_low:+.4f} to {c.ci_high:+.4f}, {p_text(c)}): {c.verdict}")
    rec = results.recommended
    if rec is not None:
        where = f" at {rec.path}" if rec.path else " (not written by this run)"
        lines.append(f"Recommended: {rec.name}{where} — {rec.reason}")
        if rec.name != "ExMe" and results.final_model:
            lines.append(f"The ExMe model is in {results.final_model}, but it is not the recommended model.")
    return lines
