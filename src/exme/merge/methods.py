"""Merge methods as pure tensor functions: tensors in, one tensor out, no I/O, no global state.

Every function follows the same numeric contract, so results do not depend on how a model was
stored: inputs are promoted to ``compute_dtype`` (float32 by default, float64 on request), all
arithmetic happens there, and the result is cast once to ``out_dtype`` (default: the dtype of the
first tensor argument). Inputs are never modified in place. Any torch device works; all inputs of
one call must be on the same device.

Names, parameters and defaults follow mergekit's methods of the same name, because that is what
users compare with. Deliberate differences (documented in ``docs/merge.md``):

* arithmetic is float32 even for bf16 inputs (mergekit computes in the input dtype by default);
* DARE rescales kept entries by ``1/density`` (the DARE paper), where recent mergekit matches the
  L1 norm of the dropped-out delta instead;
* TIES keeps exactly ``max(1, int(density * numel))`` entries (as mergekit), found without sorting the whole tensor;
  among entries whose magnitude ties at the threshold the ones with the lowest flat index are kept.

Notation: θ_b is the base tensor, θ_i the i-th model's tensor, Δ_i = θ_i − θ_b its task vector.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from exme.errors import ExmeError
from exme.merge import native

SignMethod = Literal["sum", "count"]

#: Entries sampled to estimate the TIES magnitude threshold before the exact selection.
_THRESHOLD_SAMPLE = 1 << 16
#: Tensors at most this large get an exact ``kthvalue`` directly (sampling would not pay off).
_DIRECT_SELECTION_MAX = 1 << 17


# --------------------------------------------------------------------------------------------
# pieces shared by the methods
# --------------------------------------------------------------------------------------------


def _as_list(value: float | Sequence[float], n: int, what: str) -> list[float]:
    """Broadcast one number to ``n`` models, or check that a sequence has one entry per model."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ExmeError(f"got {len(values)} {what} values for {n} models; give one per model")
    return values


def _check_same_shape(tensors: Sequence[torch.Tensor]) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ExmeError(f"cannot merge tensors of different shapes {sorted(shapes)}")


def _check_density(densities: Sequence[float]) -> None:
    for d in densities:
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ExmeError(f"density must be in (0, 1], got {d}")


def _out(result: torch.Tensor, out_dtype: torch.dtype | None, first: torch.Tensor) -> torch.Tensor:
    """The single cast at the end of every method."""
    return result.to(out_dtype or first.dtype)


class Workspace:
    """Tensor-sized buffers that a whole-tensor method reuses from call to call (DARE-TIES' draws).

    Why: an allocation that large comes as fresh, zero-filled pages from the OS every time (page
    faults and zeroing, counted as system time), while the engine merges tensor after tensor of
    similar sizes. A buffer is only used inside the call that asked for it; results never live here.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
        """A flat buffer of ``numel`` elements (uninitialised), the same memory as the last call's when it fits."""
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def _task_vector(model: torch.Tensor, base_c: torch.Tensor) -> torch.Tensor:
    """Δ = θ − θ_b in the compute dtype of ``base_c``; one fused pass, a new tensor."""
    return torch.sub(model, base_c).to(base_c.dtype)


# --------------------------------------------------------------------------------------------
# ExPO and ExMe
# --------------------------------------------------------------------------------------------


def extrapolate(
    theta: torch.Tensor,
    base: torch.Tensor,
    alpha: float,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ExPO: move past the fine-tuned model along its own task vector.

    θ_expo = θ + α(θ − θ_b),  α ≥ 0.

    α = 0 returns θ itself; α > 0 amplifies what fine-tuning changed. ``out_dtype`` defaults to
    ``theta``'s dtype.
    """
    if not alpha >= 0:
        raise ExmeError(f"alpha must be >= 0 (extrapolation, not interpolation), got {alpha}")
    _check_same_shape([theta, base])
    theta_c = theta.to(compute_dtype, copy=True)
    theta_c.add_(_task_vector(theta, base.to(compute_dtype)), alpha=float(alpha))
    return _out(theta_c, out_dtype, theta)


def exme_coefficients(weights: Sequence[float], alphas: Sequence[float]) -> list[float]:
    """cᵢ = wᵢ(1 + αᵢ): ExMe (and EXPO, a weight of 1) as θ_b + Σ cᵢΔᵢ. The one place this is written:
    the merge engine, the registry, the live model and the pipeline's candidates all call it, so the
    coefficients they apply are the same floats."""
    return [float(w) * (1.0 + float(a)) for w, a in zip(weights, alphas)]


def exme(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    alphas: Sequence[float] | float,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Extrapolation Merging: a convex combination of extrapolated checkpoints.

    θ* = Σ_i w_i · (θ_i + α_i(θ_i − θ_b)) = θ_b + Σ_i w_i (1 + α_i) Δ_i,  Σ w_i = 1, w_i ≥ 0, α_i ≥ 0.

    With two models and ``weights=[β, 1−β]`` this is the paper's
    θ* = θ_b + β(1+α₁)Δ₁ + (1−β)(1+α₂)Δ₂. ``out_dtype`` defaults to ``base``'s dtype.
    """
    if not models:
        raise ExmeError("exme needs at least one model")
    ws = _as_list(weights, len(models), "weight")
    als = _as_list(alphas, len(models), "alpha")
    if any(not w >= 0 for w in ws) or abs(sum(ws) - 1.0) > 1e-6:
        raise ExmeError(f"exme weights must be >= 0 and sum to 1 (they are convex), got {ws}")
    if any(not a >= 0 for a in als):
        raise ExmeError(f"exme alphas must be >= 0, got {als}")
    _check_same_shape([base, *models])
    acc = torch.empty(base.shape, dtype=compute_dtype, device=base.device)
    combine_into(acc, base, models, exme_coefficients(ws, als), compute_dtype=compute_dtype)
    return _out(acc, out_dtype, base)


def combine_into(
    out: torch.Tensor,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    deltas: bool = False,
    chunk: int | None = None,
    bufs: dict[str, torch.Tensor] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """out ← cast(b + Σ cᵢ·(θᵢ − b)), arithmetic in ``compute_dtype``, in order i = 1..K.

    The one implementation of a combination linear in the task vectors: :func:`exme` and the
    live model (``exme.search.LiveModel.apply``) both call it, so the live weights are bitwise what
    the merge engine writes. ``deltas=True``: ``tensors`` are Δᵢ already in ``compute_dtype``.
    ``chunk``: work in pieces of that many elements with the buffers in ``bufs`` (reused from
    call to call), so temporaries stay in cache; the per-element operations are the same.
    """
    o, b = out.view(-1), base.reshape(-1)
    ts = [t.reshape(-1) for t in tensors]
    n = o.numel()
    step = n if chunk is None else chunk
    size = min(step, n)
    if chunk is None or bufs is None:
        b32 = torch.empty(size, dtype=compute_dtype, device=o.device)
        d = torch.empty_like(b32)
        # Whole tensor into an output of the arithmetic dtype: accumulate in place, no final copy.
        acc = o if chunk is None and o.dtype == compute_dtype else torch.empty_like(b32)
    else:
        if "b32" not in bufs or bufs["b32"].dtype != compute_dtype:
            bufs.update({k: torch.empty(chunk, dtype=compute_dtype, device=o.device) for k in ("b32", "acc", "d")})
        b32, acc, d = bufs["b32"][:size], bufs["acc"][:size], bufs["d"][:size]
    for s in range(0, n, step):
        e = min(n, s + step)
        k = e - s
        bb, aa, dd = b32[:k], acc[:k], d[:k]
        bb.copy_(b[s:e])
        if not ts:
            aa.copy_(bb)
        for i, (t, c) in enumerate(zip(ts, coeffs)):
            if deltas:
                dd = t[s:e]
            else:
                dd = d[:k]
                dd.copy_(t[s:e])
                dd.sub_(bb)
            if i == 0:  # aa = bb + c·dd without first copying bb into aa (same fused multiply-add)
                torch.add(bb, dd, alpha=c, out=aa)
            else:
                aa.add_(dd, alpha=c)
        if aa.data_ptr() != o[s:e].data_ptr():
            o[s:e].copy_(aa)


# --------------------------------------------------------------------------------------------
# linear, task arithmetic
# --------------------------------------------------------------------------------------------


def linear(
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weighted average of whole models (model soup).

    θ = Σ_i w_i θ_i / Σ_i w_i   (normalize=True, mergekit's default), else θ = Σ_i w_i θ_i.
    """
    if not models:
        raise ExmeError("linear needs at least one model")
    ws = _as_list(weights, len(models), "weight")
    _check_same_shape(models)
    total = sum(ws)
    if normalize and abs(total) < 1e-8:
        raise ExmeError(f"linear weights sum to {total}; with normalize=true they must not sum to 0")
    scale = 1.0 / total if normalize else 1.0
    acc = torch.zeros(models[0].shape, dtype=compute_dtype, device=models[0].device)
    for model, w in zip(models, ws):
        acc.add_(model.to(compute_dtype), alpha=w * scale)
    return _out(acc, out_dtype, models[0])


def task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    lambda_: float = 1.0,
    *,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Task arithmetic: add weighted task vectors to the base.

    θ = θ_b + λ · Σ_i w_i Δ_i / D,  D = Σ_i w_i if normalize (and |D| ≥ 1e-8) else 1.

    Defaults as mergekit's ``task_arithmetic``: normalize off, λ = 1.
    """
    ws = _as_list(weights, len(models), "weight")
    _check_same_shape([base, *models])
    divisor = sum(ws) if normalize and abs(sum(ws)) >= 1e-8 else 1.0
    base_c = base.to(compute_dtype)
    acc = base_c.clone()
    for model, w in zip(models, ws):
        acc.add_(_task_vector(model, base_c), alpha=lambda_ * w / divisor)
    return _out(acc, out_dtype, base)


# --------------------------------------------------------------------------------------------
# TIES: magnitude pruning without a full sort, sign election, disjoint merge
# --------------------------------------------------------------------------------------------


#: Entries per step when scanning a large tensor: temporaries stay small (and are reused by
#: the allocator) instead of allocating tensor-sized masks.
SCAN_CHUNK = 1 << 20


def _count_greater(values: torch.Tensor, x: torch.Tensor) -> int:
    return sum(int(torch.count_nonzero(values[i : i + SCAN_CHUNK] > x)) for i in range(0, values.numel(), SCAN_CHUNK))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a flat tensor (1 ≤ k ≤ numel), without sorting it.

    See :func:`kth_largest_and_count`, which also counts the entries strictly above it.
    """
    return kth_largest_and_count(values, k)[0]


def kth_largest_and_count(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The exact k-th largest entry of a flat tensor and how many entries are strictly larger."""
    value, greater, _ = kth_largest_stats(values, k)
    return value, greater


def kth_largest_stats(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The exact k-th largest entry, how many entries are strictly larger and how many equal it.

    Why not ``argsort``: a full sort of every tensor is what makes TIES slow. Instead a fixed
    sample of 65536 entries estimates the (1 − k/n) quantile, with a band around the estimate wide
    enough to contain the true value with overwhelming probability. Non-negative float32 values
    (magnitudes, the TIES case) are then counted per distinct value inside the band with one
    histogram pass (:func:`_bits_select`); other values have the band cut out with two
    comparisons, and ``kthvalue`` runs only on that band. If the band misses (a pathological
    distribution), the exact ``kthvalue`` on the whole tensor is the fallback, so the answer is
    always exact.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    if n <= _DIRECT_SELECTION_MAX:
        value = torch.kthvalue(values, n - k + 1).values
        return value, int(torch.count_nonzero(values > value)), int(torch.count_nonzero(values == value))
    # A deterministic sample: results never depend on global RNG state.
    gen = torch.Generator(device="cpu").manual_seed(n * 2654435761 % (2**63))
    idx = torch.randint(0, n, (_THRESHOLD_SAMPLE,), generator=gen).to(values.device)
    sample = values[idx].sort().values
    m = sample.numel()
    q = 1.0 - k / n
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / m) / m) + 2.0 / m
    lo = sample[max(0, math.floor((q - margin) * m))]
    hi = sample[min(m - 1, math.ceil((q + margin) * m))]
    if values.dtype == torch.float32 and int(values.view(torch.int32).amin()) >= 0:  # no sign bit set
        return _bits_select(values, k, lo, hi)
    n_above = 0
    band_parts = []
    for i in range(0, n, SCAN_CHUNK):
        part = values[i : i + SCAN_CHUNK]
        n_above += int(torch.count_nonzero(part > hi))
        band_parts.append(part[(part >= lo) & (part <= hi)])
    need = k - n_above  # how many of the largest band entries reach down to the k-th overall
    band = torch.cat(band_parts)
    if 1 <= need <= band.numel():
        value = torch.kthvalue(band, band.numel() - need + 1).values
        return value, n_above + int(torch.count_nonzero(band > value)), int(torch.count_nonzero(band == value))
    value = torch.kthvalue(values, n - k + 1).values
    return value, _count_greater(values, value), _count_equal(values, value)



#: Counters of one histogram pass of :func:`_bits_select` (small, so they stay in cache).
_HIST_BINS = 1 << 12
#: Entries per histogram step (the int32 scratch of one step; in cache).
_HIST_STEP = 1 << 18


def _band_histogram(bits: torch.Tensor, lo: int, hi: int, shift: int, signed: bool = False) -> torch.Tensor:
    """Counts of the int32 keys ``bits``: below ``lo``, in each bin of 2**shift keys of [lo, hi], above ``hi``.

    ``signed``: the keys are float bits whose sign bit is cleared first (counting |x| of signed x).

    Why a histogram: counting with ``bincount`` over clamped keys is integer work in cache, where
    cutting a band out with comparisons and boolean indexing cost several passes of boolean
    temporaries, which are slow on CPU.
    """
    width = ((hi - lo) >> shift) + 3
    hist = torch.zeros(width, dtype=torch.int64, device=bits.device)
    n = bits.numel()
    scratch = torch.empty(min(n, _HIST_STEP), dtype=torch.int32, device=bits.device)
    for s in range(0, n, _HIST_STEP):
        part = scratch[: min(n, s + _HIST_STEP) - s]
        # below lo → lo − 2**shift (bin 0), above hi → hi + 2**shift (the last bin)
        if signed:  # |x| in float (cheaper than masking the sign bit), read back as its bits
            torch.abs(bits[s : s + part.numel()].view(torch.float32), out=part.view(torch.float32))
            part.clamp_(lo - (1 << shift), hi + (1 << shift))
        else:
            torch.clamp(bits[s : s + part.numel()], lo - (1 << shift), hi + (1 << shift), out=part)
        part.sub_(lo - (1 << shift))
        if shift:
            part.bitwise_right_shift_(shift)
        hist[: width].add_(torch.bincount(part, minlength=width)[:width])
    return hist


def _bits_select(
    values: torch.Tensor, k: int, lo: torch.Tensor | int, hi: torch.Tensor | int, bins: int = _HIST_BINS,
    signed: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """Exact k-th largest of non-negative float32 ``values`` with the counts, by histograms of their bits.

    The bits of a non-negative float32, read as an int32, order the same way as the floats, so
    the k-th largest float is the k-th largest key. Starting from a guess ``[lo, hi]`` (floats, or
    keys as ints; a sampled band, or the coarse bin of :class:`MagnitudePass`; every key when the
    guess misses), each pass counts the keys of the range in at most ``bins`` bins and narrows the
    range to the bin holding the k-th largest, until bins are single keys: always exact, usually
    two passes from a sampled band and one from a coarse bin. ``signed``: select among |values|.
    """
    bits = values.view(torch.int32)
    lo_b = lo if isinstance(lo, int) else int(lo.view(torch.int32))
    hi_b = hi if isinstance(hi, int) else int(hi.view(torch.int32))
    above = 0  # entries with a key above hi_b
    guessed = True
    while True:
        shift = max(0, (hi_b - lo_b).bit_length() - bins.bit_length() + 1)
        hist = _band_histogram(bits, lo_b, hi_b, shift, signed)
        n_above, n_below = int(hist[-1]), int(hist[0])
        if not n_above < k <= values.numel() - n_below:
            assert guessed, "the k-th largest left the range that held it"
            lo_b, hi_b, guessed = 0, 0x7F800000, False  # the guess missed: all keys
            continue
        cum = hist[1:-1].flip(0).cumsum(0)  # cum[j]: entries in the top j + 1 bins of the range
        j = int(torch.searchsorted(cum, k - n_above))
        count = int(hist[-2 - j])
        top = lo_b + (((hi_b - lo_b) >> shift) - j) * (1 << shift)  # first key of bin j from the top
        above = n_above + int(cum[j]) - count
        if shift == 0:
            value = torch.tensor(top, dtype=torch.int32, device=values.device).view(torch.float32)
            return value, above, count
        lo_b, hi_b = top, min(hi_b, top + (1 << shift) - 1)


#: Low bits dropped from a float32 key for the coarse histogram of :class:`MagnitudePass`: the
#: top 16 bits (sign, exponent, 7 mantissa bits) index at most 2**15 bins for non-negative floats.
_COARSE_SHIFT = 16
_COARSE_BINS = 1 << 15


class MagnitudePass:
    """The first pass of TIES over one tensor: Δᵢ per model, chunk by chunk, and a histogram of |Δᵢ|.

    Why here: the threshold needs a histogram of the magnitudes' bits, and building its first
    (coarse) level while each chunk is in cache replaces the whole-tensor passes that sampled a
    band and histogrammed it; what is left per model is one pass over the coarse bin that holds
    the k-th largest (:func:`_bits_select`). Keeping Δᵢ itself (not |Δᵢ|, the same memory) lets
    the merge pass take Δᵢ from here (``ties(..., deltas=True)``) instead of reading and
    subtracting every model again. The buffers are kept from tensor to tensor.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype
        self.deltas: list[torch.Tensor] = []
        self._hists: list[torch.Tensor] = []
        self._scratch = torch.empty(0, dtype=torch.float32, device=device)
        self.numel = 0
        #: this tensor's pass runs the fused kernels (exme.merge.native); their histogram counts a
        #: sample of the keys, and they flag non-finite Δ themselves
        self._native = False
        self._bad: list[bool] = []

    def start(self, numel: int, n_models: int) -> None:
        """Begin a tensor of ``numel`` elements (per model) merged from ``n_models`` models."""
        self.numel = numel
        while len(self.deltas) < n_models:
            self.deltas.append(torch.empty(0, dtype=self.dtype, device=self.device))
            self._hists.append(torch.zeros(_COARSE_BINS, dtype=torch.int64, device=self.device))
        for j in range(n_models):
            if self.deltas[j].numel() < numel:
                self.deltas[j] = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._hists[j].zero_()
        self._native = native.usable(self.deltas[0], compute_dtype=self.dtype) if n_models else False
        self._bad = [False] * n_models

    @property
    def coarse(self) -> bool:
        """Whether the coarse histogram is built (float32 task vectors of a tensor worth sampling)."""
        return self.dtype == torch.float32 and self.numel > _DIRECT_SELECTION_MAX

    def add(self, j: int, start: int, model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Δ = θ − θ_b of model ``j``'s flat chunk at ``start``; returns it.

        ``base`` in the compute dtype or a narrower one (as stored): the subtraction widens it
        exactly, so the caller need not convert it first.
        """
        delta = self.deltas[j][start : start + model.numel()]
        if self._native:  # the same Δ in one loop; the histogram of a sample
            self._bad[j] |= native.magnitude_pass(model, base, delta, self._hists[j] if self.coarse else None)
            return delta
        delta.copy_(model)
        delta.sub_(base)
        if self.coarse:
            if self._scratch.numel() < delta.numel():
                self._scratch = torch.empty(delta.numel(), dtype=torch.float32, device=self.device)
            mag = torch.abs(delta, out=self._scratch[: delta.numel()])
            keys = mag.view(torch.int32)  # the float's bits: ordered as |Δ| is
            # the sign bit of |Δ| is clear, so every key (NaN's too) shifts into [0, 2**15): no clamp
            keys.bitwise_right_shift_(_COARSE_SHIFT)
            self._hists[j].add_(torch.bincount(keys, minlength=_COARSE_BINS)[:_COARSE_BINS])
        return delta

    def finite(self, j: int, delta: torch.Tensor) -> bool:
        """Whether model ``j``'s Δ is finite so far (``delta``: the chunk :meth:`add` just returned).

        With the coarse histogram, NaN and ±Inf are the keys from 0x7F800000 on, counted in its
        top bins, so no pass over the chunk is needed.
        """
        if self._native:
            return not self._bad[j]
        if self.coarse:
            return int(self._hists[j][0x7F800000 >> _COARSE_SHIFT :].sum()) == 0
        return bool(torch.isfinite(delta.sum()))

    def chunk(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Model ``j``'s Δ over ``[start, stop)`` (the merge pass consumes it in place)."""
        return self.deltas[j][start:stop]

    def selectors(self, densities: Sequence[float]) -> list[MagnitudeSelector]:
        """One :class:`MagnitudeSelector` per model, after every chunk of the tensor was added."""
        out = []
        for j, d in enumerate(densities):
            delta = self.deltas[j][: self.numel]
            if self.coarse:
                out.append(MagnitudeSelector.from_magnitudes(delta, d, coarse=self._hists[j], sampled=self._native))
            else:
                out.append(MagnitudeSelector.from_magnitudes(delta.abs(), d))
        return out


def _coarse_band(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The key range [lo, hi] of the coarse bin that holds the k-th largest entry."""
    cum = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(cum, k))
    b = hist.numel() - 1 - j
    return b << _COARSE_SHIFT, ((b + 1) << _COARSE_SHIFT) - 1


def _nth_equal(values: torch.Tensor, x: torch.Tensor, nth: int, signed: bool = False) -> int:
    """Flat index of the ``nth`` (1-based) entry of ``values`` (``signed``: of |values|) equal to ``x``; it must exist.

    Why float operations: counting the equal entries of a piece as its size minus Σ sign(|v − x|)
    avoids boolean temporaries (slow on CPU); the piece that holds the answer is narrowed to a
    small one before its entries are compared.
    """
    scratch = torch.empty(min(values.numel(), SCAN_CHUNK), dtype=values.dtype, device=values.device)
    xf = float(x)

    def equal(part: torch.Tensor) -> int:
        diff = scratch[: part.numel()]
        if signed:
            torch.abs(part, out=diff).sub_(xf)
        else:
            torch.sub(part, xf, out=diff)
        return part.numel() - int(diff.abs_().sign_().sum())  # a float32 sum of 0/1 is exact below 2**24

    offset, step = 0, SCAN_CHUNK
    while True:
        n = values.numel()
        for i in range(0, n, step):
            part = values[i : i + step]
            count = equal(part)
            if count >= nth:
                break
            nth -= count
        else:
            raise AssertionError("fewer entries equal the threshold than counted")
        offset += i
        values = part
        if part.numel() <= _KERNEL_BLOCK:
            hits = torch.nonzero((part.abs() if signed else part) == x).reshape(-1)
            return offset + int(hits[nth - 1])
        step = max(_KERNEL_BLOCK, step // 16)


def _count_equal(values: torch.Tensor, x: torch.Tensor) -> int:
    return sum(int(torch.count_nonzero(values[i : i + SCAN_CHUNK] == x)) for i in range(0, values.numel(), SCAN_CHUNK))


class MagnitudeSelector:
    """Keeps exactly the k entries of largest magnitude; applicable chunk by chunk in flat order.

    Built once from all magnitudes of a tensor (the threshold is global), then :meth:`mask`
    is called on consecutive chunks of the same magnitudes (or once on the whole tensor).
    Entries strictly above the threshold are kept; entries equal to it fill the remaining slots
    in flat-index order, so the count is exactly k and the result deterministic. Why a stateful
    object: the streaming engine merges large tensors in small chunks, and the tie quota must
    carry over from one chunk to the next.
    """

    def __init__(self, threshold: torch.Tensor | None, ties_to_keep: int, all_ties: bool = False) -> None:
        self.threshold = threshold  # None: keep everything
        self.ties_left = ties_to_keep
        #: every entry equal to the threshold is kept (the usual case: one entry sits at it), so
        #: ``>= threshold`` is the whole rule and chunks need no tie bookkeeping
        self.all_ties = all_ties
        #: flat index of the last tied entry that is kept (when not ``all_ties``), so a chunk can
        #: keep ``>= threshold`` up to it and ``> threshold`` after it without counting ties
        self.last_tie: int | None = None
        #: elements of the tensor already merged through :meth:`trim_`
        self.offset = 0
        self._cuts: tuple[torch.dtype, float, float] | None = None  # (dtype, t⁻, t) for trim_

    @classmethod
    def from_magnitudes(
        cls, magnitudes: torch.Tensor, density: float, coarse: torch.Tensor | None = None, sampled: bool = False
    ) -> MagnitudeSelector:
        """``magnitudes``: |Δ| of the whole tensor, flat. Keeps max(1, ⌊density·n⌋) (as mergekit).

        ``coarse``: the coarse histogram from :class:`MagnitudePass`; then ``magnitudes`` are that
        pass's signed Δ (float32) and the selection reads |Δ| from their bits. ``sampled``: the
        histogram counts a sample of the keys (the fused kernels' pass); the kernels select.
        """
        n = magnitudes.numel()
        if density >= 1.0 or n == 0:
            return cls(None, 0)
        k = max(1, int(density * n))  # as mergekit: a positive density keeps at least one entry
        if k >= n:
            return cls(None, 0)
        if coarse is not None and n > _DIRECT_SELECTION_MAX and sampled:
            key, n_greater, n_equal = native.select(magnitudes, coarse, k)
            selector = cls(torch.tensor(key, dtype=torch.int32).view(torch.float32), k - n_greater, all_ties=k - n_greater == n_equal)
            if not selector.all_ties:
                selector.last_tie = native.nth_equal(magnitudes, key, k - n_greater)
            return selector
        if coarse is not None and n > _DIRECT_SELECTION_MAX:
            lo_b, hi_b = _coarse_band(coarse, k)
            threshold, n_greater, n_equal = _bits_select(magnitudes, k, lo_b, hi_b, bins=1 << _COARSE_SHIFT, signed=True)
        else:
            threshold, n_greater, n_equal = kth_largest_stats(magnitudes, k)
        ties = k - n_greater
        selector = cls(threshold, ties, all_ties=ties == n_equal)
        if not selector.all_ties:
            selector.last_tie = _nth_equal(magnitudes, threshold, ties, signed=coarse is not None)
        return selector

    @property
    def float_only(self) -> bool:
        """Whether :meth:`trim_` applies (it does, unless built by hand with a tie quota)."""
        return self.threshold is None or self.all_ties or self.last_tie is not None

    def cuts(self, dtype: torch.dtype, start: int) -> tuple[float, float, int] | None:
        """The trim of the flat block at ``offset + start``: (t⁻, t, cut), or None when nothing is dropped.

        Entries of the block before index ``cut`` are kept where |Δ| > t⁻ (t⁻ the next float
        below t: |Δ| ≥ t, ties included), the others where |Δ| > t; ``cut`` may lie outside the
        block. One rule for :meth:`trim_` and the fused kernel (:mod:`exme.merge.native`).
        """
        if self.threshold is None:
            return None
        if self._cuts is None or self._cuts[0] != dtype:  # the two cut points, once per tensor
            t = self.threshold.to(dtype)
            self._cuts = (dtype, float(torch.nextafter(t, torch.zeros_like(t))), float(t))
        _, below, at = self._cuts
        if self.all_ties and at <= 0:  # every entry is at least 0: all kept
            return None
        if self.all_ties:
            return below, at, 1 << 62
        return below, at, self.last_tie + 1 - (self.offset + start)

    def trim_(self, delta: torch.Tensor, start: int) -> None:
        """Zero, in place, the dropped entries of the flat block of Δ at ``offset + start``.

        The same entries as :meth:`mask` drops, with float operations only: keeping |Δ| ≥ t is
        hardshrink's |Δ| > t⁻ (t⁻ the next float below t), keeping |Δ| > t is hardshrink at t.
        """
        cuts = self.cuts(delta.dtype, start)
        if cuts is None:
            return
        below, at, cut = cuts
        cut = min(max(cut, 0), delta.numel())  # entries at or before the last kept tie
        if cut:
            torch.ops.aten.hardshrink.out(delta[:cut], below, out=delta[:cut])
        if cut < delta.numel():
            torch.ops.aten.hardshrink.out(delta[cut:], at, out=delta[cut:])

    def mask(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """Keep-mask of the next chunk of magnitudes (flat, in order)."""
        if self.threshold is None:
            return torch.ones_like(magnitudes, dtype=torch.bool)
        if self.all_ties:
            return magnitudes >= self.threshold
        keep = magnitudes > self.threshold
        if self.ties_left > 0:
            tied = magnitudes == self.threshold
            n_tied = int(torch.count_nonzero(tied))
            if n_tied <= self.ties_left:
                keep |= tied
                self.ties_left -= n_tied
            else:
                keep[torch.nonzero(tied).reshape(-1)[: self.ties_left]] = True
                self.ties_left = 0
        return keep


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly ``max(1, int(density · numel))`` entries of largest |Δ|.

    Entries strictly above the threshold are all kept; entries equal to it fill the remaining
    slots in flat-index order, so the count is exact and the result deterministic.
    """
    magnitude = delta.abs().reshape(-1)
    return MagnitudeSelector.from_magnitudes(magnitude, density).mask(magnitude).reshape(delta.shape)


def _check_sign_method(method: str) -> None:
    if method not in ("sum", "count"):
        raise ExmeError(f"majority_sign_method must be 'sum' or 'count', got {method!r}")


def elect_sign(weighted_deltas: Sequence[torch.Tensor], method: SignMethod = "sum") -> torch.Tensor:
    """TIES sign election: the majority sign per entry (±1.0), +1 where the vote is tied at zero.

    ``sum``: sign(Σ_i w_iΔ_i) (the TIES paper, mass-weighted); ``count``: sign(Σ_i sign(w_iΔ_i)).
    """
    _check_sign_method(method)
    vote = torch.zeros_like(weighted_deltas[0])
    for wd in weighted_deltas:
        vote.add_(wd if method == "sum" else wd.sign())
    return torch.ge(vote, 0).to(vote.dtype).mul_(2).sub_(1)


def disjoint_merge(
    base: torch.Tensor,
    weighted_deltas: list[torch.Tensor],
    weights: Sequence[float],
    majority_sign_method: SignMethod = "sum",
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES disjoint merge of weighted (already pruned) task vectors, in their dtype.

    θ = θ_b + λ · Σ_i w_iΔ_i·[sgn(w_iΔ_i) = s] / D,  s = elect_sign({w_iΔ_i}),
    D = Σ_i w_i·[sgn(w_iΔ_i) = s] (0 → 1) if normalize else 1. Zero (pruned) entries never
    agree with s = ±1, so they add nothing. ``weighted_deltas`` are consumed (overwritten).
    """
    sign = elect_sign(weighted_deltas, majority_sign_method)
    mixed = torch.zeros_like(weighted_deltas[0])
    divisor = torch.zeros_like(weighted_deltas[0]) if normalize else None
    for wd, w in zip(weighted_deltas, weights):
        agree = wd.sign().eq_(sign)  # 1.0 where the entry has the elected sign, else 0.0
        mixed.addcmul_(wd, agree)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    if divisor is not None:
        divisor.add_(divisor == 0)  # 0 → 1 where no entry agrees (mixed is 0 there)
        mixed.div_(divisor)
    return base.to(mixed.dtype).add(mixed, alpha=lambda_)


#: Elements per block of :func:`_disjoint_kernel`: its K + 4 float32 buffers stay in cache.
_KERNEL_BLOCK = 1 << 15


def _disjoint_kernel(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    ws: list[float],
    prune: Callable[[int, torch.Tensor, int, int], None],
    method: SignMethod,
    normalize: bool,
    lambda_: float,
    compute_dtype: torch.dtype,
    deltas: bool = False,
) -> torch.Tensor:
    """TIES' sign election and disjoint merge from float operations only, block by block.

    The same floats as :func:`disjoint_merge` on the pruned, weighted task vectors (for weights
    > 0 when ``normalize``): with s = ±1 the elected sign, the agreeing entries of wΔ' are
    those with s·wΔ' > 0, so Σ_agree wΔ' = s · Σ_i max(s·w_iΔ'_i, 0) (negation is exact and
    rounding symmetric, so the sums agree bit for bit), and the agreement indicator is
    sign(max(s·w_iΔ'_i, 0)). s = copysign(1, vote) equals the +1-on-ties rule wherever it
    matters (a vote of −0 needs every term −0, and then nothing agrees). A divisor of 0 means
    nothing agreed, so clamping it to min wᵢ (> 0) divides 0 by something positive, as the
    0 → 1 rule does. Why: comparisons and ``where`` produce boolean tensors, many times slower
    per element than these float operations on CPU, and blocks keep every temporary in cache.

    ``prune(i, Δ_i block, start, stop)`` trims or drops entries of model i's block in place.
    ``deltas``: ``models`` are Δᵢ in ``compute_dtype`` already, and are overwritten.
    """
    b_flat = base.reshape(-1)
    ms = [m.reshape(-1) for m in models]
    n = b_flat.numel()
    out = torch.empty(n, dtype=compute_dtype, device=base.device)
    size = min(n, _KERNEL_BLOCK)
    bufs = [torch.empty(size, dtype=compute_dtype, device=base.device) for _ in range(4 + (0 if deltas else len(ms)))]
    bb, sgn, mixed, tmp, wds = bufs[0], bufs[1], bufs[2], bufs[3], bufs[4:]
    divisor = torch.empty(size, dtype=compute_dtype, device=base.device) if normalize else None
    floor = min(ws) if normalize else 0.0
    one = torch.ones((), dtype=compute_dtype, device=base.device)
    for s in range(0, n, size):
        e = min(n, s + size)
        k = e - s
        b, sg, mx, t = bb[:k], sgn[:k], mixed[:k], tmp[:k]
        b.copy_(b_flat[s:e])
        cur = []
        for i, (m, w) in enumerate(zip(ms, ws)):
            wd = m[s:e] if deltas else wds[i][:k]
            cur.append(wd)
            if not deltas:
                wd.copy_(m[s:e])
                wd.sub_(b)
            prune(i, wd, s, e)
            wd.mul_(w)
            # the vote, in model order: Σ wΔ' (sum) or Σ sign(wΔ') (count)
            if method == "count":
                if i == 0:
                    torch.sign(wd, out=sg)
                else:
                    sg.add_(torch.sign(wd, out=t))
            elif i == 1:
                torch.add(cur[0], wd, out=sg)
            elif i > 1:
                sg.add_(wd)
        if method == "sum" and len(ms) == 1:
            sg.copy_(cur[0])
        torch.copysign(one, sg, out=sg)
        for i, (wd, w) in enumerate(zip(cur, ws)):
            r = mx if i == 0 else t
            torch.mul(wd, sg, out=r).clamp_min_(0)
            if i:
                mx.add_(r)
            if divisor is not None:
                dv = divisor[:k]
                if i == 0:
                    torch.sign(r, out=dv).mul_(w)
                else:
                    dv.add_(r.sign_(), alpha=w)
        mx.mul_(sg)
        if divisor is not None:
            mx.div_(divisor[:k].clamp_min_(floor))
        torch.add(b, mx, alpha=lambda_, out=out[s:e])
    return out.reshape(base.shape)


def _fast_disjoint(ws: Sequence[float], normalize: bool, compute_dtype: torch.dtype) -> bool:
    """Whether :func:`_disjoint_kernel` gives :func:`disjoint_merge`'s floats for these parameters."""
    return compute_dtype in (torch.float32, torch.float64) and (not normalize or all(w > 0 for w in ws))


def _sign_consensus_merge(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    ws: list[float],
    method: SignMethod,
    normalize: bool,
    lambda_: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Weight the task vectors in place, then :func:`disjoint_merge`."""
    for d, w in zip(deltas, ws):
        d.mul_(w)
    return disjoint_merge(base.to(compute_dtype), deltas, ws, method, normalize, lambda_)


def ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    majority_sign_method: SignMethod = "sum",
    normalize: bool = True,
    lambda_: float = 1.0,
    *,
    selectors: Sequence[MagnitudeSelector] | None = None,
    deltas: bool = False,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Δ'_i = Δ_i ⊙ topk_mask(|Δ_i|, max(1, ⌊d_i·n⌋));  s = elect_sign({w_iΔ'_i});
    θ = θ_b + λ · Σ_i w_iΔ'_i[sgn(w_iΔ'_i)=s] / Σ_i w_i[sgn(w_iΔ'_i)=s]   (normalize, the default).

    ``selectors`` (one :class:`MagnitudeSelector` per model, built from the whole tensor's |Δ_i|)
    let a caller apply TIES to consecutive flat chunks of a large tensor with the global top-k;
    without them the top-k is taken over the tensors given. ``deltas=True``: ``models`` are the
    task vectors Δᵢ in ``compute_dtype`` already (the engine's :class:`MagnitudePass` keeps them
    from its first pass), and are overwritten.
    """
    ws = _as_list(weights, len(models), "weight")
    ds = _as_list(density, len(models), "density")
    _check_density(ds)
    _check_same_shape([base, *models])
    _check_sign_method(majority_sign_method)  # the float-only kernel does not go through elect_sign
    if deltas and any(m.dtype != compute_dtype for m in models):
        raise ValueError("deltas=True needs task vectors in the compute dtype")
    if selectors is None and models:
        base_c = base.to(compute_dtype)
        selectors = []
        for model, d in zip(models, ds):
            mag = model.abs() if deltas else _task_vector(model, base_c).abs_()
            selectors.append(MagnitudeSelector.from_magnitudes(mag.reshape(-1), d))
    if _fast_disjoint(ws, normalize, compute_dtype) and all(sel.float_only for sel in selectors):
        if models and native.usable(base, *models, compute_dtype=compute_dtype):
            trims = [sel.cuts(compute_dtype, 0) for sel in selectors]
            merged = native.merge(base, list(models), deltas, ws, trims=trims, count_vote=majority_sign_method == "count",
                                  normalize=normalize, lambda_=lambda_, out_dtype=out_dtype or base.dtype)
        else:
            def trim(i: int, wd: torch.Tensor, start: int, stop: int) -> None:
                selectors[i].trim_(wd, start)

            merged = _out(_disjoint_kernel(base, models, ws, trim, majority_sign_method, normalize, lambda_,
                                           compute_dtype, deltas), out_dtype, base)
        for sel in selectors:
            sel.offset += base.numel()
        return merged
    base_c = base.to(compute_dtype)
    task_vectors = []
    for i, (model, d) in enumerate(zip(models, ds)):
        delta = model if deltas else _task_vector(model, base_c)
        if selectors is not None:
            delta.mul_(selectors[i].mask(delta.abs().reshape(-1)).reshape(delta.shape))
        elif d < 1.0:
            delta.mul_(magnitude_mask(delta, d))
        task_vectors.append(delta)
    merged = _sign_consensus_merge(base, task_vectors, ws, majority_sign_method, normalize, lambda_, compute_dtype)
    return _out(merged, out_dtype, base)


# --------------------------------------------------------------------------------------------
# DARE: random drop and rescale, seeded per tensor
# --------------------------------------------------------------------------------------------


def tensor_generator(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """The RNG for one tensor's DARE masks: a function of (seed, tensor name) only.

    Why per tensor: the streaming engine and the live model visit tensors in different orders
    and on different devices; deriving the stream from the name (via SHA-256, stable across
    processes, unlike ``hash``) gives both the same masks for the same seed.
    :func:`dare_mask` draws on the generator's device; the merge engine always passes a CPU
    generator (masks are then moved to the tensors' device), so a CUDA merge draws exactly the
    masks of a CPU merge. A CUDA generator is valid too but gives CUDA's (different) stream.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dare_mask(shape: torch.Size | Sequence[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn from ``generator`` (uniform u < density keeps the entry).

    Drawn on the generator's device; call once per model in model order so masks are reproducible.
    """
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return u < density


def _dare_deltas(
    base_c: torch.Tensor,
    models: Sequence[torch.Tensor],
    ds: list[float],
    generator: torch.Generator,
    rescale: bool,
) -> list[torch.Tensor]:
    deltas = []
    for model, d in zip(models, ds):
        delta = _task_vector(model, base_c)
        if d < 1.0:
            keep = dare_mask(delta.shape, d, generator).to(delta.device)
            delta.mul_(keep)
            if rescale:
                delta.div_(d)
        deltas.append(delta)
    return deltas


def dare_linear(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    generator: torch.Generator,
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DARE (Yu et al. 2024) with a linear combination of the pruned task vectors.

    m_i ~ Bernoulli(d_i);  Δ'_i = m_i ⊙ Δ_i / d_i (rescale) or m_i ⊙ Δ_i;
    θ = θ_b + λ · Σ_i w_iΔ'_i / D,  D = Σ_i w_i if normalize else 1.
    Masks come from ``generator`` in model order (see :func:`tensor_generator`).
    """
    ws = _as_list(weights, len(models), "weight")
    ds = _as_list(density, len(models), "density")
    _check_density(ds)
    _check_same_shape([base, *models])
    base_c = base.to(compute_dtype)
    deltas = _dare_deltas(base_c, models, ds, generator, rescale)
    divisor = sum(ws) if normalize and abs(sum(ws)) >= 1e-8 else 1.0
    acc = base.to(compute_dtype, copy=True)
    for delta, w in zip(deltas, ws):
        acc.add_(delta, alpha=lambda_ * w / divisor)
    return _out(acc, out_dtype, base)


def dare_ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    generator: torch.Generator,
    rescale: bool = True,
    majority_sign_method: SignMethod = "sum",
    normalize: bool = False,
    lambda_: float = 1.0,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """DARE pruning followed by TIES sign election and disjoint merge.

    Δ'_i as in :func:`dare_linear`; then the disjoint merge of :func:`ties` on {w_iΔ'_i}.
    mergekit's defaults: rescale on, normalize off. ``workspace``: where the random draws go
    (:class:`Workspace`; the same draws, without a fresh allocation per tensor).
    """
    ws = _as_list(weights, len(models), "weight")
    ds = _as_list(density, len(models), "density")
    _check_density(ds)
    _check_same_shape([base, *models])
    _check_sign_method(majority_sign_method)  # the float-only kernel does not go through elect_sign
    if _fast_disjoint(ws, normalize, compute_dtype):
        # The same draws as dare_mask, in model order; kept where u < d, i.e. where sign(d − u) > 0.
        draws: list[torch.Tensor | None] = []
        for i, d in enumerate(ds):
            if d >= 1.0:
                draws.append(None)
                continue
            shape = tuple(base.shape)
            if workspace is None:
                u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
            else:  # the same draws, into memory reused from the previous tensor
                u = workspace.get(f"draws{i}", base.numel(), torch.float32, generator.device)
                torch.rand(shape, generator=generator, out=u.view(shape))
            draws.append(u.to(base.device).reshape(-1))
        if models and native.usable(base, *models, compute_dtype=compute_dtype):
            return native.merge(base, list(models), False, ws, draws=draws, densities=ds, rescale=rescale,
                                count_vote=majority_sign_method == "count", normalize=normalize, lambda_=lambda_,
                                out_dtype=out_dtype or base.dtype)
        keep = torch.empty(min(base.numel(), _KERNEL_BLOCK), dtype=compute_dtype, device=base.device)

        def drop(i: int, wd: torch.Tensor, start: int, stop: int) -> None:
            if draws[i] is None:
                return
            k = keep[: stop - start]
            torch.sub(ds[i], draws[i][start:stop], out=k)  # d − u, zero only where u = d (dropped)
            wd.mul_(k.sign_().clamp_min_(0))
            if rescale:
                wd.div_(ds[i])

        merged = _disjoint_kernel(base, models, ws, drop, majority_sign_method, normalize, lambda_, compute_dtype)
        return _out(merged, out_dtype, base)
    base_c = base.to(compute_dtype)
    deltas = _dare_deltas(base_c, models, ds, generator, rescale)
    merged = _sign_consensus_merge(base, deltas, ws, majority_sign_method, normalize, lambda_, compute_dtype)
    return _out(merged, out_dtype, base)


# --------------------------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------------------------


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical interpolation between two whole tensors (flattened), as mergekit's ``slerp``.

    cos Ω = ⟨a/‖a‖, b/‖b‖⟩;  θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b.
    Falls back to lerp (1−t)a + t·b when |cos Ω| > ``dot_threshold`` (nearly parallel; the
    sine ratio is ill-conditioned there). A tensor with norm ≤ ``eps`` is used unnormalised
    for the angle, as mergekit does. ``t=0`` gives ``a`` (mergekit: the base model).
    """
    if not 0.0 <= t <= 1.0:
        raise ExmeError(f"slerp t must be in [0, 1], got {t}")
    _check_same_shape([a, b])
    a_c = a.to(compute_dtype)
    b_c = b.to(compute_dtype)
    na = torch.linalg.vector_norm(a_c)
    nb = torch.linalg.vector_norm(b_c)
    a_dir = a_c / na if na > eps else a_c
    b_dir = b_c / nb if nb > eps else b_c
    dot = float((a_dir * b_dir).sum())
    if abs(dot) > dot_threshold:
        return _out(torch.lerp(a_c, b_c, float(t)), out_dtype, a)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    s_a = math.sin((1.0 - t) * omega) / sin_omega
    s_b = math.sin(t * omega) / sin_omega
    return _out(a_c * s_a + b_c * s_b, out_dtype, a)
