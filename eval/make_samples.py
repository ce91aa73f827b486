"""Rebuild the small offline samples shipped in ``ipq_index/data/``.

    python eval/make_samples.py --src /work/shared/data

For each sample: draw rows with ``numpy.random.default_rng(0)`` --
``permutation(N)[:n_train]`` of the train set, then (same generator)
``permutation(Q)[:n_test]`` of the test set -- round the vectors to float16
(the stored form), and recompute the exact top-100 inner-product neighbours
on the float16-rounded values cast back to float32.  Saved with
``np.savez_compressed`` as ``train``/``test`` (float16), ``neighbors`` (int32),
``distances`` (float32), ``metric`` and ``provenance`` (strings).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from ipq_index.bench.datasets import GT_K, _DATA_DIR, ground_truth, load_sample

#: name -> (source file, n_train, n_test)
RECIPES = {
    "minilm": ("pypi-paraphrase-minilm-l3-384-raw-dot.hdf5", 10_000, 300),
    "glove50": ("glove-6b-50-raw-dot.hdf5", 30_000, 300),
}
SEED = 0


def _attr(f, key, default=""):
    v = f.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def build(name: str, src_dir: Path, n_train: int, n_test: int, out_dir: Path) -> Path:
    fname = RECIPES[name][0]
    with h5py.File(src_dir / fname, "r") as f:
        metric = _attr(f, "distance")
        if metric != "dot":
            raise ValueError(f"{fname}: expected distance='dot', got {metric!r}")
        model = _attr(f, "model")
        train_all = f["train"][()]
        test_all = f["test"][()]
    rng = np.random.default_rng(SEED)
    tr = rng.permutation(train_all.shape[0])[:n_train]
    te = rng.permutation(test_all.shape[0])[:n_test]
    train16 = train_all[tr].astype(np.float16)
    test16 = test_all[te].astype(np.float16)
    if not (np.isfinite(train16).all() and np.isfinite(test16).all()):
        raise ValueError(f"{fname}: values overflow float16")
    neighbors, distances = ground_truth(
        train16.astype(np.float32), test16.astype(np.float32), GT_K, "dot"
    )
    provenance = (
        f"source={fname}; model={model}; rows drawn with numpy default_rng({SEED}): "
        f"permutation({train_all.shape[0]})[:{n_train}] of train, then "
        f"permutation({test_all.shape[0]})[:{n_test}] of test; vectors stored as float16; "
        f"neighbors/distances = exact top-{GT_K} inner product on the float16 values; "
        f"counts: {n_train} train, {n_test} test, d={train16.shape[1]}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.npz"
    np.savez_compressed(
        out,
        train=train16,
        test=test16,
        neighbors=neighbors.astype(np.int32),
        distances=distances.astype(np.float32),
        metric=np.array("dot"),
        provenance=np.array(provenance),
    )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/work/shared/data"), help="directory of the HDF5 files")
    ap.add_argument("--out", type=Path, default=_DATA_DIR, help="output directory (default: ipq_index/data)")
    ap.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="build only these samples")
    ap.add_argument("--minilm-train", type=int, default=RECIPES["minilm"][1],
                    help="train rows of the minilm sample (default %(default)s)")
    args = ap.parse_args(argv)
    counts = {"minilm": (args.minilm_train, RECIPES["minilm"][2]),
              "glove50": RECIPES["glove50"][1:]}
    total = 0
    for name in args.only or RECIPES:
        n_train, n_test = counts[name]
        out = build(name, args.src, n_train, n_test, args.out)
        size = out.stat().st_size
        total += size
        ds = load_sample(name) if args.out == _DATA_DIR else None
        print(f"{out}: {size:,} bytes" + (f"  {ds!r}" if ds is not None else ""))
    print(f"total: {total:,} bytes")


if __name__ == "__main__":
    main()
