"""The medleak package's imports run one way: no cycle, deferred (function-level) imports included.

    python tests/test_import_graph.py     # prints every cycle and privacy_utils → campaign edge

The graph is read from the source with `ast` (nothing is imported): an edge a → b for every
`import b` / `from b import …` anywhere in module a, also inside functions, so a cycle cannot hide
behind a deferred import. `from package import name` points at `package.name` when that is a module.
"""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "medleak"


def module_names(src=SRC, package=PACKAGE) -> dict:
    """{dotted module name: path} of every module of `package` under `src`."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(src=SRC, package=PACKAGE) -> dict:
    """{module: set of medleak modules it imports}."""
    modules = module_names(src, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph) -> list:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def forbidden_edges(graph, importer_prefix, imported_prefix) -> list:
    return sorted((a, b) for a, edges in graph.items() if a.startswith(importer_prefix)
                  for b in edges if b.startswith(imported_prefix))


def test_cycle_finder_finds_a_planted_cycle_and_a_deferred_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.c import g\n")  # deferred: still an edge
    (package / "c.py").write_text("from . import a\nimport pkg.d\n")
    (package / "d.py").write_text("import os\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a", "pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_medleak_import_graph_has_no_cycle():
    graph = import_graph()
    assert "medleak.privacy_utils.audit" in graph and graph["medleak.privacy_utils.audit"]
    assert cycles(graph) == []


def test_privacy_utils_does_not_import_campaign():
    assert forbidden_edges(import_graph(), "medleak.privacy_utils", "medleak.campaign") == []


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    for component in found:
        print("cycle:", " ↔ ".join(component))
    for a, b in forbidden_edges(graph, "medleak.privacy_utils", "medleak.campaign"):
        print(f"forbidden: {a} imports {b}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, {len(found)} cycle(s)")
    sys.exit(1 if found else 0)
