"""AGD schedules: exact sequences, reproducibility per step, frequencies, and lr values."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from m3jepa.config import IMAGE_TEXT
from m3jepa.train.schedule import directions_at, dynamic_probs, lr_at

THREE = ["image->text", "text->image", "audio->text"]


def test_alternate_exact_sequence() -> None:
    assert [directions_at(s, IMAGE_TEXT, "alternate")[0] for s in range(4)] == [
        "image->text",
        "text->image",
        "image->text",
        "text->image",
    ]
    assert [directions_at(s, THREE, "alternate")[0] for s in range(7)] == THREE * 2 + THREE[:1]


def test_joint_returns_every_direction() -> None:
    assert directions_at(5, THREE, "joint") == THREE


def test_random_is_reproducible_per_step_and_follows_probs() -> None:
    seq = [directions_at(s, THREE, "random", probs=[0.6, 0.3, 0.1], seed=7)[0] for s in range(4000)]
    # Any step alone gives the same answer (no hidden state), and the seed matters.
    assert directions_at(1234, THREE, "random", probs=[0.6, 0.3, 0.1], seed=7)[0] == seq[1234]
    other = [directions_at(s, THREE, "random", probs=[0.6, 0.3, 0.1], seed=8)[0] for s in range(50)]
    assert other != seq[:50]
    freq = Counter(seq)
    for d, p in zip(THREE, [0.6, 0.3, 0.1], strict=True):
        assert abs(freq[d] / 4000 - p) < 0.03  # ≈ 4 standard errors


def test_random_defaults_to_uniform_and_validates() -> None:
    freq = Counter(directions_at(s, IMAGE_TEXT, "random")[0] for s in range(2000))
    assert abs(freq["image->text"] / 2000 - 0.5) < 0.04
    with pytest.raises(ValueError, match="probabilities"):
        directions_at(0, IMAGE_TEXT, "random", probs=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        directions_at(0, IMAGE_TEXT, "random", probs=[1.0, -0.5])


def test_dynamic_favours_the_weaker_direction() -> None:
    recalls = {"image->text": 0.8, "text->image": 0.4}
    p = dynamic_probs(IMAGE_TEXT, recalls)
    assert p == pytest.approx([0.25 / 0.9, 0.65 / 0.9])  # (1 − R) + 0.05, normalised
    seq = [directions_at(s, IMAGE_TEXT, "dynamic", recalls=recalls)[0] for s in range(3000)]
    assert abs(Counter(seq)["text->image"] / 3000 - 0.65 / 0.9) < 0.03
    assert directions_at(17, IMAGE_TEXT, "dynamic", recalls=recalls) == [seq[17]]
    # Before any evaluation: uniform.
    assert dynamic_probs(IMAGE_TEXT, None) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="fractions"):
        dynamic_probs(IMAGE_TEXT, {"image->text": 80.0, "text->image": 40.0})
    with pytest.raises(ValueError, match="no recall"):
        dynamic_probs(IMAGE_TEXT, {"image->text": 0.5})


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="not one of"):
        directions_at(0, IMAGE_TEXT, "greedy")


def test_lr_warmup_and_cosine_key_steps() -> None:
    total, base = 100, 1e-3  # warm-up of 10 steps
    assert lr_at(0, total, base) == pytest.approx(1e-4)
    assert lr_at(4, total, base) == pytest.approx(5e-4)
    assert lr_at(9, total, base) == pytest.approx(base)  # the last warm-up step reaches base
    assert lr_at(10, total, base) == pytest.approx(base)  # cosine starts at base
    assert lr_at(55, total, base) == pytest.approx(0.5 * base)  # halfway through the cosine
    assert lr_at(100, total, base) == pytest.approx(0.0)
    assert lr_at(500, total, base, min_lr_frac=0.1) == pytest.approx(1e-4)
    mid = 10 + 90 / 4  # a quarter of the cosine: 0.5·(1 + cos(π/4))
    assert lr_at(int(mid), total, base) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 90))
    )
    assert lr_at(0, total, base, warmup_frac=0.0) == pytest.approx(base)
