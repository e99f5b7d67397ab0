"""``gsm8k``: grade-school maths in GSM8K's format; the final number is compared exactly (see extract.py)."""

from __future__ import annotations

from typing import Any

from exme.errors import ExmeError
from exme.evaluate.kinds.base import GenerativeKind, mean


class GSM8K(GenerativeKind):
    name = "gsm8k"
    required = ("question", "answer")
    metrics = ("exact_match",)
    prompt = "Question: {question}\nAnswer:"
    target = " {answer}"
    chat_prompt = (  # lm-eval's gsm8k-cot-llama instruction
        "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
        'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
    )
    stop = ("\n\n", "Question:")
    # lm-eval's gsm8k stops: a chat answer's reasoning has blank lines, so "\n\n" would cut it before its number.
    chat_stop = ("Question:", "</s>", "<|im_end|>")
    own_keys = ("answer_filter",)

    def check_record(self, record: dict[str, Any], where: str) -> None:
        from exme.evaluate.extract import gsm8k_target

        if gsm8k_target(str(record["answer"])) is None:
            raise ExmeError(f"{where}: 'answer' must hold exactly one '#### <number>' (GSM8K format)")

    def score_completions(self, task, prep, completions, records, ctx):
        from exme.evaluate.extract import score_gsm8k

        scored = [score_gsm8k(c, str(r["answer"]), task.spec.answer_filter) for c, r in zip(completions, records)]
        items = [{"completion": c, "prediction": p, "correct": ok} for c, (p, ok) in zip(completions, scored)]
        return {"exact_match": mean(ok for _, ok in scored)}, items
