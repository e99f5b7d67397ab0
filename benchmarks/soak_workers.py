"""Workers killed again and again, the long version of tests/postgres/test_soak.py.

Three `exme run` workers share one PostgreSQL study (a throwaway server, as the tests start it) and one
run folder; one of them is SIGKILLed at a random moment every few seconds and started again, ``--kills``
times, then all run to the end. The outcome is compared with an uninterrupted single worker on SQLite:
choices, results.json (without times and paths), the final model's bytes, evaluations (each extra one
must be the evaluation a killed worker died in), and the rows and temporary files left behind.

Run:  PYTHONPATH=src python benchmarks/soak_workers.py [--kills 40] [--seed 0] [--sleep 0.25]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "postgres"))
from soak import comparable_results, leftovers, model_bytes, run_reference, soak, worker_rows, write_config  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.25, help="seconds per evaluation")
    ap.add_argument("--kill-min", type=float, default=0.5)
    ap.add_argument("--kill-max", type=float, default=8.0)
    args = ap.parse_args()
    from exme.testing import make_finetuned, make_tiny_model

    pg = _load("exme_soak_pg", ROOT / "tests" / "postgres" / "conftest.py")
    resume = _load("exme_soak_resume", ROOT / "tests" / "pipeline" / "test_resume.py")
    bindir = pg.server_bin()
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries (pip install pgserver)")
    alphas, betas = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    with tempfile.TemporaryDirectory(prefix="exme-soak-") as tmp, pg.throwaway_cluster(bindir) as cluster:
        tmp = Path(tmp)
        base = make_tiny_model(tmp / "base", seed=0)
        ckpts = [make_finetuned(base, tmp / "run" / f"checkpoint-{s}", seed=i, scale=0.02)
                 for i, s in enumerate((10, 20, 100), start=1)]
        t0 = time.monotonic()
        run_reference(write_config(tmp / "ref.yaml", base, tmp / "run", tmp / "ref", alphas, betas),
                      tmp / "ref.log", base, ckpts, sleep=0.0)
        reference_s = time.monotonic() - t0
        storage = pg.create_database(cluster, "exme_soak")
        result = soak(write_config(tmp / "shared.yaml", base, tmp / "run", tmp / "shared", alphas, betas), storage,
                      tmp / "logs", base, ckpts, tmp / "ref.log", kills=args.kills, seed=args.seed, sleep=args.sleep,
                      kill_after=(args.kill_min, args.kill_max), timeout_s=3600)
        report = {
            **dataclasses.asdict(result),
            "reference_seconds": round(reference_s, 1),
            "same_choices": resume._choices(tmp / "shared") == resume._choices(tmp / "ref"),
            "same_results_json": comparable_results(tmp / "shared") == comparable_results(tmp / "ref"),
            "same_model_bytes": model_bytes(tmp / "shared") == model_bytes(tmp / "ref"),
            "rows_left_claims_workers": worker_rows(storage),
            "temp_left": leftovers(tmp / "shared"),
            "load_avg": os.getloadavg(),
            "args": vars(args),
        }
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
