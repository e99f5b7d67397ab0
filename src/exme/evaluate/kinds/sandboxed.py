"""What the code kinds (``humaneval``, ``mbpp``) share: a program built from each completion runs with its
tests in the sandbox (exme.evaluate.code builds and runs them); pass@1 with greedy decoding."""

from __future__ import annotations

from exme.evaluate.kinds.base import GenerativeKind


class CodeKind(GenerativeKind):
    """Shared by the two code formats: scored in the sandbox; no default stops under a chat template,
    since chat models answer with a whole fenced function, which HumanEval's ``"\\ndef "`` would cut
    (their turn ends at EOS instead)."""

    metrics = ("pass@1",)
    chat_stop = ()

    def score_completions(self, task, prep, completions, records, ctx):
        from exme.evaluate.code import score_code

        return score_code(
            task, records, completions, workers=ctx.workers, progress=ctx.bar(len(records), f"{task.name}: running tests")
        )

    def item_scores(self, task, items):
        return [float(it["status"] == "passed") for it in items]

