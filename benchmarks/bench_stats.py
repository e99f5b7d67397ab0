"""Paired bootstrap speed: exme's vectorised, chunked bootstrap against a per-resample numpy loop.

Run:  PYTHONPATH=src python benchmarks/bench_stats.py

The case is a report's overall comparison: three tasks of 0/1 per-item differences (1000, 1000 and
1500 items), weights (0.25, 0.25, 0.5), 2000 and 10 000 resamples. The peer is the obvious
implementation: one ``rng.integers`` draw and one mean per task per resample (numpy, no Python loop
over items). Both draw the same indices (one generator per task), so their outputs are equal to
float rounding; the script checks that. Each time is the best of three calls. A single-thread
figure: run with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from exme.report.stats import bootstrap_distribution, sign_flip_p


def loop_bootstrap(diffs: list[np.ndarray], weights: list[float], n_resamples: int, seed: int) -> np.ndarray:
    gens = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(diffs))]
    out = np.zeros(n_resamples)
    for d, w, g in zip(diffs, weights, gens):
        for b in range(n_resamples):
            out[b] += w * d[g.integers(0, len(d), size=len(d))].mean()
    return out


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    sizes, weights = [1000, 1000, 1500], [0.25, 0.25, 0.5]
    diffs = [(rng.integers(0, 2, n) - rng.integers(0, 2, n)).astype(float) for n in sizes]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("| resamples | items | exme vectorised | per-resample loop | ratio | sign-flip p (exme) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (2000, 10000):
        fast = bootstrap_distribution(diffs, weights, n_resamples=b, seed=1)
        slow = loop_bootstrap(diffs, weights, b, 1)
        assert np.allclose(fast, slow, rtol=0, atol=1e-12)
        t_fast = best_of(lambda: bootstrap_distribution(diffs, weights, n_resamples=b, seed=1))
        t_slow = best_of(lambda: loop_bootstrap(diffs, weights, b, 1))
        t_flip = best_of(lambda: sign_flip_p(diffs, weights, n_resamples=b, seed=1))
        print(f"| {b} | {sum(sizes)} | {t_fast:.3f} s | {t_slow:.3f} s | {t_slow / t_fast:.1f}× | {t_flip:.3f} s |")


if __name__ == "__main__":
    main()
