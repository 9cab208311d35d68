"""The command line's help: the top level names every command, and every command's and group's help ends
with an example (the README promises it; tests/test_docs_commands.py checks each example parses)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from m3jepa.cli import app


def _commands(cmd, path=()):
    """(path, click command) of the root, every group and every command under it."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)


def test_every_help_ends_with_an_example():
    seen = []
    for path, cmd in _commands(ROOT):
        last = [line.strip() for line in (cmd.help or "").strip().splitlines() if line.strip()][-1]
        assert last.startswith("Example: m3jepa "), f"m3jepa {' '.join(path)} --help ends with {last!r}"
        seen.append(path)
    assert ("stores",) in seen and ("pipelines", "copy") in seen and len(seen) >= 20


def test_the_top_level_help_names_every_command():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    head = res.stdout.split("Options")[0]  # the description, before typer's own command table
    missing = [name for name in ROOT.commands if name not in head]
    assert not missing, f"the top-level help's description does not name {missing}"
