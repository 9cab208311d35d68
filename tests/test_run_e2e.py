"""`m3jepa run tuxpaint` end to end through the real CLI on the real Tux Paint stamps, then run again.

Both runs are the docs' own commands in the docs work folder (tests/docs_runner.py): README's
`m3jepa run tuxpaint`, in full, and `m3jepa run pipelines/tuxpaint.toml`, which finds it done.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow


def _recalls(out: str) -> list[str]:
    """The rows of the printed retrieval table: direction, space, R@1, R@5, R@10, mean."""
    row = re.compile(r"\| \**(image|text)->\S+( \| [^|]+){5} \|")
    return [line for line in out.splitlines() if row.fullmatch(line)]


def test_run_tuxpaint_pipeline_end_to_end_then_again(docs_work):
    first = docs_work.ensure("m3jepa run tuxpaint")
    assert first.rc == 0, first.out[-3000:]
    assert "| direction | space |" in first.out and "image->text" in first.out
    metrics = json.loads((docs_work.root / "runs" / "tuxpaint" / "metrics.json").read_text())
    gallery = metrics["gallery"]["image->text"]["gallery"]
    # the whole Tux Paint split (628 / 78 / 79 stamps)
    assert gallery == 79 and metrics["gallery"]["text->image"]["queries"] == 79
    chance = 100.0 / gallery  # R@1 of a random ranking: 1.3%
    for direction in ("image->text", "text->image"):
        assert metrics["directions"][direction]["R@1"] > 5 * chance, metrics["directions"]
    assert (docs_work.root / "stores" / "tuxpaint" / "test" / "image").is_dir()

    # Run again: every store is cached (no encoder loaded) and the finished run is resumed, not redone.
    again = docs_work.ensure("m3jepa run pipelines/tuxpaint.toml")
    assert again.rc == 0, again.out[-3000:]
    assert "stores cached; no encoder loaded" in again.out
    assert "resuming" in again.out
    assert "run runs/tuxpaint was already finished (" in again.out
    assert len(_recalls(first.out)) == 4 and _recalls(again.out) == _recalls(first.out)
