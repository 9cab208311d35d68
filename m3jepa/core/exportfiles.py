"""An export's checksums: `m3jepa export` writes EXPORT/checksums.json, and the loader (core/trained.py)
checks every file it reads against it before using a byte of it.

    EXPORT/checksums.json   {"format": "m3jepa-export-checksums", "version": 1,
                             "config_sha256": sha256 of config.json's meaning (its JSON, keys sorted,
                                              no whitespace: reformatting keeps it, a value change not),
                             "files": {relative path: {"sha256", "bytes"}} of model.safetensors,
                                      vocabularies.safetensors and everything under adapters/}

README.md (the model card, made to be edited) and files the loader never reads are not covered. A symbolic
link anywhere among the files the loader reads is refused: its target can be anything, and can change
after the check. This guards against damage and careless edits, not against someone who rewrites
checksums.json as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from m3jepa.core.checkpoint import CheckpointError, linked_part
from m3jepa.core.layout import ADAPTERS, CHECKSUMS, EXPORT_CONFIG, VOCABULARIES, WEIGHTS, ExportDir

FORMAT = "m3jepa-export-checksums"
VERSION = 1


def config_sha256(meta: dict[str, Any]) -> str:
    """The sha256 of config.json's meaning: its JSON with keys sorted and no whitespace."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def covered(folder: Path) -> list[str]:
    """The files of an export the loader reads (besides config.json), as sorted '/'-separated paths."""
    layout = ExportDir(folder)
    names = [WEIGHTS] + ([VOCABULARIES] if layout.vocabularies.exists() or layout.vocabularies.is_symlink()
                         else [])
    if layout.adapters.is_dir():
        names += [p.relative_to(folder).as_posix() for p in layout.adapters.rglob("*")
                  if p.is_file() or p.is_symlink()]
    return sorted(names)


def write_export_checksums(folder: Path, meta: dict[str, Any]) -> None:
    """EXPORT/checksums.json for an export whose config.json holds `meta` (written last, by export)."""
    files = {}
    for name in covered(folder):
        data = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    record = {"format": FORMAT, "version": VERSION, "config_sha256": config_sha256(meta), "files": files}
    (folder / CHECKSUMS).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fix(meta: dict[str, Any]) -> str:
    run = (meta.get("trained") or {}).get("run") if isinstance(meta, dict) else None
    again = f"`m3jepa export --run {run} --out DIR --force`" if run else "`m3jepa export ... --force`"
    return f"export it again ({again}) or restore the folder from a copy"


def refuse_links(folder: Path) -> None:
    """A CheckpointError naming the first file the loader would read through a symbolic link."""
    for name in [EXPORT_CONFIG, CHECKSUMS, *covered(folder)]:
        link = linked_part(folder, name)
        if link is not None:
            raise CheckpointError(f"{folder / link} is a symbolic link; an export holds its own files (a "
                                  "link can point anywhere, and change after it is checked): replace it by a "
                                  "copy of what it points to")


def verify_export(folder: Path, meta: dict[str, Any]) -> dict[str, bytes]:
    """Check config.json's meaning and every covered file against checksums.json; returns the verified bytes
    of the safetensors files ({name: bytes}), so what is loaded is what was checked."""
    where = folder / CHECKSUMS
    fix = _fix(meta)
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
            raise ValueError(f"it is not an {FORMAT} record")
        files = {str(n): (str(f["sha256"]), int(f["bytes"])) for n, f in record["files"].items()}
        want_config = str(record["config_sha256"])
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {CHECKSUMS}, which its format version needs: its files "
                              f"cannot be verified; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where} is unreadable ({e}); {fix}") from None
    if config_sha256(meta) != want_config:
        raise CheckpointError(f"{folder / EXPORT_CONFIG} was changed after the export was written (its "
                              f"content differs from the one {CHECKSUMS} records: a model setting such as "
                              f"top_k or the routing would load differently); {fix}")
    extra = sorted(set(covered(folder)) - set(files))
    if extra:
        raise CheckpointError(f"{folder / extra[0]} is not listed in {CHECKSUMS}: it was added after the "
                              f"export was written; remove it, or {fix}")
    verified = {}
    for name, (sha256, size) in sorted(files.items()):
        verified[name] = _verified_bytes(folder, name, sha256, size, fix)
    return {n: b for n, b in verified.items() if n in (WEIGHTS, VOCABULARIES)}


def _verified_bytes(folder: Path, name: str, sha256: str, size: int, fix: str) -> bytes:
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or name.split("/")[0] not in (
            WEIGHTS, VOCABULARIES, ADAPTERS):
        raise CheckpointError(f"{folder / CHECKSUMS} lists {name!r}, which is no file of an export; {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing ({CHECKSUMS} lists it); {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    if len(data) != size:
        raise CheckpointError(f"{path} has {len(data):,} bytes, {CHECKSUMS} says {size:,} (truncated?); "
                              f"{fix}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match its sha256 in {CHECKSUMS}: it was changed or damaged "
                              f"after the export was written; {fix}")
    return data
