"""The package's layout holds (docs/architecture.md, "The tree"): imports go one way between
folders, and no module imports itself back through others.

Read from the source with `ast`, lazy imports inside functions included (a lazy import is
still a dependency), so a violation fails here before anyone has to notice it in a review.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ant_dist"

# folder (or top-level module) -> what it may import besides itself. Entry points
# (`python -m ant_dist.<stage>`, the top-level modules not named here) may import anything.
ALLOWED = {
    "runtime": set(),
    "methods": set(),
    "config": {"runtime", "methods"},
    "data": {"runtime", "config", "methods"},
    "features": {"runtime", "config", "data"},
    "model": {"runtime", "config"},
    "eval": {"runtime", "config", "methods", "data", "features", "model"},
    "serving": {"runtime", "config", "data", "features", "model", "eval"},
    "train": {"runtime", "config", "methods", "data", "features", "model", "eval"},
    "baselines": {"runtime", "config", "methods", "data", "features", "eval", "train"},
    "pipeline": {"runtime", "config", "methods", "data", "features", "model", "eval", "serving", "train",
                 "baselines"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The ant_dist modules `name` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
    return {m for m in found if m.split(".")[0] == "ant_dist" and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d} ({_area(m)} may import only {sorted(ALLOWED[_area(m)]) or 'itself'})"
                  for m, deps in graph.items() if _area(m) in ALLOWED for d in deps
                  if d != "ant_dist" and _area(d) != _area(m) and _area(d) not in ALLOWED[_area(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_folder_of_the_package_has_a_rule():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(ALLOWED), f"folders without an import rule: {folders - set(ALLOWED)}"


def test_imports_go_one_way():
    assert not violations(GRAPH), "\n".join(violations(GRAPH))


def test_no_import_cycle():
    assert not cycles(GRAPH), f"import cycles: {cycles(GRAPH)}"


def test_the_checks_find_a_wrong_way_import_and_a_cycle():
    assert violations({"ant_dist.model.ant": {"ant_dist.train.loop"}}) == [
        "ant_dist.model.ant imports ant_dist.train.loop (model may import only ['config', 'runtime'])"]
    assert violations({"ant_dist.eval.report": {"ant_dist.train.loop"}}), "evaluation never reads the loop"
    assert violations({"ant_dist.runtime.locking": {"ant_dist.data.pack"}}), "the runtime imports no stage"
    assert not violations({"ant_dist.train.loop": {"ant_dist.model.ant", "ant_dist.eval.metrics"}})
    graph = {"ant_dist.a": {"ant_dist.b"}, "ant_dist.b": {"ant_dist.c"}, "ant_dist.c": {"ant_dist.a"},
             "ant_dist.d": {"ant_dist.a"}}
    assert cycles(graph) == [["ant_dist.a", "ant_dist.b", "ant_dist.c"]]
