"""``ipq datasets list`` and ``ipq datasets fetch``: the shipped samples and
the ann-benchmarks data sets, downloaded atomically (nothing left behind on
failure)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .cli import _command, _human, _Parser, _progress

DEFAULT_BASE_URL = "http://ann-benchmarks.com"

#: ann-benchmarks datasets (name, dim, train, test, metric as stored, download size).
KNOWN_DATASETS = [
    ("lastfm-64-dot", 65, 292_385, 50_000, "angular (MIPS via augmentation)", "135 MB"),
    ("glove-25-angular", 25, 1_183_514, 10_000, "angular", "121 MB"),
    ("glove-50-angular", 50, 1_183_514, 10_000, "angular", "235 MB"),
    ("glove-100-angular", 100, 1_183_514, 10_000, "angular", "463 MB"),
    ("glove-200-angular", 200, 1_183_514, 10_000, "angular", "918 MB"),
    ("nytimes-256-angular", 256, 290_000, 10_000, "angular", "301 MB"),
    ("nytimes-16-angular", 16, 290_000, 10_000, "angular", ""),
    ("deep-image-96-angular", 96, 9_990_000, 10_000, "angular", "3.6 GB"),
    ("coco-i2i-512-angular", 512, 113_287, 10_000, "angular", "136 MB"),
    ("coco-t2i-512-angular", 512, 113_287, 10_000, "angular", "136 MB"),
    ("fashion-mnist-784-euclidean", 784, 60_000, 10_000, "euclidean (not MIPS)", "217 MB"),
    ("sift-128-euclidean", 128, 1_000_000, 10_000, "euclidean (not MIPS)", "501 MB"),
]

_SAMPLE_INFO = {
    "minilm": "raw paraphrase-MiniLM-L3-v2 embeddings of PyPI package summaries (inner product)",
    "glove50": "GloVe 6B 50-d word vectors with natural norms (inner product)",
}


def _npz_shapes(path: Path) -> dict:
    """Array shapes in an .npz, read from the member headers only."""
    import zipfile

    shapes = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            shapes[info.filename[:-4]] = shape
    return shapes


def cmd_datasets_list(args, extra=None) -> int:
    from .bench import datasets

    print("shipped samples (use as DATA / QUERIES / dataset: sample:<name>):")
    for name in datasets.SAMPLES:
        p = datasets.sample_path(name)
        try:
            sh = _npz_shapes(p)
            size = f"train {sh['train'][0]} x {sh['train'][1]}, test {sh['test'][0]}"
        except (OSError, KeyError, ValueError):
            size = "missing"
        print(f"  sample:{name:<10} {size:<32} {_SAMPLE_INFO.get(name, '')}")
    print(f"\nann-benchmarks datasets (ipq datasets fetch NAME; from {DEFAULT_BASE_URL}/NAME.hdf5):")
    print(f"  {'name':<28} {'dim':>4} {'train':>10} {'test':>7}  {'size':>7}  metric")
    for name, dim, ntr, nte, metric, size in KNOWN_DATASETS:
        print(f"  {name:<28} {dim:>4} {ntr:>10,} {nte:>7,}  {size:>7}  {metric}")
    print("  (angular sets are searched as inner product on normalised vectors; only true-MIPS data "
          "exercises raw inner products)")
    d = Path(args.dir)
    local = sorted(d.glob("*.hdf5")) if d.is_dir() else []
    if local:
        print(f"\nlocal files in {d}/:")
        for p in local:
            print(f"  {p.name:<44} {_human(p.stat().st_size)}")
    return 0


def cmd_datasets_fetch(args, extra=None) -> int:
    name = args.name[:-5] if args.name.endswith(".hdf5") else args.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"bad dataset name {args.name!r} (letters, digits, '.', '_', '-')")
    unknown = "" if name in {k[0] for k in KNOWN_DATASETS} else \
        f" ({name!r} is not among the names in 'ipq datasets list')"
    url = f"{args.base_url.rstrip('/')}/{name}.hdf5"
    dest_dir = Path(args.dir)
    dest = dest_dir / f"{name}.hdf5"
    if dest.exists() and not args.force:
        print(f"{dest} already exists ({_human(dest.stat().st_size)}); use --force to download again")
        return 0
    created = _make_dirs(dest_dir)
    try:
        _download(args, name, url, dest, unknown)
    except BaseException:
        _remove_dirs(created)
        raise
    print(f"wrote {dest} ({_human(dest.stat().st_size)})")
    return 0


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest first."""
    missing = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _remove_dirs(missing)
        raise
    return missing


def _remove_dirs(dirs: list[Path]) -> None:
    """Remove the (empty) directories ``_make_dirs`` created, deepest first;
    stops at the first one that cannot go (it holds something)."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break


def _download(args, name: str, url: str, dest: Path, unknown: str) -> None:
    """Download ``url`` into a temporary file next to ``dest``, check it is
    HDF5, and rename it to ``dest``; nothing is left behind on failure."""
    import socket
    import tempfile
    import urllib.error
    import urllib.request

    dest_dir = dest.parent
    hint = f"download {url} on a machine with internet access and copy it to {dest}"
    try:
        resp = urllib.request.urlopen(url, timeout=args.timeout)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"cannot download {url}: HTTP {e.code} {e.reason}{unknown}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach {url} ({reason}); {hint}") from None
    from .storage import new_file_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    try:
        os.chmod(tmp, new_file_mode(dest))  # mkstemp's 0o600 would hide the data from other users
        total = int(resp.headers.get("Content-Length") or 0) or None
        written = 0
        with os.fdopen(fd, "wb") as f, _progress(args, total, name, "B", unit_divisor=1024) as bar:
            while True:
                try:
                    chunk = resp.read(1 << 20)
                except (socket.timeout, OSError) as e:
                    raise RuntimeError(f"download of {url} interrupted ({e}); {hint}") from None
                if not chunk:
                    break
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        resp.close()
        if total is not None and written != total:
            raise RuntimeError(f"download of {url} is incomplete ({written} of {total} bytes); {hint}")
        import h5py

        if not h5py.is_hdf5(tmp):
            raise RuntimeError(f"{url} did not return an HDF5 file ({written} bytes)")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def add_datasets(sub, common) -> None:
    p = sub.add_parser("datasets", parents=[common], help="list or download datasets",
                       description="Shipped samples and ann-benchmarks datasets.")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    q = _command(dsub, common, "list", cmd_datasets_list, help="list samples and known datasets")
    q.add_argument("--dir", default="data", help="also list *.hdf5 files here (default %(default)s)")
    q = _command(dsub, common, "fetch", cmd_datasets_fetch, help="download an ann-benchmarks dataset")
    q.add_argument("name", metavar="NAME", help="e.g. glove-100-angular")
    q.add_argument("--dir", default="data", help="destination directory (default %(default)s)")
    q.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server (default %(default)s)")
    q.add_argument("--timeout", type=float, default=30.0, help="network timeout in s (default %(default)s)")
    q.add_argument("--force", action="store_true", help="download even if the file exists")
