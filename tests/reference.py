"""Slow, independent reference implementations (numpy / itertools only).

They share no code with ipq_index and serve as oracles in the tests.
"""

from __future__ import annotations

import itertools

import numpy as np


def sum_cost(x, levels, w=None):
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    lv = np.asarray(levels, np.float64)
    total = 0.0
    for xi, wi in zip(x, w):
        b = lv[lv >= xi].min()
        a = lv[lv <= xi].max()
        total += wi * (b - xi) * (xi - a)
    return total


def max_cost(x, levels, w=None):
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    lv = np.sort(np.asarray(levels, np.float64))
    idx = np.clip(np.searchsorted(lv, x, side="right") - 1, 0, len(lv) - 1)
    a = lv[idx]
    b = lv[np.minimum(idx + 1, len(lv) - 1)]
    return float(np.max(w * (b - x) * (x - a)))


def brute_force_sum(x, s, w=None):
    """Exhaustive search over level subsets of the distinct values."""
    u = np.unique(np.asarray(x, np.float64))
    if len(u) <= s:
        return 0.0
    inner = u[1:-1]
    best = np.inf
    for r in range(0, s - 1):
        for comb in itertools.combinations(inner, r):
            lv = np.concatenate(([u[0]], comb, [u[-1]]))
            best = min(best, sum_cost(x, lv, w))
    return best


def dp_sum(x, s, w=None):
    """Plain O(s n^2) dynamic program over the sorted distinct values."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    u, inv = np.unique(x, return_inverse=True)
    wu = np.bincount(inv, weights=w, minlength=len(u))
    n = len(u)
    if n <= s:
        return 0.0
    # C[k, j]: cost of points strictly between u_k and u_j (direct sums)
    C = np.full((n, n), np.inf)
    for k in range(n):
        for j in range(k + 1, n):
            mid = slice(k + 1, j)
            C[k, j] = float(np.sum(wu[mid] * (u[j] - u[mid]) * (u[mid] - u[k])))
    D = C[0].copy()  # two levels: 0 and j
    for _ in range(3, s + 1):
        D = np.minimum(D, np.min(D[:, None] + C, axis=0))
    return float(D[n - 1])


def grid_minimax(x, s, w=None, points=400):
    """Minimax cost by exhaustive search of s-2 interior levels on a fine grid.

    Returns an upper bound on the optimum that converges as the grid refines.
    """
    x = np.asarray(x, np.float64)
    lo, hi = x.min(), x.max()
    grid = np.linspace(lo, hi, points)
    best = np.inf
    for comb in itertools.combinations(grid[1:-1], s - 2):
        best = min(best, max_cost(x, np.concatenate(([lo], comb, [hi])), w))
    return best


def staged_search(idx, Q, k, *, rerank=None, fs=None, nprobe=None):
    """A flat / IVF search composed step by step from the component kernels
    (each tested on its own against brute force): rotation, probes, coarse
    fast-scan candidates (or every row of the probed lists), the rescoring
    plan of ``cost_model.rescore_plan``, the ADC top-kk (field by field,
    lookup tables or the SIMD candidate ADC), <q, mean>, the exact re-rank,
    ids.  The index's own search runs the same steps in one kernel per
    query chunk and must give the same (scores, ids)."""
    from ipq_index import cost_model
    from ipq_index._kernels import cand_adc, fields, rerank as rr_kernels, tables
    from ipq_index.structures.base import copy_rows

    enc = idx.encoder
    Q = np.ascontiguousarray(Q, np.float32)
    n = idx.ntotal
    rr = idx.rerank if rerank is None else rerank
    kk = min(n, k * rr) if rr else k
    exact_ns = cost_model.exact_ns_per_dim(idx.vectors.nbytes) if rr else 0.0
    Y = enc.rotate_queries(Q, num_threads=1)
    codes = np.asarray(idx.codes)
    scales = np.asarray(idx.scales) if enc.config.scale else np.zeros(0, np.float32)
    ivf = hasattr(idx, "nlist")
    npb = min(idx.nprobe if nprobe is None else nprobe, idx.nlist) if ivf else 1
    scanned = n * npb / idx.nlist if ivf else n
    fsf = idx._fs_factor(fs, scanned)
    every = fsf == 0 or n < idx.settings.fastscan_min_rows
    cl = None
    if every:
        if ivf:
            ptr, order = idx._list_index()
            lists = idx._probes(Y, npb, Q) if npb < idx.nlist else np.tile(np.arange(idx.nlist), (len(Q), 1))
            rows = [np.concatenate([order[ptr[l]:ptr[l + 1]] for l in ls]) for ls in lists]
            cand = np.full((len(Q), max(len(r) for r in rows)), -1, np.int64)
            for i, r in enumerate(rows):
                cand[i, :len(r)] = r
        else:
            cand = np.tile(np.arange(n, dtype=np.int64), (len(Q), 1))
        nc = min(n, max(kk, int(scanned)))
    else:
        sc = idx._fast_scanner()
        cl = idx._cand_layout(sc)
        nc = idx._coarse_count(fsf, kk)
        probes = raw = None
        if ivf and (npb < idx.nlist or sc.residual):
            probes, raw = idx._probes(Y, npb, Q, with_raw=True)
        elif ivf:
            probes = np.tile(np.arange(idx.nlist, dtype=np.int64), (len(Q), 1))
        cand = sc.candidates(Y, nc, 1, probes, raw)
    plan = cost_model.rescore_plan(enc, nc, kk, exact_ns, idx.settings.exact_preference, cl=cl)
    offsets = Q.astype(np.float64) @ np.asarray(enc.mean, np.float64)

    def rescore(cand, Yq, Qq, off):
        if plan == "exact":
            v, r = None, cand
        elif plan == "cand":
            v, r = cand_adc.candidate_topk(Yq, enc.levels32(), cl, codes, scales, cand, kk)
        elif plan == "fields":
            v, r = fields.rescore_fields(Yq, enc.levels32(), enc.field_layout(), codes, scales, cand, kk)
        else:
            v, r = tables.rescore_topk(enc.rotated_tables(Yq, num_threads=1), codes, scales, cand, kk)
        if rr:
            return rr_kernels.rerank(Qq, copy_rows(idx.vectors), np.ascontiguousarray(r, np.int64), k)
        return (v.astype(np.float64) + off[:, None]).astype(np.float32), r

    # the setting at k = 10, scaled by ln 11 / ln(k + 1) (``flat.depth_for_k``)
    depth = idx.settings.depth * np.log(11.0) / np.log(k + 1.0) if fs is None else 0.0
    if every or not depth:
        v, r = rescore(cand, Y, Q, offsets)
    else:  # the pool grows per query until deep enough (``_fs._rescore_candidates``)
        width = kk if not rr else k
        v, r = np.full((len(Q), width), -np.inf, np.float32), np.full((len(Q), width), -1, np.int64)
        for i in range(len(Q)):
            pq = None if probes is None else probes[i:i + 1]
            rq = None if raw is None else raw[i:i + 1]
            v[i], r[i] = deep_candidates(sc, Y[i:i + 1], pq, rq, nc, depth, k,
                                         lambda c: rescore(c, Y[i:i + 1], Q[i:i + 1], offsets[i:i + 1]))
    v, r = v[:, :k], r[:, :k]
    ids = np.where(r >= 0, np.asarray(idx.ids)[np.maximum(r, 0)], -1)
    return np.where(r >= 0, v, -np.inf).astype(np.float32), ids


def best_of(vals, m):
    """Positions (in pool order) of the m best scores ``vals``, ties at the cut: the first."""
    cnt = vals.size
    if m >= cnt:
        return np.arange(cnt)
    t = np.sort(vals)[::-1][m - 1]
    above = np.flatnonzero(vals > t)
    ties = np.flatnonzero(vals == t)[:m - above.size]
    return np.sort(np.concatenate([above, ties]))


def deep_candidates(sc, Yq, probes, raw, nc, depth, k, rescore):
    """One query's pool grown until deep enough, step by step: the scan's
    pool of ceil(depth * nc) rows and their quantized coarse scores; its
    best m rows (m = nc first) rescored (``rescore``: a fresh rescoring of
    every row taken so far, in the order taken); the rank r within the pool
    of the coarsest of the k results; stop at m >= ceil(depth * r), else
    m = max(that, 2 m), a pool twice as large when m outgrows it."""
    bp = sc.block_ptr
    lists = np.arange(bp.size - 1) if probes is None else probes[0][probes[0] >= 0]
    slots = int((bp[lists + 1] - bp[lists]).sum()) * 32
    size = min(max(nc, int(np.ceil(min(depth * nc, 1e15)))), max(slots, nc))
    m = nc
    while True:
        full = size >= slots
        pool, pv = sc.candidates(Yq, size, 1, probes, raw, with_scores=True)
        pool, pv = pool[0], pv[0].astype(np.int64)
        cnt = int(np.argmin(pool >= 0)) if (pool < 0).any() else size
        taken = np.zeros(cnt, bool)
        order = []
        while True:
            new = [p for p in best_of(pv[:cnt], min(m, cnt)) if not taken[p]]
            taken[new] = True
            order += new
            v, r = rescore(pool[order][None].astype(np.int64))
            res = r[0, :k]
            vals = [pv[p] for p in order if pool[p] in set(res[res >= 0].tolist())]
            need = int(np.ceil(min(depth * (pv[:cnt] >= min(vals)).sum(), 1e15))) if vals else 0
            if need <= m or (m >= cnt and (cnt < size or full)):
                return v[0], r[0]
            m = max(need, 2 * m)
            if m > cnt and not full:
                break
            m = min(m, cnt)
        size = min(max(m, 2 * size), slots)
