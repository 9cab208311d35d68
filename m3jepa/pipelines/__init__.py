"""The pipelines shipped inside the package (`m3jepa run tuxpaint`), and how a name or a path is resolved."""

from __future__ import annotations

from pathlib import Path

from m3jepa.config import ConfigError

# The TOML files sit beside this module and are package data (pyproject.toml), so a plain
# `pip install` has them; the repository's top-level `pipelines/` is a symbolic link to this folder.
SHIPPED_DIR = Path(__file__).resolve().parent


def shipped() -> dict[str, Path]:
    """Shipped pipeline name (the file's stem) -> its file, sorted by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.toml"))}


def resolve(name_or_path: str | Path) -> Path:
    """An existing file as given, else the shipped pipeline of that name (`tuxpaint` or `tuxpaint.toml`).

    A file wins over a shipped name, so a local copy made by `m3jepa pipelines copy` is what runs.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    files = shipped()
    if path.parent == Path(".") and _stem(path.name) in files:
        return files[_stem(path.name)]
    raise ConfigError(
        f"pipeline {name_or_path} is neither a file nor a shipped pipeline; pass a TOML file or one of "
        f"{', '.join(files)} (m3jepa pipelines list)"
    )


def shipped_file(name: str) -> Path:
    """The file of shipped pipeline `name` (`tuxpaint` or `tuxpaint.toml`)."""
    files = shipped()
    if _stem(name) not in files:
        raise ConfigError(f"no shipped pipeline {name!r}; shipped pipelines: {', '.join(files)}")
    return files[_stem(name)]


def _stem(name: str) -> str:
    return name[: -len(".toml")] if name.endswith(".toml") else name


def summary(path: Path) -> str:
    """The one-line description: the header's second line (line 1 is the command that runs the file)."""
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].startswith("# m3jepa run ") or not lines[1].startswith("# "):
        return ""
    return lines[1][2:].strip()


def copy(name: str, dest: str | Path, force: bool = False) -> Path:
    """Write shipped pipeline `name` to `dest` (a file, or a folder to put NAME.toml in); return the path."""
    source = shipped_file(name)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it")
    target.write_text(source.read_text())
    return target
