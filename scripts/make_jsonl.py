"""Build a `jsonl` dataset folder (pairs.jsonl + copied images) from images already on this machine.

    python scripts/make_jsonl.py tuxpaint /tmp/mydata --limit 300   # Tux Paint stamps and their captions
    python scripts/make_jsonl.py icons /tmp/icons                     # Adwaita icons, captioned by name

`tuxpaint`: each stamp's PNG and the first line of its .txt (Debian's tuxpaint-stamps-default); `--limit N`
keeps N stamps spread over the categories (every len/N-th by id), so a small set still spans them.
`icons`: the Adwaita icon theme (Debian's adwaita-icon-theme), one image per icon name, the largest PNG
(the full-colour one where the theme has both it and a `-symbolic` silhouette), captioned with the name's
words ("folder pictures", "face wink"); names are unique, so every caption is.
No `split` is written: the jsonl loader cuts a seeded 80/10/10 by id (docs/datasets.md). The images are
copied into the folder (a jsonl path may not leave it). Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

STAMPS = Path("/usr/share/tuxpaint/stamps")
ICONS = Path("/usr/share/icons/Adwaita")


def tuxpaint_items(root: Path = STAMPS) -> list[tuple[str, Path, str]]:
    """(id, png, caption) for every stamp with a PNG and a non-empty caption, sorted by id."""
    out = []
    for txt in sorted(root.rglob("*.txt")):
        png = txt.with_suffix(".png")
        lines = txt.read_bytes().decode("utf-8-sig").splitlines()
        caption = lines[0].strip() if lines else ""
        if png.is_file() and caption:
            out.append((txt.relative_to(root).with_suffix("").as_posix(), png, caption))
    return out


def _icon_size(path: Path) -> int:
    m = re.match(r"(\d+)x\d+$", path.relative_to(ICONS).parts[0])
    return int(m.group(1)) if m else 0


def icon_items(root: Path = ICONS) -> list[tuple[str, Path, str]]:
    """(id, png, caption) per icon name: the largest full-colour PNG, else the largest symbolic one."""
    best: dict[str, tuple[tuple[int, int], Path]] = {}
    for png in root.rglob("*.png"):
        stem = png.name[: -len(".png")].removesuffix(".symbolic")
        symbolic = stem.endswith("-symbolic")
        name = stem.removesuffix("-symbolic")
        key = (0 if symbolic else 1, _icon_size(png))  # full colour first, then size
        if name not in best or key > best[name][0]:
            best[name] = (key, png)
    out = []
    for name in sorted(best):
        words = re.sub(r"[-_+.]+", " ", name).strip()
        out.append((name, best[name][1], words))
    return out


def spread(items: list, limit: int | None) -> list:
    """Every len/limit-th item, so a subset spans the whole sorted list (all categories)."""
    if limit is None or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def write_folder(items: list[tuple[str, Path, str]], out: Path) -> Path:
    """Copy each image to out/img/ and write out/pairs.jsonl; return the jsonl path."""
    (out / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (item_id, png, caption) in enumerate(items):
        rel = f"img/{i:05d}.png"
        shutil.copyfile(png, out / rel)
        lines.append(json.dumps({"id": item_id, "image": rel, "caption": caption}, ensure_ascii=False))
    path = out / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", choices=("tuxpaint", "icons"))
    p.add_argument("out", type=Path, help="the folder to write (pairs.jsonl and img/)")
    p.add_argument("--limit", type=int, default=None, help="keep this many items, spread over the list")
    args = p.parse_args()
    items = tuxpaint_items() if args.source == "tuxpaint" else icon_items()
    items = spread(items, args.limit)
    if not items:
        raise SystemExit(f"no {args.source} images found (install the Debian package: scripts/setup.sh)")
    path = write_folder(items, args.out)
    print(f"{path}: {len(items)} images with captions")


if __name__ == "__main__":
    main()
