"""The documented single-run results (docs/measured.toml) are what their commands print today.

Every quote of a result on its page renders from the table (values and the commit they were measured
at); for each result the suite runs in full, the run in the docs work folder must print the table's
values: exactly on the machine they were measured on, within the result's tolerance elsewhere.
`python scripts/docs_results.py --update` re-measures them and rewrites table and pages in one step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from docs_runner import RUN, Run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import docs_results  # noqa: E402

TABLE = docs_results.load()
RESULTS = TABLE["result"]
IN_SUITE = [name for name, r in RESULTS.items() if r["suite"]]


def test_every_quote_on_its_page_is_what_the_table_holds():
    assert docs_results.quote_problems(TABLE) == []


def test_every_result_names_its_commit_machine_and_why_the_suite_runs_it_or_not():
    for name, r in RESULTS.items():
        assert r["commit"] and set(r["machine"]) == {"torch", "cpu", "cpu_model", "threads"}, name
        assert r["values"] and "default" in r["tolerance"], name
        assert r["suite"] or r["reason"], f"{name}: say why the suite does not run it in full"
        fields = {m.group(1) for q in r["quoted"] for m in docs_results.FIELD.finditer(q["text"])}
        assert fields - {"commit"} <= set(r["values"]), name


def test_the_suite_runs_its_results_as_printed():
    # full, as documented: no added limit, no placeholder filled, nothing removed first
    assert IN_SUITE
    for name in IN_SUITE:
        assert RUN.get(RESULTS[name]["command"]) == Run(), name


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_SUITE)
def test_documented_result_is_what_the_run_prints(name, docs_work):
    r = RESULTS[name]
    got = docs_work.ensure(r["command"])  # with the recorded threads (docs_runner.reference_threads)
    assert got.rc == 0, got.out[-4000:]
    run_dir = docs_work.root / r["run"]
    measured = docs_results.values_of(run_dir, list(r["values"]))
    exact = docs_results.same_machine(r["machine"], docs_results.machine(r["machine"]["threads"]))
    diff = docs_results.differences(r, measured, exact)
    assert diff == [], (
        f"`{r['command']}` no longer prints what {', '.join(q['file'] for q in r['quoted'])} say "
        f"(measured at {r['commit']}; {'this machine' if exact else 'another machine'}): {'; '.join(diff)}. "
        f"Re-measure with `python scripts/docs_results.py --only {name} --update` and read the prose again."
    )


# ---------------------------------------------------------------- the machinery itself


def _table(tmp_path: Path, page: str) -> dict:
    (tmp_path / "page.md").write_text(page)
    return {"result": {"r": {
        "command": "m3jepa run x", "run": "runs/x", "suite": False, "reason": "test", "commit": "aaaaaaa",
        "config_sha256": "", "machine": {"torch": "", "cpu": "", "cpu_model": "", "threads": 2},
        "tolerance": {"default": 2.0, "state/best_step": 100.0},
        "values": {"a/R@1": 20.2532, "state/best_step": 140.0},
        "quoted": [{"file": "page.md", "text": "R@1 {a/R@1:.1f} at step {state/best_step:.0f} "
                                               "(commit {commit})"}],
    }}}


def test_an_update_rewrites_each_quote_in_place_keeping_the_line_breaks(tmp_path):
    page = "Intro.\nThe run gave R@1 20.3 at\n  step 140 (commit aaaaaaa); more prose.\n"
    table = _table(tmp_path, page)
    assert docs_results.quote_problems(table, root=tmp_path) == []
    docs_results.update(table, "r", {"a/R@1": 100 * 17 / 79, "state/best_step": 90.0},
                        {"commit": "bbbbbbb", "config_sha256": "c0ffee"}, {"threads": 2}, root=tmp_path)
    assert (tmp_path / "page.md").read_text() == (
        "Intro.\nThe run gave R@1 21.5 at\n  step 90 (commit bbbbbbb); more prose.\n"
    )
    r = table["result"]["r"]
    assert (r["values"], r["commit"], r["config_sha256"]) == (
        {"a/R@1": 21.519, "state/best_step": 90.0}, "bbbbbbb", "c0ffee"
    )
    assert docs_results.quote_problems(table, root=tmp_path) == []


def test_a_page_that_says_something_else_is_named(tmp_path):
    table = _table(tmp_path, "The run gave R@1 20.4 at step 140 (commit aaaaaaa).\n")
    (problem,) = docs_results.quote_problems(table, root=tmp_path)
    assert problem == "r: page.md does not say 'R@1 20.3 at step 140 (commit aaaaaaa)'"
    table["result"]["r"]["quoted"][0]["text"] = "R@1 {a/R@1:.1f}"
    assert "no quote shows the commit" in docs_results.quote_problems(table, root=tmp_path)[0]


def test_exact_on_the_recorded_machine_within_tolerance_elsewhere(tmp_path):
    r = _table(tmp_path, "")["result"]["r"]
    close = {"a/R@1": 20.257, "state/best_step": 140.0}
    assert docs_results.differences(r, close, exact=True) == []
    off = {"a/R@1": 21.52, "state/best_step": 200.0}
    assert docs_results.differences(r, off, exact=True) == [
        "a/R@1: documented 20.25, printed 21.52 (allowed ±0.005)",
        "state/best_step: documented 140.00, printed 200.00 (allowed ±0.005)",
    ]
    assert docs_results.differences(r, off, exact=False) == []
    assert docs_results.differences(r, {"a/R@1": 23.0, "state/best_step": 260.0}, exact=False) == [
        "a/R@1: documented 20.25, printed 23.00 (allowed ±2)",
        "state/best_step: documented 140.00, printed 260.00 (allowed ±100)",
    ]
    now = docs_results.machine(2)
    assert docs_results.same_machine(now, dict(now)) and not docs_results.same_machine(r["machine"], now)
    assert not docs_results.same_machine(now, {**now, "threads": 1})


def test_an_update_whose_quote_is_gone_changes_nothing(tmp_path):
    page = "R@1 20.3 at step 140 (commit aaaaaaa), and R@1 20.3 again.\n"
    table = _table(tmp_path, page)
    table["result"]["r"]["quoted"].append({"file": "page.md", "text": "then {a/R@1:.2f}"})
    with pytest.raises(ValueError, match=r"page.md: the page does not say 'then 20.25'"):
        docs_results.update(table, "r", {"a/R@1": 30.0, "state/best_step": 90.0},
                            {"commit": "bbbbbbb", "config_sha256": ""}, {"threads": 2}, root=tmp_path)
    assert (tmp_path / "page.md").read_text() == page and table["result"]["r"]["commit"] == "aaaaaaa"
