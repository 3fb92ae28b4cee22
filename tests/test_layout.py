"""The package layout, checked from the source alone (``ast``; nothing is imported).

The rules of docs/DESIGN.md:

- layers import downward only: ``serving -> jaxengine -> models -> pallas_kernels``;
- inside ``jaxengine`` likewise: ``entrypoints -> engine -> config -> worker -> core -> structured_output -> sample``
  (``outputs`` and ``sampling_params`` are shared by all and import none of them);
- no import cycle between modules;
- no module over ``MAX_LINES`` lines outside ``pallas_kernels/`` (kernel files hold a body,
  its launcher and its wrapper together, and are allowed to be longer).

Every ``import``/``from ... import`` counts, wherever it is (module level, inside a
function, under ``if TYPE_CHECKING``): a lazy import hides a dependency from the reader but
not from the layering. Edges of the module graph:

- ``import a.b.c`` -> ``a.b.c`` (the deepest name that is one of our modules);
- ``from a.b import c`` -> ``a.b.c`` when ``c`` is a submodule, else ``a.b`` (its
  ``__init__``);
- relative imports are resolved against the importing module's package.

Parent packages' ``__init__`` files, which Python also runs on ``import a.b.c``, are not
edges: otherwise every package that re-exports a submodule would close a cycle with it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Top-level packages, lowest layer first: a package may import only those before it.
LAYERS = ("pallas_kernels", "models", "jaxengine", "serving")
MAX_LINES = 500
LINE_LIMIT_EXEMPT = ("pallas_kernels",)


@dataclass(frozen=True)
class Module:
    name: str  # dotted name, e.g. "jaxengine.engine.core"
    path: Path
    is_package: bool  # an __init__.py


def find_modules(root: Path, packages=LAYERS) -> dict[str, Module]:
    modules = {}
    for top in packages:
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            modules[name] = Module(name, path, is_package)
    return modules


def _resolve_relative(module: Module, level: int, target: str | None) -> str:
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 > len(package):
        raise ValueError(f"{module.path}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    if target:
        base = base + target.split(".")
    return ".".join(base)


def _deepest_known(name: str, modules: dict[str, Module]) -> str | None:
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


@dataclass(frozen=True)
class ImportEdge:
    importer: str
    imported: str
    lineno: int


def module_imports(module: Module, modules: dict[str, Module]) -> list[ImportEdge]:
    """Every import of one of our modules in ``module``'s source."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    edges = []

    def add(target: str | None, lineno: int) -> None:
        if target is not None and target != module.name:
            edges.append(ImportEdge(module.name, target, lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_deepest_known(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if alias.name != "*" and submodule in modules:
                    add(submodule, node.lineno)
                else:
                    add(_deepest_known(base, modules), node.lineno)
    return edges


def import_graph(modules: dict[str, Module]) -> dict[str, list[ImportEdge]]:
    return {name: module_imports(mod, modules) for name, mod in modules.items()}


def _layer(name: str) -> int:
    return LAYERS.index(name.split(".")[0])


def upward_imports(graph: dict[str, list[ImportEdge]]) -> list[str]:
    found = []
    for name, edges in sorted(graph.items()):
        for e in edges:
            if _layer(e.imported) > _layer(e.importer):
                found.append(f"{e.importer} (line {e.lineno}) imports {e.imported}")
    return found


def import_cycles(graph: dict[str, list[ImportEdge]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as one cycle
    through its modules, starting and ending at its smallest name."""
    adjacency = {n: sorted({e.imported for e in edges}) for n, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    # Iterative Tarjan, so a deep import chain cannot hit the recursion limit.
    for start in sorted(adjacency):
        if start in index:
            continue
        work = [(start, iter(adjacency[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in adjacency:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    cycles = []
    for component in sorted(components):
        members = set(component)
        cycles.append(_cycle_through(component[0], members, adjacency))
    return cycles


def _cycle_through(start: str, members: set[str], adjacency: dict[str, list[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in adjacency[node]:
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


# Inside jaxengine: its rooms, highest first; a room may import only rooms after it. Shared
# modules (the user-facing value types) import no room and may be imported by any.
JAXENGINE_ROOMS = ("entrypoints", "engine", "config", "worker", "core", "structured_output", "sample")
JAXENGINE_SHARED = ("outputs", "sampling_params")


def jaxengine_room(name: str) -> str | None:
    """The room of a jaxengine module: a ROOMS entry, "shared", "facade" (the package's
    __init__) or None (a module not assigned to any)."""
    parts = name.split(".")
    if parts[0] != "jaxengine":
        return None
    if len(parts) == 1:
        return "facade"
    if parts[1] in JAXENGINE_ROOMS:
        return parts[1]
    return "shared" if parts[1] in JAXENGINE_SHARED else None


def jaxengine_room_violations(graph: dict[str, list[ImportEdge]]) -> list[str]:
    found = []
    for name, edges in sorted(graph.items()):
        if not name.startswith("jaxengine"):
            continue
        src = jaxengine_room(name)
        if src is None:
            found.append(f"{name} is in no room of jaxengine (add it to JAXENGINE_ROOMS or JAXENGINE_SHARED)")
            continue
        for e in edges:
            dst = jaxengine_room(e.imported)
            if dst is None or src == dst or src == "facade":
                continue
            if dst == "facade":
                ok = False  # the facade imports everything: importing it from inside is a cycle
            elif src == "shared":
                ok = dst == "shared"
            elif dst == "shared":
                ok = True
            else:
                ok = JAXENGINE_ROOMS.index(dst) > JAXENGINE_ROOMS.index(src)
            if not ok:
                found.append(f"{name} ({src}, line {e.lineno}) imports {e.imported} ({dst})")
    return found


def long_modules(modules: dict[str, Module], max_lines=MAX_LINES) -> list[str]:
    found = []
    for name, mod in sorted(modules.items()):
        if name.split(".")[0] in LINE_LIMIT_EXEMPT:
            continue
        n = len(mod.path.read_text(encoding="utf-8").splitlines())
        if n > max_lines:
            shown = mod.path.relative_to(REPO) if mod.path.is_relative_to(REPO) else mod.path
            found.append(f"{shown}: {n} lines")
    return found


# --- the repository ---------------------------------------------------------------------

_MODULES = find_modules(REPO)
_GRAPH = import_graph(_MODULES)


def test_the_walk_sees_the_packages():
    # A guard against checking nothing (a moved root, a wrong REPO).
    for top in LAYERS:
        assert top in _MODULES, f"{top}/__init__.py not found under {REPO}"
    assert len(_MODULES) > 40
    assert sum(len(e) for e in _GRAPH.values()) > 100


def test_no_upward_import():
    found = upward_imports(_GRAPH)
    assert not found, "imports against the layers serving -> jaxengine -> models -> pallas_kernels:\n" + "\n".join(found)


def test_no_import_cycle():
    cycles = import_cycles(_GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_jaxengine_rooms_import_downward():
    # entrypoints -> engine -> config -> worker -> core -> structured_output -> sample (docs/DESIGN.md)
    found = jaxengine_room_violations(_GRAPH)
    assert not found, "imports against jaxengine's rooms " + " -> ".join(JAXENGINE_ROOMS) + ":\n" + "\n".join(found)


def test_no_module_over_500_lines_outside_pallas_kernels():
    found = long_modules(_MODULES)
    assert not found, f"modules over {MAX_LINES} lines:\n" + "\n".join(found)


# --- the checker itself, on a tree made for it -------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_and_upward_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pallas_kernels/__init__.py": "",
            "pallas_kernels/k.py": "def f():\n    from models import m  # upward, lazy\n",
            "models/__init__.py": "",
            "models/m.py": "import pallas_kernels.k\n",
            "jaxengine/__init__.py": "from .engine import core\n",
            "jaxengine/engine/__init__.py": "",
            # a cycle of three through a relative import, a package import and a submodule
            "jaxengine/engine/core.py": "from ..worker import runner\n",
            "jaxengine/worker/__init__.py": "",
            "jaxengine/worker/runner.py": "import jaxengine.worker.helpers as h\n",
            "jaxengine/worker/helpers.py": "def g():\n    from jaxengine.engine.core import x\n",
            # the facade imported from inside: jaxengine -> engine.core is already an edge
            "jaxengine/sample.py": "from jaxengine import core\n",
            "serving/__init__.py": "",
            "serving/s.py": "import jaxengine\n" + "x = 1\n" * (MAX_LINES + 1),
        },
    )
    modules = find_modules(tmp_path)
    graph = import_graph(modules)

    assert {(e.importer, e.imported) for e in graph["jaxengine.sample"]} == {("jaxengine.sample", "jaxengine")}
    assert {e.imported for e in graph["jaxengine.engine.core"]} == {"jaxengine.worker.runner"}

    up = upward_imports(graph)
    assert up == ["pallas_kernels.k (line 2) imports models.m"]

    cycles = import_cycles(graph)
    as_sets = [set(c) for c in cycles]
    assert {"jaxengine.engine.core", "jaxengine.worker.runner", "jaxengine.worker.helpers"} in as_sets
    assert {"models.m", "pallas_kernels.k"} in as_sets
    for c in cycles:
        assert c[0] == c[-1]
        for a, b in zip(c, c[1:]):
            assert b in {e.imported for e in graph[a]}, (a, b)

    assert [s.split(":")[0] for s in long_modules(modules)] == [str(tmp_path / "serving/s.py")]

    # jaxengine.sample imports the facade; worker.helpers (worker) imports engine.core (engine)
    rooms = jaxengine_room_violations(graph)
    assert any(r.startswith("jaxengine.worker.helpers (worker") and "jaxengine.engine.core (engine)" in r for r in rooms)
    assert any(r.startswith("jaxengine.sample (sample") and r.endswith("imports jaxengine (facade)") for r in rooms)


def test_checker_passes_a_clean_tree(tmp_path):
    _write(
        tmp_path,
        {
            "pallas_kernels/__init__.py": "from .k import f\n",
            "pallas_kernels/k.py": "import math\n",
            "models/__init__.py": "",
            "models/m.py": "from pallas_kernels import f\nfrom . import other\n",
            "models/other.py": "",
            "jaxengine/__init__.py": "from jaxengine.engine.a import x\n",
            "jaxengine/engine/__init__.py": "",
            "jaxengine/engine/a.py": "import models.m\nfrom jaxengine.core import b\nfrom ..outputs import Out\n",
            "jaxengine/core/__init__.py": "",
            "jaxengine/core/b.py": "from jaxengine.outputs import Out\n",
            "jaxengine/outputs.py": "",
            "serving/__init__.py": "import jaxengine\n",
        },
    )
    modules = find_modules(tmp_path)
    graph = import_graph(modules)
    assert upward_imports(graph) == []
    assert import_cycles(graph) == []
    assert jaxengine_room_violations(graph) == []
    assert {e.imported for e in graph["models.m"]} == {"pallas_kernels", "models.other"}
    assert {e.imported for e in graph["jaxengine.engine.a"]} == {"models.m", "jaxengine.core.b", "jaxengine.outputs"}
