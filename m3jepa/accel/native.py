"""Small C/C++ kernels built on first use with the system compiler, cached per source, flags and CPU.

Every kernel has an eager torch path that computes the same result; `build` returns None (and the
caller takes that path) when no compiler is found, the build fails, M3JEPA_NATIVE=0, or the cache is not
safe to load code from. ctypes runs whatever library it loads, so the cache folder must be the current
user's and writable by no one else (it is created 0700), each library must be the user's, not writable by
group or others, and match the sha256 recorded beside it (`NAME.so.sha256`) when it was built.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from m3jepa.files import (
    cache_dir,
    make_private_dir,
    matches_record,
    sha256_file,
    sha256_record,
    why_untrusted,
)

log = logging.getLogger(__name__)

# bf16 <-> float32 for the C++ kernels that read or write bf16 tensors (prepended to their sources).
BF16_CXX = r"""
#include <cstdint>
#include <cstring>

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u; std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(r);  // NaN stays NaN
}
"""


def enabled() -> bool:
    """False when M3JEPA_NATIVE=0: every caller then uses its torch path."""
    return os.environ.get("M3JEPA_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    # -march=native code must not be loaded on another CPU (a shared home directory): key on its flags
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((ln for ln in info.splitlines() if ln.startswith("flags")), info[:4096])


def library_path(name: str, source: str, flags: list[str], lang: str = "c") -> Path:
    """Where `build` keeps this kernel: keyed on source, language, flags and the CPU's flags."""
    key = hashlib.sha256("\n".join([source, lang, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


def build(
    name: str, source: str, flags: list[str], lang: str = "c", symbols: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """Compile `source` into a shared library once and load it; None when unavailable (callers fall back).

    `symbols`: the functions the caller will look up; a loaded library that lacks one was not built from
    `source` (a planted file with a forged record): it is refused and removed, and the torch path runs.
    """
    if not enabled():
        return None
    lib = library_path(name, source, flags, lang)
    try:
        make_private_dir(lib.parent)
        if (why := _untrusted(lib.parent, "folder")) is not None:
            return _refuse(name, why)
        if not (lib.exists() or lib.is_symlink()):
            _compile(lib, source, flags, lang)
        elif (why := _untrusted(lib, "library")) is not None:
            return _refuse(name, why)
        elif not matches_record(lib):
            record = sha256_record(lib)
            why = f"does not match the sha256 in {record}" if record.exists() else "has no sha256 record"
            log.warning("native kernel %s refused: it %s; rebuilding it", lib, why)
            _compile(lib, source, flags, lang)
        # No check between here and the load can be raced: the folder is ours and no one else can write it.
        loaded = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernel %s unavailable (%s); using the torch path (slower)", name, e)
        return None
    missing = [s for s in symbols if not hasattr(loaded, s)]
    if missing:
        # Loaded already, so it cannot be rebuilt and loaded again in this process (dlopen keeps the
        # first library of a name): removed, so the next process builds it.
        for path in (lib, sha256_record(lib)):
            path.unlink(missing_ok=True)
        return _refuse(name, f"the kernel library {lib} lacks the function {missing[0]}, so it was not built "
                             "from this source; removed it, the next run rebuilds it")
    return loaded


def _untrusted(path: Path, what: str) -> str | None:
    """Why `path` must not be trusted (one line naming it and the fix), or None when it is safe."""
    return why_untrusted(path, f"the kernel {what}", folder=what == "folder")


def _refuse(name: str, why: str) -> None:
    log.warning("native kernel %s refused: %s; using the torch path (slower)", name, why)
    return None


def _compile(lib: Path, source: str, flags: list[str], lang: str) -> None:
    """Build `lib` and its sha256 record, each moved into place whole (no one loads half a file)."""
    compiler = os.environ.get("CXX", "c++") if lang == "c++" else os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # 0700, inside the checked folder
        out = Path(tmp) / lib.name
        cmd = [compiler, *flags, "-x", lang, "-", "-o", str(out)]
        subprocess.run(cmd, input=source.encode(), check=True, capture_output=True, timeout=300)
        os.chmod(out, 0o700)
        record = Path(tmp) / "sha256"
        record.write_text(sha256_file(out) + "\n")
        os.replace(record, sha256_record(lib))  # the record first: a reader between the two sees a mismatch
        os.replace(out, lib)
