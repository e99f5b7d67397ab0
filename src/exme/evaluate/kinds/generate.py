"""``generate``: free-form answers compared with a target (exact match after whitespace folding, or contains)."""

from __future__ import annotations

import re

from exme.evaluate.kinds.base import GenerativeKind, mean


class Generate(GenerativeKind):
    name = "generate"
    required = ("prompt", "target")
    metrics = ("exact_match", "contains")
    prompt = "{prompt}"
    target = " {target}"
    stop = ("\n\n",)

    def prepare(self, task, records, tokenizer):
        prep = super().prepare(task, records, tokenizer)
        prep["regex"] = re.compile(task.spec.regex) if task.spec.regex else None
        return prep

    def score_completions(self, task, prep, completions, records, ctx):
        """The answer is the whole completion, or the ``regex``'s first group (or whole match) in it."""
        from exme.evaluate.extract import normalize_text

        regex = prep["regex"]
        exact, contains, items = [], [], []
        for completion, record in zip(completions, records):
            targets = record["target"] if isinstance(record["target"], list) else [record["target"]]
            targets = [normalize_text(str(t)) for t in targets]
            answer = completion
            if regex is not None:
                match = regex.search(completion)
                answer = (match.group(1) if match.groups() else match.group(0)) if match else ""
            answer = normalize_text(answer)
            exact.append(answer in targets)
            contains.append(any(t and t in normalize_text(completion) for t in targets))
            items.append({"completion": completion, "prediction": answer, "correct": exact[-1], "contains": contains[-1]})
        return {"exact_match": mean(exact), "contains": mean(contains)}, items

    def item_scores(self, task, items):
        key = "contains" if task.spec.metric == "contains" else "correct"
        return [float(bool(it[key])) for it in items]
