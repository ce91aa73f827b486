"""Measure the per-operation costs of ``ipq_index/cost_model.py`` on this
machine and print them next to the constants the planner uses.

The costs only choose how candidates are rescored (``cost_model.rescore_plan``);
re-measure them here when the kernels or the hardware change, and update the
constants in that one module.

    python eval/measure_costs.py [--data FILE.hdf5] [--n 50000] [--queries 200]

Without ``--data`` a synthetic Gaussian corpus (decaying variances, d = 384)
is used.  Single thread; random candidate rows, as in a search.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import ipq_index
from ipq_index import cost_model
from ipq_index._kernels import cand_adc, fields, rerank, tables
from ipq_index.structures.base import copy_rows


def _best(fn, repeats=5):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="HDF5 file with 'train' and 'test' (ann-benchmarks layout)")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=400)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if a.data:
        import h5py

        with h5py.File(a.data, "r") as f:
            X = np.ascontiguousarray(f["train"][:a.n], np.float32)
            Q = np.ascontiguousarray(f["test"][:a.queries], np.float32)
    else:
        d = 384
        scale = np.linspace(2.0, 0.1, d)
        X = (rng.standard_normal((a.n, d)) * scale).astype(np.float32)
        Q = (rng.standard_normal((a.queries, d)) * scale).astype(np.float32)
    idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ4,Rerank4").train(X).add(X)
    enc, codes = idx.encoder, np.asarray(idx.codes)
    ipq_index.warmup("PCA,ASQ4,Rerank4", d=X.shape[1])
    Y = enc.rotate_queries(Q)
    nq, nc = Q.shape[0], a.candidates
    cand = np.sort(rng.integers(0, X.shape[0], (nq, nc)), axis=1)
    no_scales = np.zeros(0, np.float32)
    layout = enc.field_layout()
    nfields = layout[0].shape[0]

    t_fields = _best(lambda: fields.rescore_fields(Y, enc.levels32(), layout, codes, no_scales, cand, 10))
    ptr, order = enc._byte_fields()
    t_build = _best(lambda: tables.build_tables(Y, enc.levels32(), enc.level_off, enc.bits, ptr, order,
                                                enc.nbytes))
    T = enc.rotated_tables(Y)
    t_lookup = _best(lambda: tables.rescore_topk(T, codes, no_scales, cand, 10))
    V = copy_rows(idx.vectors)
    t_exact = _best(lambda: rerank.rerank(Q, V, cand, 10))
    rows = [("FIELD_NS_BLOCKS" if layout[1].shape[0] else "FIELD_NS", t_fields / (nq * nc * nfields)),
            ("ENTRY_NS", t_build / (nq * 256 * enc.nbytes)),
            ("LOOKUP_NS", t_lookup / (nq * nc * enc.nbytes)),
            ("EXACT_NS_PER_DIM", t_exact / (nq * nc * X.shape[1]))]
    cl = enc.candidate_layout()
    if cl is not None and cand_adc.CAND_SIMD:
        t_cand = _best(lambda: cand_adc.candidate_topk(Y, enc.levels32(), cl, codes, no_scales, cand, 40))
        per_row = t_cand / (nq * nc)
        rows.append(("CAND_*: ns per candidate row (model: BYTE_NS * bytes + FIELD_NS * fields)", per_row))
        model = cost_model.CAND_BYTE_NS * cl[4] + cost_model.CAND_FIELD_NS * cl[0].shape[0]
        rows.append(("CAND_* model per row, ns", model * 1e-9))
    print(f"{X.shape[0]} x {X.shape[1]}, {enc.nbytes}-byte codes, {nfields} fields, {nq} queries x {nc} "
          "random candidates, one thread")
    for name, sec in rows:
        const = getattr(cost_model, name, None) if name.isupper() else None
        print(f"  {name:<72s} measured {sec * 1e9:7.3f} ns" + (f"   constant {const}" if const is not None else ""))


if __name__ == "__main__":
    main()
