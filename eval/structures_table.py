"""Markdown tables of the structures benchmark: per dataset and library, the best
single-thread and batch QPS among settings reaching recall@k >= 0.95 and >= 0.99
(any memory), then the same at >= 0.95 among compressed-only settings (no
full-precision copy of the vectors: see ``keeps_float_copy``).

    python eval/structures_table.py [eval/results/structures_minilm/structures_minilm.csv ...]

Without arguments it reads every eval/results/structures_*/structures_*.csv (the
full result CSVs written by ``ipq bench``; the *_pareto.csv files give the same
answer).  A dash means no setting of that library reached the recall.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ipq_index.bench.runner import best_qps_at_recall, read_csv

THRESHOLDS = (0.95, 0.99)
MODES = (("qps_single", "1 thread"), ("qps_batch", "batch"))
ROOT = Path(__file__).resolve().parent / "results"


def cell(r, attr: str) -> str:
    if r is None:
        return "–"
    what = f"{r.method} {r.params}".strip()
    return f"**{getattr(r, attr):,.0f}** `{what}` ({r.recall_at_k:.3f})"


def keeps_float_copy(r) -> bool:
    """Whether a setting searches with a full-precision (float16/32) copy of the
    vectors: ipq ``Rerank``, FAISS refine (``RFlat``) and flat-storage indexes
    (``Flat``, ``HNSW32`` without a quantizer), ScaNN reorder, hnswlib."""
    m = r.method
    if r.library == "hnswlib" or any(t in m for t in ("Rerank", "RFlat", "Refine")):
        return True
    if r.library == "scann":  # reorders with the float vectors unless reorder=0 (default 100)
        return "reorder=0" not in r.params.split(",")
    if r.library == "faiss":
        parts = m.split(",")
        return parts[-1] == "Flat" or (parts[-1].startswith("HNSW") and len(parts) == 1)
    return False


def table(paths, thresholds=THRESHOLDS, compressed_only: bool = False) -> str:
    head = ["dataset", "library"] + [f"{label} @ ≥{t}" for t in thresholds for _, label in MODES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        rows = read_csv(path)
        if compressed_only:
            rows = [r for r in rows if not keeps_float_copy(r)]
        libs = list(dict.fromkeys(r.library for r in rows))
        best = {(t, a): best_qps_at_recall(rows, t, a) for t in thresholds for a, _ in MODES}
        for lib in libs:
            cells = [cell(best[(t, a)].get(lib), a) for t in thresholds for a, _ in MODES]
            lines.append(f"| {rows[0].dataset} | {lib} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", help="result CSVs of ipq bench (default: eval/results/structures_*)")
    paths = [Path(p) for p in ap.parse_args(argv).csv] or sorted(
        p for p in ROOT.glob("structures_*/structures_*.csv") if not p.stem.endswith("_pareto"))
    if not paths:
        print(f"no structures_*.csv under {ROOT}", file=sys.stderr)
        return 1
    print(table(paths))
    print("\nCompressed only (no full-precision copy kept):\n")
    print(table(paths, thresholds=(0.95,), compressed_only=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
