"""ann-benchmarks integration: the wrapper class :class:`IpqIndex` lives in
``module.py`` because ann-benchmarks imports ``<module>.module`` for the
``module`` named in a ``config.yml``; ``config.yml`` here is a ready-made
definition file naming ``module: ipq_index.bench.ann_benchmarks`` (see
docs/ann_benchmarks.md).

Importing this package does not import ann-benchmarks; ``module.py`` subclasses
its ``BaseANN`` only when ann-benchmarks is importable.
"""
