"""The floors of the house (issue 9, DESIGN.md "Data path vs control path"), checked on the source.

Every ``.py`` under lib/flexemr, flexemrd, emrctl and flexemr_bench is parsed
(nothing is imported) and every import statement is collected, at module level
and inside functions alike, since a function-level import still makes the one
module depend on the other.  Imports under ``if TYPE_CHECKING:`` never run and
are left out.  Three rules:

* ``lib/flexemr`` is the bottom floor: it never imports ``flexemrd``,
  ``emrctl`` or ``flexemr_bench``;
* data-path modules (wire, ring, transport, routing, pooling, enginemsg, the
  row cache) never import the control path (``flexemr.control``), logging
  handlers, click or json;
* there is no import cycle anywhere between modules of these packages.

An import ``from pkg import name`` counts as an import of ``pkg.name`` when
that is a module and of ``pkg`` otherwise; importing ``pkg.sub`` is not
counted as importing ``pkg`` (a package that imports its own submodules would
otherwise be a cycle with each of them).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (directory holding the top-level package, package name)
PACKAGES = [(ROOT / "lib", "flexemr"), (ROOT, "flexemrd"), (ROOT, "emrctl"), (ROOT, "flexemr_bench")]
ABOVE_LIB = ("flexemrd", "emrctl", "flexemr_bench")
DATA_PATH = ("flexemr.wire", "flexemr.ring", "flexemr.transport", "flexemr.routing", "flexemr.pooling",
             "flexemr.enginemsg", "flexemr.cache.rowcache")
NOT_ON_DATA_PATH = ("flexemr.control", "logging.handlers", "click", "json")


@dataclasses.dataclass(frozen=True)
class Import:
    source: str   # importing module
    target: str   # imported module (most specific module the statement names)
    path: str     # file of the importing module, relative to the repository
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the packages present in this checkout."""
    out: dict[str, Path] = {}
    for base, pkg in PACKAGES:
        top = base / pkg
        if not top.is_dir():
            continue
        for f in sorted(top.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking_only(child):
            for sub in child.orelse:
                yield sub
                yield from _walk(sub)
            continue
        yield child
        yield from _walk(child)


def _resolve_relative(module: str, level: int, name: str | None) -> str:
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(ROOT))
    out: list[Import] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, alias.name, rel, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            pkg = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                sub = f"{pkg}.{alias.name}"
                out.append(Import(module, sub if sub in MODULES else pkg, rel, node.lineno))
    return out


IMPORTS = sorted({imp for m, p in MODULES.items() for imp in _imports_of(m, p)},
                 key=lambda i: (i.path, i.line, i.target))


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _report(title: str, bad: list[Import]) -> str:
    return f"{title} ({len(bad)}):\n  " + "\n  ".join(f"{i.where()}: {i.source} imports {i.target}" for i in bad)


def test_the_walk_sees_the_tree():
    """Guards the test itself: a broken walk would find no violations at all."""
    assert "flexemr.control.block" in MODULES and "flexemrd.supervisor" in MODULES and "emrctl.cli" in MODULES
    assert any(i.source == "flexemr.control.mailbox" and i.target == "flexemr.control.block" for i in IMPORTS)


def test_lib_never_imports_the_daemon_the_cli_or_the_benchmarks():
    bad = [i for i in IMPORTS if _within(i.source, ("flexemr",)) and _within(i.target, ABOVE_LIB)]
    assert not bad, _report("lib/flexemr imports a package above it", bad)


def test_data_path_never_imports_the_control_path():
    bad = [i for i in IMPORTS if _within(i.source, DATA_PATH) and _within(i.target, NOT_ON_DATA_PATH)]
    assert not bad, _report("a data-path module imports control-path code, logging handlers, click or json", bad)


def _graph() -> dict[str, dict[str, Import]]:
    g: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.source:
            g[i.source].setdefault(i.target, i)
    return g


def _cycles(g: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (as a module path, first == last) per strongly connected component (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    out = []
    for comp in comps:
        members = set(comp)
        covered: set[str] = set()
        for start in comp:  # one cycle through every member not on a cycle printed already
            if start in covered:
                continue
            cyc = _shortest_cycle(g, members, start)
            covered.update(cyc)
            out.append(cyc)
    return out


def _shortest_cycle(g: dict[str, dict[str, Import]], members: set[str], start: str) -> list[str]:
    """The shortest way from ``start`` back to itself inside one component (BFS), first == last."""
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle but no path back was found")


def test_no_import_cycles():
    g = _graph()
    lines = []
    for cyc in _cycles(g):
        hops = " -> ".join(cyc)
        wheres = ", ".join(g[a][b].where() for a, b in zip(cyc, cyc[1:]))
        lines.append(f"{hops}  ({wheres})")
    assert not lines, f"import cycles ({len(lines)}):\n  " + "\n  ".join(lines)


def test_function_level_imports_count_and_type_checking_ones_do_not():
    """Guards the resolver: loader imports dense inside functions; snapshot names ControlBlock for annotations only."""
    g = _graph()
    assert "flexemr.model.dense" in g["flexemr.model.loader"]
    assert "flexemr.control.block" not in g["flexemr.control.snapshot"]
