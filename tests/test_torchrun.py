"""torchrun and m3jepa's command line: every documented `torchrun` line runs as printed, and no m3jepa option
name is one that torchrun's own parser takes for its options (docs/training.md, "Multi-process").

torchrun parses its whole command line with argparse, the script's arguments included: an argument that is
an ambiguous abbreviation of torchrun's options (`--run`: --run-path or --run_path) stops it before any
process starts, and one that abbreviates exactly one of them would be read as that option.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from launch import printed_env

from m3jepa import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Names torchrun's parser refuses, each with the name of the same option the documented torchrun lines use
REFUSED = {"--run": "--run-dir"}
# The small budget a documented line may get, per m3jepa command (nothing else is added to a line)
BUDGET = {
    "encode": ["--limit", "24", "--workers", "0"],  # 24 groups per split, no decoding processes
    "train-predictor": ["--set", "train.max_steps=4", "--set", "train.batch_size=16", "--set",
                        "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set",
                        "train.num_threads=1"],
}
# Set-up a page states before its torchrun line, run first with the same budget (docs/lora.md: the
# LoRA mode trains from prefix stores)
SETUP = [["encode", "--pipeline", "tuxpaint_lora"]]
ORDER = ["encode", "train-predictor"]  # stores before the runs that read them


def _options() -> list[tuple[list[str], object]]:
    """(command path, option) for every option of every m3jepa command."""
    out = []

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])
        out.extend((path, p) for p in cmd.params if p.param_type_name == "option")

    walk(typer.main.get_command(cli.app), [])
    return out


def _torchrun_takes(args: list[str]) -> bool:
    """Whether `torchrun --nproc_per_node=2 -m m3jepa ARGS` reaches m3jepa with ARGS intact."""
    from torch.distributed.run import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "m3jepa", *args])
    except SystemExit:
        return False
    return parsed.training_script_args == args


def test_every_option_name_survives_torchruns_parser():
    refused: dict[str, set[str]] = {}
    for path, option in _options():
        names = [*option.opts, *option.secondary_opts]
        forms = lambda n: ([n, "x"], [f"{n}=x"])  # noqa: E731  (`--opt value` and `--opt=value`)
        bad = [n for n in names if not all(_torchrun_takes([*path, *f]) for f in forms(n))]
        for n in bad:
            refused.setdefault(n, set()).add(" ".join(path))
            assert REFUSED.get(n) in names, (
                f"`m3jepa {' '.join(path)} {n}` does not survive torchrun's parser; give the option another "
                f"name that does (as --run has --run-dir) and add it to REFUSED"
            )
    assert set(refused) == set(REFUSED), refused  # also fails when torchrun stops refusing one


def _torchrun_lines() -> list[tuple[str, str]]:
    """(file:line, command) of every `torchrun ...` line in the docs' code blocks, comment removed."""
    found = []
    for path in DOCS:
        fence = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = not fence
            elif fence and re.match(r"\s*torchrun\s", line):
                found.append((f"{path.relative_to(ROOT)}:{number}", re.sub(r"\s+#.*$", "", line).strip()))
    return found


def test_the_docs_have_torchrun_lines():
    where = {w.split(":")[0] for w, _ in _torchrun_lines()}
    assert {"README.md", "docs/encode.md", "docs/training.md", "docs/lora.md"} <= where


def _m3jepa_args(words: list[str]) -> list[str]:
    return words[words.index("m3jepa") + 1:]


@pytest.mark.slow
def test_documented_torchrun_lines_run_as_printed(tmp_path, tuxpaint_root):
    """Each line as printed, in one work folder (the repository's pipelines/ beside it), with the budget
    of its command added at the end; `torchrun` is this interpreter's torch.distributed.run."""
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    lines = _torchrun_lines()
    # a line of several nodes needs one launch per node: tests/test_multinode.py runs those as printed
    several = [w for w, t in lines if "--nnodes" in t]
    assert all(w.startswith("docs/multinode.md:") for w in several), several
    lines = [(w, t) for w, t in lines if "--nnodes" not in t]
    for _, text in lines:
        words = shlex.split(text)
        assert "..." not in words and not any(w.isupper() for w in words), f"a placeholder in `{text}`"
        assert _m3jepa_args(words)[0] in BUDGET, f"`{text}`: add its command to BUDGET"
    lines.sort(key=lambda wl: ORDER.index(_m3jepa_args(shlex.split(wl[1]))[0]))
    for args in SETUP:
        res = subprocess.run([sys.executable, "-m", "m3jepa", *args, *BUDGET[args[0]]], cwd=tmp_path,
                             env=printed_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    failed = []
    for where, text in lines:
        words = shlex.split(text)
        cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:], *BUDGET[_m3jepa_args(words)[0]]]
        # printed_env: torchrun's static rendezvous on 127.0.0.1 and a port free now
        res = subprocess.run(cmd, cwd=tmp_path, env=printed_env(), capture_output=True, text=True,
                             timeout=600)
        if res.returncode:
            failed.append(f"{where}: `{text}` failed:\n{res.stderr[-2000:]}")
        elif "--run-dir" in words:
            run = tmp_path / words[words.index("--run-dir") + 1]
            assert (run / "checkpoints" / "latest" / "model.safetensors").is_file(), where
    assert not failed, "\n\n".join(failed)
