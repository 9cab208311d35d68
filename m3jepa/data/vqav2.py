"""VQAv2 in its official layout: COCO images, open-ended questions, ten annotator answers each."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from m3jepa.data.records import DatasetError
from m3jepa.data.vqa import (
    Question,
    VqaDataset,
    check_images,
    normalize_answer,
    split_by_image,
    top_answers,
)

log = logging.getLogger(__name__)

DEFAULT_ROOT = "data/vqav2"
TOP_K = 3129  # candidate answers: the K most frequent training targets (the common VQAv2 setting)
VAL_FRACTION = 0.05  # of train2014 IMAGES (seeded) held out for validation
LAYOUT_HINT = (
    "expected <root>/v2_OpenEnded_mscoco_{train,val}2014_questions.json, "
    "<root>/v2_mscoco_{train,val}2014_annotations.json and images under <root>/{train,val}2014/"
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"vqav2: {path} not found; {LAYOUT_HINT}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"vqav2: {path} is unreadable: {e}") from e


def image_path(root: Path, source: str, image_id: int) -> str:
    """`<root>/train2014/COCO_train2014_000000000009.jpg`."""
    return str(root / f"{source}2014" / f"COCO_{source}2014_{int(image_id):012d}.jpg")


def read_source(root: Path, source: str) -> tuple[list[Question], dict[str, str]]:
    """Questions (answers normalised and counted over annotators) and image paths of train2014 or val2014."""
    qs = _read_json(root / f"v2_OpenEnded_mscoco_{source}2014_questions.json")["questions"]
    anns = _read_json(root / f"v2_mscoco_{source}2014_annotations.json")["annotations"]
    # joined by question id, never by position
    answers = {a["question_id"]: Counter(normalize_answer(x["answer"]) for x in a["answers"]) for a in anns}
    questions, images = [], {}
    for q in qs:
        qid, gid = str(q["question_id"]), f"{source}-{q['image_id']}"
        if q["question_id"] not in answers:
            where = f"v2_mscoco_{source}2014_annotations.json"
            raise DatasetError(f"vqav2: question {qid} has no annotation in {where}")
        images[gid] = image_path(root, source, q["image_id"])
        counts = dict(answers[q["question_id"]])
        questions.append(Question(qid, str(q["question"]).strip(), {"image": gid}, counts))
    return questions, images


def load_vqav2(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False,
    top_k: int = TOP_K,
) -> VqaDataset:
    """train (train2014 minus val) / val (5% of train2014's images, seeded) / test (the official val2014).

    Candidates: the `top_k` most frequent training targets. A question whose target is outside them
    stays in its split (scored: its VQA accuracy can still be > 0) but is not a training pair.
    """
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(f"vqav2: folder {base} not found; {LAYOUT_HINT}")
    skipped: list[tuple[str, str]] = []
    train_q, train_img = read_source(base, "train")
    test_q, test_img = read_source(base, "val")
    train_q = check_images("vqav2", train_q, train_img, skip_bad, skipped)
    test_q = check_images("vqav2", test_q, test_img, skip_bad, skipped)
    questions = split_by_image(train_q, test_q, seed, VAL_FRACTION)
    answers = top_answers(questions["train"], top_k)
    log.info("vqav2: %s questions, %d candidate answers",
             {s: len(q) for s, q in questions.items()}, len(answers))
    images = {"train": train_img, "val": train_img, "test": test_img}
    return VqaDataset("vqav2", questions, images, answers, scoring="vqa", limit=limit, skipped=skipped)
