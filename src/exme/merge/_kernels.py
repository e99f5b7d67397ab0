"""The numba kernels behind :mod:`exme.merge.native` (imported on first use: numba's import costs ~0.3 s).

Every loop runs over ``range(count)`` of a slice: an index that might be negative (``s + t``, or
a range not starting at 0) costs a wraparound check per element, which keeps LLVM from
vectorising the loop. ``error_model="numpy"``: IEEE division (x/0 = ±Inf, as torch), without
Python's zero check in the loop.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from exme.merge.methods import _COARSE_SHIFT as COARSE_SHIFT  # the coarse histogram's key: |Δ|'s top 16 bits

#: The magnitude pass counts every this-many-th entry into the coarse histogram (a sample).
SAMPLE_STRIDE = 8
#: Most bins of one counting pass of :func:`_select` (int64 counters: 1 MiB, in L2).
FINE_BINS = 1 << 17
#: Elements per block of the merge kernel: its per-model scratch stays in L1/L2.
_BLOCK = 2048


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits`` (a register move)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits(typingctx, x):
    """The bits of float32 ``x`` as a uint32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma), as torch's ``add(c, b, alpha=a)`` computes on FMA CPUs."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


def _load(a, i):  # replaced by the overload below in compiled code
    raise NotImplementedError


@overload(_load)
def _load_impl(a, i):
    """Element ``i`` of a float32 array, or of a bfloat16 array given as uint16 bits, as float32."""
    if a.dtype == types.uint16:
        return lambda a, i: _f32_from_bits(np.uint32(a[i]) << np.uint32(16))
    return lambda a, i: a[i]


def _store(o, t, x):  # replaced by the overload below in compiled code
    raise NotImplementedError


@overload(_store)
def _store_impl(o, t, x):
    """o[t] = x: float32 as is, or rounded to bfloat16 (uint16 bits) to nearest even, as torch casts."""
    if o.dtype == types.uint16:

        def impl(o, t, x):
            b = _bits(x)
            if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                o[t] = np.uint16(0x7FC0)  # NaN, as c10::BFloat16 writes it
            else:
                o[t] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

        return impl

    def impl(o, t, x):
        o[t] = x

    return impl


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _magnitude_pass(model, base, delta, hist, sample):
    """Δ = θ − θ_b into ``delta``; returns whether some Δ is NaN or ±Inf.

    With ``sample``: every ``SAMPLE_STRIDE``-th |Δ|'s top 16 bits are counted into ``hist``, the
    first guess of :func:`_select`. Why a sample: counting every entry (a scattered increment
    per entry) cost twice the rest of the pass, and the guess needs only a sample.
    """
    n = delta.shape[0]
    bad = np.uint32(0)
    for i in range(n):
        d = _load(model, i) - _load(base, i)
        delta[i] = d
        bad |= np.uint32((_bits(d) & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000))
    if sample:
        for i in range(0, n, SAMPLE_STRIDE):
            hist[(_bits(delta[i]) & np.uint32(0x7FFFFFFF)) >> np.uint32(COARSE_SHIFT)] += 1
    return bad != 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _select(delta, hist, k):
    """The k-th largest |Δ| (as its bits), how many |Δ| are larger, how many equal: exact.

    ``hist`` (the sample's coarse histogram) gives a band of coarse bins that holds the k-th
    largest with overwhelming probability; one pass counts the keys above the band and each key
    inside it (bins of 2**shift keys when the band is wider than ``FINE_BINS``, then one more pass
    over the bin that holds it). The counts are exact whatever the sample, so the answer is: a
    band that misses (an unlucky or adversarial sample) only costs passes over all keys.
    """
    n = delta.shape[0]
    total = 0
    for b in range(hist.shape[0]):
        total += hist[b]
    lo = np.uint32(0)
    hi = np.uint32(0x7FFFFFFF)
    if total > 0:
        rank = k * total / n  # the k-th largest's rank in the sample, from the top
        spread = 6.0 * np.sqrt(total * (k / n) * (1.0 - k / n)) + 8.0
        first, last = rank - spread, rank + spread
        cum = 0
        top = hist.shape[0] - 1
        bottom = 0
        for b in range(hist.shape[0] - 1, -1, -1):
            if cum <= first:
                top = b
            cum += hist[b]
            if cum >= last:
                bottom = b
                break
        lo = np.uint32(bottom) << np.uint32(COARSE_SHIFT)
        hi = (np.uint32(top + 1) << np.uint32(COARSE_SHIFT)) - np.uint32(1)
    guessed = total > 0
    while True:
        shift = np.uint32(0)
        while ((hi - lo) >> shift) >= np.uint32(FINE_BINS):
            shift += np.uint32(1)
        width = ((hi - lo) >> shift) + np.uint32(1)
        fine = np.zeros(FINE_BINS, np.int64)
        above = 0
        for i in range(n):
            key = _bits(delta[i]) & np.uint32(0x7FFFFFFF)
            above += key > hi
            off = key - lo  # wraps far above the band when key < lo
            if off <= hi - lo:
                fine[off >> shift] += 1
        inside = 0
        for j in range(width):
            inside += fine[j]
        if not above < k <= above + inside:
            if not guessed:
                return np.int64(-1), 0, 0  # cannot happen: the band of all keys holds every entry
            lo, hi, guessed = np.uint32(0), np.uint32(0x7FFFFFFF), False
            continue
        j = np.int64(width) - 1
        while above + fine[j] < k:
            above += fine[j]
            j -= 1
        if shift == 0:
            return np.int64(lo) + j, above, fine[j]
        lo = lo + (np.uint32(j) << shift)
        hi = lo + (np.uint32(1) << shift) - np.uint32(1)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _nth_equal(delta, key, nth):
    """Flat index of the ``nth`` (1-based) entry whose |Δ| has the bits ``key``; −1 if there is none.

    Blocks are counted by a vectorised loop; only the block that holds the answer is scanned
    entry by entry (a loop that can stop early does not vectorise).
    """
    k = np.uint32(key)
    n = delta.shape[0]
    for s in range(0, n, _BLOCK):
        part = delta[s : min(n, s + _BLOCK)]
        count = 0
        for t in range(part.shape[0]):
            count += (_bits(part[t]) & np.uint32(0x7FFFFFFF)) == k
        if count < nth:
            nth -= count
            continue
        for t in range(part.shape[0]):
            if (_bits(part[t]) & np.uint32(0x7FFFFFFF)) == k:
                nth -= 1
                if nth == 0:
                    return s + t
    return -1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _merge(base, models, is_delta, trim, below, at, cut, draws, density, rescale, ws, count_vote, normalize,
           floor, lam, out):
    """TIES/DARE-TIES from Δ to θ in one pass per block of elements (see methods._disjoint_kernel).

    Per model i: Δ (``is_delta``: given, else θᵢ − θ_b); TIES trim (``trim[i]``: |Δ| ≥ t for
    local index < ``cut[i]``, as hardshrink at ``below[i]``, then |Δ| > t, hardshrink at
    ``at[i]``); DARE drop (``draws[i]`` non-empty: kept where u < d, then / d if ``rescale``);
    × wᵢ; the vote (Σ wΔ', or Σ sign(wΔ')). Then s = ±1 from the vote's sign bit, the agreeing
    mass Σ max(s·wΔ', 0)·s, the divisor Σ wᵢ[agree] clamped to ``floor`` (``normalize``), and
    out = fma(λ, mixed / divisor, θ_b).
    """
    n = out.shape[0]
    nm = len(models)
    wd = np.empty((nm, _BLOCK), np.float32)
    bb = np.empty(_BLOCK, np.float32)
    vote = np.empty(_BLOCK, np.float32)
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        m = e - s
        b_in = base[s:e]
        for t in range(m):
            bb[t] = _load(b_in, t)
        for i in range(nm):
            # TIES keeps |Δ| > below[i] before index cut[i] of the tensor and |Δ| > at[i] from
            # there on; without a trim the limit −1 keeps everything (NaN too, as torch does)
            c = min(max(cut[i] - s, 0), m) if trim[i] else m
            no_trim = np.float32(-1.0)
            _stage(models[i][s:e], bb, wd[i], vote, draws[i], s, 0, c, below[i] if trim[i] else no_trim,
                   is_delta, density[i], rescale, ws[i], count_vote, i == 0)
            if c < m:
                _stage(models[i][s:e], bb, wd[i], vote, draws[i], s, c, m, at[i], is_delta, density[i], rescale,
                       ws[i], count_vote, i == 0)
        if normalize:  # two loops: a test of the flag inside one keeps it from vectorising
            _finish(out[s:e], bb, vote, wd, ws, floor, lam, True, m)
        else:
            _finish(out[s:e], bb, vote, wd, ws, floor, lam, False, m)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _finish(o, bb, vote, wd, ws, floor, lam, normalize, m):
    """Elected sign, agreeing mass and divisor over all models, θ_b + λ·mixed/divisor; per element.

    ``o``: float32, or bfloat16 bits (the output rounded once, where a separate cast would read
    the float32 result back).
    """
    zero = np.float32(0.0)
    for t in range(m):
        # the elected sign: +1 where the vote's sign bit is clear
        sg = _f32_from_bits((_bits(vote[t]) & np.uint32(0x80000000)) | np.uint32(0x3F800000))
        mx = zero
        dv = zero
        for i in range(wd.shape[0]):  # the models, in order
            r = wd[i, t] * sg
            r = zero if r < zero else r  # clamp_min(0): −0 stays −0, as in torch
            a = ws[i] if r > zero else zero
            mx = r if i == 0 else mx + r
            dv = a if i == 0 else dv + a
        mx = mx * sg
        if normalize:
            mx = mx / max(dv, floor)
        _store(o, t, _fma(lam, mx, bb[t]))


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _stage(src, bb, row, vote, draws, s, lo, hi, lim, is_delta, d, rescale, w, count_vote, first):
    """One model over elements [lo, hi) of a block: Δ, trim at ``lim``, DARE drop, × w, the vote."""
    zero, one = np.float32(0.0), np.float32(1.0)
    m = hi - lo
    x_in, r, v, b = src[lo:hi], row[lo:hi], vote[lo:hi], bb[lo:hi]
    dare = draws.shape[0] > 0
    u = draws[s + lo : s + hi] if dare else draws
    for t in range(m):
        x = x_in[t] if is_delta else _load(x_in, t) - b[t]
        x = zero if abs(x) <= lim else x
        if dare:
            x = x * (one if d - u[t] > zero else zero)
            if rescale:
                x = x / d
        x = x * w
        r[t] = x
        if count_vote:
            x = one if x > zero else (-one if x < zero else zero)
        v[t] = x if first else v[t] + x
