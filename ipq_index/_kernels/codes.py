"""ASQ codes: encoding and decoding, the coarse 4-bit codes derived from
them, and rows' residual energy around their IVF centroids.

Code layout: every vector's code is ``nbytes`` bytes; dimension j with
``bits[j] > 0`` occupies ``bits[j]`` bits of byte ``byte_of[j]`` starting at
bit ``shift_of[j]`` (fields never straddle bytes).  Levels of dimension j are
``levels[level_off[j]:level_off[j+1]]`` (sorted).
"""

from __future__ import annotations

import numpy as np

from .._numba import kernel


@kernel
def _uniform(seed, i, j):
    """Counter-based uniform in [0, 1) from (seed, i, j): splitmix64 finaliser."""
    z = np.uint64(seed) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(j) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@kernel
def _level_code(z, levels, lo, hi, unbiased, seed, row, j):
    """Code of value z among the sorted levels ``levels[lo:hi]`` (values
    outside their range clipped to the end levels): one of the two levels
    around z, the nearer one, or with ``unbiased`` the upper one with
    probability (z - lower) / (upper - lower), drawn by ``_uniform(seed,
    row, j)``."""
    L = hi - lo
    if z <= levels[lo]:
        return 0
    if z >= levels[hi - 1]:
        return L - 1
    a = 0
    h = L - 1
    while h - a > 1:
        mid = (a + h) >> 1
        if levels[lo + mid] <= z:
            a = mid
        else:
            h = mid
    la = levels[lo + a]
    lb = levels[lo + a + 1]
    if unbiased:
        return a + 1 if _uniform(seed, row, j) * (lb - la) < z - la else a
    return a + 1 if lb - z < z - la else a


@kernel
def _field_code(codes, i, j, b, byte_of, shift_of):
    """The b-bit code (b > 0) of dimension j in row i of ``codes``."""
    return (codes[i, byte_of[j]] >> shift_of[j]) & ((1 << b) - 1)


@kernel
def encode(Z, levels, level_off, bits, byte_of, shift_of, nbytes, unbiased, seed, row0):
    """Codes (n, nbytes) uint8 of the rows of Z (already transformed).

    ``unbiased``: stochastic rounding with counter-based uniforms keyed by
    (seed, row0 + i, j), so results do not depend on threads or batching.
    Values outside a dimension's level range are clipped to its end levels.
    """
    n, d = Z.shape
    codes = np.zeros((n, nbytes), np.uint8)
    for i in range(n):
        for j in range(d):
            if bits[j] > 0:
                c = _level_code(Z[i, j], levels, level_off[j], level_off[j + 1], unbiased, seed, row0 + i, j)
                codes[i, byte_of[j]] |= np.uint8(c << shift_of[j])
    return codes


@kernel
def decode(codes, levels, level_off, bits, byte_of, shift_of, d):
    """Reconstruct (n, d) float32 values (0 for dimensions with 0 bits)."""
    n = codes.shape[0]
    out = np.zeros((n, d), np.float32)
    for i in range(n):
        for j in range(d):
            b = bits[j]
            if b > 0:
                out[i, j] = levels[level_off[j] + _field_code(codes, i, j, b, byte_of, shift_of)]
    return out


@kernel
def coarse_nibbles(codes, bits, byte_of, shift_of, rshift, nib_of, nib_shift, M):
    """Coarse 4-bit codes packed two per byte (faiss PQ layout, nibble m in
    byte m // 2, low half for even m): field j contributes its code's top
    bits ``code >> rshift[j]`` at bit ``nib_shift[j]`` of nibble ``nib_of[j]``."""
    n = codes.shape[0]
    d = bits.shape[0]
    out = np.zeros((n, M // 2), np.uint8)
    for i in range(n):
        for j in range(d):
            b = bits[j]
            if b == 0:
                continue
            v = (_field_code(codes, i, j, b, byte_of, shift_of) >> rshift[j]) << nib_shift[j]
            m = nib_of[j]
            out[i, m >> 1] |= np.uint8(v << (4 * (m & 1)))
    return out


@kernel
def residual_energy(codes, scales, levels, level_off, bits, byte_of, shift_of, assign, Cr, w):
    """Per row i: sum_j w_j (z_ij - Cr[assign[i], j])^2, z the decoded row
    (times its scale when ``scales`` is not empty) and Cr the (nlist, d)
    centroids in the same (transformed) space; float64."""
    n = codes.shape[0]
    d = Cr.shape[1]
    out = np.empty(n, np.float64)
    has_scale = scales.shape[0] > 0
    for i in range(n):
        lst = assign[i]
        sc = scales[i] if has_scale else np.float32(1.0)
        s = 0.0
        for j in range(d):
            z = 0.0
            b = bits[j]
            if b > 0:
                z = levels[level_off[j] + _field_code(codes, i, j, b, byte_of, shift_of)] * sc
            r = z - Cr[lst, j]
            s += w[j] * r * r
        out[i] = s
    return out
