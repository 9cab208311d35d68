"""SVG images rendered to PNG once by librsvg's rsvg-convert, cached under a hash of their bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from m3jepa.data.records import BadItemError, DatasetError

RENDERER = "rsvg-convert"
RENDER_TIMEOUT_S = 60
INSTALL_HINT = "install it with `apt-get install librsvg2-bin` (scripts/setup.sh does)"


def cache_root() -> Path:
    """Where rendered PNGs go: `$XDG_CACHE_HOME/m3jepa/svg` (default ~/.cache), never the repo."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m3jepa" / "svg"


def renderer() -> str:
    """The rsvg-convert executable; DatasetError saying how to install it when it is missing."""
    exe = shutil.which(RENDERER)
    if exe is None:
        raise DatasetError(f"SVG images need {RENDERER}, which is not on PATH; {INSTALL_HINT}")
    return exe


def cached_png(data: bytes, size: int, cache: Path) -> Path:
    """The cache file of an SVG's bytes at `size`: another SVG (or size) gives another file."""
    key = hashlib.sha256(data + f"\x00{RENDERER}\x00{size}".encode()).hexdigest()
    return cache / key[:2] / f"{key}.png"


def render_svg(svg: str | Path, size: int, *, item: str | None = None, cache: Path | None = None) -> Path:
    """A PNG of `svg` fitted into size x size pixels (aspect kept, transparent background), made once.

    The file is keyed by the SVG's bytes, so a changed SVG is rendered again and an unchanged one never
    is. A file rsvg-convert cannot render is a BadItemError naming `item`.
    """
    item = item or str(svg)
    try:
        data = Path(svg).read_bytes()
    except OSError as e:
        raise BadItemError(item, f"SVG file {svg} is unreadable: {e.strerror or e}") from None
    out = cached_png(data, size, cache or cache_root())
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.{id(out)}.tmp")  # concurrent loaders never see a partial file
    cmd = [renderer(), "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
           "--format", "png", "--output", str(tmp), str(svg)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise BadItemError(item, f"SVG {svg} took over {RENDER_TIMEOUT_S} s to render") from None
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise BadItemError(item, f"SVG {svg} cannot be rendered: {reason}")
    os.replace(tmp, out)
    return out


def render_many(
    svgs: Sequence[tuple[str, Path]], size: int, *, cache: Path | None = None
) -> dict[str, Path | BadItemError]:
    """item → its PNG (or the BadItemError that refused it), rendering the uncached ones in parallel."""
    renderer()  # a missing renderer is one clear error, not one per file
    workers = max(1, min(8, os.cpu_count() or 1))

    def one(pair: tuple[str, Path]) -> Path | BadItemError:
        try:
            return render_svg(pair[1], size, item=pair[0], cache=cache)
        except BadItemError as e:
            return e

    # rsvg-convert runs as a subprocess, so threads render in parallel without holding the GIL
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((name for name, _ in svgs), pool.map(one, svgs), strict=True))
