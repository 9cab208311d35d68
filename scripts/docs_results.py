"""Re-run the documented single-run results and print them, or write them into the docs with the commit.

    python scripts/docs_results.py [--only tuxpaint,audio] [--workdir /tmp/m3jepa-docs-results] [--update]

docs/measured.toml is the table of the results the docs quote from one run of a documented command
(README's `m3jepa run tuxpaint`, docs/audio.md, docs/vqa.md, docs/classification.md): the command, the
values it printed (paths into the run's metrics.json, or `state/...` of its best checkpoint's
state.json), the commit and the machine it was measured on, and each place that quotes them, as a
template (`{spaces/image->text/cl/R@1:.1f}`, `{commit}`). This script runs each command as printed in
a work folder laid out like the repository, with the torch threads of the table's machine (the numbers
depend on them), and prints documented against measured. `--update` writes the new values, the commit
and this machine into the table and re-renders every quote in place. tests/test_docs_results.py
checks that every quote renders to what its page says and, for the results the suite runs in full,
that the run prints the documented values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "docs" / "measured.toml"
FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")  # {key} or {key:format spec}


def load(path: Path = MEASURED) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def save(table: dict[str, Any], path: Path = MEASURED) -> None:
    path.write_text(tomli_w.dumps(table, multiline_strings=True))


# ---------------------------------------------------------------- values out of a run


def value_of(run_dir: Path, key: str) -> float:
    """`key` a path into the run's metrics.json ("spaces/image->text/cl/R@1"), or into its best
    checkpoint's state.json ("state/best_metric")."""
    first, *rest = key.split("/")
    if first == "state":
        node: Any = json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())
    else:
        node, rest = json.loads((run_dir / "metrics.json").read_text()), [first, *rest]
    for part in rest:
        node = node[part]
    return float(node)


def values_of(run_dir: Path, keys: list[str]) -> dict[str, float]:
    return {k: value_of(run_dir, k) for k in keys}


def provenance(run_dir: Path) -> dict[str, Any]:
    """The commit the run's code was at (short) and its config's hash, as the run recorded them."""
    prov = json.loads((run_dir / "metrics.json").read_text())["provenance"]
    return {"commit": ((prov.get("code") or {}).get("commit") or "unknown")[:7],
            "config_sha256": prov.get("config_sha256", "")}


def code_changes() -> str:
    """Uncommitted changes to the code and pipelines (m3jepa/), which a documented number must not have."""
    out = subprocess.run(["git", "status", "--porcelain", "--", "m3jepa"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def machine(threads: int) -> dict[str, Any]:
    """What a float-exact rerun has to share: torch, the CPU's kernels and model, the thread count."""
    import torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")), "")
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": model or platform.processor(), "threads": threads}


# ---------------------------------------------------------------- quotes: templates in the docs


def render(template: str, values: dict[str, float], commit: str) -> str:
    """The quote as the page shows it: each {key:spec} formatted, {commit} the short commit."""

    def one(m: re.Match) -> str:
        key, spec = m.group(1), m.group(2) or ""
        return commit if key == "commit" else format(values[key], spec)

    return FIELD.sub(one, template)


def _pattern(text: str) -> re.Pattern:
    """`text` with any run of whitespace matching any other (a quote may be wrapped differently)."""
    return re.compile(r"\s+".join(re.escape(word) for word in text.split()))


def find(page: str, quote: str) -> re.Match | None:
    return _pattern(quote).search(page)


def replace(page: str, old: str, new: str) -> str:
    """`page` with the quote `old` replaced by `new`, word for word, keeping the page's own line breaks
    (the two render the same template, so they have the same number of words)."""
    m = find(page, old)
    if m is None:
        raise ValueError(f"the page does not say {' '.join(old.split())[:100]!r}")
    gaps = re.findall(r"\s+", m.group(0))
    words = new.split()
    assert len(words) == len(gaps) + 1, (old, new)
    text = words[0] + "".join(gap + word for gap, word in zip(gaps, words[1:], strict=True))
    return page[: m.start()] + text + page[m.end():]


def quote_problems(table: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Each quote of each result that its page does not show as the table renders it."""
    problems = []
    for name, r in table["result"].items():
        if not any("{commit}" in q["text"] for q in r["quoted"]):
            problems.append(f"{name}: no quote shows the commit it was measured at ({{commit}})")
        for q in r["quoted"]:
            want = render(q["text"], r["values"], r["commit"])
            if find((root / q["file"]).read_text(), want) is None:
                problems.append(f"{name}: {q['file']} does not say {' '.join(want.split())!r}")
    return problems


# ---------------------------------------------------------------- comparing


def same_machine(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    return all(recorded.get(k) == now.get(k) for k in ("torch", "cpu", "cpu_model", "threads"))


def differences(result: dict[str, Any], measured: dict[str, float], exact: bool) -> list[str]:
    """Each value the run printed that is off the documented one by more than allowed: 0.005 (the runs'
    printed precision) on the recorded machine, else the result's tolerance for that key (or its default)."""
    out = []
    for k, v in result["values"].items():
        allowed = 0.005 if exact else result["tolerance"].get(k, result["tolerance"]["default"])
        if abs(measured[k] - v) > allowed + 1e-9:
            out.append(f"{k}: documented {v:.2f}, printed {measured[k]:.2f} (allowed ±{allowed:g})")
    return out


# ---------------------------------------------------------------- re-running


def prepare(workdir: Path) -> None:
    """A work folder laid out like the repository, so the docs' `pipelines/...` paths resolve."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("pipelines", "scripts"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)


def rerun(result: dict[str, Any], workdir: Path, threads: int) -> float:
    """Run the result's command as printed in `workdir` (its run folder removed first, the stores kept:
    they are cached by content) with `threads` torch threads; the wall seconds."""
    shutil.rmtree(workdir / result["run"], ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    began = time.perf_counter()
    subprocess.run(["bash", "-c", result["command"]], cwd=workdir, env=env, check=True)
    return time.perf_counter() - began


def update(table: dict[str, Any], name: str, measured: dict[str, float], prov: dict[str, Any],
           now: dict[str, Any], root: Path = ROOT) -> None:
    """Write a re-run into the table and into every page that quotes it (all pages, or none: a quote its
    page no longer shows is a ValueError naming it)."""
    r = table["result"][name]
    pages: dict[Path, str] = {}
    for q in r["quoted"]:
        path = root / q["file"]
        old = render(q["text"], r["values"], r["commit"])
        try:
            pages[path] = replace(pages.get(path) or path.read_text(), old,
                                  render(q["text"], measured, prov["commit"]))
        except ValueError as e:
            raise ValueError(f"{q['file']}: {e}; make it say what docs/measured.toml holds "
                             "(tests/test_docs_results.py names each quote), then run again") from None
    for path, text in pages.items():
        path.write_text(text)
    r.update(values={k: round(v, 4) for k, v in measured.items()}, commit=prov["commit"],
             config_sha256=prov["config_sha256"], machine=now)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated result names (default: all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-docs-results"))
    p.add_argument("--threads", type=int, help="torch threads (default: each result's recorded machine's)")
    p.add_argument("--update", action="store_true", help="write the new numbers into the table and the docs")
    args = p.parse_args()
    if args.update and (changes := code_changes()):
        sys.exit(f"error: m3jepa/ has uncommitted changes; commit them, so the numbers name a commit:\n"
                 f"{changes}")
    table = load()
    names = [n for n in args.only.split(",") if n] or list(table["result"])
    prepare(args.workdir)
    for name in names:
        r = table["result"][name]
        threads = args.threads or r["machine"]["threads"]
        print(f"\n== {name}: `{r['command']}` ({threads} threads)", flush=True)
        seconds = rerun(r, args.workdir, threads)
        run_dir = args.workdir / r["run"]
        measured, prov, now = values_of(run_dir, list(r["values"])), provenance(run_dir), machine(threads)
        print(f"{seconds:.0f} s; commit {prov['commit']} (documented at {r['commit']})")
        for k, v in r["values"].items():
            print(f"  {k:<48} documented {v:>8.2f}   printed {measured[k]:>8.2f}")
        exact = same_machine(r["machine"], now)
        changed = differences(r, measured, exact=True)
        beyond = changed if exact else differences(r, measured, exact=False)
        print("  same as documented" if not changed else
              f"  {len(changed)} of {len(r['values'])} differ from the docs; "
              + (f"{len(beyond)} beyond what tests/test_docs_results.py allows" if beyond else
                 "within what tests/test_docs_results.py allows on another machine than the recorded one"))
        if args.update:
            try:
                update(table, name, measured, prov, now)
            except ValueError as e:
                sys.exit(f"error: {name}: {e}")
            save(table)
            pages = dict.fromkeys(q["file"] for q in r["quoted"])
            print(f"  written to docs/measured.toml and {', '.join(pages)}")
    if args.update:
        print("\nRead each changed page again: the prose around the numbers may no longer hold.")


if __name__ == "__main__":
    main()
