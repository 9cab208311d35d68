"""The import rules of docs/architecture.md, checked on the source: one-way package layers, no circles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "m3jepa"

# Each package's layer: a package may import only packages of a lower layer (or itself). Imports inside
# functions count too: a lazy import is still a dependency.
LAYERS: dict[str, int] = {
    "files": 0,
    "location": 0,  # store locations: a local Path or an fsspec URL (StoreURL), and their file operations
    "knn": 0,  # the plain exact search: eval scores with it, accel.search certifies against it
    "progress": 0,  # encode's and train's progress: a tqdm bar on a terminal, summary lines elsewhere
    "config": 0,
    "device_table": 0,  # the device table: torch only, read by distributed, encoders, encode and core
    "data": 1,
    "prefetch": 1,
    "pipelines": 1,  # the shipped pipeline files and name resolution (raises config's ConfigError)
    "distributed": 1,
    "store": 2,
    "encoders": 2,
    "model": 2,
    "encode": 3,
    "accel": 3,
    "core": 4,
    "lora": 5,
    "eval": 6,
    "train": 7,
    "runner": 8,
    "api": 6,  # m3jepa.load: the model object over core (its loader) and (lazily) encoders and lora; beside
    # eval, so neither imports the other
    "search": 9,  # embed / index / search over a loaded model
    "serve": 10,  # the HTTP service and its page, over search
    "cli": 11,
    "__main__": 12,
    "__init__": 12,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the m3jepa modules it imports (resolved to modules that exist), lazy imports included."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                if not t.startswith("m3jepa"):
                    continue
                while t and t not in modules:  # `from pkg import name`: the module is pkg
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
        graph.setdefault(name, set())
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    missing = {_package(m) for m in import_graph()} - set(LAYERS)
    assert not missing, f"add these packages to LAYERS (and docs/architecture.md): {sorted(missing)}"


def test_packages_import_only_lower_layers():
    bad = []
    for mod, deps in import_graph().items():
        for dep in deps:
            a, b = _package(mod), _package(dep)
            if a != b and dep != "m3jepa" and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_circles():
    # a package's __init__ re-exporting its modules is not a circle of behaviour; leave it out
    graph = {m: {d for d in deps if not _is_init_of(d, m)} for m, deps in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _is_init_of(dep: str, mod: str) -> bool:
    return mod.startswith(dep + ".") and (ROOT.parent / dep.replace(".", "/") / "__init__.py").exists()


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_run_folder_layout_has_one_owner():
    """No module but m3jepa/core/layout.py spells a run folder's file names: where a run keeps its
    checkpoints, config, stores record, logs and galleries is decided in one place."""
    names = {"checkpoints", "config.toml", "stores.json", "provenance.json", "metrics.jsonl", "metrics.csv",
             "trainable.json", "embedded", ".lock", "best", "latest"}
    found = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).as_posix() == "core/layout.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        keys = {id(k) for d in ast.walk(tree) if isinstance(d, ast.Dict) for k in d.keys}  # JSON keys: fine
        for node in ast.walk(tree):
            literal = isinstance(node, ast.Constant) and id(node) not in keys
            if literal and node.value in names - {"best", "latest"}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            # a path built from a literal: run / "checkpoints" / "best"
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                    and isinstance(node.right, ast.Constant) and node.right.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} / {node.right.value!r}")
    assert not found, "use m3jepa.core.layout (RunDir, ExportDir):\n" + "\n".join(sorted(set(found)))
