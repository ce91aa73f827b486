"""Benchmark harness for ipq_index (not imported by ``import ipq_index``).

* :mod:`.runner`      -- measure methods on a dataset (``ipq bench``): sweeps,
  Pareto fronts, CSV, plots;
* :mod:`.config`      -- YAML benchmark configs with ann-benchmarks sweep semantics;
* :mod:`.datasets`    -- ann-benchmarks HDF5, ``*vecs`` files, shipped samples,
  exact ground truth;
* :mod:`.baselines`   -- FAISS, hnswlib and ScaNN behind the ann-benchmarks
  wrapper contract;
* :mod:`.ann_benchmarks` -- the ann-benchmarks adapter (``module.py``) and its
  definition file (``config.yml``);
* :mod:`.params`      -- metric names, row normalisation and search keyword
  arguments shared by the modules above and the ``ipq`` command;
* :mod:`.demo`        -- ``python -m ipq_index.bench.demo`` (``ipq demo``).

Third-party modules (h5py, yaml, tqdm, matplotlib, faiss, hnswlib, scann) are
imported inside the functions that need them.
"""
