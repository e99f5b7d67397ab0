"""The synthetic objective of the pipeline tests as a ``module:function`` evaluator for `exme run`.

Configured by environment variables, since `exme run` takes only a spec string: EXME_PG_LOG (one line
``<split> <sha of the weights>`` per evaluation, written before scoring), EXME_PG_KILL_AT (SIGKILL this
process during that evaluation, as a crash or a pre-empted job would), EXME_PG_SLEEP (seconds per
evaluation, so that two workers interleave), EXME_PG_BASE / _SFT1 / _SFT2 (the model folders).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

_evaluator = None


def score(model, tokenizer, split, limit=None):
    global _evaluator
    if _evaluator is None:
        from conftest import P1, P2, W1, W2
        from pipeline_worker import LoggingEvaluator

        env = os.environ
        kill_at = int(env["EXME_PG_KILL_AT"]) if env.get("EXME_PG_KILL_AT") else None
        _evaluator = LoggingEvaluator(
            Path(env["EXME_PG_LOG"]), kill_at, float(env.get("EXME_PG_SLEEP", "0")),
            Path(env["EXME_PG_BASE"]), Path(env["EXME_PG_SFT1"]), Path(env["EXME_PG_SFT2"]), P1, P2, W1, W2,
        )
    return _evaluator.evaluate(model, tokenizer, split, limit)
