"""The search's cost model: measured per-operation costs (nanoseconds, on
the 2-core AVX-512 x86_64 hosts the project is benchmarked on) and the
rescoring planner built on them.  The costs only choose between ways of
computing the same candidates' scores (which plan, not which answer, up to
the exact re-rank's superset; see ``rescore_plan``); they are the one place
such constants live.
"""

from __future__ import annotations

import numpy as np

from ._kernels import cand_adc as _cand

#: measured per-operation costs (ns; 192-byte codes, 345-367 fields, d = 384)
#: behind the rescoring choices (``rescore_plan``): one field of the
#: table-free ADC, one table entry built, one table lookup (the first and the
#: last from 48-400 random candidates of 50k rows per query: fields 0.95 ns,
#: lookups 0.58 ns + 19 us of tables; cross-over ~80 candidates), one dimension of
#: an exact dot product with the stored copy (random float16 rows, all
#: prefetched first, F16C widening, float64 sums: 0.32-0.66 ns for 400-20
#: rows of a 50k x 384 copy; 0.45-0.63 ns for a 10^6 x 384 copy = 768 MB),
#: and the copy size up to which the first applies.  FIELD_NS_BLOCKS: one
#: field of the table-free ADC in 16-field blocks (``Encoder.field_layout``;
#: 48-400 random candidates of 50k / 10^6 rows, 345-381 fields: 0.48-0.96 ns,
#: against 1.08-1.41 ns one field at a time)
FIELD_NS, FIELD_NS_BLOCKS, ENTRY_NS, LOOKUP_NS = 1.0, 0.6, 0.4, 0.6
#: the SIMD candidate ADC (``_cand``; 10^6 x 384, 192-byte codes, 345
#: fields, 22,600 table entries): per table entry built (6.2 us per query),
#: per code byte of a row transposed (16-18 ns per row) and per field of a row
#: looked up (22 ns per row), rows in cache
CAND_ENTRY_NS, CAND_BYTE_NS, CAND_FIELD_NS = 0.28, 0.095, 0.065
EXACT_NS_PER_DIM, EXACT_NS_PER_DIM_FAR, EXACT_NEAR_BYTES = 0.35, 0.45, 128 << 20


def rescore_plan(enc, nc, kk, exact_ns, preference, have_tables=False, cl=None):
    """How to pick the top-kk of nc candidates (costs above): ``"exact"``
    (hand all of them to the exact re-rank; only when ``exact_ns`` > 0),
    ``"cand"`` (SIMD candidate ADC with layout ``cl``, then the exact
    re-rank of kk; only when ``exact_ns`` > 0 and ``cl`` is not None),
    ``"fields"`` (table-free ADC) or ``"tables"`` (lookup tables, built
    unless ``have_tables``).  Memoised per encoder (a few microseconds of a
    ~200 us query)."""
    key = (nc, kk, exact_ns, preference, have_tables, id(cl))  # layouts live in the encoder's cache
    plan = enc._plans.get(key)
    if plan is None:
        plan = enc._plans[key] = _choose_plan(enc, nc, kk, exact_ns, preference, have_tables, cl)
    return plan


def _choose_plan(enc, nc, kk, exact_ns, preference, have_tables, cl):
    table, starts = enc.field_layout()[:2]
    fields_ns = (FIELD_NS_BLOCKS if starts.shape[0] else FIELD_NS) * nc * table.shape[0]
    tables_ns = (0.0 if have_tables else ENTRY_NS * 256 * enc.nbytes) + LOOKUP_NS * nc * enc.nbytes
    adc_ns = min(fields_ns, tables_ns)
    cand_ns = np.inf
    if cl is not None and exact_ns > 0:
        rows = -(-nc // _cand.GROUP) * _cand.GROUP
        cand_ns = CAND_ENTRY_NS * float(cl[0][:, 2].sum()) + rows * (CAND_BYTE_NS * cl[4]
                                                                     + CAND_FIELD_NS * cl[0].shape[0])
    if exact_ns > 0:
        exact = exact_ns * enc.d
        if exact * nc <= preference * (min(adc_ns, cand_ns) + exact * kk):
            return "exact"
        if cand_ns <= adc_ns:
            return "cand"
    return "fields" if fields_ns < tables_ns else "tables"


def exact_ns_per_dim(copy_nbytes: int) -> float:
    """Cost of one dimension of an exact dot product with a stored copy of
    this many bytes (random rows, prefetched)."""
    return EXACT_NS_PER_DIM if copy_nbytes <= EXACT_NEAR_BYTES else EXACT_NS_PER_DIM_FAR


#: the SIMD fast-scan, per coarse code byte of a scanned row (50k MiniLM
#: rows, 48-byte coarse codes: ~100 us of a single-query search)
SCAN_NS_PER_BYTE = 0.04


def scan_allowed_rows(enc, allowed, scanned, coarse_bytes, ncand) -> bool:
    """Whether a filtered search should score all ``allowed`` rows with the
    full ADC (one lookup per code byte of each) rather than fast-scan the
    allowed rows of the probed lists (``scanned``, ``coarse_bytes`` each)
    and then score ``ncand`` candidates with the full ADC (the lookup tables
    are built either way)."""
    full = LOOKUP_NS * allowed * enc.nbytes
    return full <= SCAN_NS_PER_BYTE * scanned * coarse_bytes + LOOKUP_NS * min(ncand, scanned) * enc.nbytes


#: the graph walk, per node it must keep in its beam (HNSW32, 50k MiniLM
#: rows, ASQ6 codes, ef 64, single queries: 430-830 ns at 1-10% of the rows
#: allowed: a walk that keeps only allowed nodes visits about ef / share of
#: them before its beam is full)
WALK_NS_PER_KEPT = 600.0


def scan_beats_walk(enc, allowed, live, ef, coarse_bytes, ncand) -> bool:
    """Whether a filtered graph search should fast-scan the ``allowed`` rows
    (``coarse_bytes`` each, then the full ADC of ``ncand`` candidates)
    rather than walk until its beam holds ``ef`` allowed nodes, about
    ef * live / allowed nodes kept along the way."""
    scan = SCAN_NS_PER_BYTE * allowed * coarse_bytes + LOOKUP_NS * min(ncand, allowed) * enc.nbytes
    return scan <= WALK_NS_PER_KEPT * ef * live / max(allowed, 1)
