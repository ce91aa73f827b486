"""Damaged-file cases and the subprocess that runs them
(``tests/test_damaged_files.py``).

A case damages a saved index (a flipped byte, a truncation, or a prepared
crafted file) and loads and searches it.  The cases run in a child process
(``python fuzz_helpers.py CASES.json``) so a crash in a kernel fails the
test instead of killing pytest.  Protocol, one line each on stdout:
``START\\t<id>`` before a case, ``DONE\\t<id>\\t<outcome>\\t<detail>`` after it;
outcomes: ``rejected`` (load raised FormatError; detail: its message),
``same`` (loaded; every search returned the undamaged index's results),
``differs`` (loaded; some search returned other results) and ``error``
(another exception; detail: type and message).  A START without its DONE,
or a non-zero exit, is a crash at that case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

#: search calls compared with the undamaged index: (queries taken, parameters)
#: per kind; one query takes the fused kernels, 16 the staged ones
SEARCHES = {
    "flat": [(1, {}), (16, {}), (16, {"fs": 0})],
    "ivf": [(1, {}), (16, {}), (1, {"nprobe": 4}), (16, {"nprobe": 4, "fs": 0})],
    "hnsw": [(1, {}), (16, {}), (16, {"nav": "full"})],
}
K = 10


def region_of(entries, at, data_start):
    """The array whose bytes hold file offset ``at`` (None: prefix, header or padding)."""
    for name, e in entries.items():
        if e["offset"] <= at < e["offset"] + e["nbytes"]:
            return name
    return None


def _results(index, Q, kind):
    return [index.search(Q[:nq], K, num_threads=1, **params) for nq, params in SEARCHES[kind]]


def _same(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def run_cases(doc):
    """Run every case of ``doc`` (see ``write_cases``), reporting by the protocol."""
    import ipq_index

    Q = np.load(doc["queries"])
    refs, raw = {}, {}
    work = Path(doc["workdir"])
    for case in doc["cases"]:
        base = case["base"]  # the undamaged file
        if base not in refs:
            idx = ipq_index.load(base, mmap=False)
            refs[base] = _results(idx, Q, case["kind"])
            raw[base] = Path(base).read_bytes()
        print(f"START\t{case['id']}", flush=True)
        if case["op"] == "file":
            path = case["path"]
        else:
            data = bytearray(raw[base])
            if case["op"] == "flip":
                data[case["at"]] ^= case["mask"]
            elif case["op"] == "truncate":
                del data[case["size"]:]
            # a fresh file per case: a still-mapped earlier file keeps its own inode
            fd, path = tempfile.mkstemp(suffix=".ipq", dir=work)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            try:
                idx = ipq_index.load(path, mmap=case["mmap"], verify=case["verify"])
            except ipq_index.FormatError as e:
                outcome, detail = "rejected", str(e)
            else:
                got = _results(idx, Q, case["kind"])
                outcome, detail = ("same" if _same(got, refs[base]) else "differs"), ""
                del idx
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
            outcome, detail = "error", f"{type(e).__name__}: {e}"
        if case["op"] != "file":
            os.unlink(path)
        detail = detail.replace("\t", " ").replace("\n", " ")
        print(f"DONE\t{case['id']}\t{outcome}\t{detail}", flush=True)


def run_in_subprocess(doc, tmp_path, timeout=600):
    """Run the cases in a child process; returns ({id: (outcome, detail)},
    the id of the case it crashed or hung at or None, exit status, stderr tail)."""
    import ipq_index

    cases_path = Path(tmp_path) / f"cases_{os.getpid()}_{id(doc)}.json"
    cases_path.write_text(json.dumps(doc))
    env = dict(os.environ)
    root = str(Path(ipq_index.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(cases_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout


def collect(proc_timeout):
    """Wait for a child started by ``run_in_subprocess`` and parse its report."""
    proc, timeout = proc_timeout
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        hung = True
    results, started = {}, None
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == "START":
            started = parts[1]
        elif parts[0] == "DONE":
            results[parts[1]] = (parts[2], parts[3] if len(parts) > 3 else "")
            started = None
    crashed_at = started if (started is not None or proc.returncode != 0 or hung) else None
    status = "hung" if hung else proc.returncode
    return results, crashed_at, status, err[-3000:]


if __name__ == "__main__":
    run_cases(json.loads(Path(sys.argv[1]).read_text()))
