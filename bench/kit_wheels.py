"""The wheels the GPU first-contact kit needs, downloaded for another machine's Python and platform.

    python -m bench.kit_wheels                                   # Python 3.12, manylinux x86_64 -> wheels/
    python -m bench.kit_wheels --python-version 3.11 --dest /tmp/w --dry-run   # print the pip commands

The target node has Python and torch but no registry, and none of the project's other packages. This
resolves the kit's requirements (`KIT_PACKAGES`, with pyproject.toml's version ranges) for that Python and
platform as the dependency closure of this machine's installed packages (pinned to the versions the test
suite runs here, markers evaluated for the node's Python), torch a leaf: the node's own build stays, and
its CUDA wheels, gigabytes, are never fetched. (pip's resolver, `pip install --dry-run --report`, cannot
be told to leave torch out: pip 23.2 downloaded whole torch wheels, 0.5 to 0.9 GB each, to backtrack.)
Then `pip download --no-deps --only-binary=:all:` exactly those pins. The project itself goes
in as a wheel built from this checkout (`pip wheel --no-deps`), and `requirements.txt` lists the pins, so
the node installs with

    python -m pip install --no-index --find-links wheels -r wheels/requirements.txt
    python -m pip install --no-index --no-deps wheels/m3jepa-*.whl

(`python -m bench.gpu_kit --wheels wheels` runs both). Left out, because the kit never imports them:
faiss (galleries are under eval.faiss_threshold), h5py (zarr stores), the serve stack (fastapi, uvicorn,
python-multipart), webdataset, soundfile, scipy and the offline encoders; tests/test_gpu_kit.py runs the kit
with those blocked. `--without numpy` (repeatable) leaves out a package the node already has.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What the kit imports: the store writer (zarr, numpy), the CLI (typer), training and evaluation
# (safetensors, tomli-w, tqdm, fsspec; matplotlib: `evaluate` draws its plots), the LoRA mode and stage 1
# on tiny random models (transformers, peft, pillow for the jsonl images)
KIT_PACKAGES = ("numpy", "zarr", "typer", "safetensors", "tomli-w", "tqdm", "fsspec", "matplotlib",
                "transformers", "peft", "pillow")
# The node has these already (torch and what only torch pulls): never fetched
# manylinux x86_64, glibc 2.28 or newer (pip matches the tags as given, so both spellings are listed)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LEAVES = re.compile(r"torch|triton|pytorch-triton|nvidia-.*|cuda-.*")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """KIT_PACKAGES with the version ranges pyproject.toml gives them (one source of truth)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    by_name = {canonical(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]): d for d in deps}
    missing = [p for p in KIT_PACKAGES if canonical(p) not in by_name]
    if missing:
        raise SystemExit(f"kit_wheels: {', '.join(missing)} not in pyproject.toml's dependencies")
    return [by_name[canonical(p)] for p in KIT_PACKAGES]


def target_args(python_version: str, platforms: list[str]) -> list[str]:
    """pip's options that resolve for another interpreter: binary wheels only, its version and platforms."""
    abi = "cp" + python_version.replace(".", "")
    plats = [a for p in platforms for a in ("--platform", p)]
    return ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none", *plats]


def target_env(python_version: str) -> dict[str, str]:
    """The marker environment of the node (PEP 508): its Python on Linux x86_64."""
    major_minor = ".".join(python_version.split(".")[:2])
    return {"python_version": major_minor, "python_full_version": f"{major_minor}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def installed_requires(name: str) -> tuple[str, list[str]] | None:
    """(version, requires_dist) of an installed distribution; None when it is not installed here."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, list(dist.requires or [])


Lookup = Callable[[str], tuple[str, list[str]] | None]


def needed(
    roots: list[str], python_version: str, lookup: Lookup = installed_requires, leaves: tuple[str, ...] = ()
) -> tuple[dict[str, str], list[str]]:
    """({name: version} pinned to what is installed here, [requirements not installed here]): the closure
    of `roots` over the installed packages' metadata, markers evaluated for the node's Python; torch and
    its CUDA wheels are leaves (LEAVES), so a package only torch needs is left to the node's torch; so is
    each of `leaves` (canonical names the node has).

    Pinning this machine's versions fetches what the test suite ran against; a requirement that applies
    on the node's Python but not here (a marker) is fetched by its own range, unpinned."""
    env = target_env(python_version)
    pins: dict[str, str] = {}
    unpinned: list[str] = []
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in pins or LEAVES.fullmatch(name) or name in leaves:
            continue
        if req.marker and not req.marker.evaluate(env):
            continue
        found = lookup(name)
        if found is None:
            if str(req) not in unpinned:
                unpinned.append(str(req))
            continue
        pins[name] = found[0]
        todo += [Requirement(r) for r in found[1]]
    return dict(sorted(pins.items())), sorted(unpinned)


def download_command(wanted: list[str], dest: Path, python_version: str, platforms: list[str]) -> list[str]:
    """`pip download --no-deps` of exactly `wanted` (name==version pins) for the node."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
            *target_args(python_version, platforms), *wanted]


def project_wheel_command(dest: Path) -> list[str]:
    """This checkout as a wheel (pure Python: any node takes it), its dependencies not resolved."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(ROOT)]


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def fetch(dest: Path, python_version: str, platforms: list[str], dry_run: bool = False,
          without: tuple[str, ...] = ()) -> list[str]:
    """Download the kit's wheels into `dest` and write dest/requirements.txt; the requirements fetched.
    `without`: packages the node has already (left out with what only they need)."""
    pins, unpinned = needed(requirements(), python_version, leaves=tuple(canonical(w) for w in without))
    wanted = [f"{n}=={v}" for n, v in pins.items()] + unpinned
    commands = [download_command(wanted, dest, python_version, platforms), project_wheel_command(dest)]
    if dry_run:
        for cmd in commands:
            print(" ".join(cmd))
        return wanted
    dest.mkdir(parents=True, exist_ok=True)
    for cmd in commands:
        run(cmd)
    (dest / "requirements.txt").write_text("".join(f"{w}\n" for w in wanted))
    return wanted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / "wheels",
                   help="where the wheels go (git ignores wheels/)")
    p.add_argument("--python-version", default="3.12", help="the node's Python, e.g. 3.12")
    p.add_argument("--platform", action="append", dest="platforms",
                   help=f"pip's platform tags of the node, repeatable (default: {', '.join(PLATFORMS)})")
    p.add_argument("--without", action="append", default=[], help="a package the node has (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the pip commands, download nothing")
    args = p.parse_args()
    wanted = fetch(args.dest, args.python_version, args.platforms or list(PLATFORMS), args.dry_run,
                   tuple(args.without))
    if not args.dry_run:
        size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
        print(f"{len(wanted)} wheels + m3jepa in {args.dest} ({size:.0f} MiB): {' '.join(wanted)}")


if __name__ == "__main__":
    main()
