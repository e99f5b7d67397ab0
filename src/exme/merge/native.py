"""Fused CPU kernels (numba) for TIES and DARE-TIES in float32: one loop where torch needs ~20 operations.

Why native code: on the CPU, TIES' merge thread spent most of its time in passes over memory
that each do one small operation (copy, subtract, histogram keys, compare, sign, clamp, add...),
where task arithmetic needs two or three. A compiled loop does all of an element's work while it
is in registers. Every kernel computes exactly the floats of the torch path in
:mod:`exme.merge.methods` (same operations, same order, the final ``b + λ·m`` as one fused
multiply-add as torch's ``add(..., alpha=)`` does on CPUs with FMA), so the two paths agree bit
for bit on such CPUs; ``tests/merge`` runs over both.

The kernels are single-threaded (the engine runs one arithmetic thread; its reader and writer
threads use the other cores) and release the GIL. They live in :mod:`exme.merge._kernels`, imported
on first use (numba's import costs ~0.3 s, which a merge without TIES should not pay). ``cache=True``
keeps the compiled code next to that module (or under ``NUMBA_CACHE_DIR``), so only the first run
after an install compiles.

Which path runs is decided in :func:`usable` alone; ``EXME_NATIVE=0`` (read at import) or
``native.ENABLED = False`` turns the kernels off (the torch path is then used everywhere).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

#: The switch between the fused kernels and the torch path (tests flip it to run both).
ENABLED = os.environ.get("EXME_NATIVE", "1") != "0"

#: numba is a dependency; where it is missing (an unsupported platform) torch does the work.
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _k():
    """The kernels module, imported on first use (so that merges without TIES never load numba)."""
    from exme.merge import _kernels

    return _kernels


def usable(*tensors: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the fused kernels can take these tensors: numba present and on, CPU, float32 arithmetic.

    Inputs may be float32 or bfloat16 (converted inside the kernels); anything else (CUDA,
    float64 arithmetic, float16 inputs) goes the torch way.
    """
    return (
        ENABLED
        and _HAVE_NUMBA
        and compute_dtype == torch.float32
        and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
    )


def as_array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor (bfloat16 as its raw uint16 bits); copies only if not contiguous."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


# ------------------------------------------------------------------------------------ wrappers


def magnitude_pass(model: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, hist: torch.Tensor | None) -> bool:
    """Δ = θ − θ_b into the float32 ``delta`` (flat); with ``hist`` (int64), count a sample of |Δ|'s coarse keys.

    Returns whether some Δ is NaN or ±Inf. Inputs of another dtype than float32/bfloat16 are
    converted first (the same floats: the torch path converts them by the same cast).
    """
    if model.dtype not in (torch.float32, torch.bfloat16):
        model = model.float()
    if base.dtype not in (torch.float32, torch.bfloat16):
        base = base.float()
    h = hist.numpy() if hist is not None else np.zeros(0, np.int64)
    return bool(_k()._magnitude_pass(as_array(model), as_array(base), delta.numpy(), h, hist is not None))


def select(delta: torch.Tensor, hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(bits of the k-th largest |Δ|, count larger, count equal) of float32 ``delta``; ``hist`` from :func:`magnitude_pass`."""
    key, above, equal = _k()._select(delta.numpy(), hist.numpy(), k)
    if key < 0:
        raise AssertionError("the k-th largest magnitude left the range of all keys")
    return int(key), int(above), int(equal)


def nth_equal(delta: torch.Tensor, key: int, nth: int) -> int:
    """Flat index of the ``nth`` entry of ``delta`` whose |Δ| has the bits ``key``."""
    index = int(_k()._nth_equal(delta.numpy(), key, nth))
    if index < 0:
        raise AssertionError("fewer entries equal the threshold than counted")
    return index


_EMPTY = np.zeros(0, np.float32)


def merge(
    base: torch.Tensor,
    models: list[torch.Tensor],
    is_delta: bool,
    ws: list[float],
    *,
    trims: list[tuple[float, float, int] | None] | None = None,
    draws: list[torch.Tensor | None] | None = None,
    densities: list[float] | None = None,
    rescale: bool = True,
    count_vote: bool = False,
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The fused disjoint merge; returns θ as a new tensor of ``base``'s shape in ``out_dtype``.

    The arithmetic is float32; a bfloat16 ``out_dtype`` is written rounded to nearest even, the
    floats of ``.to(torch.bfloat16)``; any other is a cast afterwards.

    ``trims[i]``: (below, at, cut) of model i's TIES trim (None: nothing trimmed); ``draws[i]``:
    model i's uniform draws (flat float32; None: nothing dropped) with ``densities[i]``.
    Inputs of different dtypes are brought to float32 first (a tuple of arrays must share a type).
    """
    nm = len(models)
    arrays = [as_array(m) for m in models]
    if len({a.dtype for a in arrays}) > 1:
        arrays = [a if a.dtype == np.float32 else as_array(m.float()) for a, m in zip(arrays, models)]
    trims = trims or [None] * nm
    draws = draws or [None] * nm
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    direct = out_dtype in (torch.float32, torch.bfloat16)
    out = torch.empty(base.shape, dtype=out_dtype if direct else torch.float32)
    _k()._merge(
        as_array(base), tuple(arrays), is_delta,
        np.asarray([t is not None for t in trims], dtype=np.bool_),
        f32([t[0] if t else 0.0 for t in trims]), f32([t[1] if t else 0.0 for t in trims]),
        np.asarray([t[2] if t else 0 for t in trims], dtype=np.int64),
        tuple(_EMPTY if u is None else as_array(u) for u in draws),
        f32(densities or [1.0] * nm), rescale, f32(ws), count_vote, normalize,
        np.float32(min(ws) if normalize else 0.0), np.float32(lambda_), as_array(out),
    )
    return out if direct else out.to(out_dtype)
