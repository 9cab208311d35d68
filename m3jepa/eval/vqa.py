"""VQA accuracy: the predicted answer is the nearest of the K answer latents, scored against annotators."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from m3jepa.core.directions import parse_direction, source_modalities
from m3jepa.core.paired import PairedSplit, join_rows
from m3jepa.eval.classification import classify_by_nearest
from m3jepa.eval.embed import SPACES, source_batch

log = logging.getLogger(__name__)


def vqa_score(predicted: str, answers: Mapping[str, int], scoring: str = "vqa") -> float:
    """One question's score in [0, 1].

    "vqa": min(#annotators who gave `predicted` / 3, 1) (the VQA accuracy of Antol et al.; the official
    script further averages this over the 10 leave-one-annotator-out subsets, see docs/vqa.md);
    "exact": 1 if `predicted` is the one true answer (easy-vqa, NLVR2).
    """
    n = answers.get(predicted, 0)
    if scoring == "vqa":
        return min(n / 3.0, 1.0)
    if scoring == "exact":
        return 1.0 if n > 0 else 0.0
    raise ValueError(f"scoring {scoring!r} is not 'vqa' or 'exact'")


def vqa_accuracy(
    predicted: Sequence[str], answers: Sequence[Mapping[str, int]], scoring: str = "vqa"
) -> float:
    """Mean score in percent over questions (predicted[i] is scored against answers[i])."""
    if len(predicted) != len(answers) or not predicted:
        raise ValueError(f"need one prediction per question: {len(predicted)} vs {len(answers)}")
    return 100.0 * float(np.mean([vqa_score(p, a, scoring) for p, a in zip(predicted, answers, strict=True)]))


@dataclass
class VqaResult:
    """VQA accuracy of one direction on one split, with what was (and was not) scored."""

    accuracy: float  # percent, over every scored question
    accuracy_in_k: float  # percent, over questions whose target answer is one of the K candidates
    n_questions: int  # scored: questions whose input rows were all encoded
    n_outside_k: int  # scored questions whose target answer is not a candidate (never trained on)
    n_unscored: int  # questions with a skipped (unencodable) input row
    n_answers: int  # K, the gallery
    scoring: str
    space: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, direction: str) -> str:
        """One markdown line for metrics.md."""
        return (
            f"- **{direction}** VQA accuracy **{self.accuracy:.2f}** ({self.scoring} scoring, {self.space} "
            f"space) over {self.n_questions} questions and {self.n_answers} candidate answers; "
            f"{self.accuracy_in_k:.2f} on the {self.n_questions - self.n_outside_k} whose answer is a "
            f"candidate; {self.n_unscored} unscored (input skipped at encode time)"
        )


@torch.no_grad()
def evaluate_vqa(
    predictor: nn.Module, data: PairedSplit, direction: str, space: str, batch_size: int = 2048
) -> VqaResult:
    """Score every question of the split (also those whose answer is outside the K) in one space."""
    if space not in SPACES:
        raise ValueError(f"space {space!r} is not one of {SPACES}")
    if data.join is None:
        raise ValueError(f"split {data.split} has no VQA join table; is it a VQA dataset's split?")
    src, tgt = parse_direction(direction)
    rows_s, rows_t = join_rows(data.modalities, source_modalities(src), tgt, data.join, keep_unanswered=True)
    if isinstance(src, str):
        rows_s = rows_s[:, 0]
    answers = data.modalities[tgt]
    gallery_rows = np.flatnonzero(answers.valid)  # (K,) every encoded candidate answer
    queries = []
    for i in range(0, len(rows_s), batch_size):
        out = predictor(src, source_batch(data, src, rows_s[i : i + batch_size]), tgt)
        queries.append(out.pred if space == "pred" else out.cl_query)
    y = data.rows(tgt, gallery_rows)  # (K, D_answer)
    gallery = y if space == "pred" else predictor.encode_target(tgt, y)
    q = torch.cat(queries).float().cpu().numpy()  # (Q, d)
    nearest = classify_by_nearest(q, gallery.float().cpu().numpy())  # (Q,)
    predicted = [str(answers.group_ids[gallery_rows[k]]) for k in nearest]
    anchor = data.modalities[data.join.anchor]
    column = source_modalities(src).index(data.join.anchor) if rows_s.ndim == 2 else 0
    qids = anchor.group_ids[rows_s[:, column] if rows_s.ndim == 2 else rows_s]
    truth = [data.join.counts[q] for q in qids]
    in_k = rows_t >= 0
    scores = np.array([vqa_score(p, a, data.join.scoring) for p, a in zip(predicted, truth, strict=True)])
    return VqaResult(
        accuracy=100.0 * float(scores.mean()),
        accuracy_in_k=100.0 * float(scores[in_k].mean()) if in_k.any() else 0.0,
        n_questions=len(scores),
        n_outside_k=int((~in_k).sum()),
        n_unscored=len(data.join.links) - len(scores),
        n_answers=len(gallery_rows),
        scoring=data.join.scoring,
        space=space,
    )


def vqa_metrics(
    predictor: nn.Module, data: PairedSplit, directions: Sequence[str], space: str
) -> dict[str, dict[str, Any]]:
    """metrics["vqa"]: VQA accuracy of every direction into `answer` over a split with a join table."""
    if data.join is None:
        return {}
    out = {}
    for d in directions:
        if parse_direction(d)[1] == "answer":
            res = evaluate_vqa(predictor, data, d, space)
            log.info("%s: VQA accuracy %.2f over %d questions", d, res.accuracy, res.n_questions)
            out[d] = res.to_json()
    return out


def vqa_lines(metrics: dict[str, Any]) -> str:
    """The markdown section for metrics.md (empty without VQA directions)."""
    vqa = metrics.get("vqa", {})
    if not vqa:
        return ""
    lines = [f"\n\n### VQA accuracy ({metrics['headline_space']} space)\n"]  # blank line: a new block
    lines += [VqaResult(**res).line(d) for d, res in vqa.items()]
    return "\n".join(lines) + "\n"
