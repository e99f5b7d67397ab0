"""The run report: ``report.md`` and its PNG figures, rendered from a run's ``results.json``.

``save_results(results, run_dir)`` writes ``results.json`` atomically; ``render(results, run_dir)`` writes
the report; ``load_results(run_dir)`` reads a run folder back, so ``exme report RUN_DIR`` can re-render
it at any time.
"""

from exme.report.render import load_results, render, save_results
from exme.report.schema import RunResults

__all__ = ["RunResults", "load_results", "render", "save_results"]
