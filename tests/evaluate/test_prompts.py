"""Prompt building: templates, few-shot blocks, chat templates, and template errors."""

import pytest

from exme.errors import ExmeError
from exme.evaluate import Suite, SuiteEvaluator, load_evaluator
from exme.evaluate.prompts import encode, prompt_text
from exme.testing import char_tokenizer

from .conftest import write_jsonl, write_suite

CHAT = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _suite(tmp_path, task_yaml: str) -> Suite:
    write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "so 4\n#### 4"}])
    return Suite.from_yaml(write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: g, kind: gsm8k, dev: g.jsonl, test: g.jsonl" + task_yaml + "}\n"))


def test_fewshot_text_prompt(tmp_path):
    suite = _suite(tmp_path, ", fewshot: g.jsonl, num_fewshot: 1, system_prompt: Solve.")
    text, chat = prompt_text(suite.tasks[0], suite.tasks[0].records("dev")[1], char_tokenizer())
    assert not chat
    assert text == "Solve.\n\nQuestion: 1+1?\nAnswer: #### 2\n\nQuestion: 2+2?\nAnswer:"


def test_chat_template_prompt_has_turns_and_one_bos(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = CHAT
    suite = _suite(tmp_path, ", fewshot: g.jsonl, num_fewshot: 1, chat_template: true, system_prompt: Solve.")
    text, chat = prompt_text(suite.tasks[0], suite.tasks[0].records("dev")[1], tok)
    assert chat
    # under a chat template the user turn carries lm-eval's gsm8k-cot-llama instruction
    ask = lambda q: (  # noqa: E731
        "Given the following problem, reason and give a final answer to the problem.\nProblem: " + q + "\n"
        'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
    )
    assert text == f"<s><system>Solve.\n<user>{ask('1+1?')}\n<assistant>#### 2\n<user>{ask('2+2?')}\n<assistant>"
    ids = encode(tok, text, from_chat_template=True)
    assert ids.count(tok.bos_token_id) == 1


def test_chat_template_missing_is_an_error(tmp_path, tiny_lm):
    model, _, _ = tiny_lm
    suite = _suite(tmp_path, ", chat_template: true")
    with pytest.raises(ExmeError, match="tokenizer has no chat template"):
        SuiteEvaluator(suite).evaluate(model, char_tokenizer(), "dev")


def test_template_with_unknown_field_is_an_error(tmp_path, tiny_lm):
    model, tok, _ = tiny_lm
    suite = _suite(tmp_path, ", prompt: 'Q: {query}'")
    with pytest.raises(ExmeError, match="task 'g': template 'Q: {query}' uses field 'query'"):
        SuiteEvaluator(suite).evaluate(model, tok, "dev")


def test_unknown_evaluator_option_is_an_error(tmp_path):
    _suite(tmp_path, "")
    with pytest.raises(ExmeError, match="batchsize"):
        load_evaluator(tmp_path / "s.yaml", batchsize=4)
