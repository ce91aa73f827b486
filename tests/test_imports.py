"""``import ipq_index`` (and ``import ipq_index.cli``) stays off the benchmark harness
and its third-party dependencies; checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: Top-level modules the core import path must not load.
HEAVY = ("h5py", "yaml", "matplotlib", "tqdm", "faiss", "hnswlib", "scann", "ann_benchmarks", "dask", "distributed",
         "fsspec")
#: Our own modules the core import path must not load (the harness, incl. the adapter).
HARNESS = "ipq_index.bench"

# Records, for each first import of a HEAVY module, the module that imported it: a
# meta-path finder is asked about every import not yet in sys.modules; it walks the
# stack to the first frame outside importlib.
PROBE = textwrap.dedent("""
    import json, sys

    HEAVY = set({heavy!r})
    importers = {{}}

    class Recorder:
        def find_spec(self, fullname, path=None, target=None):
            top = fullname.partition(".")[0]
            if top in HEAVY and top not in importers:
                f = sys._getframe(1)
                while f is not None and f.f_code.co_filename.startswith("<frozen importlib"):
                    f = f.f_back
                importers[top] = f.f_globals.get("__name__", "?") if f is not None else "?"
            return None

    sys.meta_path.insert(0, Recorder())
""")
REPORT = textwrap.dedent("""
    loaded = sorted(m for m in sys.modules
                    if m.partition(".")[0] in HEAVY or m == {harness!r} or m.startswith({harness!r} + "."))
    print(json.dumps({{"loaded": loaded, "importers": importers}}))
""")


def probe(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return the HEAVY / harness modules it
    loaded and, per HEAVY top-level module, the module that first imported it."""
    src = PROBE.format(heavy=HEAVY) + textwrap.dedent(code) + REPORT.format(harness=HARNESS)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", ["ipq_index", "ipq_index.cli"])
def test_core_import_loads_no_harness_or_heavy_dependency(target):
    got = probe(f"import {target}")
    importers = dict(got["importers"])
    # numba.core.config does `try: import yaml` (optional .numba_config.yaml support), so
    # yaml arrives with numba whenever PyYAML is installed; only that importer is allowed
    if importers.get("yaml", "").startswith("numba."):
        del importers["yaml"]
    assert importers == {}, f"import {target}: {importers} (module -> importer)"
    allowed_yaml = "yaml" in got["importers"] and "yaml" not in importers
    loaded = [m for m in got["loaded"] if not (allowed_yaml and m.partition(".")[0] == "yaml")]
    assert loaded == [], f"import {target} loaded {loaded}"


def test_probe_attributes_imports_to_the_importing_module():
    """The recorder names the module that made an import (so the check above can fail)."""
    got = probe("""
        import ipq_index.bench.datasets as d
        try:
            d.read_hdf5("/nonexistent/x.hdf5")  # imports h5py, then fails
        except FileNotFoundError:
            pass
    """)
    assert got["importers"]["h5py"] == "ipq_index.bench.datasets"
    assert "ipq_index.bench.datasets" in got["loaded"] and "h5py" in got["loaded"]
