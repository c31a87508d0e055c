"""The import graph of ``src/spannorm`` against docs/architecture.md: no cycles between modules, no import from a
layer to a higher one, and a stated reason beside every import written inside a function.

The layers are read from the table in docs/architecture.md, so the doc and this test cannot disagree.
``python tests/test_architecture.py`` prints every violation found today.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "src" / "spannorm"
DOC = REPO / "docs" / "architecture.md"

KNOWN_VIOLATIONS: dict[str, list[tuple[str, ...]]] = {
    # Violations the code has, to be removed, not added to: delete an entry when its violation is fixed (a test
    # fails while a stale entry is left). Emptied in December 2026; keep it empty.
    #
    # Import cycles, each given as the modules of one strongly connected component, sorted.
    "cycles": [],
    # Imports from a layer to a higher one: (importing module, imported module).
    "upward": [],
    # Imports inside a function with no comment giving the reason: (module, function, imported module).
    "unexplained": [],
}

NOT_A_REASON = re.compile(r"\b(cycle|cycles|circular|circle|circles)\b", re.IGNORECASE)
"""The house rule: breaking an import cycle is not a reason for an import inside a function."""


# ---------------------------------------------------------------------------------------------------------------
# The layer table


def read_layers(doc_text: str) -> list[tuple[int, list[str]]]:
    """The rows ``| N | `path`, `path` | ... |`` of the layer table: (layer, paths under src/spannorm)."""
    rows = []
    for line in doc_text.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            rows.append((int(match.group(1)), re.findall(r"`([^`]+)`", match.group(2))))
    return rows


def layer_of(path: str, rows: list[tuple[int, list[str]]]) -> int | None:
    """The layer of a file (path relative to the package folder): the row naming it or its longest folder."""
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for layer, entries in rows:
        for entry in entries:
            hit = path.startswith(entry) if entry.endswith("/") else path == entry
            if hit and (best is None or len(entry) > best[0]):
                best = (len(entry), layer)
    return None if best is None else best[1]


# ---------------------------------------------------------------------------------------------------------------
# The import graph


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # the imported module (for our own package: the module or package the import loads)
    kind: str  # "top" (at module level), "function" (inside a function) or "type" (under `if TYPE_CHECKING:`)
    function: str  # the enclosing function's qualified name, "" at module level
    line: int
    reason: str | None  # for an import inside a function: the comment on its lines or the line above


def module_files(package_dir: Path) -> dict[str, Path]:
    """Module name -> file for every module of the package in ``package_dir``."""
    top = package_dir.name
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [top, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line -> (comment text, whether the line holds nothing but the comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[:tok.start[1]].strip()
            out[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: dict[str, Path]) -> str:
    """A dotted name inside our package -> the longest prefix that is one of its modules."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else name


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[Import]:
    source = path.read_text()
    comments = _comments(source)
    top = next(iter(known)).split(".")[0]
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def reason_for(node: ast.stmt) -> str | None:
        end = node.end_lineno or node.lineno
        texts = [comments[n][0] for n in range(node.lineno, end + 1) if n in comments]
        above = comments.get(node.lineno - 1)
        if above and above[1]:
            texts.insert(0, above[0])
        return " ".join(texts) if texts else None

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            return [_resolve(n, known) if n.split(".")[0] == top else n for n in names]
        base = node.module or ""
        if node.level:  # relative: from the package holding this module
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        if base.split(".")[0] != top:
            return [base]
        return [_resolve(f"{base}.{alias.name}", known) for alias in node.names]

    def visit(nodes, scope: str, in_function: bool, type_only: bool) -> None:
        """``scope``: the qualified name of the enclosing class or function ("" at module level)."""
        for child in nodes:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                kind = "function" if in_function else "type" if type_only else "top"
                function, reason = (scope, reason_for(child)) if in_function else ("", None)
                for target in dict.fromkeys(targets(child)):
                    found.append(Import(module, target, kind, function, child.lineno, reason))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
                is_function = in_function or not isinstance(child, ast.ClassDef)
                visit(ast.iter_child_nodes(child), inner, is_function, type_only)
            elif isinstance(child, ast.If) and not in_function and _is_type_checking(child.test):
                visit(child.body, scope, in_function, True)
                visit(child.orelse, scope, in_function, type_only)
            else:
                visit(ast.iter_child_nodes(child), scope, in_function, type_only)

    visit(ast.parse(source).body, "", False, False)
    return found


def import_graph(package_dir: Path) -> tuple[dict[str, Path], list[Import]]:
    known = module_files(package_dir)
    return known, [imp for module, path in known.items() for imp in imports_of(module, path, known)]


def cycles(modules: list[str], imports: list[Import]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (or a module importing itself), over every import:
    at the top, inside functions and type-only (a type-only cycle still means a type lives in the wrong module)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in edges:
            edges[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                out.append(tuple(sorted(component)))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(modules) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(out)


def upward_imports(package_dir: Path, known: dict[str, Path], imports: list[Import], rows) -> list[tuple[str, str]]:
    layers = {m: layer_of(p.relative_to(package_dir).as_posix(), rows) for m, p in known.items()}
    out = set()
    for imp in imports:
        if imp.target in layers:
            src, dst = layers[imp.importer], layers[imp.target]
            if src is not None and dst is not None and dst > src:
                out.add((imp.importer, imp.target))
    return sorted(out)


def unexplained_imports(imports: list[Import]) -> list[tuple[str, str, str]]:
    out = set()
    for imp in imports:
        if imp.kind == "function" and (imp.reason is None or NOT_A_REASON.search(imp.reason)):
            out.add((imp.importer, imp.function, imp.target))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------------------
# Today's code


@pytest.fixture(scope="module")
def rows():
    return read_layers(DOC.read_text())


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR)


def test_the_doc_has_one_row_per_layer_in_order(rows):
    assert [layer for layer, _ in rows] == list(range(len(rows))) and len(rows) >= 5, rows
    entries = [entry for _, entries in rows for entry in entries]
    assert len(entries) == len(set(entries)), f"a path in two layers: {entries}"
    assert {"config.py", "model/", "train/", "cli/"} <= set(entries)


def test_every_module_has_a_layer(rows, graph):
    known, _ = graph
    missing = [m for m, p in known.items() if layer_of(p.relative_to(PACKAGE_DIR).as_posix(), rows) is None]
    assert not missing, f"add these to a row of the layer table in {DOC.relative_to(REPO)}: {missing}"


def _new_and_stale(found: list, known: list) -> tuple[list, list]:
    return [v for v in found if v not in known], [v for v in known if v not in found]


def test_no_new_import_cycle(graph):
    known, imports = graph
    found = cycles(list(known), imports)
    new = [c for c in found if not any(set(c) <= set(k) for k in KNOWN_VIOLATIONS["cycles"])]
    assert not new, f"import cycles: {new}\n" + _describe(imports, {m for c in new for m in c})


def test_no_new_import_from_a_lower_layer_to_a_higher_one(rows, graph):
    known, imports = graph
    new, _ = _new_and_stale(upward_imports(PACKAGE_DIR, known, imports, rows), KNOWN_VIOLATIONS["upward"])
    assert not new, f"imports from a layer to a higher one ({DOC.relative_to(REPO)}): {new}"


def test_every_new_import_inside_a_function_states_its_reason(graph):
    known, imports = graph
    new, _ = _new_and_stale(unexplained_imports(imports), KNOWN_VIOLATIONS["unexplained"])
    lines = [f"{known[imp.importer].relative_to(REPO)}:{imp.line} {imp.function}: import {imp.target}"
             for imp in imports if (imp.importer, imp.function, imp.target) in new]
    assert not new, ("an import inside a function needs a comment on its line or the line above saying why "
                     "(an optional dependency, start-up time; not a cycle):\n" + "\n".join(lines))


def test_known_violations_are_still_there(rows, graph):
    """Keeps KNOWN_VIOLATIONS honest: a fixed violation must leave the list, so that it cannot come back."""
    known, imports = graph
    found_cycles = cycles(list(known), imports)
    stale = {
        "cycles": [k for k in KNOWN_VIOLATIONS["cycles"] if k not in found_cycles],  # gone, or now smaller
        "upward": _new_and_stale(upward_imports(PACKAGE_DIR, known, imports, rows), KNOWN_VIOLATIONS["upward"])[1],
        "unexplained": _new_and_stale(unexplained_imports(imports), KNOWN_VIOLATIONS["unexplained"])[1],
    }
    assert not any(stale.values()), f"fixed, so delete from KNOWN_VIOLATIONS: {stale}"


def _describe(imports: list[Import], modules: set[str]) -> str:
    return "\n".join(f"  {i.importer}:{i.line} -> {i.target} ({i.kind})" for i in imports
                     if i.importer in modules and i.target in modules)


# ---------------------------------------------------------------------------------------------------------------
# The checker itself, on a made-up package


LAYERS_DOC = """
| layer | code | what |
|---|---|---|
| 0 | `base.py` | bottom |
| 1 | `mid/` | middle |
| 2 | `top.py`, `__init__.py` | top |
"""

FAKE = {
    "__init__.py": "",
    "base.py": """
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from pkg.top import Thing  # type-only, but still upward

        def late():
            import json  # start-up time
            # an optional dependency
            import yaml
            import csv
            from pkg import top  # breaks a cycle
            return json, yaml, csv, top
        """,
    "mid/__init__.py": "from . import a\nfrom pkg.mid import b\n",
    "mid/a.py": "from pkg.mid.b import f\nfrom .. import base\n",
    "mid/b.py": "import pkg.mid.a\ndef f():\n    pass\n",
    "top.py": "import pkg.base\nclass Thing:\n    def m(self):\n        import os\n",
}


@pytest.fixture()
def fake_package(tmp_path) -> Path:
    for name, text in FAKE.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


def test_checker_reads_imports_of_each_kind(fake_package):
    known, imports = import_graph(fake_package)
    assert set(known) == {"pkg", "pkg.base", "pkg.mid", "pkg.mid.a", "pkg.mid.b", "pkg.top"}
    got = {(i.importer, i.target, i.kind, i.function) for i in imports}
    assert got == {
        ("pkg.base", "typing", "top", ""), ("pkg.base", "pkg.top", "type", ""),
        ("pkg.base", "json", "function", "late"), ("pkg.base", "yaml", "function", "late"),
        ("pkg.base", "csv", "function", "late"), ("pkg.base", "pkg.top", "function", "late"),
        ("pkg.mid", "pkg.mid.a", "top", ""), ("pkg.mid", "pkg.mid.b", "top", ""), ("pkg.mid.a", "pkg.mid.b", "top", ""),
        ("pkg.mid.a", "pkg.base", "top", ""), ("pkg.mid.b", "pkg.mid.a", "top", ""),
        ("pkg.top", "pkg.base", "top", ""),
        ("pkg.top", "os", "function", "Thing.m"),
    }


def test_checker_finds_cycles_upward_imports_and_missing_reasons(fake_package):
    known, imports = import_graph(fake_package)
    rows = read_layers(LAYERS_DOC)
    assert rows == [(0, ["base.py"]), (1, ["mid/"]), (2, ["top.py", "__init__.py"])]
    # base -> top (type-only and in a function) and top -> base make a cycle; mid.a and mid.b import each other
    assert cycles(list(known), imports) == [("pkg.base", "pkg.top"), ("pkg.mid.a", "pkg.mid.b")]
    assert upward_imports(fake_package, known, imports, rows) == [("pkg.base", "pkg.top")]
    assert unexplained_imports(imports) == [("pkg.base", "late", "csv"), ("pkg.base", "late", "pkg.top"),
                                            ("pkg.top", "Thing.m", "os")]
    assert layer_of("mid/deeper/x.py", rows) == 1 and layer_of("other.py", rows) is None


def summary() -> str:
    rows = read_layers(DOC.read_text())
    known, imports = import_graph(PACKAGE_DIR)
    kinds = {k: sum(1 for i in imports if i.kind == k) for k in ("top", "function", "type")}
    unexplained = unexplained_imports(imports)
    lines = [f"{len(known)} modules; imports: {kinds}",
             f"cycles ({len(cycles(list(known), imports))}):"]
    lines += [f"  {' <-> '.join(c)}" for c in cycles(list(known), imports)]
    upward = upward_imports(PACKAGE_DIR, known, imports, rows)
    lines.append(f"imports to a higher layer ({len(upward)}):")
    lines += [f"  {a} -> {b}" for a, b in upward]
    lines.append(f"imports inside functions without a reason: {len(unexplained)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
