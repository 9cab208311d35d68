"""Run-time compiled kernels are loaded only from a private cache, owned by us and as they were built."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from m3jepa.accel import native
from m3jepa.accel.search import exact_ranks
from m3jepa.accel.search import native as search_native

TINY = "int add1(int x) { return x + 1; }\n"
FLAGS = ["-O1", "-shared", "-fPIC"]
OTHER_UID = 65534  # nobody


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh $M3JEPA_CACHE, and the search kernels forgotten so that they load from it."""
    path = tmp_path / "cache"
    monkeypatch.setenv("M3JEPA_CACHE", str(path))
    monkeypatch.setenv("M3JEPA_NATIVE", "1")
    monkeypatch.setattr(search_native, "_KERNEL", None)
    return path


def _tiny(cache: Path) -> Path:
    lib = native.build("tiny", TINY, FLAGS)
    if lib is None:
        pytest.skip("no C compiler")
    assert lib.add1(41) == 42
    return native.library_path("tiny", TINY, FLAGS)


def _reference_ranks(q: np.ndarray, g: np.ndarray, q_codes: np.ndarray, g_codes: np.ndarray, k: int):
    """Rank of each query's best correct item in a stable float64 argsort (independent of the search)."""
    scores = q.astype(np.float64) @ g.astype(np.float64).T  # (Q, G)
    out = []
    for i in range(len(q)):
        hits = np.flatnonzero(g_codes[np.argsort(-scores[i], kind="stable")] == q_codes[i])
        out.append(min(int(hits[0]), k))
    return np.array(out)


def _search_is_right(native_expected: bool) -> None:
    """exact_ranks on a small problem: the right ranks, from the kernels or from the torch path."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((120, 16)).astype(np.float32)
    q = g[rng.integers(0, 120, 60)] + 0.8 * rng.standard_normal((60, 16)).astype(np.float32)
    q_codes, g_codes = rng.integers(0, 120, 60), np.arange(120)
    got = exact_ranks(q, g, q_codes, g_codes, 10, both=False)
    np.testing.assert_array_equal(got.rows, _reference_ranks(q, g, q_codes, g_codes, 10))
    assert got.stats["native"] == int(native_expected)


def _one_refusal(caplog, kernel: str, path: Path, fix: str) -> str:
    """The one log line refusing `kernel`: it names the path, the fix and the fallback."""
    lines = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    lines = [ln for ln in lines if ln.startswith(f"native kernel {kernel} refused")]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and fix in lines[0] and "torch path" in lines[0], lines[0]
    return lines[0]


def test_the_cache_folder_is_created_private_with_a_sha256_record(cache: Path) -> None:
    lib = _tiny(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    record = lib.with_name(lib.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


def test_a_world_writable_cache_folder_is_refused(cache: Path, caplog) -> None:
    cache.mkdir()
    os.chmod(cache, 0o777)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.build("tiny", TINY, FLAGS) is None
        _search_is_right(native_expected=False)  # the torch path, the same ranks
    assert "writable by group or others" in _one_refusal(caplog, "tiny", cache, f"chmod 700 {cache}")
    assert _one_refusal(caplog, "search_kernels", cache, f"chmod 700 {cache}")
    assert list(cache.iterdir()) == []  # nothing was built in it either


def test_a_cache_folder_owned_by_another_user_is_refused(cache: Path, caplog) -> None:
    cache.mkdir(mode=0o700)
    os.chown(cache, OTHER_UID, -1)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.build("tiny", TINY, FLAGS) is None
    assert f"owned by uid {OTHER_UID}" in _one_refusal(caplog, "tiny", cache, "M3JEPA_CACHE")


def test_a_library_owned_by_another_user_is_refused(cache: Path, caplog) -> None:
    if search_native.load() is None:
        pytest.skip("no C compiler")
    _search_is_right(native_expected=True)
    lib = native.library_path("search_kernels", search_native.C_SOURCE, search_native.FLAGS)
    os.chown(lib, OTHER_UID, -1)  # the bytes are still the ones recorded: only the owner is wrong
    search_native._KERNEL = None  # a new process: load from the cache again
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert search_native.load() is None
        _search_is_right(native_expected=False)
    assert f"owned by uid {OTHER_UID}" in _one_refusal(caplog, "search_kernels", lib, f"rm {lib}")


def test_a_group_writable_library_is_refused(cache: Path, caplog) -> None:
    lib = _tiny(cache)
    os.chmod(lib, 0o775)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.build("tiny", TINY, FLAGS) is None
    assert "writable by group or others" in _one_refusal(caplog, "tiny", lib, f"rm {lib}")


def test_a_symlinked_library_is_refused(cache: Path, tmp_path: Path, caplog) -> None:
    lib = _tiny(cache)
    elsewhere = tmp_path / "elsewhere.so"
    lib.rename(elsewhere)
    lib.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.build("tiny", TINY, FLAGS) is None
    assert "symbolic link" in _one_refusal(caplog, "tiny", lib, f"rm {lib}")


def test_a_library_changed_after_its_build_is_refused_and_rebuilt(cache: Path, caplog) -> None:
    if search_native.load() is None:
        pytest.skip("no C compiler")
    lib = native.library_path("search_kernels", search_native.C_SOURCE, search_native.FLAGS)
    built = lib.read_bytes()
    changed = bytearray(built)
    changed[len(changed) // 2] ^= 0xFF  # one flipped byte in the code
    # A new file moved over it: this process has the library mapped, and bytes changed under a mapping
    # would change the code it runs (a segfault, not the case under test).
    swap = lib.with_name("changed.so")
    swap.write_bytes(bytes(changed))
    os.replace(swap, lib)
    search_native._KERNEL = None
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert search_native.load() is not None  # rebuilt, then loaded
        _search_is_right(native_expected=True)
    lines = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(lines) == 1 and str(lib) in lines[0] and "does not match the sha256" in lines[0], lines
    assert "rebuilding" in lines[0]
    assert lib.read_bytes() != bytes(changed)  # the changed bytes were replaced, never loaded


def test_a_library_without_a_record_is_rebuilt(cache: Path, caplog) -> None:
    lib = _tiny(cache)
    lib.with_name(lib.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.build("tiny", TINY, FLAGS).add1(1) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("has no sha256 record" in ln and str(lib) in ln for ln in lines), lines


def test_a_planted_library_with_a_forged_record_is_one_warning_not_a_traceback(cache: Path, caplog) -> None:
    """Someone with the user's rights plants another library at the search kernels' path and writes its
    sha256 as the record: loading it is within the threat model (docs/architecture.md), but what follows
    is one warning, the torch path with the right ranks, and a rebuild in the next process."""
    tiny = _tiny(cache)
    lib = native.library_path("search_kernels", search_native.C_SOURCE, search_native.FLAGS)
    planted = lib.with_name("planted.so")
    planted.write_bytes(tiny.read_bytes())  # a real library, without the search functions
    os.chmod(planted, 0o700)
    os.replace(planted, lib)
    lib.with_name(lib.name + ".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest() + "\n")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert search_native.load() is None
        _search_is_right(native_expected=False)
    line = _one_refusal(caplog, "search_kernels", lib, "the next run rebuilds it")
    assert "lacks the function prepare_rows" in line
    assert not lib.exists() and not lib.with_name(lib.name + ".sha256").exists()
