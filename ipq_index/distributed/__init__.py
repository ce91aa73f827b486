"""Sharded build and search on Dask (``pip install "ipq_index[dask]"``).

    from dask.distributed import Client, LocalCluster
    from ipq_index.distributed import ShardedIndex, load

    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    sh = ShardedIndex(384, "PCA,IVF1024,ASQ4,Rerank2", n_shards=2, client=client)
    sh.train(sample)                     # one encoder for every shard, trained here
    sh.add(X)                            # dask.array, NumPy array or list of .npy / HDF5 files
    scores, ids = sh.search(Q, 10)       # exact merge of the shards' top-10
    sh.save("/shared/idx")               # one ipq file per shard + manifest.json
    sh = load("/shared/idx", client)     # each worker memory-maps its shards

``import ipq_index`` does not import this package (nor Dask); importing it
needs ``dask.distributed``.  docs/distributed.md: design, fault model, sizing.
"""

from __future__ import annotations

try:
    import distributed as _distributed  # noqa: F401  (fail early with the install hint)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('ipq_index.distributed needs Dask: pip install "ipq_index[dask]"') from e

from ._sharded import ShardedIndex, ShardFileError, load, merge_topk

__all__ = ["ShardedIndex", "ShardFileError", "load", "merge_topk"]
