"""The commands README.md and docs/*.md quote, read out of the markdown (shared by the docs tests).

A command is a line of a shell code block (```bash, ```sh), continuations joined, its trailing comment
dropped, split at `&&`; or an inline code span in prose that starts like one (`m3jepa run ...`,
`python scripts/...`, `python -c ...`, `bash scripts/...`, `torchrun ...`). An inline `m3jepa` span
that only names a command (`m3jepa evaluate`) is prose, not a command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")

# The docs' placeholders, each replaced by a sample value of its kind (whole arguments only).
SAMPLES = {
    "PATH": "stores/tuxpaint/val/image/efficientnet-lite0",
    "<store>": "stores/tuxpaint/val/image/efficientnet-lite0",
    "root": "stores",
    "DIR": "/tmp/m3jepa-docs",
    "D": "/tmp/m3jepa-docs",
    "DEST": "/tmp/m3jepa-docs/my.toml",
    "FILE": "pipelines/tuxpaint.toml",
    "PIPELINE.toml": "pipelines/tuxpaint.toml",
    "PIPELINE": "tuxpaint",
    "NAME": "tuxpaint",
    "R": "runs/tp",
    "RUN": "runs/tp",
    "W": "2",
    "N": "3",
    "key=value": "train.lr=1e-3",
}

INLINE = re.compile(
    r"(?:time\s+)?((?:m3jepa\s+[a-z-]|python3?\s+-m\s+m3jepa\s|python3?\s+-[mc]\s|python3?\s+(?:scripts|bench)/"
    r"|bash\s+scripts/|torchrun\s).*)"
)


def lines(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, text, the fence's language or None outside code), backslash continuations in code
    joined; a fence without a language is ''."""
    out: list[tuple[int, str, str | None]] = []
    lang, pending = None, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            lang = line.strip()[3:].strip() if lang is None else None
            continue
        if pending is not None:
            line, number = pending[1] + " " + line.strip(), pending[0]
            pending = None
        if lang is not None and line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        out.append((number, line, lang))
    return out


def expand(text: str, samples: dict[str, str] = SAMPLES) -> list[list[str]]:
    """A quoted `m3jepa` command as argument lists (after `m3jepa`): optional [parts] kept, `a | b`
    alternatives split, placeholders replaced by `samples`."""
    text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
    group = re.search(r"(?<!\S)\(([^()]*\|[^()]*)\)", text)
    if group:  # `(--text T | --image PATH)`: one command per choice
        return [args for choice in group.group(1).split(" | ")
                for args in expand(text[: group.start()] + choice.strip() + text[group.end():], samples)]
    while re.search(r"(?<!\S)\[([^\[\]]*)\]", text):
        text = re.sub(r"(?<!\S)\[([^\[\]]*)\]", r"\1", text)
    first, *others = [part.strip() for part in text.split(" | ")]
    words = shlex.split(first)[1:]
    commands = [words]
    if others:  # `m3jepa stores list | inspect PATH`: the others are siblings under the same group
        group = words[:1]
        commands += [group + shlex.split(part) for part in others]
    out = []
    for args in commands:
        args = [a for a in args if a != "..."]
        # `multi|paired` as a value: the first of the choices (a placeholder too: `PATH|none`)
        args = [a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in args]
        out.append([samples.get(a, a) for a in args])
    return out


def _clean(text: str) -> str:
    """One command as the table keys it: trailing comment dropped, `time` dropped, spaces collapsed."""
    text = re.sub(r"(?<!\S)#.*$", "", text).strip()
    text = re.sub(r"^time\s+", "", text)
    return " ".join(text.split())


def _names_only(text: str, group_words: set[str]) -> bool:
    """`m3jepa evaluate`, `python -m m3jepa serve`: prose naming a command, not a command line."""
    words = text.split()
    if words[:1] == ["m3jepa"]:
        words = words[1:]
    elif words[1:3] == ["-m", "m3jepa"]:
        words = words[3:]
    else:
        return False
    return all(w in group_words for w in words)


def shell_commands(group_words: set[str]) -> dict[str, list[str]]:
    """Every command the docs quote → the places (file:line) that quote it, in reading order.

    `group_words` are the words that name m3jepa's commands and groups (`run`, `stores`, `list`, ...),
    to tell a span that names a command from one that runs it."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        rel = path.relative_to(ROOT)
        for number, line, lang in lines(path):
            if lang in SHELL:
                texts = [] if line.lstrip().startswith("#") else line.split(" && ")
            elif lang == "":  # a fence without a language: trees and outputs, and sometimes commands
                texts = [m.group(1)] if (m := INLINE.fullmatch(line.strip())) else []
            elif lang is None:
                spans = re.findall(r"`([^`]+)`", line)
                texts = [m.group(1) for span in spans if (m := INLINE.fullmatch(span))]
                texts = [t for t in texts if not _names_only(_clean(t), group_words)]
            else:
                texts = []
            for text in texts:
                if cleaned := _clean(text):
                    found.setdefault(cleaned, []).append(f"{rel}:{number}")
    return found
