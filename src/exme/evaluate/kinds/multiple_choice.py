"""``multiple_choice``: the choice with the highest log-likelihood after the question (acc), or per
character of the choice (acc_norm, as lm-eval's), is the model's answer."""

from __future__ import annotations

import string
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.kinds.base import TaskKind, mean


class MultipleChoice(TaskKind):
    name = "multiple_choice"
    required = ("question", "choices", "label")
    metrics = ("acc", "acc_norm")
    generative = False
    prompt = "Question: {question}\nAnswer:"
    target = " {answer_text}"

    def check_record(self, record: dict[str, Any], where: str) -> None:
        """ARC's ``{"text": [...], "label": [...]}`` choices and letter labels become a list and an index."""
        choices, label = record["choices"], record["label"]
        if isinstance(choices, dict) and "text" in choices:
            letters = list(choices.get("label", []))
            record["choices"] = choices = list(choices["text"])
            if isinstance(label, str) and label in letters:
                record["label"] = label = letters.index(label)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ExmeError(f"{where}: 'choices' must be a list of at least two strings")
        if isinstance(label, str) and len(label) == 1 and label.isalpha():
            record["label"] = label = ord(label.upper()) - ord("A")
        elif isinstance(label, str) and label.strip().isdigit():  # HellaSwag's "3": an index written as text
            record["label"] = label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ExmeError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1}), got {label!r}")

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        view = dict(record)
        choices = record["choices"]
        view.setdefault("choices_lettered", "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices)))
        view.setdefault("answer_text", choices[record["label"]])
        return view

    def prepare(self, task, records, tokenizer):
        """One (context, continuation) request per choice; the continuation's tokens are those the
        whole text adds to the context, so a tokenizer merging across the boundary is handled."""
        from exme.evaluate.lm import Continuation
        from exme.evaluate.prompts import encode

        texts = [self.prompt_text(task, r, tokenizer) for r in records]
        requests, spans, lengths = [], [], []
        for (text, chat), record in zip(texts, records):
            ctx = encode(tokenizer, text, from_chat_template=chat)
            start = len(requests)
            for choice in record["choices"]:
                cont_text = " " + choice if not chat else choice
                whole = encode(tokenizer, text + cont_text, from_chat_template=chat)
                if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                    cont = whole[len(ctx) :]
                else:  # the tokenizer merged across the boundary: encode the continuation alone
                    cont = list(tokenizer(cont_text, add_special_tokens=False)["input_ids"])
                requests.append(Continuation(tuple(ctx), tuple(cont)))
                lengths.append(len(choice))  # lm-eval's acc_norm: characters of the choice text
            spans.append((start, len(requests)))
        return {"records": records, "texts": [t for t, _ in texts], "requests": requests, "spans": spans,
                "choice_lengths": lengths}

    def score(self, task, prep, n, engine, ctx):
        spans = prep["spans"][:n]
        end = spans[-1][1] if spans else 0
        scored = engine.loglikelihood(prep["requests"][:end], progress=ctx.bar(end, f"{task.name}: scoring choices"))
        acc, acc_norm, items = [], [], []
        for (start, stop), record in zip(spans, prep["records"][:n]):
            logps = [scored[i][0] for i in range(start, stop)]
            normed = [lp / max(1, prep["choice_lengths"][i]) for lp, i in zip(logps, range(start, stop))]
            pick = max(range(len(logps)), key=logps.__getitem__)
            pick_norm = max(range(len(normed)), key=normed.__getitem__)
            acc.append(pick == record["label"])
            acc_norm.append(pick_norm == record["label"])
            items.append({"loglik": logps, "prediction": pick, "prediction_norm": pick_norm, "label": record["label"]})
        return {"acc": mean(acc), "acc_norm": mean(acc_norm)}, items, None

    def item_scores(self, task, items):
        key = "prediction_norm" if task.spec.metric == "acc_norm" else "prediction"
        return [float(it[key] == it["label"]) for it in items]
