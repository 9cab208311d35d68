"""VQA datasets as stores (image, question, answer) plus the join table that links them by id."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3jepa.data.records import DatasetError, Record, membership_fingerprint
from m3jepa.data.splits import SKIP_HINT, assign_clusters, natural_key
from m3jepa.location import Location, location, write_text

log = logging.getLogger(__name__)

ANCHOR = "question"  # the store whose rows are the samples; every other store is reached through it
JOIN_FILE = "vqa_join.json"
JOIN_FORMAT = 1
SCORINGS = ("vqa", "exact")  # vqa: min(#annotators who gave it / 3, 1); exact: one true answer


@dataclass(frozen=True)
class Question:
    """One question (or NLVR2 statement): its text, its image(s) and its annotators' answers."""

    question_id: str
    text: str
    images: Mapping[str, str]  # image store name ("image", "image2") -> that image's group id
    answers: Mapping[str, int]  # answer -> number of annotators who gave it


def target_answer(answers: Mapping[str, int]) -> str | None:
    """The most common answer (the training target); ties go to the smallest string, for determinism."""
    if not answers:
        return None
    return min(answers, key=lambda a: (-answers[a], a))


def normalize_answer(answer: str) -> str:
    """Lower case, single spaces, no trailing period: the light part of the official VQA normalisation."""
    return " ".join(answer.strip().lower().split()).rstrip(".")


def top_answers(questions: Iterable[Question], k: int) -> list[str]:
    """The K most frequent training targets (one per question), most frequent first, ties by string."""
    if k <= 0:
        raise DatasetError(f"the number of candidate answers must be positive, got {k}")
    counts = Counter(t for q in questions if (t := target_answer(q.answers)) is not None)
    return sorted(counts, key=lambda a: (-counts[a], a))[:k]


def carve_val(image_ids: Iterable[str], seed: int, val_fraction: float) -> dict[str, str]:
    """image id -> "train" or "val": a seeded split of IMAGES, so no image is in two splits."""
    sizes = dict.fromkeys(image_ids, 1)
    return assign_clusters(sizes, seed, (1.0 - val_fraction, val_fraction), ("train", "val"))


@dataclass(frozen=True)
class JoinTable:
    """One split's links: question id -> the group id of its row in every other store."""

    anchor: str
    membership: str  # membership fingerprint of the question store it was written with
    scoring: str  # one of SCORINGS
    answers: list[str]  # the K candidate answers
    links: dict[str, dict[str, str | None]]  # question id -> {store: group id}; answer None = outside K
    counts: dict[str, dict[str, int]]  # question id -> {answer: annotators}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JOIN_FORMAT, "anchor": self.anchor, "membership": self.membership,
            "scoring": self.scoring, "answers": self.answers,
            "questions": {q: {"links": self.links[q], "answers": self.counts[q]} for q in self.links},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> JoinTable:
        if data.get("format") != JOIN_FORMAT or data.get("scoring") not in SCORINGS:
            raise DatasetError(f"{path} is not a version-{JOIN_FORMAT} VQA join table; re-run m3jepa encode")
        qs = data["questions"]
        return cls(
            anchor=data["anchor"], membership=data["membership"], scoring=data["scoring"],
            answers=list(data["answers"]), links={q: v["links"] for q, v in qs.items()},
            counts={q: v["answers"] for q, v in qs.items()},
        )


@dataclass
class VqaDataset:
    """Questions with their images and answers, per split, read as stores.

    Stores: one row per image of each image store (group id = image id), one per question (group id =
    question id) and one per candidate answer in every split (group id = payload = the answer).
    `limit=N` keeps the questions of the first N images (natural order of the `image` ids) per split.
    """

    name: str
    questions: dict[str, list[Question]]  # split -> questions
    image_paths: dict[str, dict[str, str]]  # image group id -> path, per split
    answers: list[str]  # the K candidates
    scoring: str = "vqa"
    limit: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise DatasetError(f"{self.name}: limit={self.limit} must be a positive number of images")
        self._kept: dict[str, list[Question]] = {}

    def splits(self) -> list[str]:
        return list(self.questions)

    def image_modalities(self) -> list[str]:
        first = next((q for qs in self.questions.values() for q in qs), None)
        return sorted(first.images) if first else ["image"]

    def modalities(self) -> list[str]:
        return [*self.image_modalities(), "question", "answer"]

    def kept_questions(self, split: str) -> list[Question]:
        """The split's questions after `limit`, sorted by natural question id."""
        if split not in self.questions:
            raise DatasetError(f"{self.name} has no split {split!r}; it has {', '.join(self.questions)}")
        if split not in self._kept:
            qs = self.questions[split]
            if self.limit is not None:
                first = sorted({q.images["image"] for q in qs}, key=natural_key)[: self.limit]
                keep = set(first)
                qs = [q for q in qs if q.images["image"] in keep]
            self._kept[split] = sorted(qs, key=lambda q: natural_key(q.question_id))
        return self._kept[split]

    def records(self, split: str, modality: str) -> list[Record]:
        """One split's rows of one store, row_id = position (sorted by natural group id)."""
        qs = self.kept_questions(split)
        if modality == "question":
            rows = [(q.question_id, q.text) for q in qs]
        elif modality == "answer":
            rows = [(a, a) for a in sorted(self.answers, key=natural_key)]
        elif modality in self.image_modalities():
            ids = sorted({q.images[modality] for q in qs}, key=natural_key)
            rows = [(i, self.image_paths[split][i]) for i in ids]
        else:
            has = ", ".join(self.modalities())
            raise DatasetError(f"{self.name} has no {modality!r} records; it has {has}")
        return [Record(i, gid, gid, modality, payload) for i, (gid, payload) in enumerate(rows)]

    def join_table(self, split: str) -> JoinTable:
        """The links of one split's questions to their image rows and target answer row."""
        qs = self.kept_questions(split)
        candidates = set(self.answers)
        links: dict[str, dict[str, str | None]] = {}
        for q in qs:
            target = target_answer(q.answers)
            links[q.question_id] = {**q.images, "answer": target if target in candidates else None}
        return JoinTable(
            anchor=ANCHOR, membership=membership_fingerprint(self.records(split, "question")),
            scoring=self.scoring, answers=list(self.answers), links=links,
            counts={q.question_id: dict(q.answers) for q in qs},
        )

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {m: len(self.records(s, m)) for m in self.modalities()} for s in self.splits()}



def split_by_image(train_q: list, test_q: list, seed: int, val_fraction: float) -> dict[str, list]:
    """train/val/test questions: val carved from the training images, so no image is in two splits."""
    side = carve_val((q.images["image"] for q in train_q), seed, val_fraction)
    return {
        "train": [q for q in train_q if side[q.images["image"]] == "train"],
        "val": [q for q in train_q if side[q.images["image"]] == "val"],
        "test": test_q,
    }

def check_images(
    name: str, questions: list[Question], image_paths: Mapping[str, str], skip_bad: bool,
    skipped: list[tuple[str, str]],
) -> list[Question]:
    """Questions whose every image exists; one without is a DatasetError naming it (or, skip_bad, listed)."""
    exists: dict[str, bool] = {}
    kept = []
    for q in questions:
        reason = None
        for store, gid in q.images.items():
            path = image_paths.get(gid)
            if path is None:
                reason = f"its {store} {gid!r} is not in the dataset"
            elif not exists.setdefault(path, Path(path).is_file()):
                reason = f"its {store} file {path} is missing"
            if reason:
                break
        if reason is None:
            kept.append(q)
        elif not skip_bad:
            raise DatasetError(f"{name}: question {q.question_id}: {reason}; {SKIP_HINT}")
        else:
            skipped.append((q.question_id, reason))
    if skipped:
        log.warning("%s: %d questions skipped (--skip-bad), e.g. %s: %s", name, len(skipped), *skipped[0])
    return kept


# ---------------------------------------------------------------- the join table on disk


def join_path(store_root: str | Location, dataset: str, split: str) -> Location:
    """`<store_root>/<dataset>/<split>/vqa_join.json`, beside the split's stores (a folder or a URL)."""
    return location(store_root) / dataset / split / JOIN_FILE


def write_join_tables(
    store_root: str | Location, dataset_name: str, dataset: Any, splits: Sequence[str]
) -> None:
    """Write the join table of each split (stage 1, rank 0); rewritten on every encode, it is cheap."""

    for split in splits:
        path = join_path(store_root, dataset_name, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(dataset.join_table(split).to_json(), sort_keys=True) + "\n")
        log.info("wrote %s", path)


def read_join_table(store_root: str | Location, dataset: str, split: str) -> JoinTable | None:
    """The split's join table, or None when the dataset wrote none (not a VQA dataset)."""
    path = join_path(store_root, dataset, split)
    if not path.is_file():
        return None
    try:
        return JoinTable.from_json(json.loads(path.read_text(encoding="utf-8")), path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path} is unreadable ({e}); re-run `m3jepa encode` to rewrite it") from e
