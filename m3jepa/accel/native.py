"""Small C/C++ kernels built on first use with the system compiler and cached per source, flags and CPU.

Every kernel has an eager torch path that computes the same result; `build` returns None (and the
caller takes that path) when no compiler is found, the build fails, or M3JEPA_NATIVE=0.
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


def cache_dir() -> Path:
    """Where built libraries live: $M3JEPA_CACHE, else $XDG_CACHE_HOME/m3jepa, else ~/.cache/m3jepa."""
    if os.environ.get("M3JEPA_CACHE"):
        return Path(os.environ["M3JEPA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m3jepa"


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


def build(name: str, source: str, flags: list[str], lang: str = "c") -> ctypes.CDLL | None:
    """Compile `source` into a shared library once and load it; None when unavailable (callers fall back)."""
    if not enabled():
        return None
    key = hashlib.sha256("\n".join([source, lang, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{key}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            compiler = os.environ.get("CXX", "c++") if lang == "c++" else os.environ.get("CC", "cc")
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / f"{name}.so"
                cmd = [compiler, *flags, "-x", lang, "-", "-o", str(out)]
                subprocess.run(cmd, input=source.encode(), check=True, capture_output=True, timeout=300)
                os.replace(out, lib)  # atomic: a concurrent builder never loads a half-written file
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernel %s unavailable (%s); using the torch path (slower)", name, e)
        return None
