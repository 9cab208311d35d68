"""NLVR2: two images and a statement, true or false; read from its JSON-lines release layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from m3jepa.data.records import DatasetError
from m3jepa.data.vqa import Question, VqaDataset, check_images

log = logging.getLogger(__name__)

DEFAULT_ROOT = "data/nlvr2"
SPLITS = {"train": "train", "val": "dev", "test": "test1"}  # our split -> the release's file stem
ANSWERS = ["false", "true"]
LAYOUT_HINT = (
    "expected <root>/{train,dev,test1}.json (JSON lines with identifier, sentence, label) and images "
    "<root>/<split>/[<directory>/]<identifier minus its last part>-img0.png and -img1.png"
)


def pair_prefix(identifier: str) -> str:
    """"train-10171-0-0" -> "train-10171-0": the image pair a statement is about."""
    prefix, sep, _ = identifier.rpartition("-")
    if not sep or not prefix:
        raise DatasetError(f"nlvr2: identifier {identifier!r} is not of the form <split>-<set>-<pair>-<n>")
    return prefix


def read_split(root: Path, stem: str) -> tuple[list[Question], dict[str, str]]:
    """Statements of one release file, with the paths of their left (image) and right (image2) images."""
    path = root / f"{stem}.json"
    if not path.is_file():
        raise DatasetError(f"nlvr2: {path} not found; {LAYOUT_HINT}")
    questions, images = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ident, sentence, label = row["identifier"], row["sentence"], str(row["label"]).lower()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"nlvr2: {path} line {n} is not a statement record: {e}") from e
        if label not in ANSWERS:
            raise DatasetError(f"nlvr2: {ident}: label {row['label']!r} is not True or False")
        prefix = pair_prefix(ident)
        folder = root / stem / str(row["directory"]) if "directory" in row else root / stem
        left, right = f"{prefix}-img0", f"{prefix}-img1"
        images[left], images[right] = str(folder / f"{left}.png"), str(folder / f"{right}.png")
        questions.append(Question(ident, str(sentence).strip(), {"image": left, "image2": right}, {label: 1}))
    return questions, images


def load_nlvr2(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> VqaDataset:
    """train / val (the release's dev) / test (test1); `seed` does not change the official splits."""
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(f"nlvr2: folder {base} not found; {LAYOUT_HINT}")
    skipped: list[tuple[str, str]] = []
    questions, images = {}, {}
    for split, stem in SPLITS.items():
        qs, images[split] = read_split(base, stem)
        questions[split] = check_images("nlvr2", qs, images[split], skip_bad, skipped)
    log.info("nlvr2: %s statements", {s: len(q) for s, q in questions.items()})
    return VqaDataset("nlvr2", questions, images, list(ANSWERS), scoring="exact", limit=limit,
                      skipped=skipped)
