"""lm-eval's model interface served from an exme Backend, against lm-eval's own ``HFLM`` on the
same module, document by document, for every output type; and the refusal of a task a backend
cannot serve. (The vLLM engine against lm-eval's ``VLLM`` model: ``test_vllm.py``.)"""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="optional extra exme[lm-eval] is not installed")

from .conftest import LM_EVAL_TASKS, count_changed, lm_eval_responses  # noqa: E402


@pytest.mark.slow
def test_backend_lm_over_hf_gives_hflm_responses_on_every_output_type(tiny_models, lm_eval_tasks):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exme.evaluate.backends.hf import HFBackend
    from exme.evaluate.lm_eval_adapter import backend_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_models.sft1, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models.sft1)
    theirs = lm_eval_responses(HFLM(pretrained=model, tokenizer=tok, batch_size=4), lm_eval_tasks)
    ours = lm_eval_responses(backend_lm(HFBackend(model, tok, batch_size=4, mc_batch_size=8), tok), lm_eval_tasks)
    changed = count_changed(ours, theirs)
    assert all(n <= 1 for n in changed.values()), changed
    assert set(changed) == set(LM_EVAL_TASKS)
    print("documents changed (BackendLM over hf vs HFLM):", changed, {t: list(r.items())[:2] for t, r in theirs.items()})
    assert any(r[0] for r in theirs["exme_lm_gen"].values())  # the generations are not all empty


def test_a_task_a_backend_cannot_serve_is_one_line_naming_task_and_backend(tmp_path, lm_eval_tasks):
    from exme.errors import ExmeError
    from exme.evaluate import load_evaluator

    text = (lm_eval_tasks / "exme_lm_gen.yaml").read_text()
    (tmp_path / "exme_lm_sampled.yaml").write_text(
        text.replace("task: exme_lm_gen", "task: exme_lm_sampled").replace("do_sample: false", "do_sample: true\n  temperature: 0.7")
    )
    evaluator = load_evaluator("lm-eval:exme_lm_sampled,exme_lm_mc", include_path=[str(tmp_path), str(lm_eval_tasks)])
    evaluator.check_backend("hf")  # HFLM samples as the task asks
    with pytest.raises(ExmeError) as err:
        evaluator.check_backend("vllm")
    message = str(err.value)
    assert "'exme_lm_sampled'" in message and "backend vllm" in message and "\n" not in message
    load_evaluator("lm-eval:exme_lm_gen,exme_lm_mc,exme_lm_ll,exme_lm_ppl", include_path=str(lm_eval_tasks)).check_backend("vllm")
