"""The 4-bit fast-scan kernels (``ipq_index/_kernels/fastscan.py``) against
numpy references computed from the documented layout."""

import platform

import numpy as np
import pytest

from ipq_index import fast_scanner
from ipq_index._kernels import fastscan as fk


def _table_offset(m):
    """Offset of sub-quantizer m's table in a query's tables (module doc;
    byte lanes: the first of its two copies)."""
    g = m // 2
    if fk.DWORDS:  # bytes g = 4j..4j+3: [lo(4j)..lo(4j+3) | hi(4j)..hi(4j+3)], one copy each
        return (g // 4) * 128 + (g % 4) * 16 + (m % 2) * 64
    # bytes g = 2h, 2h+1: [lo(2h) | lo(2h+1) | hi(2h) | hi(2h+1)], 32 bytes each (two copies)
    return (g // 2) * 128 + (g % 2) * 32 + (m % 2) * 64


def _place_tables(T):
    """uint8 tables T (M, 16) in the documented order (lo(g): sub-quantizer
    2g, hi(g): 2g + 1; byte lanes: each 16-entry table written twice)."""
    M = T.shape[0]
    out = np.zeros(fk.lut_width(M), np.uint8)
    assert out.size == fk.padded_bytes(M) * (32 if fk.DWORDS else 64)
    for m in range(M):
        base = _table_offset(m)
        out[base:base + 16] = T[m]
        if not fk.DWORDS:
            out[base + 16:base + 32] = T[m]
    return out


def _block_bytes(blocks, slots):
    """(len(slots), Gp) code bytes of block slots (block * 32 + row) read
    from the documented block layout."""
    b, v = slots // 32, slots % 32
    if fk.DWORDS:  # bytes 4j..4j+3 of row v at 128 j + 4 v in the block
        flat = blocks.reshape(blocks.shape[0], -1)
        g = np.arange(blocks.shape[1])
        return flat[b[:, None], (g // 4) * 128 + v[:, None] * 4 + g % 4]
    return blocks[b, :, v]  # byte g of row v at 32 g + v


def _scores(packed, T):
    """int64 score of every row: sum over code bytes of the low nibble's entry
    of table 2g and the high nibble's entry of table 2g + 1."""
    s = np.zeros(packed.shape[0], np.int64)
    for g in range(packed.shape[1]):
        s += T[2 * g].astype(np.int64)[packed[:, g] & 15] + T[2 * g + 1].astype(np.int64)[packed[:, g] >> 4]
    return s


@pytest.mark.parametrize("n,G", [(1000, 33), (77, 1), (4096, 32)])
def test_block_scores_simd_and_scalar_equal_the_reference(n, G):
    rng = np.random.default_rng(n + G)
    packed = rng.integers(0, 256, (n, G), dtype=np.uint8)
    blocks, rows, bptr, fill = fk.layout_blocks(packed, np.array([0, n]), np.arange(n))
    assert blocks.shape == (-(-n // 32), fk.padded_bytes(2 * G), 32) and bptr.tolist() == [0, blocks.shape[0]]
    assert fk.padded_bytes(2 * G) % (4 if fk.DWORDS else 2) == 0 and G <= fk.padded_bytes(2 * G) < G + 4
    slots = np.flatnonzero(rows >= 0)
    np.testing.assert_array_equal(_block_bytes(blocks, slots)[:, :G], packed[rows[slots]])
    np.testing.assert_array_equal(fk.block_codes(blocks, slots), _block_bytes(blocks, slots))
    assert not _block_bytes(blocks, slots)[:, G:].any()
    assert (np.sort(rows[rows >= 0]) == np.arange(n)).all() and fill.tolist() == [n - 32 * (blocks.shape[0] - 1)]
    T = _byte_tables(rng, G)
    lut = _place_tables(T)[None, :]
    ref = _scores(packed, T)
    simd = fk.block_scores_all(blocks, lut, 0, True)
    scalar = fk.block_scores_all(blocks, lut, 0, False)
    assert (simd == scalar).all()
    assert (simd[rows >= 0].astype(np.int64) == ref[rows[rows >= 0]]).all()
    # padding rows hold code 0 (the scan masks them out); the padding byte adds 0
    assert (simd[rows < 0].astype(np.int64) == T[:, 0].astype(np.int64).sum()).all()


def test_a_group_of_queries_scores_as_each_query_alone():
    """``block_scores_group`` (GROUP queries per call; the dword kernel
    shares their nibble indices) gives each query's scores of the scalar
    kernel and the mask of its own threshold, in every block, at any first
    query of the tables."""
    rng = np.random.default_rng(21)
    n, G, nq = 300, 23, fk.GROUP + 2
    packed = rng.integers(0, 256, (n, G), dtype=np.uint8)
    blocks, rows, bptr, fill = fk.layout_blocks(packed, np.array([0, n]), np.arange(n))
    T = _byte_tables(rng, G, nq)
    lut = np.stack([_place_tables(t) for t in T])
    out = np.empty((fk.GROUP, 32), np.uint16)
    masks = np.empty(fk.GROUP, np.int64)
    for q0 in (0, nq - fk.GROUP):
        ref = [_scores(packed, T[q0 + t])[rows] for t in range(fk.GROUP)]
        thr = np.array([np.quantile(r, 0.7) for r in ref], np.int64)
        for b in range(blocks.shape[0]):
            fk.block_scores_group(blocks, b, lut, q0, out, thr, masks)
            for t in range(fk.GROUP):
                want = np.empty(32, np.uint16)
                mask = fk.block_scores_scalar(blocks, b, lut, q0 + t, want, thr[t])
                np.testing.assert_array_equal(out[t], want)
                valid = rows[b * 32:(b + 1) * 32] >= 0
                np.testing.assert_array_equal(want[valid], ref[t][b * 32:(b + 1) * 32][valid])
                assert masks[t] == mask == sum(1 << v for v in range(32) if want[v] >= thr[t])


@pytest.mark.parametrize("with_bias", [False, True])
def test_scan_keeps_the_best_scores_of_the_probed_lists(with_bias):
    """Top-kk by score over uneven lists (one empty), with -1 probes skipped,
    kk above the probed rows (-1 padding), and kk = 37 small enough for the
    sampled first threshold; with per-list offsets (residual coarse codes:
    a row of probes[q, t] scores its table sum + bias[q, t], up to the uint16
    limit) the ranking is by the offset scores.  Ties make the row set
    ambiguous, so scores are compared as multisets."""
    rng = np.random.default_rng(3)
    n, G, nlist = 20000, 8, 12
    packed = rng.integers(0, 256, (n, G), dtype=np.uint8)
    assign = rng.integers(0, nlist - 1, n)  # list nlist - 1 stays empty
    order = np.argsort(assign, kind="stable")
    ptr = np.searchsorted(assign[order], np.arange(nlist + 1))
    blocks, rows, bptr, fill = fk.layout_blocks(packed, ptr, order)
    nq = 10
    T = _byte_tables(rng, G, nq)
    lut = np.stack([_place_tables(t) for t in T])
    probes = np.stack([rng.permutation(nlist)[:5] for _ in range(nq)]).astype(np.int64)
    probes[0, 1] = -1
    probes[1, :] = [nlist - 1, -1, 0, -1, -1]
    # offsets up to 65535 - the largest table sum (G * 255): the uint16 sums never wrap
    bias = rng.integers(0, 65535 - G * 255 + 1, probes.shape) if with_bias else np.zeros(probes.shape, np.int64)
    bias[:, 0] = 65535 - G * 255 if with_bias else 0
    assert fk.SAMPLE_KK <= 37 and fk.SAMPLE_MIN * 37 <= 5 * (n // nlist)  # kk = 37 takes the sampled threshold
    for kk in (1, 37, 400, n):
        got = fk.scan_tables_topk(blocks, rows, bptr, fill, lut, probes, kk,
                                  bias if with_bias else np.zeros((0, 0), np.int64))
        assert got.shape == (nq, kk)
        for q in range(nq):
            members = np.zeros(0, np.int64)
            sq = _scores(packed, T[q])
            score = np.full(n, -1, np.int64)
            for t, lst in enumerate(probes[q]):
                if lst >= 0:
                    m = order[ptr[lst]:ptr[lst + 1]]
                    members = np.concatenate([members, m])
                    score[m] = sq[m] + bias[q, t]
            s = score[members]
            want = np.sort(s)[::-1][:kk]
            kept = got[q][got[q] >= 0]
            assert kept.size == min(kk, members.size) and (got[q][kept.size:] == -1).all()
            assert np.unique(kept).size == kept.size and np.isin(kept, members).all()
            assert (np.sort(score[kept])[::-1] == want).all()


def test_a_tile_scan_keeps_each_querys_rows():
    """``_scan_tile`` of several queries (each block scored for all of them
    in turn, a collector per query) keeps each query's best kk scores, the
    rows ``scan_tables_topk`` keeps for it alone (same tie rule), over uneven
    lists with an empty one, kk below and above the rows (kk = 37: sampled
    first thresholds)."""
    rng = np.random.default_rng(4)
    n, G, nlist, nq = 5000, 8, 7, 5
    packed = rng.integers(0, 16, (n, G), dtype=np.uint8)  # few distinct scores: many ties
    assign = rng.integers(0, nlist - 1, n)
    order = np.argsort(assign, kind="stable")
    ptr = np.searchsorted(assign[order], np.arange(nlist + 1))
    blocks, rows, bptr, fill = fk.layout_blocks(packed, ptr, order)
    T = _byte_tables(rng, G, nq)
    lut = np.stack([_place_tables(t) for t in T])
    lists = np.arange(nlist, dtype=np.int64)
    assert fk.SAMPLE_MIN * 37 <= n <= fk.SAMPLE_MAX * 37
    for kk in (1, 37, 300, n + 10):
        out_i = np.empty((nq, kk), np.int64)
        out_v = np.empty((nq, kk), np.uint16)
        fk._scan_tile(blocks, rows, bptr, fill, lut, 0, nq, lists, np.zeros(0, np.int64), kk, out_i, out_v)
        alone = fk.scan_tables_topk(blocks, rows, bptr, fill, lut, np.tile(lists, (nq, 1)), kk,
                                    np.zeros((0, 0), np.int64))
        np.testing.assert_array_equal(np.sort(out_i, axis=1), np.sort(alone, axis=1))
        for q in range(nq):
            kept = out_i[q][out_i[q] >= 0]
            score = _scores(packed, T[q])
            assert kept.size == min(kk, n) and np.unique(kept).size == kept.size
            assert (np.sort(score[kept]) == np.sort(score)[::-1][:kept.size][::-1]).all()
            assert (out_v[q][:kept.size].astype(np.int64) == score[kept]).all()


@pytest.mark.parametrize("spec, probe", [("PCA,ASQ4", {}), ("PCA,ASQ4,Rerank2", {}),
                                         ("PCA,IVF16,ASQ4s", {"nprobe": 16})])
def test_a_batch_finds_what_each_query_finds_alone(spec, probe):
    """A batch over a flat index (or an IVF index scanning every list:
    scaled codes have no list terms) scans the blocks for a tile of queries
    at a time; each query's results (ids and scores, bit for bit) are those
    of the query searched alone, across tile edges (19 queries: whole tiles
    and a partial one), with the default depth rule, a fixed pool and an
    allow-list."""
    import ipq_index
    from ipq_index.bench import datasets

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:19]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    assert idx.ntotal >= idx.settings.fastscan_min_rows
    sc = idx._fast_scanner()
    tile = min(fk.TILE_QUERIES, fk.TILE_TABLE_BYTES // fk.lut_width(sc.M))
    tile -= tile % fk.GROUP if tile > fk.GROUP else 0
    assert 2 <= tile < len(Q) and len(Q) % tile  # whole tiles and a partial one
    allowed = np.arange(0, X.shape[0], 3)
    if probe:  # every list scanned, no list terms: the kernel gets nprobe = 0 (the tile path)
        assert not sc.residual and idx._kernel_probe(probe["nprobe"], True)[3] == 0
    for params in ({**probe}, {"fs": 3, **probe}, {"filter": allowed, **probe}):
        D, I = idx.search(Q, 10, num_threads=1, **params)
        for q in range(len(Q)):
            d1, i1 = idx.search(Q[q:q + 1], 10, num_threads=1, **params)
            np.testing.assert_array_equal(i1[0], I[q])
            np.testing.assert_array_equal(d1[0], D[q])


@pytest.mark.parametrize("spec", ["PCA,IVF32,ASQ4n", "PCA,IVF32,ASQ4n,Rerank2", "IVF24,ASQ3s"])
def test_an_ivf_batch_probes_and_finds_what_each_query_finds_alone(spec):
    """A batch over an IVF index rotates and probes a tile of queries at a
    time (``probe._probe_tile``: the centroids read once per tile); each
    query's results (ids and scores, bit for bit) are those of the query
    searched alone, across tile edges (37 queries: two whole tiles and a
    partial one), with residual coarse codes (list terms) or scaled codes,
    a fixed pool and the scan of every row of the probed lists (fs=0); and
    every result lies in a list the one-query probe (``probe_lists``) picks."""
    import ipq_index
    from ipq_index._kernels import probe as _probe
    from ipq_index.bench import datasets

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:37]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    assert idx.ntotal >= idx.settings.fastscan_min_rows
    assert idx._fast_scanner().residual == ("s" not in spec)
    np.testing.assert_array_equal(idx.ids, np.arange(idx.ntotal))  # ids are rows
    qt = _probe.probe_tile_rows(len(Q), idx.nlist)
    assert 2 <= qt < len(Q) and len(Q) % qt
    dims, Ct = idx._probe_args()
    Y = np.ascontiguousarray(idx.encoder.rotate_queries(Q, num_threads=1), np.float32)
    assign = np.asarray(idx.assign)
    for params in ({"nprobe": 5}, {"nprobe": 5, "fs": 3}, {"nprobe": 7, "fs": 0}):
        D, I = idx.search(Q, 10, num_threads=1, **params)
        for q in range(len(Q)):
            d1, i1 = idx.search(Q[q:q + 1], 10, num_threads=1, **params)
            np.testing.assert_array_equal(i1[0], I[q])
            np.testing.assert_array_equal(d1[0], D[q])
        lists, _ = _probe.probe_lists(Y, dims, Ct, idx._list_spread(), params["nprobe"], Q)
        for q in range(len(Q)):
            assert set(assign[I[q][I[q] >= 0]]) <= set(lists[q])


def test_quantized_tables_round_the_float_tables():
    """quantize_luts: each sub-quantizer's 16 float scores of the query
    (numpy float64 from the centroids), minus their minimum, times one
    scale = min(254 / widest sum of a code byte's two spans, (65535 - M) /
    sum of spans), rounded, so a byte's two entries sum to at most 255;
    also for M > 257, where the uint16 sums would otherwise overflow."""
    rng = np.random.default_rng(5)
    for M, d in ((6, 10), (300, 600)):
        slot_dim = rng.integers(-1, d, (M, fast_scanner.DSUB)).astype(np.int64)
        cent = rng.standard_normal((M, 16, fast_scanner.DSUB)).astype(np.float32)
        centT = np.ascontiguousarray(cent.transpose(0, 2, 1))
        Y = rng.standard_normal((3, d)).astype(np.float32)
        got = fk.quantize_luts(Y, slot_dim, centT)
        for q in range(3):
            yv = np.where(slot_dim >= 0, Y[q].astype(np.float64)[slot_dim], 0.0)
            F = np.einsum("mcs,ms->mc", cent.astype(np.float64), yv)
            F -= F.min(axis=1, keepdims=True)
            span = F.max(axis=1)
            scale = min(254 / (span[0::2] + span[1::2]).max(), (65535 - M) / span.sum())
            want = _place_tables(np.clip(np.round(F * scale), 0, 255).astype(np.uint8))
            diff = np.abs(got[q].astype(np.int64) - want.astype(np.int64))
            # float32 arithmetic may round a value at .5 the other way
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
            Tq = np.stack([got[q][_table_offset(m):][:16] for m in range(M)])
            assert int(Tq.max(axis=1).astype(np.int64).sum()) <= 65535
            top = Tq.max(axis=1).astype(np.int64)
            assert (top[0::2] + top[1::2]).max() <= 255


def _byte_tables(rng, G, nq=None):
    """Random uint8 tables of G code bytes ((2 G, 16), or (nq, 2 G, 16)) as
    ``quantize_luts`` makes them: the two tables of a byte (2g, 2g + 1)
    reach at most 255 together, up to exactly 255 (the kernel adds them as
    bytes)."""
    shape = (G,) if nq is None else (nq, G)
    split = rng.integers(0, 256, shape)  # the largest entry of table 2g; table 2g + 1 gets 255 - split
    lo = (rng.random(shape + (16,)) * (split[..., None] + 1)).astype(np.uint8)
    hi = (rng.random(shape + (16,)) * (256 - split[..., None])).astype(np.uint8)
    lo[..., 0], hi[..., 15] = split, 255 - split
    return np.stack([lo, hi], axis=-2).reshape(shape[:-1] + (2 * G, 16))


_OTHER_TARGET = """
import sys, numpy as np
from ipq_index._kernels import fastscan as fk
assert fk.SIMD_WIDTH == int(sys.argv[1]), fk.SIMD_WIDTH
assert not fk.DWORDS  # byte lanes: neither target has AVX-512 VBMI and VNNI
d = np.load(sys.argv[2])
n = d["packed"].shape[0]
blocks, rows, bptr, fill = fk.layout_blocks(d["packed"], np.array([0, n]), np.arange(n))  # this target's layout
lut = np.zeros((1, fk.lut_width(d["T"].shape[0])), np.uint8)
for m, t in enumerate(d["T"]):
    o = fk._table_at(m)
    lut[0, o:o + 16] = t
    lut[0, o + 16:o + 32] = t  # byte lanes: a copy per 128-bit lane
print(fk.block_scores_all(blocks, lut, 0, True).tolist())
print(fk.scan_tables_topk(blocks, rows, bptr, fill, lut, np.zeros((1, 1), np.int64), 50,
                         np.zeros((0, 0), np.int64))[0].tolist())
from ipq_index._kernels import rerank as rr
assert rr.HALF_SIMD == (sys.argv[1] != "0"), rr.HALF_SIMD
v, r = rr.rerank(d["Q"], d["V"], d["cand"], 5)
print(v.tolist()); print(r.tolist())
from ipq_index._kernels import fields, rotation
assert fields.FIELD_SIMD == (sys.argv[1] != "0"), fields.FIELD_SIMD
assert rotation.HALF_SIMD == (sys.argv[1] != "0"), rotation.HALF_SIMD
layout = tuple(d[k] for k in ("ftable", "fstarts", "flanes", "fdims"))  # blocks (built on this host)
v, r = fields.rescore_fields(d["Y"], d["levels"], layout, d["codes"], np.zeros(0, np.float32), d["cand"], 7)
print(v.tolist()); print(r.tolist())
print(rotation.rotate_rows(d["Q"], d["R16"]).tolist())  # F16C vectors / integer widening
from ipq_index._kernels import cand_adc
assert not cand_adc.CAND_SIMD  # neither target has AVX-512 VBMI: the search plans never pick it
"""


_HASWELL = "+64bit,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="x86 targets (AVX2 and baseline x86-64) are compiled only on x86 hosts")
@pytest.mark.parametrize("cpu,features,width", [
    pytest.param("skylake-avx512", _HASWELL + ",+avx512f,+avx512bw,+avx512dq,+avx512cd,+avx512vl", 64,
                 marks=pytest.mark.skipif(not fk.target_has("avx512bw"),
                                          reason="AVX-512 code runs only on an AVX-512 host")),
    ("haswell", _HASWELL, 32), ("x86-64", "+64bit,+sse,+sse2", 0)])
def test_other_targets_give_the_same_integers(tmp_path, cpu, features, width):
    """The byte-lane kernels (AVX-512BW without VBMI, AVX2) and the scalar
    fallback (a CPU without AVX2), with their own block layout,
    the exact re-rank's float16 widening and the float16 query rotation
    without F16C, are what other
    machines run: compiled for those targets in a subprocess (NUMBA_CPU_NAME
    / NUMBA_CPU_FEATURES), they give this machine's scores and candidates."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(9)
    n, G = 999, 21
    packed = rng.integers(0, 256, (n, G), dtype=np.uint8)
    blocks, rows, bptr, fill = fk.layout_blocks(packed, np.array([0, n]), np.arange(n))
    T = _byte_tables(rng, G)
    lut = _place_tables(T)[None, :]
    V = rng.standard_normal((300, 37)).astype(np.float16).view(np.uint16)
    Q = rng.standard_normal((2, 37)).astype(np.float32)
    cand = rng.integers(-1, 300, (2, 40))
    from ipq_index.encoder import ASQEncoder, EncoderConfig
    from ipq_index._kernels import fields, rotation

    X = rng.standard_normal((300, 37)).astype(np.float32)
    enc = ASQEncoder(37, EncoderConfig(bits=5.0, transform="none")).train(X)  # 24 bytes: two blocks
    codes = enc.encode(X)[0]
    layout = enc.field_layout()
    assert layout[1].shape[0] > 0
    np.savez(tmp_path / "d.npz", packed=packed, T=T, V=V, Q=Q, cand=cand,
             ftable=layout[0], fstarts=layout[1], flanes=layout[2], fdims=layout[3], codes=codes,
             levels=enc.levels32(), Y=Q, R16=rng.standard_normal((37, 21)).astype(np.float16).view(np.uint16))
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", _OTHER_TARGET, str(width), str(tmp_path / "d.npz")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    scores, found, rr_v, rr_r, ad_v, ad_r, rot = (eval(line) for line in res.stdout.strip().splitlines())
    assert scores == fk.block_scores_all(blocks, lut, 0, True).tolist()
    here = fk.scan_tables_topk(blocks, rows, bptr, fill, lut, np.zeros((1, 1), np.int64), 50,
                               np.zeros((0, 0), np.int64))[0]
    assert found == here.tolist()
    from ipq_index._kernels import rerank as rr
    v, r = rr.rerank(Q, V, cand, 5)
    assert rr_r == r.tolist()
    np.testing.assert_allclose(rr_v, v, rtol=1e-6)
    # the block ADC (AVX2 gathers / one lane at a time) against this host's
    v, r = fields.rescore_fields(Q, enc.levels32(), layout, codes, np.zeros(0, np.float32), cand, 7)
    np.testing.assert_allclose(ad_v, v, rtol=1e-5, atol=1e-5)
    assert sorted(ad_r[0]) == sorted(r[0].tolist())
    # query rotation by a float16 matrix: this host's float32 sums of the same values, bit for bit
    R16 = np.load(tmp_path / "d.npz")["R16"]
    assert np.array_equal(np.array(rot, np.float32), rotation.rotate_rows(Q, R16.view(np.float16).astype(np.float32)))


def test_the_sampled_threshold_rarely_needs_a_rescan():
    """The first threshold is the ``_sample_rank(kk)``-th best sampled score;
    fewer than kk rows reach it (and the scan is repeated) when the sample
    holds at least that many of the kk - 1 best rows: a binomial count
    (kk - 1 rows, each sampled with probability 1 / SAMPLE_STEP) whose tail
    stays under 1% at every kk the sample is used for, while the rank stays
    a small share of the sampled rows the collector keeps."""
    import math

    p = 1.0 / fk.SAMPLE_STEP
    for kk in (fk.SAMPLE_KK, 40, 50, 64, 100, 200, 400, 1000, 4000):
        ks = int(fk._sample_rank(kk))
        n = kk - 1
        log_pmf = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p)
                   + (n - j) * math.log1p(-p) for j in range(ks, n + 1)]
        tail = sum(math.exp(v) for v in log_pmf)
        assert tail < 0.01, (kk, ks, tail)
        assert 1 <= ks < kk / 2


def test_sampled_threshold_stays_exact():
    """Scans of many rows per candidate start from a threshold set on every
    SAMPLE_STEP-th block; the result is the exact top-kk both when the sample
    is representative and when it holds nearly all the best rows (the
    threshold then aims too high and the scan is repeated from 0)."""
    rng = np.random.default_rng(11)
    step, kk, G = fk.SAMPLE_STEP, 40, 6
    assert kk >= fk.SAMPLE_KK
    n = 32 * step * 12
    assert fk.SAMPLE_MIN * kk <= n <= fk.SAMPLE_MAX * kk
    T = rng.integers(0, 100, (2 * G, 16), dtype=np.uint8)  # a byte's two entries: <= 255 (quantize_luts)
    lut = _place_tables(T)[None, :]
    for adversarial in (False, True):
        packed = rng.integers(0, 256, (n, G), dtype=np.uint8)
        ks = int(fk._sample_rank(kk))  # the sample rank of the first threshold
        if adversarial:  # ks + 1 top rows, all inside sampled blocks (block index % step == 0)
            # (entries of T are < 100; the top rows' entries are raised to 127 below)
            tops = (np.arange(ks + 1) * step) * 32 + 3
            packed[tops] = np.array([T[2 * g].argmax() | (T[2 * g + 1].argmax() << 4) for g in range(G)], np.uint8)
            T2 = T.copy()
            for g in range(G):  # make those codes score far above every other row
                T2[2 * g, T[2 * g].argmax()] = 127
                T2[2 * g + 1, T[2 * g + 1].argmax()] = 127
            lut = _place_tables(T2)[None, :]
            scores = _scores(packed, T2)
            sample = np.concatenate([scores[b * 32:(b + 1) * 32] for b in range(0, n // 32, step)])
            thr = np.sort(sample)[::-1][ks - 1]
            assert (scores >= thr).sum() < kk  # the sampled threshold must be abandoned
        else:
            scores = _scores(packed, T)
            lut = _place_tables(T)[None, :]
        blocks, rows, bptr, fill = fk.layout_blocks(packed, np.array([0, n]), np.arange(n))
        got = fk.scan_tables_topk(blocks, rows, bptr, fill, lut, np.zeros((1, 1), np.int64), kk,
                                  np.zeros((0, 0), np.int64))[0]
        assert np.unique(got).size == kk
        assert (np.sort(scores[got]) == np.sort(scores)[-kk:]).all()


def _coarse_float_scores(sc, Y):
    """(nq, n) float64 coarse table sums of every row of scanner ``sc`` for
    transformed queries Y: its nibble codes read back from the documented
    block layout, each scored in float64 from the sub-quantizers' centroids."""
    n = sc.ntotal
    slots = np.nonzero(sc.block_rows >= 0)[0]
    packed = np.zeros((n, sc.blocks.shape[1]), np.uint8)
    packed[sc.block_rows[slots]] = _block_bytes(sc.blocks, slots)
    out = np.zeros((Y.shape[0], n))
    for m in range(sc.M):
        sd = sc.slot_dim[m]
        yv = np.where(sd >= 0, Y.astype(np.float64)[:, np.maximum(sd, 0)], 0.0)  # (nq, DSUB)
        F = yv @ sc._centT[m].astype(np.float64)  # (nq, 16)
        out += F[:, (packed[:, m // 2] >> (4 * (m % 2))) & 15]
    return out


def test_residual_coarse_codes_rank_by_the_list_term_plus_the_residual_code(monkeypatch):
    """IVF coarse codes of unscaled rows quantize each row's decoded vector
    minus its list's centroid, and a row of probed list l scores <y, c_l>
    (the probe's float32 sum over the probe dimensions) + its code's table
    sum.  (1) The scan keeps the top-kk of that score, in float64, to within
    the rounding of the uint8 tables and of the list terms (one scale per
    query, leaving room for the list terms in the uint16 sums).  (2) At the
    same coverage these scores follow the full-precision ADC scores as
    closely as direct coarse codes of the same index (rows' values, no list
    term) with fewer coarse bits (the widths are chosen on the residuals'
    errors, ``FastScanner._residual_bits``)."""
    import ipq_index
    from ipq_index.bench import datasets
    from ipq_index._kernels import codes

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:20]
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF64,ASQ4n").train(X).add(X)
    sc = ivf._fast_scanner()
    assert sc.residual and sc.ntotal == X.shape[0]
    Y = ivf.encoder.rotate_queries(Q)
    probes, raw = ivf._probes(Y, 12, Q, with_raw=True)
    dims, Ct = ivf._probe_space()
    np.testing.assert_allclose(raw, (Y[:, dims].astype(np.float64) @ Ct.astype(np.float64))[
        np.arange(len(Q))[:, None], probes], rtol=1e-4, atol=1e-4)
    F = _coarse_float_scores(sc, Y)
    assign = np.asarray(ivf.assign)
    kk = 200
    got = sc.candidates(Y, kk, 1, probes, raw)
    for q in range(len(Q)):
        members = np.nonzero(np.isin(assign, probes[q]))[0]
        term = np.zeros(ivf.nlist)
        term[probes[q]] = raw[q]
        ref = F[q] + term[assign]
        # the kernel's scale (``_quantize_one``): tables and list terms in one integer unit
        sd = np.maximum(sc.slot_dim, 0)
        tabs = np.einsum("ms,msc->mc", np.where(sc.slot_dim >= 0, Y[q].astype(np.float64)[sd], 0.0),
                         sc._centT.astype(np.float64))
        span = tabs.max(axis=1) - tabs.min(axis=1)
        scale = min(254 / (span[0::2] + span[1::2]).max(), (65535 - sc.M) / (span.sum() + np.ptp(raw[q])))
        tol = (sc.M + 1) / scale + 1e-3  # both rows' rounding, each <= (M + 1) / 2 units
        assert np.isin(got[q], members).all() and np.unique(got[q]).size == kk
        kth = np.sort(ref[members])[::-1][kk - 1]
        assert ref[got[q]].min() >= kth - tol
        # (nearly) every row clearly above the cut is found
        assert np.isin(members[ref[members] > kth + tol], got[q]).all()

    # (2) error of the coarse scores against the full ADC scores <y, z_hat> (per-query offsets removed)
    e = ivf.encoder
    Zh = codes.decode(np.asarray(ivf.codes), e.levels, e.level_off, e.bits, e.byte_of, e.shift_of, X.shape[1])
    exact = Y.astype(np.float64) @ Zh.astype(np.float64).T

    def err(scores):
        return float(np.mean(np.var(scores - exact, axis=1)))

    resid_err = err(F + (Y.astype(np.float64) @ ivf._transformed_centroids().T)[:, assign])
    ivf.configure(residual=False)
    direct = ivf._fast_scanner()
    assert not direct.residual
    direct_err = err(_coarse_float_scores(direct, Y))
    # the same error target (1 - coverage of the score variance, the list term counting as kept): about the
    # same error (sample estimates) from fewer coarse bits (measured: 242 vs 256 bits, error +0.2%)
    assert resid_err <= 1.05 * direct_err, (resid_err, direct_err)
    assert sc.coarse_bits.sum() < direct.coarse_bits.sum()
