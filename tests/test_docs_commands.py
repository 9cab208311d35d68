"""Every `m3jepa ...` command quoted in README.md, docs/*.md and the --help examples parses for real.

Each command's arguments go through click's own parser (`make_context`: every option exists, every value
converts, required ones are given) and then through the checks the command runs before any work (the
pipeline resolves, --set keys exist and type-check, the dataset is registered). Nothing is run, except a
few cheap commands on a miniature at the end.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from doc_commands import DOCS, ROOT, expand, lines
from typer.testing import CliRunner

from m3jepa import __version__, cli
from m3jepa.data import check_dataset_name

APP = typer.main.get_command(cli.app)


@dataclass
class Quoted:
    where: str  # file:line
    args: list[str]  # after `m3jepa`
    named_only: bool  # prose naming a command (`m3jepa evaluate`), not a command line to parse


def _quoted_in(path: Path) -> list[tuple[int, str, bool]]:
    """(line, command text from `m3jepa` on, inline) for each command in code blocks and inline code."""
    found = []
    for number, line, lang in lines(path):
        if lang is not None:
            # a command starts its line, or follows `&&`, `time` or `-m` (`torchrun ... -m m3jepa ...`)
            m = re.match(r"\s*(?:.*&&\s*|time\s+|.*\s-m\s+)?(m3jepa\s.*)", line)
            if m:
                found.append((number, m.group(1), False))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                m = re.match(r"(?:time\s+|.*\s-m\s+)?(m3jepa\s+[a-z-].*)", span)
                if m:
                    found.append((number, m.group(1), True))
    return found


def _command_words(args: list[str]) -> bool:
    """Whether `args` only names a command (`stores verify`), with no arguments of its own."""
    cmd = APP
    for word in args:
        sub = cmd.commands.get(word) if hasattr(cmd, "commands") else None
        if sub is None:
            return False
        cmd = sub
    return True


def _help_examples() -> list[tuple[str, str]]:
    """(command path, example) for each `Example: m3jepa ...` in a command's help."""
    out = []

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])
        for m in re.finditer(r"Example: (m3jepa .+)", cmd.help or ""):
            out.append((" ".join(path), m.group(1).strip()))

    walk(APP, [])
    return out


def _all_quoted() -> list[Quoted]:
    quoted = []
    for path in DOCS:
        rel = path.relative_to(ROOT)
        for number, text, inline in _quoted_in(path):
            for args in expand(text):
                quoted.append(Quoted(f"{rel}:{number}", args, inline and _command_words(args)))
    for command, example in _help_examples():
        quoted += [Quoted(f"m3jepa {command} --help", args, False) for args in expand(example)]
    return quoted


QUOTED = _all_quoted()


def _parse(args: list[str]):
    """click's parse of `m3jepa ARGS` down to the command it names: (command name, its parameters)."""
    cmd, ctx, rest, name = APP, None, list(args), "m3jepa"
    while True:
        ctx = cmd.make_context(name, rest, parent=ctx)
        if not hasattr(cmd, "commands"):
            return name, ctx.params
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)


def _check_config(name: str, p: dict) -> None:
    """The checks each command runs on its options before it does any work."""
    if name == "encode":
        check_dataset_name(cli._encode_config(p).dataset)
    elif name == "train-predictor":
        cfg = cli._pipeline(p["pipeline"], p["set_"], store_root=p["store_root"], dataset=p["dataset"],
                            run=p["run"], device=p["device"], precision=p["precision"])
        if not (cfg.encode.image_encoder and cfg.encode.text_encoder):  # imported stores name both encoders
            check_dataset_name(cfg.encode.dataset)
    elif name in ("run", "model-info"):
        cli._pipeline(p["pipeline"], p["set_"], device=p.get("device"), precision=p.get("precision"))
    elif name == "evaluate":
        cli._check_options("eval", {"split": p["split"], "protocol": p["protocol"]})
        cli._check_options("runtime", {"device": p["device"], "precision": p["precision"]})
    if "checkpoint" in p:
        cli._check_checkpoint(p["checkpoint"])
    if name in ("show", "copy"):
        from m3jepa.pipelines import shipped_file

        shipped_file(p["name"])


def test_the_docs_quote_commands():
    assert len(QUOTED) > 60  # the extraction finds the docs' commands (a broken pattern finds none)
    assert any(q.args[:2] == ["stores", "inspect"] for q in QUOTED)  # `list | inspect PATH` expanded


@pytest.mark.parametrize("quoted", QUOTED, ids=[f"{q.where} {' '.join(q.args)}" for q in QUOTED])
def test_quoted_command_parses(quoted, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' relative pipeline paths are the repository's
    if quoted.named_only:
        return  # `_command_words` found the command it names
    try:
        name, params = _parse(quoted.args)
        _check_config(name, params)
    except typer.Exit:
        pass  # --version prints and exits while parsing
    except Exception as e:  # click's usage errors, ConfigError, DatasetError: the doc is wrong
        pytest.fail(f"{quoted.where}: `m3jepa {shlex.join(quoted.args)}` does not parse: {e}")


def test_every_command_has_an_example_in_its_help():
    examples = {command for command, _ in _help_examples()}
    leaves = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", {})
        for name, sub in subs.items():
            walk(sub, [*path, name])
        if not subs:
            leaves.append(" ".join(path))

    walk(APP, [])
    assert sorted(set(leaves) - examples) == []


def test_a_command_that_does_not_parse_is_caught():
    with pytest.raises(Exception, match="No such option"):
        _parse(["encode", "--datset", "tuxpaint"])
    with pytest.raises(Exception, match="valid integer"):
        _parse(["encode", "--limit", "forty"])
    with pytest.raises(Exception, match="unknown config key"):
        _check_config(*_parse(["run", "tuxpaint", "--set", "train.bogus=1"]))


def test_the_readme_names_every_doc_and_every_shipped_pipeline():
    from m3jepa.pipelines import shipped

    readme = (ROOT / "README.md").read_text()
    docs = [str(p.relative_to(ROOT)) for p in DOCS[1:]]
    assert [d for d in docs if f"`{d}`" not in readme] == []
    assert [n for n in shipped() if f"`{n}`" not in readme] == []


# ---------------------------------------------------------------- cheap ones, run for real


def _invoke(*args: str):
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_version():
    assert _invoke("--version") == f"m3jepa {__version__}\n"


def test_pipelines_list_names_every_shipped_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the pipelines are in the package
    from m3jepa.pipelines import shipped, summary

    lines = _invoke("pipelines", "list").splitlines()
    assert [line.split()[0] for line in lines] == list(shipped())
    assert lines[list(shipped()).index("tuxpaint")].endswith(summary(shipped()["tuxpaint"]))


def test_model_info_prints_the_paper_preset():
    total = _invoke("model-info").splitlines()[-1]
    dims = {"image": 1024, "text": 4096}
    assert total == f"{'total':<16}{'140,641,304':>14}  (moe, gates=multi, dims {dims})"


def test_stores_list_of_an_empty_folder(tmp_path):
    assert _invoke("stores", "list", str(tmp_path)) == (
        f"no stores under {tmp_path} (write some with `m3jepa encode --store-root {tmp_path}`)\n"
    )
