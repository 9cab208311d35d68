"""Every command in README.md and docs/ runs as printed (on small settings), or is listed with the reason
it cannot run here; and every shipped offline pipeline runs end to end with its own model and batch.

The table is tests/docs_runner.py (RUN, LISTED, SETUP, BUDGET); the commands are found by
tests/doc_commands.py. The slow tests share one work folder (the `docs_work` session fixture) and run
each command once, in the table's order.
"""

from __future__ import annotations

import json

import pytest
import typer
from doc_commands import shell_commands
from docs_runner import (
    ALLOWED_ADDITIONS,
    BUDGET,
    LISTED,
    PIPELINE_GPU,
    PIPELINE_RUN,
    RUN,
    SETUP,
)

from m3jepa import cli
from m3jepa.config import load_pipeline
from m3jepa.pipelines import shipped


def _command_names() -> set[str]:
    names: set[str] = set()

    def walk(cmd) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            names.add(name)
            walk(sub)

    walk(typer.main.get_command(cli.app))
    return names


DOCUMENTED = shell_commands(_command_names())


def test_the_docs_commands_are_found():
    assert len(DOCUMENTED) > 100  # a broken pattern finds none
    assert "m3jepa run tuxpaint" in DOCUMENTED and "bash scripts/setup.sh" in DOCUMENTED  # `a && b` split
    assert "python scripts/vqa_baselines.py easy-vqa --limit 300" in DOCUMENTED  # an inline span
    assert "m3jepa run pipelines/tuxpaint_lora.toml" in DOCUMENTED  # a fence without a language
    assert "m3jepa evaluate" not in DOCUMENTED  # prose naming a command


def test_every_documented_command_is_run_or_listed_with_its_reason():
    missing = {text: places for text, places in DOCUMENTED.items() if text not in RUN and text not in LISTED}
    assert missing == {}, "add each to RUN (its small settings) or LISTED (why not) in tests/docs_runner.py"
    assert set(RUN) & set(LISTED) == set()
    stale = sorted((set(RUN) | set(LISTED)) - set(DOCUMENTED))
    assert stale == [], "no page quotes these any more: remove them from tests/docs_runner.py"
    assert all(reason.strip() for reason in LISTED.values())


def test_the_table_only_adds_limits():
    for key, run in {**RUN, **SETUP}.items():
        pairs = [f"{option} {value}" for option, value in zip(run.add[::2], run.add[1::2], strict=True)]
        assert all(ALLOWED_ADDITIONS.fullmatch(pair) for pair in pairs), (key, run.add)
        assert all(need in RUN or need in SETUP for need in run.needs), key


def test_every_shipped_pipeline_runs_here_or_needs_a_gpu():
    assert sorted(PIPELINE_RUN) == sorted(BUDGET)
    assert sorted(shipped()) == sorted([*PIPELINE_RUN, *PIPELINE_GPU])
    for name, key in PIPELINE_RUN.items():
        run = RUN.get(key) or SETUP[key]
        assert run.add == BUDGET[name], f"{key} runs with {name}'s budget"


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RUN))
def test_documented_command_runs(key, docs_work):
    run = RUN[key]
    got = docs_work.ensure(key)
    if run.xfail:
        if got.rc != 0:
            pytest.xfail(run.xfail)
        pytest.fail(f"`{key}` runs now: remove its xfail ({run.xfail})")
    assert got.rc == 0, f"`{key}` ({', '.join(DOCUMENTED[key])}) exits {got.rc}:\n{got.out[-4000:]}"
    assert run.expect in got.out, got.out[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PIPELINE_RUN))
def test_shipped_offline_pipeline_runs_end_to_end(name, docs_work):
    key = PIPELINE_RUN[name]
    got = docs_work.ensure(key)
    assert got.rc == 0, f"`{key}` exits {got.rc}:\n{got.out[-4000:]}"
    want = load_pipeline(shipped()[name])
    run_dir = docs_work.root / "runs" / want.name
    ran = load_pipeline(run_dir / "config.toml")  # the resolved config the run saved
    # its own model and batch: the budget changed the steps and the subset, nothing else
    assert ran.model == want.model
    assert (ran.train.batch_size, ran.train.directions) == (want.train.batch_size, want.train.directions)
    assert set(json.loads((run_dir / "metrics.json").read_text())["directions"]) == set(want.train.directions)
