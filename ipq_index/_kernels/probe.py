"""IVF probing: the lists with the largest probe scores per query, chosen by
a histogram-bounded top selection (``top_sorted``)."""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .rotation import weighted_rows_sum


#: queries probed together (``_probe_tile``: the centroids, and in a search
#: the rotation, read once per tile), at most as many as keep their centroid
#: scores within PROBE_TILE_BYTES: they stay in a 32-48 KiB L1 data cache
#: while the L2-resident centroids stream past (342 x 1024 float16
#: centroids, one thread: 8.6-9.3 us per query in tiles of 5 to 8 queries,
#: 19 at 12, 24 at 16 (64 KiB of scores); 342 x 256: 1.7 us for 16 to 32)
PROBE_QUERIES, PROBE_TILE_BYTES = 16, 24 * 1024


@kernel
def probe_tile_rows(nq, nlist):
    """Queries per probe tile for nq queries over nlist lists (>= 1)."""
    return max(1, min(nq, PROBE_QUERIES, PROBE_TILE_BYTES // max(4 * nlist, 1)))


@kernel
def _probe_tile(Y, nt, dims, Ct, spread, acc, hv, lists, Q, q0, raw):
    """For the rotated queries Y[t] (queries Q[q0 + t]), t < nt: the lists
    of the ``nprobe`` = lists.shape[1] largest <y_t[dims], Ct[:, l]> + |q_t|
    spread[l], best first, into lists[t] (float32 accumulation, vectorised
    over the lists: the scores only order the lists; only the ``dims``
    entries of Y's rows are read; |q| = |y|: the rotation is orthogonal);
    their <y_t[dims], Ct[:, l]> (without the spread term; residual coarse
    codes add it per list) into raw[t] (rows of 0 entries: none).  ``acc``
    (>= nt, nlist) scratch.  Each query's sums are those of one query alone
    (``weighted_rows_sum``), the centroids read once for the tile."""
    qd = np.empty((nt, dims.shape[0]), np.float32)
    for t in range(nt):
        for s in range(dims.shape[0]):
            qd[t, s] = Y[t, dims[s]]
    weighted_rows_sum(qd, 0, nt, Ct, acc)
    for t in range(nt):
        _probe_select(acc[t], spread, Q[q0 + t], hv, lists[t], raw[t])


@kernel
def _probe_select(acc, spread, qv, hv, hi, raw):
    """One query's probe choice from its centroid scores ``acc`` (nlist,;
    its entries get the spread term): ``_probe_tile``."""
    m = acc.shape[0]
    pre = acc.copy() if raw.shape[0] > 0 else acc[:0]
    if spread.shape[0] > 0:
        nrm = 0.0
        for t in range(qv.shape[0]):
            nrm += np.float64(qv[t]) * qv[t]
        qn = np.float32(np.sqrt(nrm))
        for j in range(m):
            acc[j] += qn * spread[j]
    # best list first: the fast-scan collector's threshold then rises early,
    # fewer rows pass it (with its faster radix select, 10^6 IVF1024
    # nprobe=40 keeping 400 candidates: scan 153 -> 97 us)
    top_sorted(acc[:m], hv, hi)
    for t in range(raw.shape[0]):
        raw[t] = pre[hi[t]]


#: ``top_sorted``: value bins of the histogram that bounds the survivors,
#: and the most survivors ranked by counting (more: a stable sort)
TOP_BINS = 64
TOP_RANKED = 512


@kernel
def top_sorted(vals, hv, hi):
    """(hv, hi) <- the len(hv) largest of the finite ``vals`` and their
    indices, descending, equal values lower index first (a stable sort's
    order; len(hv) <= len(vals)).  A histogram of TOP_BINS equal-width value
    bins gives the lowest bin holding the k-th largest; only values in it
    or above survive (10^6 IVF1024 probes, 44 of 1,024: ~60), ranked by
    counting the larger ones (branch-free: a heap's unpredictable
    sift-downs cost 6 us per 1,024 values, this ~3), or sorted when more
    than TOP_RANKED survive."""
    m = vals.shape[0]
    k = hv.shape[0]
    lo = vals[0]
    top = vals[0]
    for j in range(m):
        lo = min(lo, vals[j])
        top = max(top, vals[j])
    width = (top - lo) / TOP_BINS
    inv = np.float32(1.0) / width if width > 0 else np.float32(0.0)
    bin_of = np.empty(m, np.int32)
    for j in range(m):
        bin_of[j] = min(np.int32((vals[j] - lo) * inv), np.int32(TOP_BINS - 1))
    bins = np.zeros(TOP_BINS, np.int64)
    for j in range(m):
        bins[bin_of[j]] += 1
    cut = TOP_BINS - 1
    above = bins[cut]
    while above < k:
        cut -= 1
        above += bins[cut]
    sv = np.empty(above + 1, vals.dtype)
    si = np.empty(above + 1, np.int64)
    s = 0
    for j in range(m):  # branch-free: every value written, the survivors kept
        sv[s] = vals[j]
        si[s] = j
        s += bin_of[j] >= cut
    if s > TOP_RANKED:  # many survivors: a stable sort of them
        order = np.argsort(-sv[:s], kind="mergesort")
        for t in range(k):
            hv[t] = sv[order[t]]
            hi[t] = si[order[t]]
        return
    for t in range(s):
        v = sv[t]
        r = 0
        for u in range(s):
            r += sv[u] > v
        for u in range(t):
            r += sv[u] == v
        if r < k:
            hv[r] = v
            hi[r] = si[t]


@kernel
def probe_lists(Y, dims, Ct, spread, nprobe, Q):
    """(nq, nprobe) ids of the lists with the largest probe scores (best
    first): <y[dims], c_l> over the kept dimensions ``dims`` of each
    transformed query row (centroids: columns of Ct, len(dims) x nlist) plus
    |q| spread[l], q the row of Q (the untransformed queries; ``spread``
    empty: no such term); and (nq, nprobe) float32 their <y[dims], c_l>."""
    nq = Y.shape[0]
    out = np.empty((nq, nprobe), np.int64)
    raw = np.empty((nq, nprobe), np.float32)
    qt = probe_tile_rows(nq, Ct.shape[1])
    acc = np.empty((qt, Ct.shape[1]), np.float32)
    hv = np.empty(nprobe, np.float32)
    for q0 in range(0, nq, qt):
        q1 = min(nq, q0 + qt)
        _probe_tile(Y[q0:q1], q1 - q0, dims, Ct, spread, acc, hv, out[q0:q1], Q, q0, raw[q0:q1])
    return out, raw
