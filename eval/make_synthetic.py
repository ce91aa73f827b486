"""Generate a large synthetic corpus resembling a real embedding set (ann-benchmarks HDF5).

A Gaussian mixture is fitted to the real set in its PCA basis: k-means
clusters (faiss) give the component means and weights, and each component
gets its own per-axis standard deviations, so the mixture reproduces the
real set's cluster structure, anisotropy and norm spread (norms are not
normalised).  Queries are drawn from the real set's *test* vectors (real
queries), the ground truth is the exact inner-product top-100 (faiss).

    python eval/make_synthetic.py --src /path/to/pypi-paraphrase-minilm-l3-384-raw-dot.hdf5 \\
        --n 1000000 --out data/synthetic-minilm-1m-dot.hdf5
"""

from __future__ import annotations

import argparse
import time

import faiss
import h5py
import numpy as np


def fit_mixture(X, n_comp, seed):
    mean = X.mean(axis=0)
    Xc = (X - mean).astype(np.float64)
    _, evecs = np.linalg.eigh(Xc.T @ Xc / len(X))
    R = evecs[:, ::-1].astype(np.float32)
    Z = (Xc @ R).astype(np.float32)
    km = faiss.Kmeans(Z.shape[1], n_comp, niter=25, seed=seed)
    km.train(Z)
    _, a = km.index.search(Z, 1)
    a = a[:, 0]
    weights = np.bincount(a, minlength=n_comp) / len(a)
    stds = np.stack([Z[a == c].std(axis=0) if np.any(a == c) else Z.std(axis=0) for c in range(n_comp)])
    return mean, R, km.centroids.copy(), stds, weights


def sample(mean, R, cents, stds, weights, n, rng, chunk=200_000):
    out = np.empty((n, R.shape[0]), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        comp = rng.choice(len(weights), m, p=weights)
        Z = cents[comp] + rng.standard_normal((m, R.shape[0])).astype(np.float32) * stds[comp]
        out[s:s + m] = Z @ R.T + mean
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--components", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    with h5py.File(args.src, "r") as f:
        X = f["train"][:]
        Q = f["test"][: args.queries]
    rng = np.random.default_rng(args.seed)
    mean, R, cents, stds, w = fit_mixture(X, args.components, args.seed)
    Y = sample(mean, R, cents, stds, w, args.n, rng)
    index = faiss.IndexFlatIP(Y.shape[1])
    index.add(Y)
    D, I = index.search(Q, 100)
    with h5py.File(args.out, "w") as f:
        f.create_dataset("train", data=Y)
        f.create_dataset("test", data=Q)
        f.create_dataset("neighbors", data=I.astype(np.int32))
        f.create_dataset("distances", data=D.astype(np.float32))
        f.attrs["distance"] = "dot"
        f.attrs["point_type"] = "float"
        f.attrs["dimension"] = Y.shape[1]
        f.attrs["source"] = f"Gaussian mixture ({args.components} components, PCA basis) fitted to {args.src}"
        f.attrs["seed"] = args.seed
    nr = np.linalg.norm(X, axis=1)
    ny = np.linalg.norm(Y[:100_000], axis=1)
    print(f"wrote {args.out}: {Y.shape} in {time.perf_counter() - t:.0f} s; norms real "
          f"{nr.min():.2f}-{nr.max():.2f} (median {np.median(nr):.2f}), synthetic "
          f"{ny.min():.2f}-{ny.max():.2f} (median {np.median(ny):.2f})")


if __name__ == "__main__":
    main()
