"""Saving files (``storage.save_arrays`` / ``index.save``) and reading specs
(``parse_spec`` / ``index_factory``): errors name what the user gave, files
get ordinary permissions, a failed save leaves nothing behind."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

import ipq_index
from ipq_index import storage

ARRAYS = {"a": np.arange(10, dtype=np.float32), "b": np.ones((3, 4), np.int64)}


@pytest.fixture(scope="module")
def index():
    X = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    idx = ipq_index.index_factory(8, "ASQ4n")
    idx.train(X, num_threads=1)
    idx.add(X, num_threads=1)
    return idx


@pytest.fixture
def umask():
    """``os.umask`` for one test; the process umask is restored afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


# --------------------------------------------------------------------------- spec strings


@pytest.mark.parametrize("spec", ["PCA,ASQ44", "ASQ0", "ASQ9", "ASQ0.0", "ROT,IVF4,ASQ8.5,Rerank2"])
def test_bits_out_of_range_name_the_spec(spec):
    for call in (lambda: ipq_index.parse_spec(spec), lambda: ipq_index.index_factory(8, spec)):
        with pytest.raises(ValueError) as e:
            call()
        assert repr(spec) in str(e.value) and "(0, 8]" in str(e.value)


@pytest.mark.parametrize("spec", ["ASQ8", "ASQ0.5", "PCA,ASQ4"])
def test_bits_in_range_are_accepted(spec):
    assert 0 < ipq_index.parse_spec(spec)["bits"] <= 8


@pytest.mark.parametrize("given, stored", [("PCA ,ASQ4", "PCA,ASQ4"),
                                           (" PCA , IVF4 ,ASQ4s , Rerank2 ", "PCA,IVF4,ASQ4s,Rerank2"),
                                           ("ASQ4\t", "ASQ4")])
def test_spaces_around_components_are_normalised(given, stored):
    assert ipq_index.index_factory(8, given).spec == stored
    assert ipq_index.parse_spec(given) == ipq_index.parse_spec(stored)


def test_saved_spec_is_the_normalised_one(tmp_path):
    X = np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)
    idx = ipq_index.index_factory(8, "PCA , ASQ4")
    idx.train(X, num_threads=1)
    idx.add(X, num_threads=1)
    idx.save(tmp_path / "x.ipq")
    assert ipq_index.load(tmp_path / "x.ipq").spec == "PCA,ASQ4"


# --------------------------------------------------------------------------- file mode


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_saved_file_mode_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "x.ipq"
    storage.save_arrays(path, {"k": 1}, ARRAYS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what an ordinary new file gets
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_saving_over_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "x.ipq"
    path.write_bytes(b"old")
    path.chmod(0o640)
    storage.save_arrays(path, {"k": 1}, ARRAYS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert storage.load_arrays(path)[0] == {"k": 1}


def test_index_save_mode(index, tmp_path, umask):
    umask(0o022)
    index.save(tmp_path / "i.ipq")
    assert stat.S_IMODE((tmp_path / "i.ipq").stat().st_mode) == 0o644


# --------------------------------------------------------------------------- bad paths


def test_save_into_a_missing_directory_names_it(index, tmp_path):
    target = tmp_path / "missing" / "deeper" / "x.ipq"
    with pytest.raises(FileNotFoundError) as e:
        index.save(target)
    msg = str(e.value)
    assert str(target) in msg and str(target.parent) in msg
    assert ".tmp" not in msg
    assert e.value.errno == errno.ENOENT
    assert not (tmp_path / "missing").exists()


def test_save_into_a_file_used_as_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    target = tmp_path / "f" / "x.ipq"
    with pytest.raises(OSError) as e:
        storage.save_arrays(target, {}, ARRAYS)
    assert str(target) in str(e.value) and ".tmp" not in str(e.value)


def test_empty_save_path(index):
    with pytest.raises(ValueError, match="empty"):
        index.save("")
    with pytest.raises(ValueError, match="empty"):
        storage.save_arrays("", {}, ARRAYS)


def test_save_onto_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        storage.save_arrays(tmp_path, {}, ARRAYS)
    assert str(tmp_path) in str(e.value) and ".tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- failed saves


def test_failed_save_reports_the_real_error_and_removes_its_temp_file(tmp_path, monkeypatch):
    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(storage.os, "replace", full_disk)
    with pytest.raises(OSError) as e:
        storage.save_arrays(tmp_path / "x.ipq", {}, ARRAYS)
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_failed_cleanup_does_not_mask_the_real_error(tmp_path, monkeypatch):
    removed = []
    real_unlink = os.unlink

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    def unlink_fails_once(p, *args, **kwargs):
        removed.append(str(p))
        if len(removed) == 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(storage.os, "replace", full_disk)
    monkeypatch.setattr(storage.os, "unlink", unlink_fails_once)
    monkeypatch.setattr(storage.os, "remove", unlink_fails_once)
    with pytest.raises(OSError) as e:
        storage.save_arrays(tmp_path / "x.ipq", {}, ARRAYS)
    assert e.value.errno == errno.ENOSPC, e.value
    assert removed and removed[0].endswith(".tmp")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.save_arrays(tmp_path / "x.ipq", {}, ARRAYS)
    assert list(tmp_path.iterdir()) == []


def test_successful_save_round_trips(tmp_path):
    path = tmp_path / "x.ipq"
    storage.save_arrays(path, {"k": 1}, ARRAYS)
    meta, arrays = storage.load_arrays(path)
    assert meta == {"k": 1}
    for name, a in ARRAYS.items():
        np.testing.assert_array_equal(arrays[name], a)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ipq"]
