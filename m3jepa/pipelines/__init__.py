"""The pipelines shipped inside the package (`m3jepa run tuxpaint`), and how a name or a path is resolved."""

from __future__ import annotations

import re
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
    """Write shipped pipeline `name` to `dest` (a file, or a folder to put NAME.toml in); return the path.

    The copy is renamed after its file: `name = "<file stem>"`, so `m3jepa run my.toml` trains runs/my,
    never the shipped pipeline's runs/<name>; its first line becomes the command that runs it.
    """
    source = shipped_file(name)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it")
    target.write_text(renamed(source.read_text(), _stem(target.name), str(target)))
    return target


_NAME = re.compile(r'^name = "[^"\n]*"$', re.MULTILINE)


def renamed(text: str, name: str, path: str) -> str:
    """A pipeline's TOML with its top-level `name` set to `name` and its header command to `m3jepa run
    PATH`; every other line as it was (comments included)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{name!r} cannot name a run folder; copy to a file named like my_run.toml")
    text = _NAME.sub(f'name = "{name}"', text, count=1)
    head = "# m3jepa run "
    if text.startswith(head):  # "# m3jepa run tuxpaint [--set ...]": the pipeline's own name becomes PATH
        first, _, rest = text.partition("\n")
        args = first[len(head):].split(" ", 1)
        text = head + " ".join([path, *args[1:]]) + "\n" + rest
    return text
