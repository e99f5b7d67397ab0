"""Run the pipeline in its own process with the synthetic objective, logging every evaluation.

Used by the resume and shared-study tests:
    python pipeline_worker.py CONFIG.yaml LOG BASE SFT1 SFT2 [--kill-at N] [--sleep S]
Each call of the evaluator appends one line ``<split> <sha of the weights>`` to LOG *before*
scoring; with ``--kill-at N`` the process SIGKILLs itself during its N-th evaluation, as a crash
or a pre-empted job would.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import P1, P2, W1, W2  # noqa: E402
from synthetic import SyntheticEvaluator  # noqa: E402


class LoggingEvaluator(SyntheticEvaluator):
    def __init__(self, log: Path, kill_at: int | None, sleep: float, *args):
        super().__init__(*args)
        self.log, self.kill_at, self.sleep, self.n = log, kill_at, sleep, 0

    def evaluate(self, model, tokenizer, split, limit=None):
        self.n += 1
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
        with open(self.log, "a") as fh:
            fh.write(f"{split} {digest}\n")
        if self.kill_at is not None and self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.sleep)
        return super().evaluate(model, tokenizer, split, limit)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("log")
    ap.add_argument("base")
    ap.add_argument("sft1")
    ap.add_argument("sft2")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()
    from exme.pipeline import PipelineConfig, run_pipeline

    ev = LoggingEvaluator(Path(args.log), args.kill_at, args.sleep, Path(args.base), Path(args.sft1), Path(args.sft2), P1, P2, W1, W2)
    run_pipeline(PipelineConfig.from_yaml(args.config), evaluator=ev, progress=False, write_model=False, report=False)


if __name__ == "__main__":
    main()
