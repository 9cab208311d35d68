"""Shared test fixtures: the real Tux Paint stamps, read in place (never copied into the repo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="session")
def tuxpaint_root() -> Path:
    """The system stamp folder; tests that need it are skipped where it is not installed."""
    if not TUXPAINT_ROOT.is_dir():
        pytest.skip("needs `apt-get install tuxpaint-stamps-default`")
    return TUXPAINT_ROOT


@pytest.fixture(scope="session")
def real_pngs(tuxpaint_root: Path) -> list[Path]:
    """Eight real stamp PNGs, in a fixed order."""
    return sorted(tuxpaint_root.glob("animals/mammals/*.png"))[:8]


@pytest.fixture
def copy_png(real_pngs: list[Path]):
    """copy_png(dest, k): copy the k-th real PNG to dest (parents created) and return dest."""

    def _copy(dest: Path, k: int = 0) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_pngs[k % len(real_pngs)], dest)
        return dest

    return _copy
