"""easy-vqa: synthetic shapes VQA (one coloured shape per 64x64 image), read from the installed package."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from m3jepa.data.records import DatasetError
from m3jepa.data.vqa import Question, VqaDataset, check_images, split_by_image, top_answers

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `pip install easy-vqa` or pass --root (a folder with train/ and test/)"
VAL_FRACTION = 0.1  # of the official training IMAGES (seeded), with all their questions
SOURCES = ("train", "test")  # the package's own splits


def default_root() -> Path:
    """The `data/` folder of the installed easy_vqa package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise DatasetError(f"easy-vqa: the easy_vqa package is not installed; {INSTALL_HINT}")
    return Path(spec.origin).parent / "data"


def read_source(root: Path, source: str) -> tuple[list[Question], dict[str, str]]:
    """Questions and image paths of one package split; ids carry the source ("train-q00012", "train-17")."""
    qfile = root / source / "questions.json"
    try:
        rows = json.loads(qfile.read_text(encoding="utf-8"))  # [[question, answer, image_id], ...]
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"easy-vqa: {qfile} is unreadable: {e}; {INSTALL_HINT}") from e
    images = {f"{source}-{p.stem}": str(p) for p in sorted((root / source / "images").glob("*.png"))}
    questions = [
        Question(
            question_id=f"{source}-q{i:05d}",
            text=str(text).strip(),
            images={"image": f"{source}-{image_id}"},
            answers={str(answer).strip(): 1},  # one true answer per question: exact-match scoring
        )
        for i, (text, answer, image_id) in enumerate(rows)
    ]
    return questions, images


def load_easy_vqa(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> VqaDataset:
    """train / val (10% of the package's training images, seeded) / test (the package's test split).

    Candidate answers: every target answer of the training split (13 for the package).
    """
    base = Path(root) if root else default_root()
    if not base.is_dir():
        raise DatasetError(f"easy-vqa: folder {base} not found; {INSTALL_HINT}")
    skipped: list[tuple[str, str]] = []
    train_q, train_img = read_source(base, "train")
    test_q, test_img = read_source(base, "test")
    train_q = check_images("easy-vqa", train_q, train_img, skip_bad, skipped)
    test_q = check_images("easy-vqa", test_q, test_img, skip_bad, skipped)
    questions = split_by_image(train_q, test_q, seed, VAL_FRACTION)
    images = {"train": train_img, "val": train_img, "test": test_img}
    answers = top_answers(questions["train"], k=10_000)  # all of them: the package has 13
    log.info("easy-vqa (synthetic shapes): %s questions, %d answers",
             {s: len(q) for s, q in questions.items()}, len(answers))
    return VqaDataset("easy-vqa", questions, images, answers, scoring="exact", limit=limit, skipped=skipped)
