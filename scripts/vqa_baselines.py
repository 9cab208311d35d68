"""Image-blind baselines for a VQA dataset: the most common answer, and a per-question-text prior.

    python scripts/vqa_baselines.py easy-vqa --limit 300

Both are scored like `m3jepa evaluate` (the target answer of each test question, exact match), on the
same questions the pipeline scores (same `--limit` and seed), so docs/vqa.md can compare against them.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from m3jepa.data import get_dataset
from m3jepa.data.vqa import target_answer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", default="easy-vqa", nargs="?")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ds = get_dataset(args.dataset, limit=args.limit, seed=args.seed)
    train = [q for q in ds.kept_questions("train") if target_answer(q.answers) is not None]
    test = [q for q in ds.kept_questions("test") if target_answer(q.answers) is not None]
    overall = Counter(target_answer(q.answers) for q in train)
    most_common = overall.most_common(1)[0][0]
    by_text: dict[str, Counter] = defaultdict(Counter)
    for q in train:
        by_text[q.text][target_answer(q.answers)] += 1

    def prior(q) -> str:  # the question text's most common training answer, else the overall one
        seen = by_text.get(q.text)
        return seen.most_common(1)[0][0] if seen else most_common

    def accuracy(guess) -> float:
        return 100.0 * sum(guess(q) == target_answer(q.answers) for q in test) / len(test)

    print(f"{args.dataset}: {len(test)} test questions, {len(train)} training questions")
    print(f"most common answer ({most_common!r}): {accuracy(lambda q: most_common):.1f}%")
    print(f"question-text prior: {accuracy(prior):.1f}%")


if __name__ == "__main__":
    main()
