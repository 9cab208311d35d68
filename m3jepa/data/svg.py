"""SVG images rendered to PNG once by librsvg's rsvg-convert, cached under a hash of everything they read.

A render reads the SVG and the files it references (`<image href="pic.png">`, `<use href="b.svg#x">`,
style sheets); librsvg loads only files in the SVG's folder or below it. So that the cache key covers
exactly what the render read, each render runs in a private folder holding copies of the SVG and of the
files it references (found by parsing it, `references`): an edited raster is a new key, and nothing the
parser did not find can reach the render. The cache folder follows the kernel cache's rules
(m3jepa.files: the user's, mode 0700, each PNG the user's, no link and writable by no one else). Unlike
a kernel library, which is executed and so is also checked against a sha256 recorded at build time, a
PNG is only decoded (m3jepa.data.media checks it), and re-hashing every cached render cost more than the
load itself (docs/datasets.md).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

from m3jepa.data.records import BadItemError, DatasetError
from m3jepa.files import cache_dir, make_private_dir, why_untrusted

log = logging.getLogger(__name__)

RENDERER = "rsvg-convert"
RENDER_TIMEOUT_S = 60
INSTALL_HINT = "install it with `apt-get install librsvg2-bin` (scripts/setup.sh does)"
KEY_VERSION = "m3jepa-svg-2"  # bump when what the key covers changes
# What one render may read: an SVG referencing more is refused (a dataset's drawings reference a few).
MAX_REFERENCES = 256
MAX_INPUT_BYTES = 64 * 2**20

# `m3jepa encode --force` renders again even what the cache holds (set through get_dataset's rerender).
_FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("m3jepa_svg_force", default=False)
_WARNED: set[Path] = set()  # cache folders already refused in this process (one warning each)


@contextlib.contextmanager
def rerendering(force: bool = True) -> Iterator[None]:
    """Within the block, every SVG is rendered again and its cached PNG replaced (when `force`)."""
    token = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(token)


def cache_root() -> Path:
    """Where rendered PNGs go: `svg/` in m3jepa's cache (m3jepa.files.cache_dir), never the repo."""
    return cache_dir() / "svg"


def renderer() -> str:
    """The rsvg-convert executable; DatasetError saying how to install it when it is missing."""
    exe = shutil.which(RENDERER)
    if exe is None:
        raise DatasetError(f"SVG images need {RENDERER}, which is not on PATH; {INSTALL_HINT}")
    return exe


@functools.cache
def renderer_version(exe: str) -> str:
    """`rsvg-convert --version`: another librsvg may draw the same SVG differently, so it is in the key."""
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise DatasetError(f"{exe} --version failed ({e}); {INSTALL_HINT}") from None
    return done.stdout.strip()


# ---------------------------------------------------------------- what a render reads

_CSS_URL = re.compile(r"""url\(\s*(['"]?)([^'")]+)\1\s*\)""")
_CSS_IMPORT = re.compile(r"""@import\s+(['"])([^'"]+)\1""")
_PI_HREF = re.compile(r"""href\s*=\s*(['"])([^'"]+)\1""")


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]  # "{http://www.w3.org/1999/xlink}href" -> "href"


def _urls_in_css(text: str) -> list[str]:
    return [m.group(2) for m in _CSS_URL.finditer(text)] + [m.group(2) for m in _CSS_IMPORT.finditer(text)]


def _urls_in_xml(data: bytes) -> list[str]:
    """Every URL an SVG (or an XML file it includes) names: href attributes (xlink or plain, any element:
    image, use, feImage, xi:include, …), url(…) in attributes and <style>, xml-stylesheet instructions.

    expat refuses entity expansion bombs and ElementTree resolves no external entity, so parsing a
    hostile file is bounded; a file that does not parse names nothing (rsvg-convert refuses it too).
    """
    urls: list[str] = []
    parser = ElementTree.XMLPullParser(events=("end", "pi"))
    try:
        parser.feed(data)
        parser.close()
    except ElementTree.ParseError:
        pass  # the events read before the error still count
    for event, node in parser.read_events():
        if event == "pi":
            if (node.text or "").startswith("xml-stylesheet"):
                urls += [m.group(2) for m in _PI_HREF.finditer(node.text)]
            continue
        for name, value in node.attrib.items():
            if _local(name) == "href":
                urls.append(value)
            elif "url(" in value:
                urls += _urls_in_css(value)
        if _local(node.tag) == "style" and node.text:
            urls += _urls_in_css(node.text)
        node.clear()  # keep memory flat on large files
    return urls


def _target(url: str, referrer: PurePosixPath) -> PurePosixPath | None:
    """The file `url` names, relative to the SVG's folder; None for fragments, data: and other schemes,
    and for files outside the folder (librsvg refuses those: a file must be in the SVG's folder or below)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("", "file") or not parts.path or parts.netloc:
        return None  # "#id" (same document), data: (inline), http: (librsvg loads no network resource)
    path = unquote(parts.path)
    if path.startswith("/"):
        return None  # an absolute file:///… is outside any folder the renders copy
    joined = os.path.normpath(str(referrer.parent / path))
    if joined == ".." or joined.startswith("../") or os.path.isabs(joined):
        return None
    return PurePosixPath(joined)


# Every way an SVG names another file contains one of these (CSS's url( in any case). Skipping the parse
# without them is safe even if one hides behind a character reference: a render reads only the copies of
# what was found, so a reference missed is drawn as missing, never read from the disk.
_REFERRING = (b"href", b"url(", b"@import", b"stylesheet")


def _may_refer(data: bytes) -> bool:
    lowered = data.lower()
    return any(token in lowered for token in _REFERRING)


def references(svg: Path, data: bytes) -> dict[PurePosixPath, bytes | None]:
    """Each file a render of `svg` may read besides the SVG (path relative to its folder) → its bytes, or
    None when it is missing (librsvg then draws nothing there; the key still says so, so a file appearing
    later renders anew). Referenced SVG/XML files are followed; links are resolved and must stay inside."""
    found: dict[PurePosixPath, bytes | None] = {}
    if not _may_refer(data):
        return found  # most SVGs (all but 2 of OpenMoji's) name no file: no parse needed
    folder = svg.parent.resolve()
    queue = [(PurePosixPath(svg.name), data)]
    total = len(data)
    while queue:
        referrer, content = queue.pop()
        is_css = referrer.suffix.lower() == ".css"
        urls = _urls_in_css(content.decode("utf-8", "replace")) if is_css else _urls_in_xml(content)
        for url in urls:
            rel = _target(url, referrer)
            if rel is None or rel in found or rel == PurePosixPath(svg.name):
                continue
            if len(found) >= MAX_REFERENCES:
                raise BadItemError(str(svg), f"SVG {svg} references over {MAX_REFERENCES} files; render it "
                                             "yourself (rsvg-convert) and use the PNG")
            real = (folder / rel).resolve()
            if not real.is_relative_to(folder) or not real.is_file():
                found[rel] = None  # outside (librsvg refuses it) or missing: nothing is read
                continue
            found[rel] = body = real.read_bytes()
            total += len(body)
            if total > MAX_INPUT_BYTES:
                raise BadItemError(str(svg), f"SVG {svg} and the files it references exceed "
                                             f"{MAX_INPUT_BYTES // 2**20} MiB")
            if body.lstrip()[:1] == b"<" or rel.suffix.lower() == ".css":
                queue.append((rel, body))
    return found


def render_key(data: bytes, refs: dict[PurePosixPath, bytes | None], size: int, version: str) -> str:
    """The cache key of a render: the renderer's version, the size, the SVG and every file it reads."""
    h = hashlib.sha256(f"{KEY_VERSION}\x00{version}\x00{size}\x00".encode())
    h.update(hashlib.sha256(data).digest())
    for rel in sorted(refs):
        body = refs[rel]
        digest = hashlib.sha256(body).hexdigest() if body is not None else "absent"
        h.update(f"\x00{rel}\x00{digest}".encode())
    return h.hexdigest()


def cached_png(key: str, cache: Path) -> Path:
    """The cache file of a render key."""
    return cache / f"{key}.png"


# ---------------------------------------------------------------- the cache folder


def usable_cache(cache: Path | None = None) -> Path:
    """The render cache folder (created 0700), or, when it is not safe to reuse files from, a private
    folder of this process (removed at exit), after one warning naming the folder and the fix."""
    cache = cache or cache_root()
    try:
        make_private_dir(cache)
        why = why_untrusted(cache, "the SVG render cache folder", folder=True)
    except OSError as e:
        why = f"the SVG render cache folder {cache} cannot be used ({e})"
    if why is None:
        return cache
    if cache not in _WARNED:
        _WARNED.add(cache)
        log.warning("%s; rendering SVGs without a cache (slower)", why)
    return _process_cache()


@functools.cache
def _process_cache() -> Path:
    path = Path(tempfile.mkdtemp(prefix="m3jepa-svg-"))  # mode 0700
    atexit.register(shutil.rmtree, path, True)
    return path


def _reusable(out: Path) -> bool:
    """Whether a cached PNG may be reused: the user's, no link, not writable by group or others."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return False
    why = why_untrusted(out, "the rendered PNG", folder=False, redo="render it again", st=st)
    if why is not None:
        log.warning("%s; rendering it again", why)
        return False
    return True


# ---------------------------------------------------------------- rendering


def render_svg(
    svg: str | Path, size: int, *, item: str | None = None, cache: Path | None = None,
    force: bool | None = None,
) -> Path:
    """A PNG of `svg` fitted into size x size pixels (aspect kept, transparent background), made once.

    The file is keyed by the SVG's bytes and those of every file it references, so a change to any of
    them renders again and an unchanged one never is (`force`, default: inside `rerendering()`, renders
    again anyway). A file rsvg-convert cannot render is a BadItemError naming `item`.
    """
    force = _FORCE.get() if force is None else force
    return _render(Path(svg), size, item or str(svg), usable_cache(cache), renderer(), force)


def _render(svg: Path, size: int, item: str, folder: Path, exe: str, force: bool) -> Path:
    """render_svg into a checked cache `folder` with the renderer `exe`."""
    try:
        data = svg.read_bytes()
        refs = references(svg, data)
    except OSError as e:
        raise BadItemError(item, f"SVG file {svg} (or a file it references) is unreadable: "
                                 f"{e.strerror or e}") from None
    out = cached_png(render_key(data, refs, size, renderer_version(exe)), folder)
    if not force and _reusable(out):
        return out
    with tempfile.TemporaryDirectory(dir=folder, prefix=".render-") as tmp:  # 0700, in the checked folder
        inputs = Path(tmp) / "in"
        source = _copy_inputs(inputs, svg.name, data, refs)
        png = Path(tmp) / "out.png"
        _run(exe, source, png, size, item, svg)
        os.replace(png, out)  # whole or not at all: concurrent loaders (torchrun ranks) never see a part
    return out


def _copy_inputs(inputs: Path, name: str, data: bytes, refs: dict[PurePosixPath, bytes | None]) -> Path:
    """The SVG and the files it references, written under `inputs` as they lie beside it; the SVG's path."""
    inputs.mkdir()
    for rel, body in refs.items():
        if body is not None:
            dest = inputs / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(body)
    source = inputs / name
    source.write_bytes(data)
    return source


def _run(exe: str, source: Path, png: Path, size: int, item: str, svg: Path) -> None:
    cmd = [exe, "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
           "--format", "png", "--output", str(png), str(source)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadItemError(item, f"SVG {svg} took over {RENDER_TIMEOUT_S} s to render") from None
    if done.returncode != 0 or not png.is_file():
        stderr = done.stderr.strip().replace(str(source), str(svg))
        reason = stderr.splitlines()[-1] if stderr else f"exit {done.returncode}"
        raise BadItemError(item, f"SVG {svg} cannot be rendered: {reason}")


def render_many(
    svgs: Sequence[tuple[str, Path]], size: int, *, cache: Path | None = None, force: bool | None = None
) -> dict[str, Path | BadItemError]:
    """item → its PNG (or the BadItemError that refused it), rendering the uncached ones in parallel."""
    exe = renderer()  # a missing renderer is one clear error, not one per file
    folder = usable_cache(cache)  # checked (and a refusal warned) once, not once per file
    force = _FORCE.get() if force is None else force
    workers = max(1, min(8, os.cpu_count() or 1))

    def one(pair: tuple[str, Path]) -> Path | BadItemError:
        try:
            return _render(Path(pair[1]), size, pair[0], folder, exe, force)
        except BadItemError as e:
            return e

    # rsvg-convert runs as a subprocess, so threads render in parallel without holding the GIL
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((name for name, _ in svgs), pool.map(one, svgs), strict=True))
