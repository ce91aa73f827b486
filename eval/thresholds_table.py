"""The thresholds table of an ``ipq bench`` run: per library, the best QPS
at recall@k >= 0.95 and >= 0.99, one query per call (1 thread) and one batch
(the run's threads), with the configuration that reached it; then the same at
>= 0.95 for configurations that keep no full-precision copy (``compressed``).

    python eval/thresholds_table.py eval/results/speed_peers_npm/speed_peers_npm.csv \\
        > eval/results/speed_peers_npm/thresholds.md
"""

from __future__ import annotations

import argparse
import csv


def best(rows, col):
    return max(rows, key=lambda r: float(r[col])) if rows else None


def cell(rows, col):
    b = best(rows, col)
    if b is None:
        return "–"
    params = f" {b['params']}" if b["params"] else ""
    return f"**{float(b[col]):,.0f}** `{b['method']}{params}` ({float(b['recall_at_k']):.3f})"


def compressed(row) -> bool:
    """No full-precision copy: hnswlib and FAISS float indexes (``HNSW32``,
    ``Flat``) keep the floats; re-rank / refine / re-order stages keep a copy."""
    m, lib = row["method"], row["library"]
    if lib == "hnswlib" or any(s in m for s in ("Rerank", "RFlat", "Refine", "reorder")):
        return False
    return lib != "faiss" or any(c in m for c in ("SQ", "PQ", "RaBitQ", "LSH", "RQ"))


def table(rows) -> str:
    ds = rows[0]["dataset"]
    libs = sorted({r["library"] for r in rows}, key=lambda lib: (lib != "ipq", lib))
    out = ["| dataset | library | 1 thread @ ≥0.95 | batch @ ≥0.95 | 1 thread @ ≥0.99 | batch @ ≥0.99 |",
           "|---|---|---|---|---|---|"]
    for lib in libs:
        rs = [r for r in rows if r["library"] == lib]
        a = [r for r in rs if float(r["recall_at_k"]) >= 0.95]
        b = [r for r in rs if float(r["recall_at_k"]) >= 0.99]
        out.append(f"| {ds} | {lib} | {cell(a, 'qps_single')} | {cell(a, 'qps_batch')} | "
                   f"{cell(b, 'qps_single')} | {cell(b, 'qps_batch')} |")
    out += ["", "Compressed only (no full-precision copy kept):", "",
            "| dataset | library | 1 thread @ ≥0.95 | batch @ ≥0.95 |", "|---|---|---|---|"]
    for lib in libs:
        rs = [r for r in rows if r["library"] == lib and compressed(r) and float(r["recall_at_k"]) >= 0.95]
        if rs:
            out.append(f"| {ds} | {lib} | {cell(rs, 'qps_single')} | {cell(rs, 'qps_batch')} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="the run's CSV (ipq bench --out DIR writes DIR/<name>.csv)")
    ap.add_argument("--title", help="a line printed first (e.g. the run's date, host and command)")
    a = ap.parse_args(argv)
    with open(a.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if a.title:
        print(a.title + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
